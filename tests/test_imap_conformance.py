"""Points of issue #14 that a third-party IMAP compliance suite and its stress load found
(keywords, CREATE with a trailing separator, unusual mailbox names, \\Recent, CONDSTORE,
MOVE within one mailbox), each against the real server on loopback with raw clients."""

from __future__ import annotations

import asyncio
import random
import re
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postvern.crypto import keyslots, seal
from postvern.imap.fetch import FetchPlan, render_batch
from postvern.imap.grammar import commands as c
from postvern.imap.grammar.lexer import ASTRING_CHARS
from postvern.imap.protocol import (
    NEED_DATA,
    PAUSED,
    CommandReceived,
    ConnectionClosed,
    ImapConnection,
    ProtocolConfig,
)
from postvern.imap.selected import SYSTEM_FLAGS, SelectedView
from postvern.imap.serialize import Completion
from postvern.imap.wire import WireContext
from postvern.store.mailbox import Change, Folder, Mailbox
from test_imap_session import ALICE, Env, Wire, in_thread, make_env, message


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in make_env(tmp_path):
        yield e


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Mailbox]:
    private, _ = seal.generate_keypair()
    mailbox = Mailbox.create(tmp_path / "m.sqlite", keyslots.new_mailbox_key(), private)
    yield mailbox
    mailbox.close()


def listed(lines: list[bytes]) -> set[str]:
    """Mailbox names of LIST responses (quoted or atom)."""
    out = set()
    for line in lines:
        match = re.match(rb'\* LIST \([^)]*\) (?:"/"|NIL) "?([^"\r]*)"?\r\n', line)
        if match:
            out.add(match.group(1).decode())
    return out


# -- CREATE with a trailing hierarchy separator (RFC 9051 §6.3.4) -----------------------------


async def test_create_ignores_a_trailing_hierarchy_separator(env: Env) -> None:
    def session() -> tuple[list[bytes], list[bytes], set[str]]:
        wire = env.wire()
        first = [wire.command("CREATE foo/")[1], wire.command("CREATE foo/bar/")[1]]
        again = [wire.command("CREATE foo/")[1], wire.command("CREATE /")[1]]
        names = listed(wire.ok('LIST "" "foo*"'))
        wire.close()
        return first, again, names

    first, again, names = await in_thread(session)
    assert all(b" OK " in done for done in first), first
    assert b"[ALREADYEXISTS]" in again[0]
    assert b" NO " in again[1]
    assert names == {"foo", "foo/bar"}


# -- MOVE into the selected mailbox itself (RFC 6851) -----------------------------------------


async def test_move_to_the_selected_mailbox_is_copy_and_expunge(env: Env) -> None:
    for n in range(1, 4):
        await env.deliver(ALICE, message(f"m{n}"))

    def session() -> tuple[list[bytes], bytes, list[bytes], bytes, list[bytes]]:
        wire = env.wire()
        wire.ok("SELECT INBOX")
        wire.ok("STORE 2 +FLAGS (\\Flagged $Keep)")
        moved, done = wire.command("MOVE 2 INBOX")
        uid_moved, uid_done = wire.command("UID MOVE 1 INBOX")
        flags = wire.ok("UID FETCH 1:* (FLAGS)")
        wire.close()
        return moved, done, uid_moved, uid_done, flags

    moved, done, uid_moved, uid_done, flags = await in_thread(session)
    assert b" OK " in done and b" OK " in uid_done
    # COPYUID first, in an untagged OK (RFC 6851 §4.3), then the expunge and the new EXISTS.
    assert moved[0].startswith(b"* OK [COPYUID ") and b" 2 4]" in moved[0], moved
    # The new copy is recent in this session (RFC 3501), as the original was.
    assert moved[1:] == [b"* 2 EXPUNGE\r\n", b"* 3 EXISTS\r\n", b"* 3 RECENT\r\n"], moved
    assert b" 1 5]" in uid_moved[0], uid_moved
    assert uid_moved[1:] == [b"* 1 EXPUNGE\r\n", b"* 3 EXISTS\r\n", b"* 3 RECENT\r\n"]
    uids = [int(m) for line in flags for m in re.findall(rb"UID (\d+)", line)]
    assert uids == [3, 4, 5]
    assert b"$Keep" in next(line for line in flags if b"UID 4" in line)


