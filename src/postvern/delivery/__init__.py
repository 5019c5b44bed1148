"""The inbound pipeline: recipients, checks, filters, verdict, and durable delivery."""
