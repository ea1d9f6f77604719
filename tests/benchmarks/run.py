"""Run every benchmark, each in a fresh process, and print their JSON lines (one per figure).

    .venv/bin/python tests/benchmarks/run.py                 # all, default sizes (about 10 minutes on 2 cores)
    .venv/bin/python tests/benchmarks/run.py encode serve    # some of them

Not part of the test suite: speed is measured here, with a baseline in the same run, not asserted in tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {"encode": ["--texts", "2000"], "incremental": ["--items", "3000"],
              "index": ["--items", "100000", "--queries", "10000"], "publish": ["--points", "20000"],
              "serve": [], "lists": ["--sizes", "100000"],  # 300k too: bench_lists.py --sizes 100000 300000
              "list_blocks": ["--size", "100000"],  # the README's figure: --size 300000
              "scale": ["--items", "100000", "--users", "100000", "--parts", "8"]}  # the 1M/1M target: bench_scale.py

if __name__ == "__main__":
    chosen = sys.argv[1:] or list(BENCHMARKS)
    unknown = [c for c in chosen if c not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    for name in chosen:
        print(f"# {name}", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, str(HERE / f"bench_{name}.py"), *BENCHMARKS[name]])
        if done.returncode:  # its own error is above, on stderr: stop at the first failure, loudly
            sys.exit(f"run.py: bench_{name}.py failed (exit code {done.returncode}); the benchmarks after it did not run")
