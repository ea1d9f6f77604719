"""Before any work, every Dask worker is asked what it sees, so that a run across machines fails at
once with a clear message instead of quietly doing the wrong thing:

- the same nightly-recs version as the driver;
- the model resolved to the same fingerprint (a worker with other weights at that path would fill
  the cache with vectors of another model);
- every input's files listed and the first one opened (workers are handed the driver's paths);
- the embedding cache location written and read back (a cache the workers cannot see was silently
  all misses);
- when the workers will upload the publish to a Qdrant server, that server answering them (with the
  API key from their own environment); when they write the embedded store's shards, the store's
  folder written and read back.

On a LocalCluster this costs a fraction of a second and always passes.
"""

from __future__ import annotations

import os
import socket
import uuid
from importlib.metadata import PackageNotFoundError, version

import fsspec

from embedder.errors import InputError, RecsError


class PreflightFailed(RecsError):
    """A worker cannot do its share as the driver would. Exit code 2: it is the deployment's setup."""

    exit_code = 2


def project_version() -> str:
    try:
        return version("nightly-recs")
    except PackageNotFoundError:
        return "unknown"


def worker_view(sources: dict[str, str], cache_root: str, model: str, qdrant: tuple[str, str] | None = None,
                store: str | None = None) -> dict:
    """What this process sees (run on each worker): version, model fingerprint, inputs, cache, and
    with `qdrant` (url, API key variable) whether that server answers; with `store` (the embedded
    store's folder) whether it can write there."""
    from embedder.model import model_fingerprint, resolve_model_path
    from embedder.sources import list_files
    from embedder.specs import SourceSpec

    view = {"host": socket.gethostname(), "version": project_version(), "problems": []}
    try:
        view["fingerprint"] = model_fingerprint(resolve_model_path(model))
    except Exception as exc:  # reported, not raised: the driver names the worker
        view["problems"].append(f"model {model!r}: {exc}")
    for key, path in sources.items():
        try:
            first = list_files(SourceSpec(path, key))[0]
            with fsspec.open(first, "rb") as fh:
                fh.read(1)
        except InputError as exc:  # already names the key and the file
            view["problems"].append(str(exc))
        except Exception as exc:
            view["problems"].append(f"{key}: cannot read {path!r}: {exc}")
    for key, root in (("embed.cache", cache_root), ("publish (the embedded store)", store)):
        if root is not None and (problem := _write_and_read_back(root)):
            view["problems"].append(f"{key}: cannot write and read back {root!r}: {problem}")
    if qdrant is not None:
        from recommend.serving.store import open_store

        try:
            open_store(*qdrant, retries=1)
        except Exception as exc:
            view["problems"].append(f"publish.url: {exc}")
    return view


def _write_and_read_back(root: str) -> str | None:
    """Write a probe file into folder `root` (made if absent) and read it back; the problem, or None."""
    probe = f"{root.rstrip('/')}/.probe-{uuid.uuid4().hex[:8]}"
    try:
        fs, path = fsspec.core.url_to_fs(probe)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as fh:
            fh.write(b"ok")
        with fs.open(path, "rb") as fh:
            assert fh.read() == b"ok"
        fs.rm(path)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def preflight(client, *, sources: dict[str, str], cache_root: str, model: str, qdrant: tuple[str, str] | None = None,
              store: str | None = None) -> dict:
    """Ask every worker (`worker_view`) and compare with the driver; raise PreflightFailed naming each
    worker and what it lacks. `qdrant`: (url, API key variable) of the server the workers upload to;
    `store`: the embedded store's folder the workers write shards into. Returns the driver's own view."""
    mine = worker_view(sources, cache_root, model, store=store)
    if mine["problems"]:
        raise PreflightFailed("this machine: " + "; ".join(mine["problems"]))
    found = []
    for address, view in client.run(worker_view, sources, cache_root, model, qdrant, store).items():
        where = f"worker {address} ({view['host']})"
        if view["version"] != mine["version"]:
            found.append(f"{where} runs nightly-recs {view['version']}, the driver {mine['version']}")
        if view.get("fingerprint") and view["fingerprint"] != mine["fingerprint"]:
            found.append(f"{where} has other model files for {model!r} (fingerprint {view['fingerprint'][:12]}, "
                         f"the driver's {mine['fingerprint'][:12]}): its vectors would not match")
        found += [f"{where}: {problem}" for problem in view["problems"]]
    if found:
        raise PreflightFailed("preflight: " + "; ".join(found) + ". Every worker needs the same environment, the "
                              "same model files and the inputs and cache at the same paths or URLs (README, "
                              "Configuration)")
    return mine


def encode_threads(client) -> dict[str, int]:
    """Torch threads for an encode task on each worker: the worker host's cores shared among the
    task slots (threads) of the workers on that host."""
    info = client.scheduler_info()["workers"]
    cores = client.run(os.cpu_count)
    slots_per_host: dict[str, int] = {}
    for address, worker in info.items():
        host = worker.get("host", address)
        slots_per_host[host] = slots_per_host.get(host, 0) + int(worker.get("nthreads", 1))
    return {address: max(1, (cores.get(address) or 1) // slots_per_host[worker.get("host", address)])
            for address, worker in info.items()}
