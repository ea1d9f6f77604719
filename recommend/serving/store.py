"""The Qdrant connection: a server by URL, or local-mode folders (the embedded default), same calls.

What this module knows about qdrant-client's local mode (1.13 to 1.20) is kept here, in small
functions the tests guard:
- a local store is `meta.json` plus `collection/<name>/storage.sqlite`; everything is read into memory
  when a client opens the folder, and nothing is read from disk after that;
- a client takes an exclusive lock on `<folder>/.lock` (a second client, in any process, is refused).
Readers therefore open a version through `load_readonly`: a private folder of symbolic links to the
version's files, loaded and deleted at once. They write nothing into the store and take none of its
locks, so any number of them (serve's workers, CLI queries, notebooks) load one version together,
while a refresh writes the next one beside it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
import warnings
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
    """A writable local-mode client on a new folder (the publisher's; nobody else opens it)."""
    from qdrant_client import QdrantClient

    folder.mkdir(parents=True, exist_ok=True)
    return QdrantClient(path=str(folder))


def collections_in(folder: Path) -> list[str]:
    """The collection names a local store's `meta.json` lists; DamagedVersion naming the file when it
    cannot be read (a half-written or truncated file is found here in milliseconds)."""
    meta = folder / "meta.json"
    try:
        return list(json.loads(meta.read_text())["collections"])
    except FileNotFoundError:
        raise DamagedVersion(f"{meta} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedVersion(f"{meta} is damaged ({type(exc).__name__}: {str(exc)[:120]})") from None


def storage_file(folder: Path, name: str) -> Path:
    return folder / "collection" / name / "storage.sqlite"


def load_readonly(folder: Path):
    """A client holding a local store's collections in memory, without writing to `folder` or taking
    its lock: a private view of symbolic links in the temp folder is loaded, then deleted (the open
    SQLite files keep their data even if the version is deleted later)."""
    from qdrant_client import QdrantClient

    names = collections_in(folder)
    try:
        view = Path(tempfile.mkdtemp(prefix="recs-view-"))
    except OSError as exc:
        raise StoreUnavailable(f"cannot make a view of {folder} in {tempfile.gettempdir()}: {exc}") from None
    try:
        os.symlink(folder / "meta.json", view / "meta.json")
        for name in names:
            source = storage_file(folder, name)
            if not source.is_file():
                raise DamagedVersion(f"{source} is missing")
            (view / "collection" / name).mkdir(parents=True)
            os.symlink(source, view / "collection" / name / "storage.sqlite")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # local mode's "more than 20,000 points": said in the README
                return QdrantClient(path=str(view))
        except Exception as exc:
            raise DamagedVersion(f"{folder} cannot be loaded ({type(exc).__name__}: {str(exc)[:160]})") from None
    finally:
        shutil.rmtree(view, ignore_errors=True)


def stored_points(folder: Path, name: str, check: bool = False) -> int:
    """How many points collection `name` of a closed local store holds on disk, read with SQLite in
    read-only mode (the publisher's check of what it wrote; `recs check`). `check`: also run SQLite's
    quick_check. DamagedVersion naming the file when it cannot be read."""
    path = storage_file(folder, name)
    if not path.is_file():
        raise DamagedVersion(f"{path} is missing")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            if check and (verdict := db.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                raise DamagedVersion(f"{path} is damaged (SQLite: {verdict[:120]})")
            return int(db.execute("SELECT count(*) FROM points").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise DamagedVersion(f"{path} is damaged (SQLite: {exc})") from None


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
        try:
            storage.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            storage.execute("PRAGMA journal_mode=DELETE")
            storage.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error:
            pass  # the load failed (a full disk...): the caller removes the whole version folder


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
