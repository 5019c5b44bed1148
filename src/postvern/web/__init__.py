"""HTTPS: the MTA-STS policy, client autoconfiguration, and the account portal."""
