"""The Qdrant connection: local mode at a path (the embedded default) or a server by URL, same calls.

Local mode allows one client per folder per process, so clients are shared through `open_store`.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from contextlib import contextmanager
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
    """Qdrant could not be reached or opened."""


def open_store(url: str | None, local_path: str | Path | None = None, api_key_env: str = "QDRANT_API_KEY",
               retries: int = 3, backoff_s: float = 1.0):
    """A QdrantClient for `url` (server) or for local mode at `local_path`; one per location per process.

    Server connections are checked with bounded retries and backoff, then fail with a clear error.
    """
    from qdrant_client import QdrantClient

    key = url or str(Path(local_path).resolve())
    if key in _CLIENTS:
        return _CLIENTS[key]
    last = None
    for attempt in range(retries):
        try:
            if url:
                client = QdrantClient(url=url, api_key=os.environ.get(api_key_env) or None, timeout=60)
                client.get_collections()  # fail here, not in the middle of a publish
            else:
                Path(local_path).mkdir(parents=True, exist_ok=True)
                client = QdrantClient(path=str(local_path))
            _CLIENTS[key] = client
            return client
        except RuntimeError as exc:  # local mode: the folder is held by another process
            raise StoreUnavailable(f"Qdrant local store {local_path} is in use by another process ({exc}); "
                                   "stop it (e.g. a running `recs serve`) or use a Qdrant server (publish.url)") from None
        except Exception as exc:
            last = exc
            time.sleep(backoff_s * 2 ** attempt)
    raise StoreUnavailable(f"Qdrant at {url} unreachable after {retries} tries: {last}")


def close_store(url: str | None = None, local_path: str | Path | None = None) -> None:
    key = url or str(Path(local_path).resolve())
    client = _CLIENTS.pop(key, None)
    if client is not None:
        client.close()


def _local_sqlite(client, name: str):
    """The SQLite connection behind local-mode collection `name`, or None (a server, in-memory mode, or
    a qdrant-client whose local storage is laid out otherwise: then loads run at its default pace)."""
    from qdrant_client.local.qdrant_local import QdrantLocal

    local = getattr(client, "_client", None)
    if not isinstance(local, QdrantLocal):
        return None
    try:
        persistence = local.collections[name].storage  # None in in-memory mode: nothing to sync
        return persistence.storage if persistence is not None else None
    except (AttributeError, KeyError):
        log.warning("qdrant-client's local storage is not where this version expects it; "
                    "collection %s loads with a disk sync per point", name)
        return None


@contextmanager
def bulk_load(client, name: str):
    """Load many points into a new local-mode collection without a disk sync per point.

    Local mode commits every point on its own, and SQLite's default then syncs the file to disk each
    time. For the load the collection's file runs in WAL mode with synchronous=NORMAL (several times
    faster: README, publish); at the end a checkpoint writes the whole load into the database file and
    syncs it, and the file returns to SQLite's default journal, before the caller counts the points
    and switches anything live.
    A server (or in-memory mode): nothing changes.

    Example:
        with bulk_load(client, "recs_items_20261129T010000-ab12"):
            client.upload_points("recs_items_20261129T010000-ab12", points)
    """
    storage = _local_sqlite(client, name)
    if storage is None:
        yield
        return
    storage.execute("PRAGMA journal_mode=WAL")
    storage.execute("PRAGMA synchronous=NORMAL")
    try:
        yield
    finally:
        storage.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        storage.execute("PRAGMA journal_mode=DELETE")
        storage.execute("PRAGMA synchronous=FULL")
