"""Qdrant clients (a server by URL, one per process; a local-mode folder for tests of the server
code path from a worker), the store's errors, and its atomic small-file writer.

The embedded default does not use qdrant-client: it runs Qdrant's engine in-process
(recommend/serving/shards.py, recommend/serving/embedded.py).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
from pathlib import Path

from embedder.errors import RecsError

log = logging.getLogger("recs")
_CLIENTS: dict = {}


@atexit.register
def _close_all() -> None:
    # Close while the interpreter is whole: local mode's __del__ at shutdown fails noisily.
    for client in list(_CLIENTS.values()):
        try:
            client.close()
        except Exception:
            pass
    _CLIENTS.clear()


class StoreUnavailable(RecsError):
    """Qdrant could not be reached or opened. HTTP 503."""


class DamagedVersion(RecsError):
    """A published version's files are damaged or missing: named, never served."""


def shown(value: str, limit: int = 64) -> str:
    """`value` quoted for a message, cut to `limit` characters (an id can be anything a client sent)."""
    value = str(value)
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value):,} characters)"


def open_store(url: str, api_key_env: str = "QDRANT_API_KEY", retries: int = 3, backoff_s: float = 1.0):
    """A QdrantClient for the server at `url`, one per process, checked with bounded retries and
    backoff, then a clear error. (Local-mode folders are opened by `recommend.serving.versions`.)"""
    from qdrant_client import QdrantClient

    if url in _CLIENTS:
        return _CLIENTS[url]
    last = None
    for attempt in range(retries):
        try:
            client = QdrantClient(url=url, api_key=os.environ.get(api_key_env) or None, timeout=60)
            client.get_collections()  # fail here, not in the middle of a publish
            _CLIENTS[url] = client
            return client
        except Exception as exc:
            last = exc
            if attempt + 1 < retries:
                time.sleep(backoff_s * 2 ** attempt)
    raise StoreUnavailable(f"Qdrant at {url} unreachable after {retries} tries: {last}")


def close_store(url: str) -> None:
    client = _CLIENTS.pop(url, None)
    if client is not None:
        client.close()


def open_local(folder: Path):
    """A writable qdrant-client local-mode client on a folder: the tests' stand-in for a server that
    a Dask worker uploads to (tests/test_publish_tasks.py); pure Python, not for real data."""
    from qdrant_client import QdrantClient

    folder.mkdir(parents=True, exist_ok=True)
    return QdrantClient(path=str(folder))


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a part: a
    temporary file, synced, renamed over `path`, then the folder synced."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