async def test_move_to_itself_with_qresync_answers_vanished(env: Env) -> None:
    await env.deliver(ALICE, message("only"))

    def session() -> list[bytes]:
        wire = env.wire()
        wire.ok("ENABLE QRESYNC")
        wire.ok("SELECT INBOX")
        moved = wire.ok("UID MOVE 1 INBOX")
        wire.close()
        return moved

    moved = await in_thread(session)
    assert moved[0].startswith(b"* OK [COPYUID ") and b" 1 2]" in moved[0], moved
    assert moved[1:] == [b"* VANISHED 1\r\n", b"* 1 EXISTS\r\n", b"* 1 RECENT\r\n"], moved


# -- unusual atom characters and malformed modified UTF-7 (RFC 9051 §9, RFC 3501 §5.1.3) ------

# Every ATOM-CHAR that is not a letter, as the compliance suite spells them.
ODD_ATOM = "!#$&'+,-.0123456789:;<=>?@^_`|[}"
MAILBOX_COMMANDS = ("SELECT", "EXAMINE", "CREATE", "DELETE", "STATUS", "APPEND", "LIST", "LSUB")


def mailbox_line(command: str, argument: bytes) -> bytes:
    """One command whose mailbox (or LIST/LSUB pattern) argument is ``argument``."""
    if command in ("LIST", "LSUB"):
        return command.encode() + b' "" ' + argument
    if command == "STATUS":
        return b"STATUS " + argument + b" (MESSAGES)"
    if command == "APPEND":
        return b"APPEND " + argument + b" {3+}\r\nabc"
    return command.encode() + b" " + argument


async def test_unusual_atom_characters_and_bad_utf7_get_no(env: Env) -> None:
    def session() -> dict[bytes, bytes]:
        wire = env.wire()
        lines = [
            b'LIST "" ' + ODD_ATOM.encode() + b"%*",
            b"SELECT " + ODD_ATOM.encode(),
            b"EXAMINE &Jjo!",
            b"CREATE &Jjo!",
            b"CREATE &AGE-",  # printable US-ASCII in base64: not canonical
            b'RENAME INBOX "x&"',
            b"STATUS &- (MESSAGES)",  # "&-" is "&", a valid name that does not exist
            b"CREATE " + ODD_ATOM.replace("&", "&-").encode(),
            b'LIST "" ' + ODD_ATOM.replace("&", "&-").encode() + b"%*",
            b"NOOP",
        ]
        answers = {}
        for line in lines:
            untagged, done = wire.command(line)
            answers[line] = b"".join(untagged) + done
        wire.close()
        return answers

    answers = await in_thread(session)
    lines = list(answers)
    assert answers[lines[0]].startswith(b"W2 NO mailbox pattern is not valid modified UTF-7")
    assert answers[lines[1]].startswith(b"W3 NO [NONEXISTENT] no such mailbox: its name is not")
    assert answers[lines[2]].startswith(b"W4 NO [NONEXISTENT]")
    assert answers[lines[3]].startswith(b"W5 NO [CANNOT] invalid mailbox name: not valid modif")
    assert answers[lines[4]].startswith(b"W6 NO [CANNOT]")
    assert answers[lines[5]].startswith(b"W7 NO [CANNOT]")
    assert answers[lines[6]].startswith(b"W8 NO [NONEXISTENT] no such mailbox\r\n")
    assert answers[lines[7]].startswith(b"W9 OK")
    odd = ODD_ATOM.replace("&", "&-").encode()
    assert answers[lines[8]].startswith(b"* LIST (\\HasNoChildren) ")
    assert odd in answers[lines[8]] and answers[lines[8]].endswith(b"W10 OK LIST completed\r\n")
    assert answers[lines[9]] == b"W11 OK NOOP completed\r\n"


