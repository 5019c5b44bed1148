"""COMPRESS=DEFLATE (RFC 4978): raw deflate (RFC 1951) over the whole connection, sans I/O.

Output is compressed as it is queued and sync-flushed when handed to the socket, so the client
can always decode what it has. Input is inflated in bounded steps, only as fast as the command
framer consumes it: a small "deflate bomb" can never expand into more than one step of memory.
"""

from __future__ import annotations

import zlib

# RFC 4978 §3: raw deflate, no zlib header or checksum (negative window bits).
_RAW_DEFLATE = -15
# Decompressed octets produced per step. Memory held by one connection is this plus the
# framer's own limits, however well the input compresses (a 1000:1 bomb gains nothing).
INFLATE_STEP = 64 * 1024
# Compressed octets given to zlib per step; the rest waits in the input buffer.
INPUT_STEP = 16 * 1024
# RFC 4978 §4 suggests a moderate level: IMAP traffic is small and latency-sensitive.
DEFAULT_LEVEL = 6


class CompressionError(Exception):
    """The peer's deflate stream is corrupt (or ended): the connection cannot continue."""


class DeflateStream:
    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, _RAW_DEFLATE)
        self._decompressor = zlib.decompressobj(_RAW_DEFLATE)
        self._input = bytearray()
        self._dirty = False

    # -- outgoing ---------------------------------------------------------------------------

    def compress(self, data: bytes) -> bytes:
        self._dirty = True
        return self._compressor.compress(data)

    def flush(self) -> bytes:
        """Everything compressed so far, decodable by the peer now (Z_SYNC_FLUSH)."""
        if not self._dirty:
            return b""
        self._dirty = False
        return self._compressor.flush(zlib.Z_SYNC_FLUSH)

    # -- incoming ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._input += data

    @property
    def buffered(self) -> int:
        """Compressed octets not yet inflated."""
        return len(self._input) + len(self._decompressor.unconsumed_tail)

    def has_input(self) -> bool:
        return self.buffered > 0

    def inflate(self, max_output: int = INFLATE_STEP) -> bytes:
        """Up to ``max_output`` decompressed octets; raise :class:`CompressionError`."""
        source = self._decompressor.unconsumed_tail
        if not source:
            source = bytes(self._input[:INPUT_STEP])
            del self._input[:INPUT_STEP]
        try:
            data = self._decompressor.decompress(source, max_output)
        except zlib.error:
            raise CompressionError("corrupt deflate stream") from None
        if self._decompressor.eof:
            # RFC 4978 has no end of compression: a final block means a broken peer.
            raise CompressionError("deflate stream ended")
        return data
