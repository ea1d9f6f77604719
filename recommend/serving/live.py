"""Readers follow the live version: one immutable `Snapshot` per version, swapped in one assignment.

`LiveVersion.poll_once()` asks the version store which version is live (the embedded store: a small file;
a server: the alias) and, when that changed, opens the new version beside the old one and swaps the
reference. Each query takes the snapshot once, at its start, and uses only it: its reader, its
cache and its version fields. So a query never mixes two versions and never fails across a switch;
the old snapshot is only dropped, and its reader closed when the last query holding it ends. A
failed open keeps the old snapshot and says why (`error`).

Example:
    live = LiveVersion(version_store(config.publish, config.workdir))
    snap = live.current()      # loads the live version on first use, follows switches after that
    snap.run_id, snap.age_seconds()
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime

from embedder.errors import RecsError
from recommend.serving.store import StoreUnavailable
from recommend.serving.versions import VersionStore

log = logging.getLogger("recs")
ITEM_METADATA_CACHE = 100_000  # items' metadata kept per version (a few hundred bytes each)


class NotFound(RecsError):
    """An unknown user or item, or nothing published yet. Exit code 1; HTTP 404."""


class Cache:
    """A bounded LRU (answers; items' metadata). No lock: its operations are single dict operations
    (atomic under the GIL), and a lost race costs one extra fetch. The service touches the answers
    from its event loop only; the metadata is filled from the threads that read the store."""

    def __init__(self, size: int):
        self.size, self.data = size, OrderedDict()

    def get(self, key):
        value = self.data.get(key)
        if value is not None:
            try:
                self.data.move_to_end(key)
            except KeyError:
                pass
        return value

    def put(self, key, value) -> None:
        if self.size <= 0:
            return
        self.data[key] = value
        while len(self.data) > self.size:
            try:
                self.data.popitem(last=False)
            except KeyError:
                break


@dataclass(eq=False)
class Snapshot:
    """One published version as a reader holds it. Immutable apart from its cache."""

    run_id: str
    created_at: str
    reader: object  # the store's reader of this version: payload(), metadata(), vectors(), search(), count()
    meta: dict
    cache: Cache = field(default_factory=lambda: Cache(10_000))
    # item id -> its metadata as a list shows it: lists name the same popular items over and over, so
    # a list's items are mostly here and a cold answer reads the store once (the user), not once per item shard
    items: Cache = field(default_factory=lambda: Cache(ITEM_METADATA_CACHE))
    # item id -> its batch answer entry's JSON around the score (recommend/serving/batch_json.py)
    entries: Cache = field(default_factory=lambda: Cache(ITEM_METADATA_CACHE))

    retired: bool = False  # replaced by a newer live version (LiveVersion.poll_once)
    changes: object = None  # the store's token of this version's changes in place when it was opened (its `changes`)

    def __del__(self):
        # the last query holding this version ended. A version replaced is closed: its memory maps
        # go, and with them its files' pages (nobody reads them now). Otherwise the holder is going
        # away (a CLI query, a notebook's object) while others may still read this version: released,
        # its pages left in the page cache for them (embedded.ShardReader.release)
        try:
            self.reader.close() if self.retired else self.reader.release()
        except Exception:
            pass

    def __post_init__(self):
        try:
            self.created_ts = datetime.fromisoformat(self.created_at).timestamp()
        except (TypeError, ValueError):
            self.created_ts = time.time()

    def age_seconds(self) -> float:
        return round(time.time() - self.created_ts, 1)


class LiveVersion:
    """The live version of one version store, followed. `poll_s`: how often `current()` asks the store
    again. `freeze`: after a switch, move the objects alive then out of the garbage collector's scans.
    `warm`: read the files queries touch into memory when a version opens, before it is served.
    Both are for a long-running server: its first queries then find the store in memory, not on the disk."""

    def __init__(self, store: VersionStore, poll_s: float = 1.0, cache_size: int = 10_000, freeze: bool = False,
                 warm: bool = False):
        self.store, self.poll_s, self.cache_size, self.freeze = store, poll_s, cache_size, freeze
        self.warm = warm
        self.snap: Snapshot | None = None
        self.error: str | None = None      # why the last check or open failed (None: it did not)
        self.reachable = True              # whether the last check reached the store
        self._checked = 0.0
        self._loading = threading.Lock()   # one loader at a time; readers never take it

    def current(self) -> Snapshot:
        """The live snapshot, checked against the store at most every `poll_s`. NotFound before the
        first publish; StoreUnavailable (or DamagedVersion) when nothing can be loaded."""
        if self.snap is None or time.monotonic() - self._checked >= self.poll_s:
            self.poll_once()
        snap = self.snap
        if snap is None:
            if self.error:
                raise StoreUnavailable(self.error)
            raise NotFound(f"nothing published under prefix {self.store.prefix!r} yet: run `recs refresh` first")
        return snap

    def poll_once(self) -> bool:
        """Check which version is live and swap to it if it changed. True when a new one was loaded."""
        with self._loading:
            self._checked = time.monotonic()
            try:
                run_id = self.store.live()
                self.reachable = True
            except Exception as exc:
                self.reachable, self.error = False, _describe(exc)
                return False
            try:  # the live version changed in place (items added today, its text graph built): opened again
                changes = self.store.changes(run_id) if run_id is not None else None
            except Exception as exc:
                self.reachable, self.error = False, _describe(exc)
                return False
            if run_id is None or (self.snap is not None and (run_id, changes) == (self.snap.run_id, self.snap.changes)):
                self.error = None
                return False
            started = time.perf_counter()
            try:
                # the version served changed in place: most of its shards' files are in memory already,
                # only its new shards are read (an added one, small; the text shards with their graph): a
                # whole warm read would be all CPU, under a server's load
                same = self.snap is not None and run_id == self.snap.run_id
                new = self._open(run_id, changes, warm=self.warm, held=self.snap.reader if same else None)
            except Exception as exc:
                self.error = f"cannot open version {run_id}: {_describe(exc)}"
                if self.snap is not None:  # otherwise the caller raises it (current()) or /health shows it
                    log.error("%s; still serving %s", self.error, self.snap.run_id)
                return False
            old, self.snap, self.error = self.snap, new, None  # the swap
            log.info("live version %s (opened in %.2fs)", run_id, time.perf_counter() - started)
            if self.freeze:
                gc.collect()
                gc.freeze()
            if old is not None:
                old.retired = True
                del old  # closed when the last query holding it ends
                _trim()
            return True

    def _open(self, run_id: str, changes=None, warm: bool = False, held=None) -> Snapshot:
        meta = self.store.metadata(run_id)
        reader = self.store.open(run_id)
        if warm:
            reader.warm(held)
        return Snapshot(run_id, meta.get("created_at") or "", reader, meta, Cache(self.cache_size), changes=changes)


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, RecsError) else f"{type(exc).__name__}: {exc}"


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the old version's freed pages back (glibc only)
    except (OSError, AttributeError):
        pass
