"""What this process holds open in the store, in one registry closed at exit: qdrant-client clients
(a server by URL, one per process; a local-mode folder, one per process, for tests of the server code
path from a worker) and the embedded store's version readers (recommend/serving/embedded.py, which
runs Qdrant's engine in-process, not qdrant-client). And the store's errors."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from pathlib import Path

from embedder.errors import RecsError

log = logging.getLogger("recs")
_CLIENTS: dict[str, object] = {}  # by URL, or "file:" + a local-mode folder
_READERS: weakref.WeakSet = weakref.WeakSet()  # embedded version readers (released at exit: their views removed)
_LOCK = threading.Lock()


def track_reader(reader) -> None:
    """Release `reader` at exit if nobody closed it: its private views are removed, its files left
    in the page cache for other readers (embedded.ShardReader.release)."""
    _READERS.add(reader)


def close_clients(local_only: bool = False) -> None:
    """Close the clients this process opened (`local_only`: the local-mode folders only)."""
    with _LOCK:
        keys = [k for k in _CLIENTS if k.startswith("file:") or not local_only]
        clients = [_CLIENTS.pop(k) for k in keys]
    for client in clients:
        try:
            client.close()
        except Exception:
            pass


@atexit.register
def _close_all() -> None:
    # Close while the interpreter is whole: local mode's __del__ at shutdown fails noisily.
    close_clients()
    for reader in list(_READERS):
        reader.release()


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

    with _LOCK:
        if url in _CLIENTS:
            return _CLIENTS[url]
    last = None
    for attempt in range(retries):
        try:
            client = QdrantClient(url=url, api_key=os.environ.get(api_key_env) or None, timeout=60)
            client.get_collections()  # fail here, not in the middle of a publish
            with _LOCK:
                return _CLIENTS.setdefault(url, client)
        except Exception as exc:
            last = exc
            if attempt + 1 < retries:
                time.sleep(backoff_s * 2 ** attempt)
    raise StoreUnavailable(f"Qdrant at {url} unreachable after {retries} tries: {last}")


def open_local(folder: Path):
    """A writable qdrant-client local-mode client on a folder: the tests' stand-in for a server that
    a Dask worker uploads to (tests/test_publish_tasks.py); pure Python, not for real data."""
    from qdrant_client import QdrantClient

    folder.mkdir(parents=True, exist_ok=True)
    return QdrantClient(path=str(folder))


def shared_local(folder: Path):
    """`open_local`, one client per folder in this process (a local-mode folder takes one writer):
    what a worker's upload tasks share until `close_clients(local_only=True)`."""
    key = f"file:{folder}"
    with _LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = open_local(folder)
        return _CLIENTS[key]
