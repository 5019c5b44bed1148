"""The web account portal: server-rendered pages on the HTTPS listener, for users and
administrators. It renders and calls :mod:`postvern.accounts`; it keeps no state of its own
but the in-memory session store."""
