"""Office macros, found by olevba in a child process with CPU, memory and file limits.

VBA and Excel 4 macros are how Office documents run code. olevba (oletools) finds them,
but it is a large parser fed hostile input, so it never runs in the server: a child
process sets ``resource`` limits on itself before it reads a byte, analyses the document
from stdin and prints one JSON line. A crash, a timeout or a limit hit is an error result,
never an exception in the server.

    python -m postvern.filters.macros < document     # the child side
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

# Wall-clock limit for one document; olevba reads a normal document in well under a second.
MACRO_TIMEOUT = 20.0
# CPU seconds the child may use (RLIMIT_CPU), below the wall-clock limit.
MACRO_CPU_SECONDS = 15
# Address space of the child (RLIMIT_AS): the interpreter and oletools take ~100 MiB,
# the rest is for the document; a decompression bomb stops here.
MACRO_MEMORY_BYTES = 768 * 1024 * 1024
# Documents larger than this are not analysed (the attachment bound is the message size).
MAX_DOCUMENT_BYTES = 20 * 1024 * 1024
# Keywords reported per category; the verdict names a few, not the whole analysis.
MAX_KEYWORDS = 10
# The Windows Installer root storage CLSID ([MS-CFB] root entry; MSI/MSP/MST packages).
_MSI_CLSIDS = frozenset(
    ("000C1084-0000-0000-C000-000000000046", "000C1086-0000-0000-C000-000000000046")
)


@dataclass(frozen=True, slots=True)
class MacroReport:
    has_macros: bool = False
    autoexec: list[str] = field(default_factory=list)  # e.g. "AutoOpen", "Workbook_Open"
    suspicious: list[str] = field(default_factory=list)  # e.g. "Shell", "CreateObject"
    msi: bool = False
    error: str | None = None  # why the document could not be analysed


def check_macros(data: bytes) -> MacroReport:
    """Analyse an OLE or OOXML document in a limited child process (blocking)."""
    if len(data) > MAX_DOCUMENT_BYTES:
        return MacroReport(error="document too large to analyse")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONWARNINGS="ignore")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "postvern.filters.macros"],
            input=data,
            capture_output=True,
            timeout=MACRO_TIMEOUT,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return MacroReport(error="analysis timed out")
    except OSError:
        return MacroReport(error="analyser could not start")
    if done.returncode != 0:
        return MacroReport(error=f"analyser failed (exit {done.returncode})")
    return _parse_report(done.stdout)


def _parse_report(output: bytes) -> MacroReport:
    try:
        document = json.loads(output.strip().splitlines()[-1])
        return MacroReport(
            has_macros=bool(document["macros"]),
            autoexec=[str(k) for k in document["autoexec"]][:MAX_KEYWORDS],
            suspicious=[str(k) for k in document["suspicious"]][:MAX_KEYWORDS],
            msi=bool(document.get("msi")),
            error=str(document["error"]) if document.get("error") else None,
        )
    except (ValueError, KeyError, TypeError, IndexError):
        return MacroReport(error="analyser answered garbage")


# -- the child ------------------------------------------------------------------------


def _limit_resources() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MACRO_MEMORY_BYTES, MACRO_MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (MACRO_CPU_SECONDS, MACRO_CPU_SECONDS))
    # The analysis writes no files; a parser tricked into writing one is killed.
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _analyse(data: bytes) -> dict[str, object]:
    import logging

    logging.disable(logging.CRITICAL)  # olevba logs every oddity of hostile input
    from oletools.olevba import VBA_Parser

    parser = VBA_Parser("attachment", data=data)
    try:
        result: dict[str, object] = {"macros": False, "autoexec": [], "suspicious": []}
        ole = getattr(parser, "ole_file", None)
        if ole is not None:
            clsid = str(getattr(ole.root, "clsid", "") or "").upper()
            result["msi"] = clsid in _MSI_CLSIDS
        if not parser.detect_macros():
            return result
        result["macros"] = True
        autoexec: list[str] = []
        suspicious: list[str] = []
        for kind, keyword, _description in parser.analyze_macros() or []:
            target = (
                autoexec if kind == "AutoExec" else suspicious if kind == "Suspicious" else None
            )
            if target is not None and keyword not in target and len(target) < MAX_KEYWORDS:
                target.append(str(keyword)[:40])
        result["autoexec"], result["suspicious"] = autoexec, suspicious
        return result
    finally:
        parser.close()


def _child_main() -> int:
    _limit_resources()
    data = sys.stdin.buffer.read(MAX_DOCUMENT_BYTES + 1)
    try:
        if len(data) > MAX_DOCUMENT_BYTES:
            raise ValueError("document too large")
        result = _analyse(data)
    except MemoryError:
        result = {"macros": False, "autoexec": [], "suspicious": [], "error": "memory limit"}
    except Exception as exc:  # any parser failure is a result, reported by its class only
        result = {"macros": False, "autoexec": [], "suspicious": [],
                  "error": f"unreadable ({type(exc).__name__})"}  # fmt: skip
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main())
