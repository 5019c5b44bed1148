"""Record what Dovecot says about every corpus message, for the MIME conformance test.

Runs Dovecot's ``imap`` binary in PREAUTH mode over stdin on a throw-away maildir, appends
every corpus message (line ends normalized to CRLF, the form IMAP counts sizes in) and
records BODYSTRUCTURE, ENVELOPE and the SHA-256 of many BODY[section] and BINARY[part]
answers into ``dovecot_expected.json``. Run it by hand where Dovecot is installed (as root);
the tests only read its output, so they need no Dovecot. An answer recorded as
"MISSING" is one Dovecot never gave (it drops the session after some BINARY errors).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from mime_support import CORPUS, corpus_messages, crlf, fetch_items, parse_value, sha

OUT = Path(__file__).parent / "dovecot_expected.json"
IMAP_BIN = "/usr/lib/dovecot/imap"
NOBODY = 65534

CONFIG = """\
base_dir = {d}/run
mail_location = maildir:{d}/mail:LAYOUT=fs
protocols = imap
ssl = no
log_path = {d}/log
passdb {{
  driver = static
  args = password=x
}}
userdb {{
  driver = static
  args = uid={u} gid={u} home={d}
}}
mail_uid = {u}
mail_gid = {u}
"""

# Messages with thousands of parts are recorded for their first parts only, to keep the
# recorded file small.
MAX_PATHS = 200
FIELDS = "HEADER.FIELDS (FROM TO SUBJECT CONTENT-TYPE)"
FIELDS_NOT = "HEADER.FIELDS.NOT (RECEIVED CONTENT-TYPE)"


def run_imap(d: Path, commands: list[bytes]) -> bytes:
    """Feed the commands, and keep stdin open until LOGOUT is answered.

    Dovecot treats end of input as a hang-up and drops output still queued, so input is
    closed only after the final tagged answer has been read.
    """
    script = b"".join(commands) + b"z LOGOUT\r\n"
    env = {"USER": "nobody", "HOME": str(d), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [IMAP_BIN, "-c", str(d / "dovecot.conf")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def feed() -> None:
        assert proc.stdin is not None
        proc.stdin.write(script)
        proc.stdin.flush()

    writer = threading.Thread(target=feed)
    writer.start()
    out = bytearray()
    while b"\r\nz OK" not in out[-4096:]:
        chunk = proc.stdout.read1(1 << 20)
        if not chunk:
            break
        out += chunk
    writer.join()
    proc.stdin.close()
    proc.wait(timeout=60)
    return bytes(out)


def part_paths(bs: object, prefix: str = "") -> list[tuple[str, bool]]:
    """(section path, is message/rfc822) for every part of a parsed BODYSTRUCTURE."""
    assert isinstance(bs, list)
    out: list[tuple[str, bool]] = []
    if bs and isinstance(bs[0], list):  # multipart: children then subtype
        children = [c for c in bs if isinstance(c, list)]
        for i, child in enumerate(children, 1):
            path = f"{prefix}{i}"
            out += _leaf_or_deeper(child, path)
        return out
    return _leaf_or_deeper(bs, prefix + "1") if not prefix else out


def _leaf_or_deeper(part: list, path: str) -> list[tuple[str, bool]]:
    if part and isinstance(part[0], list):
        return [(path, False), *part_paths(part, path + ".")]
    is_msg = (
        isinstance(part[0], bytes)
        and part[0].lower() == b"message"
        and isinstance(part[1], bytes)
        and part[1].lower() in (b"rfc822", b"global")
        and len(part) > 8
        and isinstance(part[8], list)
    )
    out = [(path, is_msg)]
    if is_msg:
        inner = part[8]
        if inner and isinstance(inner[0], list):
            out += part_paths(inner, path + ".")
        else:
            out += _leaf_or_deeper(inner, path + ".1")
    return out


def sections_for(bs: object) -> list[str]:
    secs = ["", "HEADER", "TEXT", FIELDS, FIELDS_NOT, "99", "1.1.1.1.1.1"]
    for path, is_msg in part_paths(bs)[:MAX_PATHS]:
        secs += [path, path + ".MIME"]
        if is_msg:
            secs += [path + ".HEADER", path + ".TEXT", f"{path}.{FIELDS}"]
    return secs


def main() -> None:
    files = corpus_messages()[: int(os.environ.get("ORACLE_LIMIT", "0")) or None]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for sub in ("mail/cur", "mail/new", "mail/tmp", "run"):
            (d / sub).mkdir(parents=True)
        (d / "dovecot.conf").write_text(CONFIG.format(d=d, u=NOBODY))
        os.chmod(d, 0o755)
        for p in d.rglob("*"):
            shutil.chown(p, NOBODY, NOBODY)
        shutil.chown(d, NOBODY, NOBODY)
        files = [p for p in files if p.stat().st_size]  # Dovecot refuses empty messages
        datas = [crlf(p.read_bytes()) for p in files]
        cmds = [b"s SELECT INBOX\r\n"]
        for i, data in enumerate(datas):
            cmds.append(b"a%d APPEND INBOX {%d+}\r\n" % (i, len(data)) + data + b"\r\n")
        run_imap(d, cmds)
        # A separate session: Dovecot runs pipelined commands concurrently, so a FETCH sent
        # behind APPENDs in one session may not see the last messages.
        out = run_imap(d, [b"s SELECT INBOX\r\n", b"f UID FETCH 1:* (BODYSTRUCTURE ENVELOPE)\r\n"])
        described = {uid: items for uid, items in fetch_items(out)}
        records = []
        for i, (path, data) in enumerate(zip(files, datas, strict=True)):
            items = described[i + 1]
            bs = items["BODYSTRUCTURE"]
            record = {
                "file": str(path.relative_to(CORPUS)),
                "sha256": sha(data)[:16],
                "bodystructure": _raw_item(out, i + 1, "BODYSTRUCTURE"),
                "envelope": _raw_item(out, i + 1, "ENVELOPE"),
                "sections": {},
                "binary": {},
            }
            cmds = [b"s SELECT INBOX\r\n"]
            secs = sections_for(bs)
            for j, sec in enumerate(secs):
                cmds.append(b"b%d UID FETCH %d (BODY.PEEK[%s])\r\n" % (j, i + 1, sec.encode()))
            leaves = [p for p, _ in part_paths(bs)][:MAX_PATHS]
            for j, leaf in enumerate(leaves):
                cmds.append(b"n%d UID FETCH %d (BINARY.PEEK[%s])\r\n" % (j, i + 1, leaf.encode()))
            res = run_imap(d, cmds)
            record["sections"] = _answers(res, "b", secs, "BODY")
            record["binary"] = _answers(res, "n", leaves, "BINARY")
            records.append(record)
        OUT.write_text(json.dumps(records, indent=0) + "\n")  # ASCII: keeps 8-bit octets as escapes
    print(f"{len(records)} messages recorded in {OUT}")


def _raw_item(out: bytes, uid: int, name: str) -> str:
    """The item's IMAP text as Dovecot wrote it (for the record; tests parse it)."""
    for n, items in fetch_items(out):
        if n == uid:
            start = out.index(b"%s (" % name.encode(), _fetch_start(out, uid)) + len(name) + 1
            _, end = parse_value(out, start)
            return out[start:end].decode("utf-8", "surrogateescape")
    raise KeyError(uid)


