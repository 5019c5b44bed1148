"""Operations: the DNS records a domain needs, backups, log hygiene, health checks."""
