"""The read path for apps and notebooks: "for user U", "similar to item I", "similar to this text".

Every answer says which published version it came from, when that version was made and how old it
is. A query takes the live snapshot once (recommend/serving/live.py) and reads only from it, so an
answer is wholly from yesterday's version or wholly from today's; a refresh that publishes meanwhile
is picked up by the next query (within `poll_s`), without reopening anything by hand. The functions
below `Recommender` take a snapshot and are what the HTTP service calls too.

Every query takes a filter on the items' indexed fields and items to leave out
(recommend/serving/filters.py). A list is answered from its stored list first, the items that pass
kept; when fewer than k pass, a vector query on the store fills it (the subject's published vector,
the filter as a payload filter, a user's seen items left out), and `source` says so ("history+query";
"query" when none of the stored list passed).

Example:
    rec = Recommender.from_config("config.yaml")
    answer = rec.for_user("U00042", where={"category": "Shoes", "price": {"lt": 100}}, exclude=["I7"])
    answer.version, answer.age_seconds, answer.source, [(r.item_id, r.score) for r in answer.items]
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import numpy as np

from embedder.errors import RecsError
from recommend.serving.diversity import diversify, pool_size
from recommend.serving.filters import BadFilter, Where
from recommend.serving.live import LiveVersion, NotFound, Snapshot
from recommend.serving.payloads import parse_list
from recommend.serving.publish import BLEND_QUERY_VECTOR, BLEND_VECTOR, ITEM_VECTOR, USER_VECTOR, point_id
from recommend.serving.query_batches import NeedsQuery, answered_together
from recommend.serving.store import StoreUnavailable, shown

__all__ = ["Answer", "BatchAnswer", "NotFound", "Recommendation", "Recommender"]
MAX_BATCH = 1000  # users in one for_users call (POST /users/batch)


@dataclass
class Recommendation:
    item_id: str
    score: float
    metadata: dict = field(default_factory=dict)


@dataclass
class Answer:
    """Items for one query, best first, and the version they came from (its run id, when it was
    made, and its age in seconds when the answer was given)."""

    query: str
    version: str
    created_at: str
    age_seconds: float
    source: str  # history | few-events | history+popular | popular | similar | similar-from-text | realtime | text;
    #              "+query" when a vector query filled a filtered list, "query" when it made all of it
    items: list[Recommendation]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BatchAnswer:
    """One answer per user id asked, in order, from one version: an Answer, or None for an id the
    version does not hold (in `unknown` too)."""

    version: str
    created_at: str
    age_seconds: float
    user_ids: list[str]
    answers: list[Answer | None]
    unknown: list[str]

    def to_dict(self, recommendations: bool = False) -> dict:
        """The HTTP answer's form: the version fields and "answers": [{"user_id", "source", "items"}
        or {"user_id", "error"}], in the order asked. `recommendations`: the items left as the
        Recommendation objects, for orjson to write as objects (the HTTP answer: asdict's deep copies
        took 80 of 120 ms for 1,000 users at 1M x 1M)."""
        rows = [{"user_id": u, "source": a.source, "items": a.items if recommendations else [asdict(r) for r in a.items]}
                if a is not None else {"user_id": u, "error": "unknown user"} for u, a in zip(self.user_ids, self.answers)]
        return {"version": self.version, "created_at": self.created_at, "age_seconds": self.age_seconds, "answers": rows}


class Recommender:
    """Queries against the live version (the embedded store or a server: the same calls)."""

    def __init__(self, live: LiveVersion, model: str | None = None, device: str = "auto", k: int = 10):
        """`model`: the sentence-transformers model for text queries (default: the live version's)."""
        self.live, self.model, self.device, self.k = live, model, device, k

    @classmethod
    def from_config(cls, config, poll_s: float = 1.0, **kwargs) -> "Recommender":
        """From a Config or a config.yaml path: the versions the refresh publishes."""
        from recommend.config import Config, load_config
        from recommend.serving.versions import version_store

        if not isinstance(config, Config):
            config = load_config(config, check_inputs=False)
        kwargs.setdefault("k", config.lists.k)
        kwargs.setdefault("device", config.embed.device)
        live = LiveVersion(version_store(config.publish, config.workdir), poll_s=poll_s)
        return cls(live, config.embed.model, **kwargs)

    def live_version(self) -> str:
        return self.live.current().run_id

    def versions(self):
        """Published (complete) versions, newest first; `.live` marks the one being served."""
        return self.live.store.versions()

    def for_user(self, user_id: str, k: int | None = None, recent_items: list[str] | None = None,
                 where: dict | list[str] | None = None, exclude: list[str] | None = None, diversity: float = 0.0) -> Answer:
        """The precomputed list for `user_id`. A user the batch has not seen gets a real-time list from
        `recent_items` (item ids they just interacted with) when given; otherwise NotFound. `where`:
        {field: value | [values] | {"gt"|"gte"|"lt"|"lte": number}} on indexed fields, or texts as
        ["category=Shoes", "price<100"]; `exclude`: item ids never answered; `diversity` (0..1): variety
        over relevance (maximal marginal relevance, recommend/serving/diversity.py)."""
        snap = self.live.current()
        return user_answer(snap, user_id, k or self.k, recent_items, where_of(snap, where, exclude), _diversity(diversity))

    def for_users(self, user_ids: list[str], k: int | None = None, where: dict | list[str] | None = None,
                  exclude: list[str] | None = None, diversity: float = 0.0) -> BatchAnswer:
        """`for_user` of each of up to MAX_BATCH ids (tonight's email), all from one version; an
        unknown id gets None and is listed in `unknown`, never failing the others."""
        snap = self.live.current()
        return users_answers(snap, user_ids, k or self.k, where_of(snap, where, exclude), _diversity(diversity))

    def similar(self, item_id: str, k: int | None = None, where: dict | None = None,
                exclude: list[str] | None = None, diversity: float = 0.0) -> Answer:
        """The precomputed most similar items to `item_id` (itself excluded)."""
        snap = self.live.current()
        return similar_answer(snap, item_id, k or self.k, where_of(snap, where, exclude), _diversity(diversity))

    def for_items(self, item_ids: list[str], k: int | None = None, query: str | None = None,
                  where: dict | list[str] | None = None, exclude: list[str] | None = None, diversity: float = 0.0) -> Answer:
        """Real-time fallback: the list a user with exactly these items in their history would get
        (built as the batch builds one, in the same blended space), those items excluded."""
        snap = self.live.current()
        return items_answer(snap, item_ids, k or self.k, query, where_of(snap, where, exclude), _diversity(diversity))

    def search(self, text: str, k: int | None = None, where: dict | None = None,
               exclude: list[str] | None = None, diversity: float = 0.0) -> Answer:
        """Items nearest to `text`, encoded now with the model the live version was built with."""
        from embedder.encode import encode_chunk

        snap = self.live.current()
        path, found = query_model(snap, self.model), where_of(snap, where, exclude)
        return text_answer(snap, encode_chunk([text], str(path), device=self.device)[0], text, k or self.k, found,
                           _diversity(diversity))


# ---- queries on one snapshot (the facade's and the HTTP service's) -------------------------------

def _store_errors(query):
    """A store that stops answering mid-query (a Qdrant server outage) is StoreUnavailable (HTTP 503,
    a message in the CLI), never a traceback. qdrant-client is not imported for this: the embedded
    store's readers never load it."""

    @functools.wraps(query)
    def guarded(snap: Snapshot, *args, **kwargs):
        try:
            return query(snap, *args, **kwargs)
        except Exception as exc:
            if not (isinstance(exc, ConnectionError) or type(exc).__module__.startswith("qdrant_client.http")):
                raise
            raise StoreUnavailable(f"Qdrant did not answer for version {snap.run_id}: {type(exc).__name__}: "
                                   f"{str(exc)[:200]}") from None
    return guarded


def answer(snap: Snapshot, query: str, source: str, items: list[Recommendation]) -> Answer:
    return Answer(query, snap.run_id, snap.created_at, snap.age_seconds(), source, items)


def where_of(snap: Snapshot, where: dict | list[str] | None = None, exclude=None) -> Where:
    """A filter against `snap`'s indexed fields: from a dict or the HTTP and CLI texts ("category=Shoes",
    "price<100"), and item ids to leave out. BadFilter when the version cannot answer it."""
    fields = snap.meta.get("indexed_fields") or {}
    if isinstance(where, (list, tuple)):
        return Where.parse(list(where), exclude, fields=fields)
    return Where.build(where, exclude, fields=fields)


@_store_errors
def user_answer(snap: Snapshot, user_id: str, k: int, recent_items: list[str] | None = None,
                where: Where | None = None, diversity: float = 0.0, vector_query: bool = True) -> Answer:
    """`vector_query` False: NeedsQuery where the stored list does not answer alone (a server reads
    those on its search thread, the rest beside plain lookups)."""
    payload = _point(snap, "user", user_id)
    if payload is None:
        if recent_items:
            return items_answer(snap, recent_items, k, query=f"user {user_id}", where=where, diversity=diversity)
        raise NotFound(f"unknown user {shown(user_id)} in version {snap.run_id}; pass recent items for a real-time list")
    return _user_listed(snap, user_id, parse_list(payload, "recommended"), k, where, diversity, vector_query)


def _user_listed(snap: Snapshot, user_id: str, stored: tuple, k: int, where: Where | None, diversity: float = 0.0,
                 vector_query: bool = True, meta: dict | None = None, search=None) -> Answer:
    entries, source, seen = stored
    default, profile, points = search or search_items, [], {}

    def fill(taken: list[str], n: int, search=None) -> list[Recommendation]:
        if not profile:  # read once: a batched request is finished twice (query_batches.py)
            profile.append(snap.reader.vector("user", user_id, USER_VECTOR))
        vector = profile[0]
        if vector is None:
            return []
        using = BLEND_VECTOR if snap.meta.get("layout") else ITEM_VECTOR
        if (left_out := points.get(tuple(taken))) is None:
            left_out = points[tuple(taken)] = _points(seen, taken, where=where)
        return (search or default)(snap, vector, n, exclude=left_out, using=using, where=where)
    return _answered(_listed(snap, f"user {user_id}", entries, source or "recommended", k, where, fill, diversity, meta),
                     vector_query)


@_store_errors
def users_answers(snap: Snapshot, user_ids: list[str], k: int, where: Where | None = None,
                  diversity: float = 0.0) -> BatchAnswer:
    """`user_answer` of each id, the payloads read in one call per shard (not cached: a batch would
    push the hot answers out) and the listed items' metadata in one more."""
    if len(user_ids) > MAX_BATCH:
        raise BadFilter(f"{len(user_ids):,} user ids in one call; at most {MAX_BATCH:,}: split the batch")
    lists = {u: parse_list(p, "recommended") for u, p in snap.reader.payloads("user", list(dict.fromkeys(user_ids))).items()}
    meta = item_metadata(snap, list({i for entries, _, _ in lists.values() for i, _ in (entries if where or diversity else entries[:k])}))
    if where and not diversity:  # the short lists' vector queries asked together (query_batches.py)
        answers = answered_together(snap.reader, user_ids, lambda u, search: _user_listed(
            snap, u, lists[u], k, where, 0.0, False, meta, search) if u in lists else None, hit_items)
    else:
        answers = [_user_listed(snap, u, lists[u], k, where, diversity, meta=meta) if u in lists else None for u in user_ids]
    return BatchAnswer(snap.run_id, snap.created_at, snap.age_seconds(), list(user_ids), answers,
                       [u for u in dict.fromkeys(user_ids) if u not in lists])


@_store_errors
def similar_answer(snap: Snapshot, item_id: str, k: int, where: Where | None = None, diversity: float = 0.0,
                   vector_query: bool = True) -> Answer:
    payload = _point(snap, "item", item_id)
    if payload is None:
        raise NotFound(f"unknown item {shown(item_id)} in version {snap.run_id}")
    entries, source, _ = parse_list(payload, "similar")

    def fill(taken: list[str], n: int, search=None) -> list[Recommendation]:
        vector, using = _item_query(snap, item_id)
        return [] if vector is None else (search or search_items)(snap, vector, n, using=using, where=where,
                                                                  exclude=_points([item_id], taken, where=where))
    if "similar" not in payload:  # an item added today (serving/additions.py): its text's nearest, until the night
        entries, source = [], "query"
    return _answered(_listed(snap, f"item {item_id}", entries, source or "similar", k, where, fill, diversity), vector_query)


def _item_query(snap: Snapshot, item_id: str) -> tuple[np.ndarray | None, str]:
    """An item's similar-items query as the batch made it (its published raw query row, weighted by
    the version's layout and query scale) and the vector it is asked against; the text vector
    against the text vectors for a version without them."""
    layout, scale = snap.meta.get("layout"), snap.meta.get("query_scale")
    if layout and scale:
        from recommend.ranking.blend import Layout, item_queries

        _, rows = snap.reader.vectors([item_id], BLEND_QUERY_VECTOR)
        if rows:
            raw, shape = np.asarray(rows, dtype=np.float32), Layout(**layout)
            return item_queries(raw[:, :shape.behaviour_dim], raw[:, shape.behaviour_dim:], shape, scale)[0], BLEND_VECTOR
    _, rows = snap.reader.vectors([item_id], ITEM_VECTOR)
    return (np.asarray(rows[0], dtype=np.float32) if rows else None), ITEM_VECTOR


def _points(*id_lists, where: Where | None = None) -> list:
    """The point ids of the items in `id_lists` and of `where`'s excluded ones."""
    ids = {i for ids in id_lists for i in ids} | set(where.exclude if where else ())
    return [point_id("item", i) for i in ids]


@_store_errors
def items_answer(snap: Snapshot, item_ids: list[str], k: int, query: str | None = None,
                 where: Where | None = None, diversity: float = 0.0) -> Answer:
    from recommend.ranking.blend import Layout, user_from_items  # the real-time path only: pandas and scipy with it

    layout = snap.meta.get("layout")
    name = BLEND_QUERY_VECTOR if layout else ITEM_VECTOR  # versions before the blend had text only
    found, vectors = snap.reader.vectors(item_ids, name)
    if not found:
        listed = ", ".join(shown(i, 32) for i in item_ids[:5]) + (f" and {len(item_ids) - 5} more" if len(item_ids) > 5 else "")
        raise NotFound(f"none of the items {listed} is in version {snap.run_id}")
    rows = np.array(vectors, dtype=np.float32)
    if layout:
        vector, using = user_from_items(rows, Layout(**layout)), BLEND_VECTOR
    else:
        vector, using = rows.mean(axis=0) / (np.linalg.norm(rows.mean(axis=0)) or 1.0), ITEM_VECTOR
    hits = search_items(snap, vector, pool_size(k) if diversity else k, exclude=found + _points(where=where), using=using,
                        where=where)
    if diversity:
        return answer(snap, query or f"items {','.join(item_ids)}", "realtime+diverse", diversify(snap.reader, hits, k, diversity))
    return answer(snap, query or f"items {','.join(item_ids)}", "realtime", hits)


def query_model(snap: Snapshot, model: str | None = None):
    """The model to encode text queries for `snap` with: the version's own, checked by fingerprint."""
    from embedder.model import model_fingerprint, resolve_model_path

    path = resolve_model_path(model or snap.meta.get("model") or "all-MiniLM-L6-v2")
    expected = snap.meta.get("model_fingerprint")
    if expected and model_fingerprint(path) != expected:
        raise RecsError(f"the model at {path} is not the one version {snap.run_id} was built with "
                        f"({snap.meta.get('model')}); text queries would compare different vector spaces")
    return path


@_store_errors
def text_answer(snap: Snapshot, vector: np.ndarray, text: str, k: int, where: Where | None = None,
                diversity: float = 0.0) -> Answer:
    hits = search_items(snap, vector, pool_size(k) if diversity else k, exclude=_points(where=where), where=where)
    if diversity:
        return answer(snap, f"text {shown(text, 200)}", "text+diverse", diversify(snap.reader, hits, k, diversity))
    return answer(snap, f"text {shown(text, 200)}", "text", hits)


def search_items(snap: Snapshot, vector: np.ndarray, k: int, exclude: list | None = None,
                 using: str = ITEM_VECTOR, where: Where | None = None) -> list[Recommendation]:
    """The `k` nearest items on vector `using`, `exclude` (point ids) left out, those matching
    `where` only: a vector query on the store."""
    return hit_items(snap.reader.search(np.asarray(vector, dtype=np.float32), using, k, exclude, where or None))


def hit_items(hits: list) -> list[Recommendation]:
    """A store's hits [(payload, score)] as the answer's items."""
    return [Recommendation(p["item_id"], round(float(score), 5), {key: v for key, v in p.items() if key != "item_id"})
            for p, score in hits]


def _point(snap: Snapshot, kind: str, business_id: str) -> dict | None:
    key = (kind, business_id)
    payload = snap.cache.get(key)
    if payload is None:
        payload = snap.reader.payload(kind, business_id)
        if payload is not None:
            snap.cache.put(key, payload)
    return payload


def _listed(snap: Snapshot, query: str, entries: list, source: str, k: int, where: Where | None, fill,
            diversity: float = 0.0, meta: dict | None = None) -> tuple:
    """The stored list's first `k` entries, or with a filter those of its entries that pass, and
    `fill(item ids taken, n, search)`'s n more when fewer than `k` do (or when none was stored: an item
    added today). With `diversity`, k of those that pass and a vector query's next ones, `pool_size(k)`
    in all, chosen by maximal marginal relevance. Returns (a function that finishes the answer, whether
    it calls `fill`: a vector query), for `_answered`; the function takes the `search` to ask the vector
    query with (search_items' call; default: the subject's own), so that a server asks its waiting
    requests' queries together (query_batches.py)."""
    if not where and not diversity:
        entries = entries[:k]
    meta = meta or item_metadata(snap, [i for i, _ in entries])  # a batch reads its items' at once
    items = [Recommendation(i, s, dict(meta[i])) for i, s in entries if not where or where.matches(i, meta[i])]
    if diversity:
        def finish(search=None) -> Answer:
            pool = pool_size(k)
            more = fill([r.item_id for r in items], pool - len(items), search) if len(items) < pool else []
            return answer(snap, query, f"{source}+diverse", diversify(snap.reader, items + more, k, diversity))
    else:
        def finish(search=None) -> Answer:
            found, label = items[:k], source
            if (where or not entries) and len(found) < k and (more := fill([r.item_id for r in found], k - len(found),
                                                                           search)):
                label, found = (f"{source}+query" if found else "query"), found + more
            return answer(snap, query, label, found)
    return finish, bool(diversity or ((where or not entries) and len(items) < k))


def _answered(listed: tuple, vector_query: bool = True) -> Answer:
    """The answer `_listed` prepared; `vector_query` False: NeedsQuery when it needs one."""
    finish, needs = listed
    if needs and not vector_query:
        raise NeedsQuery(finish)
    return finish()


def _diversity(diversity: float) -> float:
    """`diversity` as a query takes it; BadFilter (HTTP 400, exit 2) outside 0..1."""
    if not 0.0 <= diversity <= 1.0:
        raise BadFilter(f"diversity: expected a number from 0 (relevance only) to 1 (variety first), got {diversity}")
    return float(diversity)


def item_metadata(snap: Snapshot, item_ids: list[str]) -> dict[str, dict]:
    """item id -> its metadata without the id ({} for an id the version does not hold), from the
    snapshot's item cache (copy a value before handing it out); the store is read once for the ids not there."""
    found = {i: m for i in item_ids if (m := snap.items.get(i)) is not None}
    if missing := [i for i in item_ids if i not in found]:
        read = snap.reader.metadata(missing)
        for i in missing:
            found[i] = {k: v for k, v in read.get(i, {}).items() if k != "item_id"}
            snap.items.put(i, found[i])
    return found
