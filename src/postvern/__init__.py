"""Postvern: a self-hosted mail server with zero-access encrypted mailboxes."""

__version__ = "0.1.0"
