"""One refresh per workdir: an OS-level lock (flock, through the `filelock` package) on
`<workdir>/refresh.lock`.

The operating system releases the lock when its process ends, however it ends (a crash, kill -9), so
a lock left behind by a dead process is simply free; the file's content plays no part. Who holds it
(host, pid, since) is written beside it, in `refresh.lock.json`, only to say so in the message.

This module imports nothing heavy, so that `recs refresh` takes the lock (or is refused) before it
loads torch, faiss or Dask. Within one process the lock is reentrant: the CLI takes it first, then
`refresh()` takes it again.

Example:
    with RefreshLock(".recs"):
        ...  # the refresh
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from embedder.errors import RecsError


class LockHeld(RecsError):
    """Another refresh is running on this workdir."""


class RefreshLock:
    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / "refresh.lock"
        self.info = Path(workdir) / "refresh.lock.json"
        self._lock: FileLock | None = None

    def acquire(self) -> "RefreshLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path.resolve()), timeout=0, is_singleton=True, thread_local=False,
                        fallback_to_soft=False, preserve_lock_file=True)
        first = not lock.is_locked
        try:
            lock.acquire()
        except Timeout:
            raise LockHeld(f"another refresh is running on {self.path.parent} ({self._holder()}); "
                           "wait for it to finish") from None
        self._lock = lock
        if first:
            self.info.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        return self

    def _holder(self) -> str:
        try:
            holder = json.loads(self.info.read_text())
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
            return f"host {holder['host']}, pid {holder['pid']}, since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            if not self._lock.is_locked:
                self.info.unlink(missing_ok=True)
            self._lock = None

    def __enter__(self) -> "RefreshLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
