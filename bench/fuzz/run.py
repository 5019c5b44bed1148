"""Coverage-guided fuzzing of one target with atheris (libFuzzer), or the bounded smoke run.

    .venv/bin/python bench/fuzz/run.py smtp -runs=10000000        # the long run
    .venv/bin/python bench/fuzz/run.py spf -max_total_time=60 corpus/spf
    .venv/bin/python bench/fuzz/run.py --list
    .venv/bin/python bench/fuzz/run.py --summary LOGDIR           # table of finished runs

Everything after the target name goes to libFuzzer (-runs=N, -max_total_time=S, -jobs=J, a
corpus directory). Postvern's modules are instrumented for coverage; the libraries they use
are not (their branches would drown ours and slow every input), except dkimpy's tag-list
parser, the one library function a target exists to fuzz. At the end libFuzzer prints its own
figures (executions, execs/s, coverage); a crash writes the input to crash-<sha1> and exits
non-zero.

--summary reads LOGDIR/<target>.log (libFuzzer's output with -print_final_stats=1) and the
artefacts beside them (-artifact_prefix=LOGDIR/<target>- names them <target>-crash-<sha1>,
<target>-timeout-..., <target>-oom-...), and prints one row per target.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["postvern"]):
    import targets

import dkim.util  # imported by targets, outside the instrumented packages

atheris.instrument_func(dkim.util.parse_tag_value)  # in place: Postvern's callers see it too

ARTEFACTS = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")


def _stat(log: str, name: str) -> str:
    found = re.findall(rf"^stat::{name}:\s*(\d+)", log, re.M)
    return found[-1] if found else "-"


def summary(logdir: Path) -> str:
    """A Markdown table of the runs whose logs are in ``logdir``."""
    rows = [
        "| target | inputs | exec/s | cov | ft | corpus | seconds | artefacts |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for log_path in sorted(logdir.glob("*.log")):
        log = log_path.read_text(errors="replace")
        progress = re.findall(r"^#\d+\s+\w+\s+(?:cov: (\d+) ft: (\d+) )?corp: (\d+)", log, re.M)
        cov, ft, corpus = progress[-1] if progress else ("-", "-", "-")
        done = re.findall(r"^Done \d+ runs in (\d+) second", log, re.M)
        kinds = tuple(f"{log_path.stem}-{kind}" for kind in ARTEFACTS)
        found = sorted(p.name for p in logdir.iterdir() if p.name.startswith(kinds))
        crashed = re.findall(r"^==\d+== ERROR: libFuzzer: (\S+)", log, re.M)
        crashed += ["python exception"] * log.count("=== Uncaught Python exception: ===")
        artefacts = ", ".join(crashed + found) or "none"
        rows.append(
            f"| {log_path.stem} | {_stat(log, 'number_of_executed_units')} "
            f"| {_stat(log, 'average_exec_per_sec')} | {cov or '-'} | {ft or '-'} | {corpus} "
            f"| {done[-1] if done else '-'} | {artefacts} |"
        )
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] == "--list":
        print("\n".join(targets.TARGETS))
        return
    if sys.argv[1] == "--summary":
        print(summary(Path(sys.argv[2])))
        return
    name = sys.argv[1]
    target = targets.TARGETS[name]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
