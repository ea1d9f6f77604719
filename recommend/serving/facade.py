"""The read path for apps and notebooks: "for user U", "similar to item I", "similar to this text".

Every answer says which published version it came from, when that version was made and how old it
is. A query takes the live snapshot once (recommend/serving/live.py) and reads only from it, so an
answer is wholly from yesterday's version or wholly from today's; a refresh that publishes meanwhile
is picked up by the next query (within `poll_s`), without reopening anything by hand. The functions
below `Recommender` take a snapshot and are what the HTTP service calls too.

Example:
    rec = Recommender.from_config("config.yaml")
    answer = rec.for_user("U00042")
    answer.version, answer.age_seconds, [(r.item_id, r.score) for r in answer.items]
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import numpy as np

from embedder.errors import RecsError
from recommend.serving.live import LiveVersion, NotFound, Snapshot
from recommend.serving.publish import BLEND_QUERY_VECTOR, BLEND_VECTOR, ITEM_VECTOR, payload_list
from recommend.serving.store import StoreUnavailable, shown

__all__ = ["Answer", "NotFound", "Recommendation", "Recommender"]


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
    source: str  # history | few-events | history+popular | popular | similar | similar-from-text | realtime | text
    items: list[Recommendation]

    def to_dict(self) -> dict:
        return asdict(self)


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

    def for_user(self, user_id: str, k: int | None = None, recent_items: list[str] | None = None) -> Answer:
        """The precomputed list for `user_id`. A user the batch has not seen gets a real-time list from
        `recent_items` (item ids they just interacted with) when given; otherwise NotFound."""
        return user_answer(self.live.current(), user_id, k or self.k, recent_items)

    def similar(self, item_id: str, k: int | None = None) -> Answer:
        """The precomputed most similar items to `item_id` (itself excluded)."""
        return similar_answer(self.live.current(), item_id, k or self.k)

    def for_items(self, item_ids: list[str], k: int | None = None, query: str | None = None) -> Answer:
        """Real-time fallback: the list a user with exactly these items in their history would get
        (built as the batch builds one, in the same blended space), those items excluded."""
        return items_answer(self.live.current(), item_ids, k or self.k, query)

    def search(self, text: str, k: int | None = None) -> Answer:
        """Items nearest to `text`, encoded now with the model the live version was built with."""
        from embedder.encode import encode_chunk

        snap = self.live.current()
        path = query_model(snap, self.model)
        return text_answer(snap, encode_chunk([text], str(path), device=self.device)[0], text, k or self.k)


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


@_store_errors
def user_answer(snap: Snapshot, user_id: str, k: int, recent_items: list[str] | None = None) -> Answer:
    payload = _point(snap, "user", user_id)
    if payload is None:
        if recent_items:
            return items_answer(snap, recent_items, k, query=f"user {user_id}")
        raise NotFound(f"unknown user {shown(user_id)} in version {snap.run_id}; pass recent items for a real-time list")
    return _listed(snap, f"user {user_id}", payload, "recommended", k)


@_store_errors
def similar_answer(snap: Snapshot, item_id: str, k: int) -> Answer:
    payload = _point(snap, "item", item_id)
    if payload is None:
        raise NotFound(f"unknown item {shown(item_id)} in version {snap.run_id}")
    return _listed(snap, f"item {item_id}", payload, "similar", k)


@_store_errors
def items_answer(snap: Snapshot, item_ids: list[str], k: int, query: str | None = None) -> Answer:
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
    hits = search_items(snap, vector, k, exclude=found, using=using)
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
def text_answer(snap: Snapshot, vector: np.ndarray, text: str, k: int) -> Answer:
    return answer(snap, f"text {shown(text, 200)}", "text", search_items(snap, vector, k))


def search_items(snap: Snapshot, vector: np.ndarray, k: int, exclude: list | None = None,
                 using: str = ITEM_VECTOR) -> list[Recommendation]:
    """The `k` nearest items on vector `using`, `exclude` (point ids) left out: a vector query on the store."""
    return [Recommendation(payload["item_id"], round(float(score), 5),
                           {k2: v for k2, v in payload.items() if k2 != "item_id"})
            for payload, score in snap.reader.search(np.asarray(vector, dtype=np.float32), using, k, exclude)]


def _point(snap: Snapshot, kind: str, business_id: str) -> dict | None:
    key = (kind, business_id)
    payload = snap.cache.get(key)
    if payload is None:
        payload = snap.reader.payload(kind, business_id)
        if payload is not None:
            snap.cache.put(key, payload)
    return payload


def _listed(snap: Snapshot, query: str, payload: dict, field_name: str, k: int) -> Answer:
    entries, source = payload_list(payload, field_name)
    entries = entries[:k]
    meta = _metadata(snap, [i for i, _ in entries])
    items = [Recommendation(i, s, {k2: v for k2, v in meta[i].items() if k2 != "item_id"}) for i, s in entries]
    return answer(snap, query, source or field_name, items)


def _metadata(snap: Snapshot, item_ids: list[str]) -> dict[str, dict]:
    """item id -> its metadata ({} for an id the version does not hold), from the snapshot's item
    cache; the store is read once for the ids not there."""
    found = {i: m for i in item_ids if (m := snap.items.get(i)) is not None}
    if missing := [i for i in item_ids if i not in found]:
        read = snap.reader.metadata(missing)
        for i in missing:
            found[i] = read.get(i, {})
            snap.items.put(i, found[i])
    return found
