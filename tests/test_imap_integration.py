"""The IMAP server against real data and hostile input: the MIME torture corpora survive
APPEND → FETCH byte for byte, bad input over the socket is answered and survived, and one
user can never reach another's mail whatever the name."""

from __future__ import annotations

import imaplib
import random
import re
import socket
from pathlib import Path

from harness import CORPORA, client_tls_context
from postvern.imap.fetch import fast_envelope
from postvern.imap.structure import render_envelope
from postvern.imap.wire import WireContext
from postvern.mime import describe, envelope_to_json
from test_imap_session import ALICE, BOB, HOST, Env, Wire, env, in_thread, message, ok

__all__ = ["env"]  # the fixture, shared with test_imap_session

MIME_CORPUS = CORPORA / "mime"


def corpus_messages() -> list[Path]:
    """Every message of the MIME corpora (README: all folders), without their expected-output
    and binary fixtures."""
    root = MIME_CORPUS
    picked = [
        *root.glob("cpython_test_email/data/msg_*.txt"),
        *root.glob("flanker/**/*.eml"),
        *root.glob("james-mime4j/**/*.msg"),
        *(p for p in root.glob("mailcore2/unittest/data/parser/input/**/*") if p.is_file()),
        *(p for p in root.glob("mailcore2/unittest/data/summary/input/*") if p.is_file()),
        *(p for p in root.glob("ruby-mail/spec/fixtures/emails/**/*") if p.is_file()),
        *(p for p in root.glob("mail-parser/tests/mails/*") if p.is_file()),
    ]
    # An empty file is no message (and APPEND refuses it); a README is documentation.
    return sorted(p for p in picked if p.stat().st_size and p.name != "README")


def literal_of(line: bytes) -> bytes:
    """The literal inside one FETCH response line read by :class:`Wire`."""
    match = re.search(rb"\{(\d+)\}\r\n", line)
    assert match is not None, line[:80]
    return line[match.end() : match.end() + int(match.group(1))]


async def test_corpus_survives_append_and_fetch(env: Env) -> None:
    paths = corpus_messages()
    assert len(paths) > 450

    def session() -> list[str]:
        # A raw client: imaplib rewrites bare LF to CRLF on APPEND, and the point here is
        # that the stored bytes are exactly the sent bytes.
        wire = env.wire()
        problems = []
        for path in paths:
            raw = path.read_bytes()
            _, done = wire.command(b"APPEND INBOX {%d+}\r\n" % len(raw) + raw)
            if b" OK " not in done:
                problems.append(f"APPEND {path.name}: {done!r}")
        wire.ok("EXAMINE INBOX")
        lines, done = wire.command("FETCH 1:* (BODYSTRUCTURE ENVELOPE)")
        if b" OK " not in done or len(lines) != len(paths):
            problems.append(f"FETCH BODYSTRUCTURE ENVELOPE: {len(lines)} answers, {done!r}")
        for number, path in enumerate(paths, 1):
            lines, done = wire.command(f"FETCH {number} (BODY.PEEK[])")
            # NUL goes out as 0x80 in a plain literal (issue #12, RFC 9051 §4.3).
            sent = path.read_bytes().replace(b"\x00", b"\x80")
            if b" OK " not in done or literal_of(lines[0]) != sent:
                problems.append(f"BODY[] of {path.name} differs")
        wire.close()
        return problems

    assert await in_thread(session) == []


def test_direct_envelope_renderer_matches_the_core() -> None:
    """FETCH's fast ENVELOPE writer spells every corpus envelope as the core's writer does."""
    for path in corpus_messages():
        envelope, _ = describe(path.read_bytes())
        for ctx in (WireContext(utf8=False), WireContext(utf8=True)):
            expected = render_envelope(envelope, ctx)
            assert fast_envelope(envelope_to_json(envelope), ctx) == expected, path


# -- bad input over the socket ---------------------------------------------------------------


def raw_session(env: Env, lines: list[bytes]) -> list[tuple[list[bytes], bytes]]:
    wire = env.wire()
    answers = []
    for line in lines:
        wire.counter += 1
        tag = f"B{wire.counter}".encode()
        wire.send(tag + b" " + line + b"\r\n")
        answers.append(wire.until(tag))
    answers.append(wire.command("NOOP"))
    wire.close()
    return answers


async def test_malformed_commands_are_answered(env: Env) -> None:
    bad = [
        b"FETCH 1 (FLAGS",
        b"SELECT",
        b'LIST "" (',
        b"SEARCH " + b"(" * 40 + b"ALL" + b")" * 40,
        b"SEARCH " + b"OR ALL " * 50 + b"ALL",
        b"FETCH 1:* FLAGS",  # no mailbox selected
        b"STARTTLS",  # already on TLS, and after login
        b"LOGIN a b",  # already logged in
        b"APPEND INBOX {4294967295}",
        b"APPEND INBOX {99999999999999999999}",
        b'CREATE "\xff\xfe\x00bad"',
        b"\x80\x81\x82 \xc3\x28 garbage",
        b"UID FROB 1",
        b"SELECT INBOX (QRESYNC (1 1))",  # QRESYNC not enabled
    ]
    answers = await in_thread(lambda: raw_session(env, bad))
    for line, (_, done) in zip(bad, answers, strict=False):
        assert re.match(rb"B\d+ (BAD|NO) ", done), (line, done)
    assert b"TOOBIG" in answers[8][1]
    assert answers[-1][1].startswith(b"W") and b" OK " in answers[-1][1]


