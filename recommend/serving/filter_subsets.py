"""The items a frequent filter passes, held beside a reader: its vector queries as one matrix product.

A filtered vector query on the embedded engine scans the items its filter passes and holds the GIL
all the while (at 1M items, with a category that 20,000 items pass: about 1 ms a query in a batch of
16, 3-4 ms alone), so a server's event loop and its reads wait meanwhile. Apps ask the same few
filters over and over ("in stock", "this category"). From a filter's HOT_AFTER-th vector query on a
version, the items it passes (up to MOST_POINTS) are read once, with their vectors and metadata, and
its queries are answered here: every passing item scored at once by numpy (BLAS, the GIL released),
the left-out ones set aside, the best k taken. Exact, as the engine's scan of the same items is. The
subsets of a reader take at most BUDGET bytes (the least recently used goes first); a reader that
is replaced (a new version, today's additions) takes its subsets with it.

Example:
    subsets = FilterSubsets(reader.items, reader.added, reader.replaced)
    subset = subsets.get("blend", where)          # None: below HOT_AFTER, too many items, or no condition
    hits = subset.search([(vector, seen_point_ids)], k=10) if subset else ...
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict

import numpy as np

from recommend.serving.payloads import LIST_FIELDS

HOT_AFTER = 3  # a filter's vector queries on a version before its items are held (a filter asked once costs no read)
MOST_POINTS = 100_000  # items a held filter may pass (97 dimensions: 39 MB of vectors, about 100 MB of payloads)
BUDGET = 256 * 2**20  # bytes the subsets of one reader's item shards (and as many its text shards') hold at most
MOST_FILTERS = 10_000  # filters counted towards HOT_AFTER at once, and filters refused, per reader
BLOCK = 64  # columns whose maximum bounds a query's k-th best from below (best_rows)
PAGE = 1024  # points read in one engine call while a subset is read
IN_BACKGROUND = True  # a subset is read in a thread of its own (tests: at once, in the query that starts it)
log = logging.getLogger("recs")


class Subset:
    """The items one filter passes: their point ids, payloads (without the lists) and vectors, in rows."""

    def __init__(self, ids: list[str], payloads: list[dict], matrix: np.ndarray):
        self.ids, self.payloads, self.matrix = ids, payloads, matrix
        self.row_of = {p: n for n, p in enumerate(ids)}

    @property
    def nbytes(self) -> int:
        """Its vectors' bytes and about 1 kB a point for its id and payload (Python objects)."""
        return self.matrix.nbytes + 1024 * len(self.ids)

    def search(self, queries: list, k: int) -> list[list[tuple[dict, float]]]:
        """The `k` best rows of each (vector, exclude point ids) in `queries`, by dot product:
        [(payload, score)] per query, best first (ties in row order). One product for the whole
        batch (each numpy call lets the GIL go, and taking it back costs), then `best_rows`."""
        if not len(self.ids):
            return [[] for _ in queries]
        scores = np.asarray([np.asarray(v, dtype=np.float32) for v, _ in queries]) @ self.matrix.T
        for row, (_, exclude) in zip(scores, queries):
            row[[r for p in exclude or () if (r := self.row_of.get(str(p))) is not None]] = -np.inf
        return [[(self.payloads[r], s) for r, s in found] for found in best_rows(scores, k)]