# Names as a client may spell them: printable US-ASCII, mUTF-7 shifts good and bad, and the
# hierarchy delimiter.
_NAME_PIECES = st.sampled_from(
    [chr(i) for i in range(0x20, 0x7F)] + ["&-", "&AGE-", "&Jjo-", "&ZeVnLIqe-", "&", "/"]
)
_NAMES = st.lists(_NAME_PIECES, max_size=12).map("".join)


def _spelled(name: str, form: str) -> bytes | None:
    """The name as an atom (None if it cannot be one), a quoted string or a literal."""
    raw = name.encode()
    if form == "atom":
        return raw if raw and all(b in ASTRING_CHARS for b in raw) else None
    if form == "quoted":
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d+}\r\n" % len(raw) + raw


async def test_no_mailbox_name_ends_the_session(env: Env) -> None:
    """Whatever the name, a mailbox command is answered and the session lives on; a name
    that is valid syntax is never answered BAD."""

    def session() -> list[tuple[bytes, bytes]]:
        wires: dict[bool, Wire] = {}
        problems: list[tuple[bytes, bytes]] = []

        def wire(rev2: bool) -> Wire:
            if rev2 not in wires:
                wires[rev2] = env.wire()
                if rev2:
                    wires[rev2].ok("ENABLE IMAP4rev2")
            return wires[rev2]

        @settings(
            max_examples=400,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            st.sampled_from(MAILBOX_COMMANDS),
            _NAMES,
            st.sampled_from(["atom", "quoted", "literal"]),
            st.booleans(),
        )
        def one(command: str, name: str, form: str, rev2: bool) -> None:
            argument = _spelled(name, form)
            if argument is None:
                return
            line = mailbox_line(command, argument)
            client = wire(rev2)
            try:
                untagged, done = client.command(line)
            except ConnectionError:
                problems.append((line, b"connection ended"))
                del wires[rev2]
                return
            if b" BAD " in done or b"SERVERBUG" in done or any(b"BYE" in u for u in untagged):
                problems.append((line, done))

        one()
        for client in wires.values():
            client.close()
        return problems

    assert await in_thread(session) == []


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.sampled_from([*MAILBOX_COMMANDS, "RENAME INBOX", "SUBSCRIBE", "COPY 1", "MOVE 1"]),
    st.binary(max_size=24) | _NAMES.map(str.encode),
    st.booleans(),
    st.booleans(),
)
def test_mailbox_arguments_never_break_the_core(
    command: str, argument: bytes, rev2: bool, selected: bool
) -> None:
    """The sans-I/O core with any bytes as a mailbox argument: every command is passed on
    or answered with one tagged BAD or NO, and the connection stays open."""
    conn = ImapConnection(ProtocolConfig(), tls_active=True)
    conn.greeting()
    exchanges = [b"L LOGIN user pass", *([b"E ENABLE IMAP4rev2"] if rev2 else [])]
    exchanges += [b"S SELECT INBOX"] if selected else []
    for line in exchanges:
        conn.receive_data(line + b"\r\n")
        event = conn.next_event()
        if isinstance(event, CommandReceived):
            conn.send(Completion.ok(event.command.tag, "done"))
    conn.data_to_send()
    words = command.split(" ")
    line = b"T " + mailbox_line(words[0], argument.replace(b"\r", b"").replace(b"\n", b""))
    if len(words) > 1:
        line = b"T " + command.encode() + b" " + argument.replace(b"\r", b"").replace(b"\n", b"")
    conn.receive_data(line + b"\r\n")
    events = []
    while (event := conn.next_event()) not in (NEED_DATA, PAUSED):
        events.append(event)
    assert not any(isinstance(e, ConnectionClosed) for e in events)
    passed = [e for e in events if isinstance(e, CommandReceived)]
    answer = conn.data_to_send()
    if passed:
        assert answer in (b"", b"+ Ready for literal data\r\n") or answer.startswith(b"+ ")
    else:
        assert re.fullmatch(rb"(\+ [^\r]*\r\n)?T (BAD|NO) [^\r\n]+\r\n", answer), answer