async def test_literal_limits_before_login(env: Env) -> None:
    def session() -> list[bytes]:
        wire = Wire(env.tls_port)
        out = []
        wire.send(b"a LOGIN {5000}\r\n")
        out.append(wire.line())
        wire.send(b"b SELECT INBOX\r\n")
        out.append(wire.line())
        wire.send(b"c CAPABILITY\r\n")
        out += wire.until(b"c")[1:]
        wire.close()
        return out

    too_big, wrong_state, capability = await in_thread(session)
    assert too_big.startswith(b"a NO [TOOBIG]")
    assert wrong_state.startswith(b"b BAD")
    assert capability.startswith(b"c OK")


async def test_garbage_flood_ends_with_bye_and_server_lives(env: Env) -> None:
    rng = random.Random(7)

    def session() -> tuple[bytes, list[object]]:
        wire = env.wire()
        for _ in range(30):
            junk = bytes(rng.randrange(0x80, 0x100) for _ in range(40))
            try:
                wire.send(b"x " + junk + b"\r\n")
            except OSError:
                break  # the server already said BYE and closed: what we came to see
        data = b""
        wire.sock.settimeout(10)
        try:
            while chunk := wire.sock.recv(65536):
                data += chunk
        except (TimeoutError, OSError):
            pass
        wire.close()
        client = env.client()
        status = ok(client.status("INBOX", "(MESSAGES)"))
        client.logout()
        return data, status

    data, status = await in_thread(session)
    assert b"* BYE too many invalid commands" in data
    assert status == [b'"INBOX" (MESSAGES 0)']


async def test_client_vanishing_mid_literal_releases_mailbox(env: Env) -> None:
    def session() -> None:
        wire = env.wire()
        wire.send(b"a APPEND INBOX {100000}\r\n")
        assert wire.line().startswith(b"+")
        wire.send(b"x" * 1000)
        wire.sock.shutdown(socket.SHUT_RDWR)
        wire.close()

    await in_thread(session)
    await env.released(ALICE)


# -- isolation between users -----------------------------------------------------------------

FOREIGN_NAMES = [
    "Secret",
    "../Secret",
    "../bob/Secret",
    "#shared/Secret",
    "#shared",
    "~bob",
    "~bob/Secret",
    "/INBOX",
    "/Secret",
    "Other Users/bob/Secret",
    "Other Users/bob",
    "bob@example.test/Secret",
    "user/bob/Secret",
    "..",
    "INBOX/../Secret",
]


async def test_user_cannot_reach_another_users_folders(env: Env) -> None:
    await env.deliver(BOB, message("for bob only", "the launch code is 0000"))

    def session() -> dict[str, object]:
        bob = env.client(BOB)
        ok(bob.create("Secret"))
        ok(bob.append("Secret", None, None, message("bob secret", "nobody else")))
        bob.logout()
        alice = env.client(ALICE)
        out: dict[str, object] = {"list": ok(alice.list('""', "*"))}
        attempts = {}
        for name in FOREIGN_NAMES:
            quoted = '"' + name + '"'
            attempts[name] = [
                alice.select(quoted)[0],
                alice.select(quoted, readonly=True)[0],
                alice.status(quoted, "(MESSAGES)")[0],
                alice.append(quoted, None, None, message("intrusion"))[0],
                ok(alice.list('""', quoted)),
                ok(alice.list(quoted, "*")),
            ]
        out["attempts"] = attempts
        out["search"] = alice.select("INBOX") and ok(alice.search(None, "TEXT", "launch"))
        alice.logout()
        bob = env.client(BOB)
        out["bob_secret"] = ok(bob.status("Secret", "(MESSAGES)"))
        out["bob_inbox"] = ok(bob.status("INBOX", "(MESSAGES)"))
        bob.logout()
        return out

    out = await in_thread(session)
    names = {line.split(b'"/" ')[1].strip(b'"') for line in out["list"]}
    assert names == {b"INBOX", b"Drafts", b"Sent", b"Archive", b"Junk", b"Trash"}
    for name, (sel, exa, status, append, listed, listed_ref) in out["attempts"].items():
        assert (sel, exa, status, append) == ("NO", "NO", "NO", "NO"), name
        assert listed in ([None], []), (name, listed)
        assert all(b"Secret" not in (x or b"") for x in listed_ref), name
    assert out["search"] == [b""]
    assert out["bob_secret"] == [b'"Secret" (MESSAGES 1)']
    assert out["bob_inbox"] == [b'"INBOX" (MESSAGES 1)']


async def test_imaplib_over_imaps_and_logout(env: Env) -> None:
    def session() -> tuple[str, list[bytes]]:
        client = imaplib.IMAP4_SSL(HOST, env.tls_port, ssl_context=client_tls_context())
        client.login(ALICE, env.password(ALICE))
        typ, data = client.logout()
        return typ, data

    typ, _ = await in_thread(session)
    assert typ == "BYE"
    await env.released(ALICE)
