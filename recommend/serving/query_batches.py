"""A batch's vector queries asked together.

A filtered list that falls short needs a vector query to fill it (recommend/serving/facade.py), and
a batch of users with a strict filter needs one for nearly every user. The embedded store answers
many as one planned batch per shard (`ShardReader.search_many`, the engine's query_batch) in about
half the time of one call each. So a batch finishes each answer that needs one twice: first
recording its query (`Deferred` answers it nothing), then, once the batch's queries were asked
together, from their answers, in the same order. Finishing an answer reads only what it was given,
so both runs ask the same.

A server does the same for the single requests waiting for a vector query (`QueryBatcher`): its one
search thread takes every request waiting when it is free and asks their queries together, so under
load a query costs what it costs in a batch, and a request waits for one batch, not for a queue of
single queries (the engine holds the GIL while it searches: a second search thread would not help).

Example:
    answers = answered_together(snap.reader, user_ids, lambda u, search: facade_answer(u, search), to_items)
    answer = await QueryBatcher(search_pool, to_items).finish(snap.reader, needs.then)   # needs: a NeedsQuery
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import Executor
from typing import Callable

import numpy as np


class NeedsQuery(Exception):
    """The stored list does not answer alone: a vector query is needed (raised when none was allowed).
    `then()` finishes the answer from where it stopped (the stored list's part is done)."""

    def __init__(self, then):
        super().__init__("a vector query is needed")
        self.then = then


class Deferred:
    """A stand-in for facade.search_items: records each query, then, after `ask()`, answers them in
    the order asked. `make(hits)`: the answer's items from a store's hits [(payload, score)]."""

    def __init__(self, reader, make: Callable):
        self.reader, self.make, self.asked, self.found = reader, make, [], None

    def __call__(self, snap, vector, k: int, exclude=None, using: str = "", where=None) -> list:  # search_items' call
        if self.found is None:
            self.asked.append((np.asarray(vector, dtype=np.float32), k, exclude, using, where))
            return []
        return self.found.popleft()

    def ask(self) -> None:
        """Every recorded query: one `search_many` per vector name and filter, as deep as its deepest."""
        groups: dict = {}
        for n, (_, _, _, using, where) in enumerate(self.asked):  # equal filters of several requests: one group
            groups.setdefault((using, where.key() if where else None), []).append(n)
        found: list = [None] * len(self.asked)
        for rows in groups.values():
            _, _, _, using, where = self.asked[rows[0]]
            hits = self.reader.search_many([(self.asked[n][0], self.asked[n][2]) for n in rows], using,
                                           max(self.asked[n][1] for n in rows), where or None)
            for n, found_n in zip(rows, hits):
                found[n] = self.make(found_n[:self.asked[n][1]])
        self.found = deque(found)


def answered_together(reader, subjects: list, answer: Callable, make: Callable) -> list:
    """`answer(subject, search)` of each subject (an answer, None, or NeedsQuery when a vector query must
    finish it), the vector queries of those that need one asked together through `search` (a Deferred)."""
    search, pending, answers = Deferred(reader, make), {}, []
    for n, subject in enumerate(subjects):
        try:
            answers.append(answer(subject, search))
        except NeedsQuery as needs:
            pending[n] = needs.then
            answers.append(None)
    if pending:
        for then in pending.values():
            then()  # recorded
        search.ask()
        for n, then in pending.items():
            answers[n] = then()
    return answers


def finished_together(reader, thens: list[Callable], make: Callable) -> list:
    """Each NeedsQuery's `then(search)`, their vector queries asked together: the answers, or the
    exception that one raised (it fails alone; a store error while asking fails them all)."""
    search, done = Deferred(reader, make), [None] * len(thens)
    for n, then in enumerate(thens):
        asked = len(search.asked)
        try:
            then(search)  # recorded
        except Exception as exc:
            del search.asked[asked:]  # what it asked before failing would shift the others' answers
            done[n] = exc
    try:
        search.ask()
    except Exception as exc:
        return [exc] * len(thens)
    for n, then in enumerate(thens):
        if done[n] is None:
            try:
                done[n] = then(search)
            except Exception as exc:
                done[n] = exc
    return done


class QueryBatcher:
    """The single requests waiting for a vector query, finished together on `pool` (one thread: the
    server's search thread): when it is free, it takes up to `most` of them, asks their queries as one
    batch per filter and shard (`finished_together`), answers them, and takes the next ones waiting.
    One request alone is asked at once, as before; under load each batch is what arrived while the
    one before ran. `sizes`: the last 1,000 batches' sizes."""

    def __init__(self, pool: Executor, make: Callable, most: int = 64):
        self.pool, self.make, self.most = pool, make, most
        self.lock, self.waiting, self.draining = threading.Lock(), [], False
        self.sizes: deque = deque(maxlen=1000)

    async def finish(self, reader, then: Callable):
        """The answer `then` (a NeedsQuery's) finishes with its query asked beside the others waiting."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.lock:
            self.waiting.append((reader, then, future, loop))
            start, self.draining = not self.draining, True
        if start:
            self.pool.submit(self._drain)
        return await future

    def _drain(self) -> None:
        while True:
            with self.lock:
                taken, self.waiting = self.waiting[:self.most], self.waiting[self.most:]
                if not taken:
                    self.draining = False
                    return
            self.sizes.append(len(taken))
            by_reader: dict = {}  # across a version switch: each version's requests on its own reader
            for waiting in taken:
                by_reader.setdefault(id(waiting[0]), []).append(waiting)
            for group in by_reader.values():
                try:
                    done = finished_together(group[0][0], [then for _, then, _, _ in group], self.make)
                except BaseException as exc:  # never leave a request waiting
                    done = [exc] * len(group)
                for (_, _, future, loop), answer in zip(group, done):
                    try:
                        loop.call_soon_threadsafe(_settle, future, answer)
                    except RuntimeError:  # its event loop is closed (the server stopped): nobody waits for it
                        pass


def _settle(future: asyncio.Future, answer) -> None:
    if not future.done():  # a request whose client went away was cancelled
        if isinstance(answer, BaseException):
            future.set_exception(answer)
        else:
            future.set_result(answer)
