"""The Qdrant connection: local mode at a path (the embedded default) or a server by URL, same calls.

Local mode allows one client per folder per process, so clients are shared through `open_store`.
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path

from embedder.errors import RecsError

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
