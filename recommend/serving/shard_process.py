"""A shard written in a process of its own, from a task on a Dask worker (recommend/serving/publish.py).

Qdrant's engine holds the GIL through a whole `optimize()`: minutes for half a million points with
a text graph, and on a loaded machine longer than the five minutes after which Dask's scheduler
takes a worker whose heartbeats stopped for dead. A publish at 1M items and users under load failed
that way: each attempt of an item shard's task "killed" its worker, and the task failed after four.
So a task writing a text shard with a graph runs the write in a child process and waits for it,
the worker's event loop free to answer (the other shards' optimize holds the GIL for seconds: they
are written on the worker's thread). The child dies with the worker (PR_SET_PDEATHSIG, Linux): a worker killed mid-write leaves
no writer behind. Errors come back as they were raised (an OSError stays an OSError).
`run_shard_tasks` hands a publish's (or a graph build's) shard tasks to the workers this way.

Example:
    info = run_apart(write_shard_task, folder, "text", specs, pieces, (0, 2), Graph(m=16))
    done = run_shard_tasks(write_shard_task, calls, order, apart=lambda name: False, dask=client)
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from recommend.serving.shards import ShardError

APART_FROM = 10_000  # points of a text shard with a graph from which a worker builds it in a child process
ROOT = Path(__file__).resolve().parents[2]  # holds recommend/ and embedder/: the child imports them from here


def run_apart(function, *args):
    """`function(*args)` in a child Python process: its result, or the exception it raised (a
    ShardError with the child's last words when the child itself died)."""
    import cloudpickle

    with tempfile.TemporaryDirectory(prefix="recs-shard-") as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        job.write_bytes(cloudpickle.dumps((function, args)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        done = subprocess.run([sys.executable, "-m", "recommend.serving.shard_process", str(job), str(result)],
                              env=env, capture_output=True, text=True,
                              preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        if done.returncode != 0 or not result.exists():
            raise ShardError(f"the process writing a shard ({getattr(function, '__name__', function)}) ended with exit "
                             f"code {done.returncode}: {done.stderr.strip()[-1500:] or 'no message'}")
        outcome = pickle.loads(result.read_bytes())
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def run_shard_tasks(task, calls: dict[str, tuple], order: list[str], apart: Callable[[str], bool], *, dask=None,
                    progress: Callable[[int], None] | None = None, key: str = "shard") -> dict[str, dict]:
    """`task(*calls[name])` for each name of `order`: in this process when `dask` is None, else as
    tasks on the workers, one per task slot, the next handed out as one ends (submitted all at once,
    the scheduler queued two on each worker and a worker that finished early sat idle), in a child
    process (`run_apart`) where `apart(name)`. `progress(points)` as each ends. {name: its result}."""
    done: dict[str, dict] = {}
    if dask is None:
        for name in order:
            done[name] = task(*calls[name])
            if progress:
                progress(done[name]["points"])
        return done
    from embedder.task_window import in_window, task_slots

    stamp = time.time_ns()

    def submit(i: int):
        name = order[i]
        return dask.submit(*((run_apart, task) if apart(name) else (task,)), *calls[name], pure=False,
                           key=f"{key}-{name}-{stamp}")

    for i, info in in_window(dask, len(order), submit, window=task_slots(dask)):
        done[order[i]] = info
        if progress:
            progress(info["points"])
    return done


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed when the worker goes


def main(job: str, result: str) -> None:
    function, args = pickle.loads(Path(job).read_bytes())
    try:
        outcome = function(*args)
    except Exception as exc:
        outcome = exc
    try:
        data = pickle.dumps(outcome)
    except Exception:  # an exception that does not pickle: its text
        data = pickle.dumps(ShardError(f"{type(outcome).__name__}: {outcome}"))
    Path(result).write_bytes(data)


if __name__ == "__main__":
    main(*sys.argv[1:3])
