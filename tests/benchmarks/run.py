"""Run every benchmark, each in a fresh process, and print their JSON lines (one per figure).

    .venv/bin/python tests/benchmarks/run.py                 # all, default sizes (about 10 minutes on 2 cores)
    .venv/bin/python tests/benchmarks/run.py encode serve    # some of them
    .venv/bin/python tests/benchmarks/run.py --smoke         # all, at the tiniest sizes (tests/test_benchmarks.py, in CI)
    .venv/bin/python tests/benchmarks/run.py serve -- --seconds 3   # what follows -- goes to each benchmark chosen

It stops at the first benchmark that fails, naming it and its exit code (its own error is above, on
stderr); the benchmarks after it do not run.

--smoke runs each benchmark with the smallest arguments that still take it through its code, and
with the stand-in encoder (stand-in:hashing-384, embedder/standin.py) where it takes --model: it
checks that the benchmarks still run against the library, not how fast anything is (figures at
these sizes mean nothing; the model's own paths are tested in tests/test_real_model.py and
tests/test_encoders.py). Left out of it, for time: bench_encode.py's second fp32 pipeline run with
Dask's MALLOC_TRIM_THRESHOLD_ (--skip-trim: the same code, another flag), Spark's ALS in
bench_lists.py (a JVM; the bench extra and Java 17), and bench_scale.py's strong-scaling mode
(--workers 1,2: a refresh per count). implicit's ALS runs in it where implicit is installed (the
bench extra). bench_serve.py keeps one client, not 16, asking through its refresh (--refresh-clients
1): 16 on 2 cores starve the refresh.

bench_gpu.py needs a GPU: --smoke runs it (small, on the GPU) only where nvidia-smi lists a GPU, and
the default run only when named (run.py gpu). on_device.sh, its wrapper for a machine without this
project installed, is never run from here.

Not part of the test suite's figures: speed is measured here, with a baseline in the same run, not
asserted in tests; tests/test_benchmarks.py asserts only that --smoke runs them all and each prints
its figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def peers() -> list[str]:
    """The lists' peers installed here (exact search always; the bench extra: ScaNN, implicit; pyspark
    with a Java runtime): a fresh clone without them still runs every benchmark, comparing ours in one
    process and on the workers with exact search on the same vectors."""
    found = ["exact"] + [p for p in ("scann", "implicit") if importlib.util.find_spec(p)]
    if importlib.util.find_spec("pyspark") and shutil.which("java"):
        found.append("spark")
    return found


BENCHMARKS = {"encode": ["--texts", "2000"], "incremental": ["--items", "3000"],
              "index": ["--items", "100000", "--queries", "10000"], "publish": ["--points", "20000"],
              "text_shards": ["--items", "100000", "--nights", "3"],
              "serve": [], "filters": [],
              "lists": ["--sizes", "100000", "--index", "auto", "--systems", "ours", "workers", *peers()],  # 300k too: --sizes 100000 300000
              "list_blocks": ["--size", "100000"],  # docs/performance.md's figure
              "scale": ["--items", "100000", "--users", "100000", "--parts", "8"]}  # the 1M/1M target: bench_scale.py
GPU = {"gpu": []}  # bench_gpu.py: default sizes (200,000 texts, 1,000,000 items)

STANDIN = "stand-in:hashing-384"
SMOKE = {"encode": ["--texts", "8", "--model", STANDIN, "--skip-trim"],
         "incremental": ["--items", "50", "--model", STANDIN],
         # IVF1024 trains on the items: at least 1024 of them
         "index": ["--items", "2000", "--queries", "50", "--dim", "32"],
         "publish": ["--points", "50", "--dim", "32"],
         "text_shards": ["--items", "300", "--nights", "2", "--queries", "20", "--dim", "32"],
         "serve": ["--items", "50", "--users", "100", "--seconds", "0.2", "--clients", "1,2", "--model", STANDIN,
                   "--refresh-clients", "1", "--add-items", "20", "--strict", "price%3C40"],  # items pass it at 50
         "filters": ["--items", "60", "--users", "80", "--asked", "20", "--keeps", "30", "--model", STANDIN],
         "lists": ["--sizes", "500", "--systems", "ours", "workers", *[p for p in peers() if p != "spark"]],
         "list_blocks": ["--size", "500"],
         "scale": ["--items", "500", "--users", "500", "--parts", "2", "--publish",
                   "--set", "index.exact_budget_s=60"]}  # --set: its config override, passed on to the refresh
SMOKE_GPU = {"gpu": ["--device", "cuda", "--texts", "4096", "--st-texts", "2048", "--items", "20000", "--dims", "64",
                     "--cpu-sample", "256", "--gpu-threads", "2"]}


def gpu_visible() -> bool:
    """Whether nvidia-smi lists a GPU (without importing torch here)."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def main(argv: list[str]) -> None:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join([*BENCHMARKS, *GPU])}")
    parser.add_argument("--smoke", action="store_true", help="the tiniest sizes: does every benchmark still run?")
    args = parser.parse_args(own)
    table = {**SMOKE, **SMOKE_GPU} if args.smoke else {**BENCHMARKS, **GPU}
    unknown = [c for c in args.names if c not in table]
    if unknown:
        sys.exit(f"run.py: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    chosen = args.names or [*BENCHMARKS, *(GPU if args.smoke and gpu_visible() else [])]
    for i, name in enumerate(chosen):
        print(f"# {name}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / f"bench_{name}.py"), *table[name], *extra])
        print(f"# {name}: exit code {done.returncode} after {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        if done.returncode:  # its own error is above, on stderr: stop at the first failure, loudly
            rest = chosen[i + 1:]
            sys.exit(f"run.py: bench_{name}.py failed (exit code {done.returncode}); "
                     + (f"not run after it: {', '.join(rest)}" if rest else "it was the last one"))


if __name__ == "__main__":
    main(sys.argv[1:])