def _fetch_start(out: bytes, uid: int) -> int:
    import re

    for m in re.finditer(rb"^\* \d+ FETCH \(UID (\d+) ", out, re.M):
        if int(m.group(1)) == uid:
            return m.start()
    for m in re.finditer(rb"^\* (\d+) FETCH ", out, re.M):
        if int(m.group(1)) == uid:
            return m.start()
    raise KeyError(uid)


def _answers(res: bytes, tag: str, keys: list[str], item: str) -> dict[str, str | None]:
    """Per key: sha256 of the returned data, None for NIL, or "NO <code>" on a refusal.

    Dovecot may run pipelined commands concurrently, so answers are matched by item name
    and tag, not by order.
    """
    import re

    values: dict[str, object] = {}
    for _, items in fetch_items(res):
        for k, v in items.items():
            if k.startswith(item + "["):
                values[k[len(item) + 1 : k.index("]", len(item)) if "(" not in k else -1]] = v
    statuses = {
        int(m.group(1)): m
        for m in re.finditer(rb"^%s(\d+) (OK|NO|BAD)([^\r\n]*)" % tag.encode(), res, re.M)
    }
    answers: dict[str, str | None] = {}
    for j, key in enumerate(keys):
        m = statuses.get(j)
        if m is None:
            answers[key] = "MISSING"
        elif m.group(2) != b"OK":
            text = m.group(3).decode("latin-1")
            answers[key] = "NO " + (text.split("]")[0].split("[")[-1] if "[" in text else "")
        else:
            value = values.get(key.replace(".PEEK", ""), "MISSING")
            answers[key] = sha(value)[:16] if isinstance(value, bytes) else value  # type: ignore[assignment]
    return answers


if __name__ == "__main__":
    main()
