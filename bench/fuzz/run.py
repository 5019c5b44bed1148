"""Coverage-guided fuzzing of one target with atheris (libFuzzer), or the bounded smoke run.

    .venv/bin/python bench/fuzz/run.py smtp -runs=10000000        # the long run
    .venv/bin/python bench/fuzz/run.py spf -max_total_time=60 corpus/spf
    .venv/bin/python bench/fuzz/run.py --list

Everything after the target name goes to libFuzzer (-runs=N, -max_total_time=S, -jobs=J, a
corpus directory). Postvern's modules are instrumented for coverage; the libraries they use
are not (their branches would drown ours). At the end libFuzzer prints its own figures
(executions, execs/s, coverage); a crash writes the input to crash-<sha1> and exits non-zero.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["postvern"]):
    import targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] == "--list":
        print("\n".join(targets.TARGETS))
        return
    name = sys.argv[1]
    target = targets.TARGETS[name]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
