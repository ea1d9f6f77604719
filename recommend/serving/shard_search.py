"""Vector queries over a version's item shards in the embedded store (Qdrant's engine in-process).

Each shard answers a batch of queries as one planned `query_batch`; the shards' answers are merged by
score. The ids a query leaves out (a user's seen items, the items its stored list already gave, the
app's exclusions) are not put into the engine's filter, up to POST_EXCLUDED of them: the engine
checks a has-id condition on every point the filter passes (at 1M items, with a category that
20,000 pass, half of a query's time), and it scores the queries of a batch together only when they
differ in nothing but their vector: 16 such in about 4x the time of one, against 16x with their own
exclusions (docs/performance.md). So each query of a batch asks as deep as k plus the most ids any
of them leaves out, and those ids are dropped from its answer here.

Example:
    hits = search_shards(reader.items, reader.added, reader.replaced, [(vector, seen_ids)], "blend", 10, where)
"""

from __future__ import annotations

import heapq

from recommend.serving.payloads import LIST_FIELDS

POST_EXCLUDED = 200  # ids a query leaves out by asking deeper; past that, in the engine's filter


def search_shards(engines: list, added: list, replaced: list, queries: list, using: str, k: int,
                  where=None, subsets=None) -> list[list[tuple[dict, float]]]:
    """The `k` best items of each (vector, exclude point ids) in `queries` on vector `using`, of
    `engines` (a version's shards) and `added` (today's additions' shard, whose points replace the
    `replaced` point ids of the version's), those matching `where` (filters.py) only:
    [(payload without the lists, score)] per query, best first. `subsets` (filter_subsets.py): the
    items of the filters asked most, whose queries numpy answers instead of the engine."""
    if subsets is not None and (subset := subsets.get(using, where)) is not None:
        return subset.search(queries, k)
    few = [n for n, (_, x) in enumerate(queries) if len(x or ()) <= POST_EXCLUDED]
    many = [n for n, (_, x) in enumerate(queries) if len(x or ()) > POST_EXCLUDED]
    found: list = [None] * len(queries)
    if few:
        depth = k + max(len(queries[n][1] or ()) for n in few)
        asked = _ask(engines, added, replaced, [queries[n][0] for n in few], [()] * len(few), using, depth, where)
        for n, hits in zip(few, asked):
            left_out = {str(p) for p in queries[n][1] or ()}  # point ids as text, or the engine's UUIDs
            found[n] = [h for h in hits if str(h.id) not in left_out][:k]
    if many:
        asked = _ask(engines, added, replaced, [queries[n][0] for n in many], [queries[n][1] for n in many], using, k, where)
        for n, hits in zip(many, asked):
            found[n] = hits
    return [[(h.payload, h.score) for h in hits] for hits in found]


def _ask(engines: list, added: list, replaced: list, vectors: list, excludes: list, using: str, k: int, where) -> list:
    """The engines' k best points of each vector, `excludes` (point ids) in the engine's filter: one
    query_batch per shard, merged by score."""
    from qdrant_edge import PayloadSelector, QuantizationSearchParams, Query, QueryBatchRequest, QueryRequest, SearchParams

    from recommend.serving.filters import edge_filter

    # on a graph: 200 candidates deep (on vectors with little structure the default depth finds fewer of the true
    # top k), the best 2k of their int8 copies rescored with the original vectors; no graph: an exact scan
    rescore = SearchParams(hnsw_ef=max(200, 2 * k), quantization=QuantizationSearchParams(rescore=True, oversampling=2.0))
    payload = PayloadSelector.Exclude(list(LIST_FIELDS))

    def batch(left_out: list, limit: int):
        return QueryBatchRequest([QueryRequest(limit=limit, query=Query.Nearest([float(x) for x in v], using=using),
                                               params=rescore, filter=edge_filter(where, list(x) + left_out),
                                               with_payload=payload) for v, x in zip(vectors, excludes)])
    # an item replaced today is answered from its added point: its version's point left out, by asking
    # deeper and dropping it (as the queries' own left-out ids), or past POST_EXCLUDED in the filter
    after = len(replaced) <= POST_EXCLUDED
    found = [e.query_batch(batch([], k + len(replaced)) if after else batch(replaced, k)) for e in engines]
    if after and replaced:
        gone = {str(p) for p in replaced}
        found = [[[h for h in hits if str(h.id) not in gone] for hits in shard] for shard in found]
    found += [added[0].query_batch(batch([], k))] if added else []
    return [heapq.nlargest(k, (h for hits in found for h in hits[q]), key=lambda h: h.score) for q in range(len(vectors))]

