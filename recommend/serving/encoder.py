"""Text queries for `recs serve`: one encoder process, fed in small dynamic batches.

The model runs in a process of its own (spawned; it dies with the server): in a thread, its Python
work held the server's GIL, so every other route's requests waited behind the encoding. Batching
needs no timer: texts that arrive while the encoder is busy are encoded together next, up to
`max_batch`. At most `max_queue` texts wait; beyond that `encode` raises `Busy` (HTTP 503). The
model loads in the background: until it is ready `encode` raises `Busy` too, and the other routes
answer meanwhile.

Example (inside an event loop):
    encoder = QueryEncoder("/path/to/model", max_batch=16)
    asyncio.create_task(encoder.run())
    vector = await encoder.encode("trail running shoes")
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from embedder.errors import RecsError

log = logging.getLogger("recs")
_MODEL: dict = {}


class Busy(RecsError):
    """The query encoder is loading or its queue is full: try again shortly (HTTP 503 with Retry-After)."""


def _child_init(model_path: str, device: str, threads: int) -> None:
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a killed server leaves no encoder behind
    except (OSError, AttributeError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us itself
    _MODEL.update(path=model_path, device=device, threads=threads)


def _child_encode(texts: list[str]) -> np.ndarray:
    from embedder.encode import encode_chunk

    return encode_chunk(texts, _MODEL["path"], device=_MODEL["device"], threads=_MODEL["threads"],
                        batch_size=max(1, len(texts))).astype(np.float32)


class QueryEncoder:
    def __init__(self, model_path: str, *, fingerprint: str | None = None, device: str = "cpu", threads: int = 1,
                 max_batch: int = 16, max_queue: int = 256):
        self.model_path, self.fingerprint, self.device, self.threads = model_path, fingerprint, device, threads
        self.max_batch, self.max_queue = max_batch, max_queue
        self.ready, self.error = False, None
        self.batches: list[int] = []  # recent batch sizes (metrics, tests)
        self._queue: asyncio.Queue | None = None
        self._pool = None

    async def run(self) -> None:
        """Start the encoder process, load the model in it, then encode queued texts until cancelled."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self.max_queue)
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_init,
                                         initargs=(self.model_path, self.device, self.threads))
        try:
            await loop.run_in_executor(self._pool, _child_encode, ["warm up"])
            self.ready = True
        except Exception as exc:
            self.error = f"the query encoder could not load {self.model_path}: {type(exc).__name__}: {exc}"
            log.error("%s", self.error)
            return
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(text, fut) for text, fut in batch if not fut.cancelled()]  # its client went away
            if not batch:
                continue
            self.batches = (self.batches + [len(batch)])[-1000:]
            try:
                vectors = await loop.run_in_executor(self._pool, _child_encode, [t for t, _ in batch])
                for (_, fut), vector in zip(batch, vectors):
                    if not fut.done():
                        fut.set_result(vector)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(RecsError(f"encoding the query failed: {type(exc).__name__}: {exc}"))

    async def encode(self, text: str) -> np.ndarray:
        if self.error:
            raise RecsError(self.error)
        if not self.ready or self._queue is None:
            raise Busy("the text model is still loading; retry in a few seconds")
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((text, fut))
        except asyncio.QueueFull:
            raise Busy(f"too many searches queued ({self.max_queue}); retry shortly") from None
        return await fut

    def close(self) -> None:
        """Stop the encoder process and wait for it (its queues are released, nothing is left behind)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