# -- keywords are announced before use and never dropped while in use (RFC 9051 §7.3.5) ------

SHARED_FOLDERS = ("INBOX", "Shared1", "Shared2", "Shared3")
SESSIONS = 10
ROUNDS = 12
_FLAGS_LINE = re.compile(rb"\* FLAGS \(([^)]*)\)")
_PERMANENT_LINE = re.compile(rb"\* OK \[PERMANENTFLAGS \(([^)]*)\)\]")
_FETCH_FLAGS = re.compile(rb"\* \d+ FETCH \(.*FLAGS \(([^)]*)\)")


def keywords_of(flags: bytes) -> set[str]:
    return {f for f in flags.decode().split() if not f.startswith("\\")}


def keyword_problems(transcript: list[bytes]) -> list[str]:
    """Where a session's transcript shows a keyword its last FLAGS (or PERMANENTFLAGS) did
    not list, or a FLAGS that leaves out a keyword the session has seen on a message (the
    test never removes a keyword, so each one seen stays in use)."""
    announced: set[str] | None = None
    permanent: set[str] | None = None
    in_use: set[str] = set()
    problems = []
    for line in transcript:
        if m := _FLAGS_LINE.match(line):
            announced = keywords_of(m.group(1))
            if in_use - announced:
                problems.append(f"FLAGS drops {sorted(in_use - announced)}: {line!r}")
        elif m := _PERMANENT_LINE.match(line):
            permanent = keywords_of(m.group(1))
            if in_use - permanent:
                problems.append(f"PERMANENTFLAGS drops {sorted(in_use - permanent)}: {line!r}")
        elif m := _FETCH_FLAGS.match(line):
            shown = keywords_of(m.group(1))
            in_use |= shown
            for name, known in (("FLAGS", announced), ("PERMANENTFLAGS", permanent)):
                if known is None or shown - known:
                    problems.append(f"FETCH before {name} listed it: {line!r}")
    return problems


def keyword_session(env: Env, index: int, start: threading.Barrier) -> list[bytes]:
    """One client of the stress load: set a new keyword, look, let others' changes in."""
    rng = random.Random(index)
    wire = env.wire()
    transcript: list[bytes] = []

    def run(line: str) -> None:
        untagged, done = wire.command(line)
        assert b" OK " in done, (line, done)
        transcript.extend(untagged)

    run(f"SELECT {SHARED_FOLDERS[index % len(SHARED_FOLDERS)]}")
    start.wait()
    for turn in range(ROUNDS):
        number = rng.randint(1, 3)
        run(f"STORE {number} +FLAGS ($S{index}R{turn})")
        step = rng.choice(["noop", "fetch", "idle", "silent"])
        if step == "noop":
            run("NOOP")
        elif step == "fetch":
            run("FETCH 1:* (FLAGS)")
        elif step == "silent":
            run(f"UID STORE 1:* +FLAGS.SILENT ($Quiet{index})")
            run("FETCH 1:* (UID FLAGS)")
        else:
            wire.send(b"I1 IDLE\r\n")
            while not (line := wire.line()).startswith(b"+ "):
                transcript.append(line)
            wire.send(b"DONE\r\n")
            untagged, _ = wire.until(b"I1")
            transcript.extend(untagged)
    run("FETCH 1:* (FLAGS)")
    wire.close()
    return transcript


