"""The Dask cluster a refresh runs on: an existing scheduler by address, or a local one laid out for
the machine (one single-threaded worker per core, or one worker per GPU when encoding on GPUs).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import dask

from embedder.errors import RecsError
from recommend.config import DaskSettings


class DaskUnavailable(RecsError):
    pass


def cuda_devices() -> int:
    """GPUs torch can see (0 without torch's CUDA build)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver install means no GPU, not a failed run
        return 0


# Threads per GPU worker: the others tokenize their chunks while the GPU encodes one (a MiniLM encode
# on a GPU is bound by that CPU-side work); 4 were faster than 2 (docs/performance.md, "GPU").
GPU_WORKER_THREADS = 4


def worker_layout(device: str, n_workers: int | None, threads_per_worker: int | None,
                  gpus: int | None = None) -> dict:
    """How many local workers, and of which kind: one per GPU when encoding on GPUs (dask-cuda pins
    each to its own GPU; without dask-cuda one worker uses the first GPU) with GPU_WORKER_THREADS
    threads, else one single-threaded worker per core. `dask.n_workers` and `dask.threads_per_worker`
    override the count and the threads."""
    gpus = cuda_devices() if gpus is None and device != "cpu" else (gpus or 0)
    if device != "cpu" and gpus > 0:
        try:
            import dask_cuda  # noqa: F401
            kind = "cuda"
        except ImportError:
            kind, gpus = "single-gpu", 1
        return {"kind": kind, "n_workers": n_workers or gpus, "threads_per_worker": threads_per_worker or GPU_WORKER_THREADS}
    threads_per_worker = threads_per_worker or 1
    return {"kind": "cpu", "n_workers": n_workers or max(1, (os.cpu_count() or 1) // threads_per_worker),
            "threads_per_worker": threads_per_worker}


@contextmanager
def dask_client(settings: DaskSettings, *, device: str = "cpu", keep_malloc_trim: bool = False):
    """A distributed Client: to `settings.address` when given, else to a local cluster laid out by
    `worker_layout`."""
    from distributed import Client, LocalCluster

    address = settings.address
    if address:
        try:
            client = Client(address, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise DaskUnavailable(f"dask.address {address}: scheduler unreachable ({exc})") from None
        with client:
            yield client
        return
    layout = worker_layout(device, settings.n_workers, settings.threads_per_worker)
    # dashboard on a free port: a second cluster on the host (another refresh, a test run) never collides
    options = {"n_workers": layout["n_workers"], "threads_per_worker": layout["threads_per_worker"],
               "dashboard_address": ":0", "silence_logs": logging.ERROR}
    if layout["kind"] == "cuda":
        from dask_cuda import LocalCUDACluster as Cluster  # one process per GPU, each seeing only its own
    else:
        Cluster, options["processes"] = LocalCluster, True
    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ(keep_malloc_trim)}), \
            Cluster(**options) as cluster, Client(cluster) as client:
        yield client


def worker_environ(keep_malloc_trim: bool = False) -> dict:
    """The environment the nanny sets before it starts a worker: Dask's, less MALLOC_TRIM_THRESHOLD_=65536.
    That setting makes glibc hand memory back after every free, which slowed the encode measurably
    (tests/benchmarks/bench_encode.py measures it; docs/performance.md)."""
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    if not keep_malloc_trim:
        env.pop("MALLOC_TRIM_THRESHOLD_", None)
    return env
