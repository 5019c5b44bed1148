"""IMAP command grammar (RFC 9051 §9): tokens (:mod:`.lexer`), typed commands
(:mod:`.commands`) and the rules that build one from the other (:mod:`.parse`)."""