async def test_concurrent_sessions_announce_every_keyword_before_use(env: Env) -> None:
    def seed() -> None:
        wire = env.wire()
        for folder in SHARED_FOLDERS:
            if folder != "INBOX":
                wire.ok(f"CREATE {folder}")
            for n in range(3):
                raw = message(f"m{n}")
                wire.ok(f"APPEND {folder} {{{len(raw)}+}}\r\n".encode() + raw)
            wire.ok(f"SELECT {folder}")
            wire.ok("STORE 1 +FLAGS ($Before)")  # in use before any session selects
        wire.close()

    await in_thread(seed)
    start = threading.Barrier(SESSIONS)
    loop = asyncio.get_running_loop()
    # A thread per client: the default pool may be smaller than the barrier.
    with ThreadPoolExecutor(max_workers=SESSIONS) as pool:
        tasks = [
            loop.run_in_executor(pool, keyword_session, env, i, start) for i in range(SESSIONS)
        ]
        transcripts = await asyncio.gather(*tasks)
    problems = {i: keyword_problems(t) for i, t in enumerate(transcripts)}
    assert {i: p for i, p in problems.items() if p} == {}
    # Each session did see others' keywords arrive (the load really was shared).
    assert all(any(b"$S" in line and b"FLAGS" in line for line in t) for t in transcripts)


def test_selected_view_announces_the_folders_keywords_and_only_grows() -> None:
    folder_row = Folder(1, "INBOX", None, 1, 4, 9, True)
    view = SelectedView(folder_row, [1, 2, 3], read_only=False, keywords={"$Before", "Work"})
    assert view.flags_list() == [*SYSTEM_FLAGS, "$Before", "Work"]
    assert view.permanent_flags() == [*SYSTEM_FLAGS, "$Before", "Work", "\\*"]
    assert not view.learn_keywords(["\\Seen", "$Before"])
    assert view.learn_keywords(["\\Seen", "$Label3"])
    assert view.flags_list() == [*SYSTEM_FLAGS, "$Before", "$Label3", "Work"]
    examined = SelectedView(folder_row, [1], read_only=True, keywords={"Work"})
    assert examined.flags_list() == [*SYSTEM_FLAGS, "Work"]
    assert examined.permanent_flags() == []


def test_fetch_batch_names_the_keywords_it_shows(box: Mailbox) -> None:
    """FETCH renders off the event loop; each batch says which keywords its FLAGS show, so
    the executor can send FLAGS before the batch even if another session set one just now."""
    inbox = box.folder("INBOX")
    box.append(inbox.id, message("one"), ["\\Seen", "$Label3"])
    box.append(inbox.id, message("two"), ["Work"])
    assert box.keywords(inbox.id) == {"$Label3", "Work"}
    plan = FetchPlan.build([c.FetchItem(name="FLAGS")], read_only=True)
    result = render_batch(box, inbox, [(1, 1), (2, 2)], plan, WireContext(utf8=False))
    assert result.keywords == {"$Label3", "Work"}
    plain = FetchPlan.build([c.FetchItem(name="UID")], read_only=True)
    assert render_batch(box, inbox, [(1, 1)], plain, WireContext(utf8=False)).keywords == set()


# -- CONDSTORE enabled by use, and ESEARCH MODSEQ (RFC 7162 §3.1, §3.1.5) ---------------------


async def test_first_condstore_command_reports_highestmodseq(env: Env) -> None:
    for n in range(1, 4):
        await env.deliver(ALICE, message(f"m{n}"))

    def session() -> dict[str, tuple[list[bytes], bytes]]:
        out = {}
        for name, first in {
            "fetch": "FETCH 1 (MODSEQ)",
            "changedsince": "FETCH 1:* (FLAGS) (CHANGEDSINCE 1)",
            "search": "SEARCH MODSEQ 1",
            "store": "STORE 1 (UNCHANGEDSINCE 1) +FLAGS ($Late)",
        }.items():
            wire = env.wire()
            selected = wire.ok("SELECT INBOX")
            out[name + ":select"] = (selected, b"")
            out[name] = wire.command(first)
            out[name + ":again"] = wire.command(first)
            wire.close()
        return out

    out = await in_thread(session)
    highest = re.search(rb"HIGHESTMODSEQ (\d+)", b"".join(out["fetch:select"][0]))
    assert highest is not None
    code = b"[HIGHESTMODSEQ " + highest.group(1) + b"]"
    for name in ("fetch", "changedsince", "search"):
        assert out[name][1].startswith(b"W3 OK " + code), (name, out[name])
        assert b"HIGHESTMODSEQ" not in out[name + ":again"][1], name
    # A conditional STORE that failed has MODIFIED in its tagged OK: HIGHESTMODSEQ goes before.
    lines, done = out["store"]
    assert done.startswith(b"W3 OK [MODIFIED 1]"), done
    assert lines[-1].startswith(b"* OK " + code), lines


