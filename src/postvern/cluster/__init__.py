"""Postvern on several machines (issue #20, docs/cluster.md).

Fronts are stateless and proxy IMAP/POP3 to the mailbox node that owns the user; mail goes to
that node by LMTP from the front's durable relay queue; every internal connection is mutual
TLS under the cluster's own CA. One concern per module:

- :mod:`.nodes`: the node list (``cluster/nodes.toml``) and this node's settings
- :mod:`.pki`: the internal CA, node certificates, the mutual-TLS contexts
- :mod:`.proxyline`: the HAProxy PROXY v1 line that carries the client's address
- :mod:`.placement`: which mailbox node owns a user
- :mod:`.lmtp`: LMTP (RFC 2033), server core and client
- :mod:`.backend`: a mailbox node's internal listener (IMAP, POP3, LMTP by ALPN)
- :mod:`.relay`: the front's relay queue and the task that empties it
- :mod:`.proxy`: the front's IMAP and POP3 proxies
- :mod:`.node`: wiring into the server; :mod:`.commands`: ``postvern cluster ...``
"""
