"""LMTP (RFC 2033) between a front and a mailbox node: the internal delivery endpoint.

LMTP rather than SMTP because after the message it answers once per recipient, and the
receiving side keeps no queue: the mailbox node either has the copy durably or says it has not
(RFC 2033 §1). The message goes by BDAT (CHUNKING, RFC 3030, which §4.2 there extends to LMTP):
its bytes exactly, with no dot-stuffing to undo and nothing to normalise. This is an internal
dialect: DATA is refused, and a recipient may carry ``XJUNK`` (the front's filters filed this
copy as junk) and ``XDELIVERY=<id>`` (the front's id for the copy, kept in the mailbox so that
a copy sent again after a failover is stored once). The node's 250 for a copy says when it
became durable there (``at=<unix time>``, the node's clock), and ``XREPLICATED`` asks the node
for the start of its last completed replication to object storage (``replicated=<unix
time>``, or ``replicated=off``): a front keeps each copy until that mark passes the copy's
``at`` (relay.py). Both sides run over the cluster's mutual TLS (backend.py, relay.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from postvern.net import Channel, converse_and_close
from postvern.smtp.replies import Reply

log = logging.getLogger(__name__)

# RFC 5321 §4.5.3.1.4 allows 512 octets for a command line; parameters push it a little.
MAX_LINE = 2048
# An internal peer that says nothing for this long is gone (a relay batch never pauses).
IDLE_TIMEOUT = 300.0
# The junk marker a recipient may carry (LHLO advertises it).
JUNK = "XJUNK"
DELIVERY = "XDELIVERY"
# A delivery id is the front's queue file name: letters, digits, '.', '-', '_'.
_DELIVERY_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_AT = re.compile(r"\bat=([0-9]+(?:\.[0-9]+)?)\b")
_REPLICATED = re.compile(r"\breplicated=([0-9]+(?:\.[0-9]+)?|off)\b")
_PATH = re.compile(r"(?i)(MAIL FROM|RCPT TO):\s*<([^<>\s]*)>((?: [^ ]+)*)")
_BDAT = re.compile(r"(?i)BDAT ([0-9]{1,10})( LAST)?")

# What the session calls: is this recipient ours (a reply, and a handle to deliver to), and
# store one copy for it durably (the reply is 250 only once it is on disk).
Recipient = Callable[[str], Awaitable[tuple[Reply, object | None]]]
Deliver = Callable[[object, bool, bytes, str | None], Awaitable[Reply]]
# The start of the node's last completed replication (unix time); None: it does not replicate.
Replicated = Callable[[], float | None]


class LMTPError(Exception):
    """The peer broke the protocol or went away."""


@dataclass
class _Transaction:
    mail_from: str | None = None
    recipients: list[tuple[object, bool, str | None]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


class LMTPSession:
    """One internal LMTP connection, server side; :meth:`run` never raises."""

    def __init__(
        self,
        channel: Channel,
        *,
        hostname: str,
        recipient: Recipient,
        deliver: Deliver,
        max_size: int,
        replicated: Replicated = lambda: None,
    ) -> None:
        self.channel = channel
        self.hostname = hostname
        self.recipient = recipient
        self.deliver = deliver
        self.replicated = replicated
        self.max_size = max_size
        self._buf = bytearray()
        self._greeted = False
        self._txn = _Transaction()

    async def run(self) -> None:
        await converse_and_close("lmtp", self._converse, self._finish)

    async def _finish(self) -> None:
        self.channel.close()

    def _reply(self, reply: Reply) -> None:
        self.channel.write(reply.to_bytes())

    async def _fill(self) -> bool:
        async with asyncio.timeout(IDLE_TIMEOUT):
            data = await self.channel.read()
        if not data:
            return False
        self._buf += data
        return True

    async def _line(self) -> str | None:
        while (end := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > MAX_LINE or not await self._fill():
                return None
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        return line.decode("utf-8", "replace")

    async def _octets(self, n: int) -> bytes | None:
        while len(self._buf) < n:
            if not await self._fill():
                return None
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def _converse(self) -> str:
        self._reply(Reply(220, None, f"{self.hostname} LMTP ready"))
        while True:
            await self.channel.drain()
            line = await self._line()
            if line is None:
                return "closed"
            verb = line.split(" ", 1)[0].upper()
            if verb == "QUIT":
                self._reply(Reply(221, "2.0.0", "bye"))
                await self.channel.drain()
                return "quit"
            await self._command(verb, line)

    async def _command(self, verb: str, line: str) -> None:
        if verb == "LHLO":
            self._greeted = True
            self._txn = _Transaction()
            caps: tuple[str, ...] = ("PIPELINING", "ENHANCEDSTATUSCODES", "CHUNKING", "8BITMIME")
            caps += (JUNK, DELIVERY, "XREPLICATED")
            self._reply(Reply(250, None, (self.hostname, *caps, f"SIZE {self.max_size}")))
        elif verb in ("RSET", "NOOP"):
            if verb == "RSET":
                self._txn = _Transaction()
            self._reply(Reply(250, "2.0.0", "OK"))
        elif verb == "MAIL":
            self._mail(line)
        elif verb == "RCPT":
            await self._rcpt(line)
        elif verb == "BDAT":
            await self._bdat(line)
        elif verb == "XREPLICATED":
            mark = self.replicated()
            said = "off" if mark is None else f"{mark:.6f}"
            self._reply(Reply(250, "2.0.0", f"replicated={said}"))
        elif verb == "DATA":
            self._reply(Reply(503, "5.5.1", "this endpoint takes BDAT (CHUNKING) only"))
        else:
            self._reply(Reply(500, "5.5.2", "command not recognised"))

    def _mail(self, line: str) -> None:
        match = _PATH.fullmatch(line)
        if not self._greeted or self._txn.mail_from is not None:
            self._reply(Reply(503, "5.5.1", "LHLO first, one MAIL per transaction"))
        elif match is None or match.group(1).upper() != "MAIL FROM":
            self._reply(Reply(501, "5.5.4", "syntax: MAIL FROM:<address>"))
        else:
            self._txn.mail_from = match.group(2)
            self._reply(Reply(250, "2.1.0", "sender OK"))

    async def _rcpt(self, line: str) -> None:
        match = _PATH.fullmatch(line)
        if self._txn.mail_from is None:
            self._reply(Reply(503, "5.5.1", "MAIL first"))
            return
        if match is None or match.group(1).upper() != "RCPT TO":
            self._reply(Reply(501, "5.5.4", "syntax: RCPT TO:<address>"))
            return
        junk, delivery_id = False, None
        for param in match.group(3).split():
            key, _, value = param.partition("=")
            if key.upper() == JUNK and not value:
                junk = True
            elif key.upper() == DELIVERY and _DELIVERY_ID.fullmatch(value):
                delivery_id = value
            else:
                self._reply(Reply(555, "5.5.4", "unknown RCPT parameter"))
                return
        reply, target = await self.recipient(match.group(2))
        if target is not None:
            self._txn.recipients.append((target, junk, delivery_id))
        self._reply(reply)

    async def _bdat(self, line: str) -> None:
        match = _BDAT.fullmatch(line)
        if match is None:
            self._reply(Reply(501, "5.5.4", "syntax: BDAT <size> [LAST]"))
            return
        chunk = await self._octets(int(match.group(1)))  # read even when refusing (RFC 3030)
        if chunk is None:
            raise LMTPError("connection closed inside a BDAT chunk")
        txn = self._txn
        txn.size += len(chunk)
        if txn.size <= self.max_size:
            txn.chunks.append(chunk)
        if not match.group(2):
            self._reply(Reply(250, "2.0.0", f"{len(chunk)} octets received"))
            return
        self._txn = _Transaction(mail_from=None)
        if txn.mail_from is None or not txn.recipients:
            self._reply(Reply(554, "5.5.1", "no valid recipients"))
            return
        for target, junk, delivery_id in txn.recipients:  # RFC 2033 §4.2: one per recipient
            if txn.size > self.max_size:
                self._reply(Reply(552, "5.3.4", "message too big"))
                continue
            self._reply(await self.deliver(target, junk, b"".join(txn.chunks), delivery_id))


class LMTPClient:
    """One connection to a mailbox node's LMTP endpoint; one copy per transaction."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, host: str, port: int, context: ssl.SSLContext, node: str, within: float
    ) -> LMTPClient:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=node
            )
            client = cls(reader, writer)
            try:
                await client._expect(220)
                writer.write(b"LHLO front\r\n")
                await client._expect(250)
            except BaseException:
                writer.close()
                raise
        return client

    async def _reply(self) -> Reply:
        lines = []
        while True:
            raw = await self.reader.readline()
            if not raw.endswith(b"\n") or len(raw) < 4:
                raise LMTPError("connection closed or malformed reply")
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if text[3:4] != "-":
                if not text[:3].isdigit() or not 200 <= int(text[:3]) <= 599:
                    raise LMTPError("malformed reply")
                return Reply(int(text[:3]), None, tuple(lines))

    async def _expect(self, code: int) -> Reply:
        reply = await self._reply()
        if reply.code != code:
            raise LMTPError(f"unexpected reply {reply.code}")
        return reply

    async def send(
        self, mail_from: str, recipient: str, junk: bool, raw: bytes, delivery_id: str = ""
    ) -> Reply:
        """One copy for one recipient, pipelined; the recipient's final reply."""
        rcpt = f"RCPT TO:<{recipient}>" + (f" {JUNK}" if junk else "")
        if delivery_id:
            rcpt += f" {DELIVERY}={delivery_id}"
        head = f"MAIL FROM:<{mail_from}>\r\n{rcpt}\r\nBDAT {len(raw)} LAST\r\n"
        self.writer.write(head.encode() + raw)
        await self.writer.drain()
        mail, rcpt_reply, final = await self._reply(), await self._reply(), await self._reply()
        if not mail.is_positive:
            return mail
        return final if rcpt_reply.is_positive else rcpt_reply

    async def replicated(self) -> float | None:
        """The node's replication mark: the start (unix time, its clock) of its last
        completed replication; None when it does not replicate. Raises LMTPError if the
        node does not say."""
        self.writer.write(b"XREPLICATED\r\n")
        await self.writer.drain()
        reply = await self._reply()
        found = _REPLICATED.search(" ".join(reply.lines)) if reply.is_positive else None
        if found is None:
            raise LMTPError("no replication mark")
        return None if found.group(1) == "off" else float(found.group(1))

    def usable(self) -> bool:
        """Still open both ways, as far as this side knows (kept between relay passes)."""
        return not self.writer.is_closing() and not self.reader.at_eof()

    def abort(self) -> None:
        self.writer.transport.abort()

    async def close(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await self.writer.drain()
            await asyncio.wait_for(self._reply(), 5.0)
        except (OSError, LMTPError, TimeoutError, ssl.SSLError):
            pass
        finally:
            self.writer.close()


def stored_at(reply: Reply) -> float | None:
    """When a 250 says the copy became durable on the node (its clock); None if it does not
    say (then there is no replication to wait for)."""
    found = _AT.search(" ".join(reply.lines))
    return float(found.group(1)) if found else None