async def test_esearch_min_or_max_modseq_is_that_messages(env: Env) -> None:
    for n in range(1, 4):
        await env.deliver(ALICE, message(f"m{n}"))

    def session() -> tuple[dict[int, int], dict[str, bytes]]:
        wire = env.wire()
        wire.ok("SELECT INBOX")
        wire.ok("STORE 3 +FLAGS (\\Flagged)")
        wire.ok("STORE 1 +FLAGS (\\Answered)")
        wire.ok("STORE 2 +FLAGS (\\Draft)")
        fetched = wire.ok("FETCH 1:* (MODSEQ)")
        modseqs = {
            int(m.group(1)): int(m.group(2))
            for line in fetched
            if (m := re.match(rb"\* (\d+) FETCH \(MODSEQ \((\d+)\)\)", line))
        }
        answers = {
            options: b"".join(wire.ok(f"SEARCH RETURN ({options}) MODSEQ 1"))
            for options in ("MIN", "MAX", "MIN MAX", "COUNT", "ALL")
        }
        wire.close()
        return modseqs, answers

    modseqs, answers = await in_thread(session)
    assert modseqs[2] > modseqs[1] > modseqs[3]

    def modseq_of(answer: bytes) -> int:
        match = re.search(rb"MODSEQ (\d+)", answer)
        assert match is not None, answer
        return int(match.group(1))

    assert modseq_of(answers["MIN"]) == modseqs[1]
    assert modseq_of(answers["MAX"]) == modseqs[3]
    assert modseq_of(answers["MIN MAX"]) == modseqs[1]
    assert modseq_of(answers["COUNT"]) == modseqs[2]
    assert modseq_of(answers["ALL"]) == modseqs[2]


def test_held_back_expunge_keeps_reported_modseq_below_it() -> None:
    view = SelectedView(Folder(1, "INBOX", None, 1, 4, 9, True), [1, 2, 3], read_only=False)
    view.note(Change("flags", 1, (1,), 10), own_flags=False)
    view.note(Change("expunge", 1, (2,), 11), own_flags=False)
    view.note(Change("flags", 1, (3,), 12), own_flags=False)
    assert view.reported_modseq == 10  # FETCH by number may not send the EXPUNGE yet
    view.take_expunged()
    assert view.reported_modseq == 12


def test_condstore_enabled_by_use_is_flagged_for_highestmodseq() -> None:
    conn = ImapConnection(ProtocolConfig(), tls_active=True)
    for line, tag in ((b"L LOGIN u p", "L"), (b"S SELECT INBOX", "S"), (b"F FETCH 1 MODSEQ", None)):
        conn.receive_data(line + b"\r\n")
        event = conn.next_event()
        assert isinstance(event, CommandReceived)
        if tag is not None:
            conn.send(Completion.ok(tag, "done"))
    assert conn.condstore_enabled and conn.condstore_enabling_tag == "F"


# -- \Recent and RECENT for IMAP4rev1 sessions (RFC 3501 §2.3.2, §7.3.2) ----------------------


