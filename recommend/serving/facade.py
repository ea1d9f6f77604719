"""The read path for apps and notebooks: "for user U", "similar to item I", "similar to this text".

Every answer says which published version it came from. Reads go through the aliases only, so an
answer is wholly from yesterday's version or wholly from today's. A small in-memory LRU cache keeps
the most-read lists hot; it is keyed by version, so a switch never serves a stale list.

Example:
    rec = Recommender.from_config("config.yaml")
    answer = rec.for_user("U00042")
    answer.version, [(r.item_id, r.score) for r in answer.items]
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from qdrant_client import models

from embedder.errors import RecsError
from recommend.ranking.blend import Layout, user_from_items
from recommend.serving.publish import BLEND_QUERY_VECTOR, BLEND_VECTOR, ITEM_VECTOR, alias, list_versions, live_run_id, point_id


class NotFound(RecsError):
    """An unknown user or item, or nothing published yet. Exit code 1."""


@dataclass
class Recommendation:
    item_id: str
    score: float
    metadata: dict = field(default_factory=dict)


@dataclass
class Answer:
    """Items for one query, best first, and where they came from."""

    query: str
    version: str
    source: str  # history | few-events | history+popular | popular | similar | similar-from-text | realtime | text
    items: list[Recommendation]

    def to_dict(self) -> dict:
        return asdict(self)


class Recommender:
    """Queries against the live version in Qdrant (local mode or server: same calls)."""

    def __init__(self, client, prefix: str = "recs", model: str | None = None, device: str = "auto",
                 k: int = 10, cache_size: int = 10_000, version_ttl_s: float = 5.0):
        """`model`: the sentence-transformers model for text queries (default: the live version's).
        `version_ttl_s`: how long the live version id is trusted before the alias is read again."""
        self.client, self.prefix, self.model, self.device, self.k = client, prefix, model, device, k
        self.cache: OrderedDict = OrderedDict()
        self.cache_size, self.version_ttl_s = cache_size, version_ttl_s
        self._live: tuple[float, str | None] = (0.0, None)

    @classmethod
    def from_config(cls, config, **kwargs) -> "Recommender":
        """From a Config or a config.yaml path: the same store and prefix the refresh publishes to."""
        from recommend.config import Config, load_config
        from recommend.serving.store import open_store

        if not isinstance(config, Config):
            config = load_config(config, check_inputs=False)
        client = open_store(config.publish.url, Path(config.workdir) / "qdrant", config.publish.api_key_env)
        kwargs.setdefault("k", config.lists.k)
        kwargs.setdefault("device", config.embed.device)
        return cls(client, config.publish.prefix, config.embed.model, **kwargs)

    # ---- versions -------------------------------------------------------------------------------
    def live_version(self) -> str:
        checked, run_id = self._live
        if run_id is None or time.monotonic() - checked > self.version_ttl_s:
            run_id = live_run_id(self.client, self.prefix)
            if run_id is None:
                raise NotFound(f"nothing published under prefix {self.prefix!r} yet: run `recs refresh` first")
            self._live = (time.monotonic(), run_id)
        return run_id

    def versions(self):
        """Published versions, newest first; `.live` marks the one being served."""
        return list_versions(self.client, self.prefix)

    # ---- queries --------------------------------------------------------------------------------
    def for_user(self, user_id: str, k: int | None = None, recent_items: list[str] | None = None) -> Answer:
        """The precomputed list for `user_id`. A user the batch has not seen gets a real-time list from
        `recent_items` (item ids they just interacted with) when given; otherwise NotFound."""
        k = k or self.k
        point = self._cached("user", user_id, lambda: self._retrieve("users", point_id("user", user_id)))
        if point is None:
            if recent_items:
                return self.for_items(recent_items, k, query=f"user {user_id}")
            raise NotFound(f"unknown user {user_id!r} in version {self.live_version()}; "
                           "pass recent items for a real-time list")
        return self._answer(f"user {user_id}", point, "recommended", k)

    def similar(self, item_id: str, k: int | None = None) -> Answer:
        """The precomputed most similar items to `item_id` (itself excluded)."""
        k = k or self.k
        point = self._cached("item", item_id, lambda: self._retrieve("items", point_id("item", item_id)))
        if point is None:
            raise NotFound(f"unknown item {item_id!r} in version {self.live_version()}")
        return self._answer(f"item {item_id}", point, "similar", k)

    def for_items(self, item_ids: list[str], k: int | None = None, query: str | None = None) -> Answer:
        """Real-time fallback: the list a user with exactly these items in their history would get
        (built as the batch builds one, in the same blended space), those items excluded."""
        k = k or self.k
        layout = self._metadata().get("layout")
        name = BLEND_QUERY_VECTOR if layout else ITEM_VECTOR  # versions before the blend had text only
        points = self.client.retrieve(alias(self.prefix, "items"), ids=[point_id("item", i) for i in item_ids],
                                      with_vectors=[name], with_payload=["run_id"])
        if not points:
            raise NotFound(f"none of the items {item_ids} is in version {self.live_version()}")
        rows = np.array([p.vector[name] for p in points], dtype=np.float32)
        if layout:
            vector, using = user_from_items(rows, Layout(**layout)), BLEND_VECTOR
        else:
            vector, using = rows.mean(axis=0) / (np.linalg.norm(rows.mean(axis=0)) or 1.0), ITEM_VECTOR
        hits = self._search(vector, k, exclude=[p.id for p in points], using=using)
        return Answer(query or f"items {','.join(item_ids)}", points[0].payload["run_id"], "realtime", hits)

    def search(self, text: str, k: int | None = None) -> Answer:
        """Items nearest to `text`, encoded now with the model the live version was built with."""
        from embedder.encode import encode_chunk
        from embedder.model import model_fingerprint, resolve_model_path

        k = k or self.k
        meta = self._metadata()
        path = resolve_model_path(self.model or meta.get("model") or "all-MiniLM-L6-v2")
        if meta.get("model_fingerprint") and model_fingerprint(path) != meta["model_fingerprint"]:
            raise RecsError(f"the model at {path} is not the one version {meta.get('run_id')} was built with "
                            f"({meta.get('model')}); text queries would compare different vector spaces")
        vector = encode_chunk([text], str(path), device=self.device)[0]
        return Answer(f"text {text!r}", meta.get("run_id", "?"), "text", self._search(vector, k))

    # ---- internals ------------------------------------------------------------------------------
    def _metadata(self) -> dict:
        """The live items collection's metadata (run id, model, layout), cached per version."""
        return self._cached("meta", "items", lambda: dict(
            self.client.get_collection(alias(self.prefix, "items")).config.metadata or {}))

    def _cached(self, kind: str, key: str, fetch):
        cache_key = (self.live_version(), kind, key)
        if cache_key in self.cache:
            self.cache.move_to_end(cache_key)
            return self.cache[cache_key]
        value = fetch()
        if value is not None:
            self.cache[cache_key] = value
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return value

    def _retrieve(self, kind: str, pid: str):
        found = self.client.retrieve(alias(self.prefix, kind), ids=[pid], with_payload=True)
        return found[0].payload if found else None

    def _answer(self, query: str, payload: dict, field_name: str, k: int) -> Answer:
        entries = payload[field_name][:k]
        meta = self._item_metadata([e["item_id"] for e in entries])
        items = [Recommendation(e["item_id"], e["score"], meta.get(e["item_id"], {})) for e in entries]
        return Answer(query, payload["run_id"], payload.get("source", field_name), items)

    def _item_metadata(self, item_ids: list[str]) -> dict[str, dict]:
        points = self.client.retrieve(alias(self.prefix, "items"), ids=[point_id("item", i) for i in item_ids],
                                      with_payload=models.PayloadSelectorExclude(exclude=["similar", "run_id", "source"]))
        return {p.payload["item_id"]: {k: v for k, v in p.payload.items() if k != "item_id"} for p in points}

    def _search(self, vector: np.ndarray, k: int, exclude: list | None = None, using: str = ITEM_VECTOR) -> list[Recommendation]:
        flt = models.Filter(must_not=[models.HasIdCondition(has_id=exclude)]) if exclude else None
        hits = self.client.query_points(alias(self.prefix, "items"), query=np.asarray(vector).tolist(), using=using,
                                        limit=k, query_filter=flt, with_payload=models.PayloadSelectorExclude(
                                            exclude=["similar", "run_id", "source"])).points
        return [Recommendation(h.payload["item_id"], round(float(h.score), 5),
                               {k2: v for k2, v in h.payload.items() if k2 != "item_id"}) for h in hits]