def best_rows(scores: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Each row's k largest finite values as (column, value), largest first, ties by column. Not a
    partition of every row (about 10 ns a value): the k-th largest of the maxima of BLOCK columns
    each bounds each row's k-th largest from below (k blocks hold a value at least that large), so
    only the values at or above it are sorted, a few times k of them."""
    m, n = scores.shape
    depth, blocks = min(k, n), n // BLOCK
    if blocks > depth:
        maxima = scores[:, :blocks * BLOCK].reshape(m, blocks, BLOCK).max(axis=2)
        floor = np.partition(maxima, blocks - depth, axis=1)[:, blocks - depth]
        rows, columns = np.nonzero(scores >= floor[:, None])
        candidates = np.split(columns, np.cumsum(np.bincount(rows, minlength=m))[:-1])
    else:
        candidates = [np.arange(n)] * m
    found = []
    for row, columns in zip(scores, candidates):
        values = row[columns]
        order = np.lexsort((columns, -values))[:depth]
        found.append([(c, v) for c, v in zip(columns[order].tolist(), values[order].tolist()) if v != -np.inf])
    return found


class FilterSubsets:
    """The held subsets of one reader's item shards (`engines`, and `added`, today's additions, whose
    points replace the `replaced` point ids of the version's), by vector name and filter. A subset is
    read in a thread of its own, PAGE points an engine call, so that the GIL goes to the server's
    other threads between pages (20,000 items: about 0.4 s in all at 1M); its filter's queries are
    answered by the engine until it is ready."""

    def __init__(self, engines: list, added: list, replaced: list):
        self.engines, self.added, self.replaced = engines, added, replaced
        self.lock, self.asked, self.held, self.refused = threading.Lock(), Counter(), OrderedDict(), set()
        self.reading: dict[tuple, threading.Thread] = {}

    def get(self, using: str, where) -> Subset | None:
        """The subset for `where`'s conditions on vector `using` (its reading started at its
        HOT_AFTER-th query); None while it is not held (then the engine answers)."""
        if where is None or not where.conditions:
            return None
        key = (using, where.key()[0])  # its conditions: the ids it leaves out are each query's own
        with self.lock:
            if key in self.held:
                self.held.move_to_end(key)
                return self.held[key]
            if len(self.asked) >= MOST_FILTERS:  # an app asking ever new ranges: counting starts again
                self.asked.clear()
            self.asked[key] += 1
            if key in self.refused or key in self.reading or self.asked[key] < HOT_AFTER:
                return None
            self.reading[key] = thread = threading.Thread(target=self._hold, args=(key, using, where), daemon=True,
                                                          name="recs-filter-subset")
        if IN_BACKGROUND:
            thread.start()
            return None
        self._hold(key, using, where)
        return self.held.get(key)

    def wait(self) -> None:
        """Until every subset being read is held (or refused)."""
        for thread in list(self.reading.values()):
            if thread.is_alive():
                thread.join()

    def _hold(self, key: tuple, using: str, where) -> None:
        try:
            subset = self._read(using, where)
        except Exception as exc:  # a reader closed meanwhile (a replaced version): its queries go to the engine
            log.debug("the items of filter %s were not held: %s", key, exc)
            subset = None
        with self.lock:
            del self.reading[key]
            if subset is None or subset.nbytes > BUDGET:
                if len(self.refused) >= MOST_FILTERS:  # as `asked`: refused ones are counted again
                    self.refused.clear()
                self.refused.add(key)
                return
            self.held[key] = subset
            while sum(s.nbytes for s in self.held.values()) > BUDGET:
                self.held.popitem(last=False)

    def _read(self, using: str, where) -> Subset | None:
        from qdrant_edge import CountRequest, PayloadSelector, ScrollRequest

        from recommend.serving.filters import edge_filter

        shards = [(e, edge_filter(where, self.replaced)) for e in self.engines]
        shards += [(e, edge_filter(where)) for e in self.added]  # an item replaced today: its added point
        if sum(e.count(CountRequest(filter=f, exact=True)) for e, f in shards) > MOST_POINTS:
            return None
        ids, payloads, rows = [], [], []
        for engine, found in shards:
            offset = None
            while True:
                records, offset = engine.scroll(ScrollRequest(
                    offset=offset, limit=PAGE, filter=found, with_vector=[using],
                    with_payload=PayloadSelector.Exclude(list(LIST_FIELDS))))
                for rec in records:
                    vector = (rec.vector or {}).get(using)
                    if vector is not None:  # an item added today has its text vector only
                        ids.append(str(rec.id))
                        payloads.append(rec.payload)
                        rows.append(np.asarray(vector, dtype=np.float32))
                if offset is None or len(ids) > MOST_POINTS:
                    break
        return Subset(ids, payloads, np.stack(rows) if rows else np.zeros((0, 0), np.float32))