async def test_recent_belongs_to_exactly_one_rev1_session(env: Env) -> None:
    await env.deliver(ALICE, message("early1"))
    await env.deliver(ALICE, message("early2"))

    def session() -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        rev2 = env.wire()
        rev2.ok("ENABLE IMAP4rev2")
        out["rev2_select"] = rev2.ok("SELECT INBOX")  # sees none of it, takes none of it
        out["rev2_fetch"] = rev2.ok("FETCH 1:* (FLAGS)")
        out["rev2_status"] = rev2.ok("STATUS INBOX (RECENT)")
        examine, first, second = env.wire(), env.wire(), env.wire()
        out["status_before"] = second.ok("STATUS INBOX (RECENT MESSAGES)")
        out["examine"] = examine.ok("EXAMINE INBOX")  # sees them, takes nothing away
        out["first"] = first.ok("SELECT INBOX")
        out["first_fetch"] = first.ok("FETCH 1:* (FLAGS)")
        out["first_search"] = [
            *first.ok("SEARCH RECENT"),
            *first.ok("SEARCH NEW"),
            *first.ok("SEARCH OLD"),
        ]
        out["first_store"] = first.ok("STORE 1 +FLAGS (\\Seen)")
        out["first_new"] = first.ok("SEARCH NEW")
        out["second"] = second.ok("SELECT INBOX")
        out["second_fetch"] = second.ok("FETCH 1:* (FLAGS)")
        out["status_examined"] = examine.ok("STATUS INBOX (RECENT)")
        other = env.wire()
        out["status_after"] = other.ok("STATUS INBOX (RECENT)")
        other.close()
        out["refused"] = [first.command("STORE 1 +FLAGS (\\Recent)")[1]]
        for wire in (rev2, examine, first, second):
            wire.close()
        return out

    out = await in_thread(session)
    assert not any(b"RECENT" in line for line in out["rev2_select"])
    assert not any(b"\\Recent" in line for line in out["rev2_fetch"])
    assert out["rev2_status"] == [b'* STATUS "INBOX" (RECENT 0)\r\n']
    assert out["status_before"] == [b'* STATUS "INBOX" (RECENT 2 MESSAGES 2)\r\n']
    assert b"* 2 RECENT\r\n" in out["examine"]
    assert b"* 2 RECENT\r\n" in out["first"]
    assert out["first_fetch"] == [
        b"* 1 FETCH (FLAGS (\\Recent))\r\n",
        b"* 2 FETCH (FLAGS (\\Recent))\r\n",
    ]
    assert out["first_search"] == [b"* SEARCH 1 2\r\n", b"* SEARCH 1 2\r\n", b"* SEARCH\r\n"]
    assert b"* 1 FETCH (FLAGS (\\Seen \\Recent))\r\n" in out["first_store"]
    assert out["first_new"] == [b"* SEARCH 2\r\n"]
    assert b"* 0 RECENT\r\n" in out["second"]
    assert not any(b"\\Recent" in line for line in out["second_fetch"])
    assert out["status_after"] == [b'* STATUS "INBOX" (RECENT 0)\r\n']
    assert b'* STATUS "INBOX" (RECENT 2)\r\n' in out["status_examined"]  # recent in it
    assert b" BAD " in out["refused"][0]


async def test_new_mail_is_recent_for_the_first_session_told(env: Env) -> None:
    def session() -> dict[str, list[bytes]]:
        first, second = env.wire(), env.wire()
        first.ok("SELECT INBOX")
        second.ok("SELECT INBOX")
        raw = message("late")
        env_out: dict[str, list[bytes]] = {}
        env_out["append"] = first.ok(b"APPEND INBOX {%d+}\r\n" % len(raw) + raw)
        env_out["second"] = second.ok("NOOP")
        env_out["first_search"] = first.ok("SEARCH RECENT")
        env_out["second_search"] = second.ok("SEARCH RECENT")
        first.close()
        second.close()
        return env_out

    out = await in_thread(session)
    assert out["append"] == [b"* 1 EXISTS\r\n", b"* 1 RECENT\r\n"]
    assert out["second"] == [b"* 1 EXISTS\r\n", b"* 0 RECENT\r\n"]
    assert out["first_search"] == [b"* SEARCH 1\r\n"]
    assert out["second_search"] == [b"* SEARCH\r\n"]
