"""SMTP server side, shared by the MX (port 25) and submission (465, 587) listeners.

``protocol`` is the sans-I/O core (bytes in, events out, replies back to bytes); ``session``
runs it on asyncio with TLS, timeouts and connection limits, and asks a ``Handler`` for every
policy decision. ``address``, ``commands``, ``replies`` and ``sasl`` are the pieces of syntax
and vocabulary both share.
"""
