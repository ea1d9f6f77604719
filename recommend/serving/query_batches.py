"""A batch's vector queries asked together.

A filtered list that falls short needs a vector query to fill it (recommend/serving/facade.py), and
a batch of users with a strict filter needs one for nearly every user. The embedded store answers
many as one planned batch per shard (`ShardReader.search_many`, the engine's query_batch) in about
half the time of one call each. So a batch finishes each answer that needs one twice: first
recording its query (`Deferred` answers it nothing), then, once the batch's queries were asked
together, from their answers, in the same order. Finishing an answer reads only what it was given,
so both runs ask the same.

Example:
    answers = answered_together(snap.reader, user_ids, lambda u, search: facade_answer(u, search), to_items)
"""

from __future__ import annotations

from collections import deque
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
        for n, (_, _, _, using, where) in enumerate(self.asked):
            groups.setdefault((using, id(where)), []).append(n)
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
