"""Published versions: the store a config uses (`version_store`), and the Qdrant server's.

Two backends, one interface (recommend/serving/version_store.py), chosen by `publish.url`:

- `EmbeddedVersions` (the default, recommend/serving/embedded.py): Qdrant's engine in-process, each
  version a folder of shards under `<workdir>/store/<prefix>/versions/<run_id>/` with its marker
  `version.json`; `<workdir>/store/<prefix>/LIVE` names the live version and is replaced atomically.
- `ServerVersions` (a Qdrant server): collections `<prefix>_items_<run_id>` / `<prefix>_users_<run_id>`,
  the marker is `complete: true` in the items collection's metadata, and the aliases
  `<prefix>_items` / `<prefix>_users` are the live pointer, switched in one atomic alias update.
  Its tests run on qdrant-client's in-memory mode; no Qdrant server runs on our machines.

Example:
    store = version_store(config.publish, config.workdir)
    store.live(), [v.run_id for v in store.versions()]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from recommend.serving.embedded import EmbeddedVersions
from recommend.serving.settings import PublishSettings
from recommend.serving.store import StoreUnavailable, open_store
from recommend.serving.version_store import (NAMESPACE, PublishError, Rollback, Version, VersionStore,  # noqa: F401
                                             alias, collection, point_id)

log = logging.getLogger("recs")


class ClientReader:
    """A version's two collections read through a qdrant-client (a server, or in-memory mode in tests)."""

    def __init__(self, client, items: str, users: str, added_items: int = 0):
        self.client, self.items, self.users, self.added_items = client, items, users, added_items

    def held(self, item_ids: list[str]) -> set[str]:
        """The ids among `item_ids` the items collection holds."""
        return set(self.payloads("item", item_ids))

    def payload(self, kind: str, business_id: str) -> dict | None:
        found = self.client.retrieve(self.items if kind == "item" else self.users, ids=[point_id(kind, business_id)],
                                     with_payload=True)
        return found[0].payload if found else None

    def payloads(self, kind: str, business_ids: list[str]) -> dict[str, dict]:
        found = self.client.retrieve(self.items if kind == "item" else self.users,
                                     ids=[point_id(kind, b) for b in business_ids], with_payload=True)
        return {p.payload[f"{kind}_id"]: p.payload for p in found}

    def metadata(self, item_ids: list[str]) -> dict[str, dict]:
        from qdrant_client import models

        points = self.client.retrieve(self.items, ids=[point_id("item", i) for i in item_ids],
                                      with_payload=models.PayloadSelectorExclude(exclude=["similar", "run_id", "source"]))
        return {p.payload["item_id"]: p.payload for p in points}

    def vectors(self, item_ids: list[str], name: str) -> tuple[list, list]:
        points = self.client.retrieve(self.items, ids=[point_id("item", i) for i in item_ids], with_vectors=[name],
                                      with_payload=False)
        points = [p for p in points if name in (p.vector or {})]  # an item added today has no blended vectors
        return [p.id for p in points], [p.vector[name] for p in points]

    def vector(self, kind: str, business_id: str, name: str) -> list[float] | None:
        found = self.client.retrieve(self.items if kind == "item" else self.users, ids=[point_id(kind, business_id)],
                                     with_vectors=[name], with_payload=False)
        return (found[0].vector or {}).get(name) if found else None

    def search(self, vector, using: str, k: int, exclude: list | None = None, where=None) -> list[tuple[dict, float]]:
        from qdrant_client import models

        from recommend.serving.filters import client_filter

        hits = self.client.query_points(self.items, query=[float(x) for x in vector], using=using, limit=k,
                                        query_filter=client_filter(where, exclude or ()), with_payload=models.PayloadSelectorExclude(
                                            exclude=["similar", "run_id", "source"])).points
        return [(h.payload, h.score) for h in hits]

    def search_many(self, queries: list, using: str, k: int, where=None) -> list[list[tuple[dict, float]]]:
        """`search` of each (vector, exclude) in `queries` (the embedded store's reader asks them as one batch)."""
        return [self.search(vector, using, k, exclude, where) for vector, exclude in queries]

    def count(self, kind: str) -> int:
        return self.client.count(self.items if kind == "item" else self.users, exact=True).count

    def warm(self, held=None) -> None:
        """Nothing to do: a server keeps its own files in memory."""

    def close(self) -> None:
        pass  # the client is the store's, shared by every version

    release = close


class ServerVersions(VersionStore):
    embedded = False

    def __init__(self, client, prefix: str = "recs", where: str = "server"):
        self.client, self.prefix, self.where = client, prefix, where

    def live(self) -> str | None:
        target = {a.alias_name: a.collection_name for a in self.client.get_aliases().aliases}.get(alias(self.prefix, "items"))
        return target.removeprefix(f"{self.prefix}_items_") if target else None

    def _runs(self) -> tuple[set, dict]:
        names = {c.name for c in self.client.get_collections().collections}
        runs = {n.removeprefix(f"{self.prefix}_{k}_") for k in ("items", "users") for n in names if n.startswith(f"{self.prefix}_{k}_")}
        return names, {r: dict(self.client.get_collection(collection(self.prefix, "items", r)).config.metadata or {})
                       if collection(self.prefix, "items", r) in names else {} for r in runs}

    def versions(self) -> list[Version]:
        live, (names, runs) = self.live(), self._runs()
        return [Version(r, r == live, m["points"].get("items"), m["points"].get("users"), m, len(m.get("added") or ()))
                for r, m in sorted(runs.items(), reverse=True)
                if m.get("complete") and collection(self.prefix, "users", r) in names]

    def incomplete(self) -> list[str]:
        names, runs = self._runs()
        return sorted((r for r, m in runs.items() if not m.get("complete") or collection(self.prefix, "users", r) not in names),
                      reverse=True)

    def metadata(self, run_id: str) -> dict:
        return dict(self.client.get_collection(collection(self.prefix, "items", run_id)).config.metadata or {})

    def verify(self, run_id: str, deep: bool = False) -> str | None:
        meta = self.metadata(run_id)
        if not meta.get("complete"):
            return "incomplete: its publish did not finish"
        for kind in ("items", "users"):
            name = collection(self.prefix, kind, run_id)
            if not self.client.collection_exists(name):
                return f"collection {name} is missing"
            expected = meta["points"].get(kind)
            if kind == "items":  # and today's items that are not the version's own
                expected += len(meta.get("added") or ()) - len(meta.get("replaced") or ())
            if (n := self.client.count(name, exact=True).count) != expected:
                return f"{name} holds {n} points, its metadata says {expected}"
        return None

    def publish(self, run_id: str, fill: Callable, metadata: dict) -> dict:
        try:
            counts = fill(self.client)
            self.client.update_collection(collection(self.prefix, "items", run_id),
                                          metadata={**metadata, "kind": "items", "complete": True, "points": counts})
            return counts
        except BaseException:
            try:
                self.remove(run_id)
            except Exception:
                log.warning("could not remove the partial version %s from %s", run_id, self.where)
            raise

    def switch(self, run_id: str) -> str | None:
        from qdrant_client import models

        previous, ops = self.live(), []
        for kind in ("items", "users"):
            if previous is not None:
                ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias(self.prefix, kind))))
            ops.append(models.CreateAliasOperation(create_alias=models.CreateAlias(
                collection_name=collection(self.prefix, kind, run_id), alias_name=alias(self.prefix, kind))))
        self.client.update_collection_aliases(change_aliases_operations=ops)
        return previous

    def remove(self, run_id: str) -> None:
        for kind in ("items", "users"):
            name = collection(self.prefix, kind, run_id)
            if self.client.collection_exists(name):
                self.client.delete_collection(name)

    def open(self, run_id: str) -> ClientReader:
        return ClientReader(self.client, collection(self.prefix, "items", run_id), collection(self.prefix, "users", run_id),
                            len(self.metadata(run_id).get("added") or ()))

    def changes(self, run_id: str):
        return self.metadata(run_id).get("added_generation")

    def add_items(self, run_id: str, points: list, replaces: set[str]) -> int:
        """Upsert today's items (recommend/serving/additions.py) into version `run_id`'s items
        collection; the ids added are kept in its metadata. Returns how many it holds added."""
        from qdrant_client import models

        name, meta = collection(self.prefix, "items", run_id), self.metadata(run_id)
        if not meta.get("complete"):
            raise PublishError(f"version {run_id} is not complete in {self.where}")
        self.client.upsert(name, [models.PointStruct(id=point_id("item", p.item_id), vector=p.vectors, payload=p.payload)
                                  for p in points], wait=True)
        before = set(meta.get("added") or ())
        added = sorted(before | {p.item_id for p in points})
        replaced = sorted(set(meta.get("replaced") or ()) | (set(replaces) - before))  # the version's own items
        self.client.update_collection(name, metadata={**meta, "added": added, "replaced": replaced,
                                                      "added_generation": int(meta.get("added_generation") or 0) + 1})
        return len(added)


def _unreachable_is_unavailable(method):
    """A server that does not answer is StoreUnavailable (a message, HTTP 503), not a traceback."""
    import functools

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        from qdrant_client.http.exceptions import ApiException

        try:
            return method(self, *args, **kwargs)
        except (ApiException, ConnectionError) as exc:
            raise StoreUnavailable(f"Qdrant at {self.where} did not answer: {type(exc).__name__}: {str(exc)[:200]}") from None
    return guarded


for _name in ("live", "versions", "incomplete", "metadata", "verify", "switch", "remove", "changes", "add_items"):
    setattr(ServerVersions, _name, _unreachable_is_unavailable(getattr(ServerVersions, _name)))


def embedded_root(workdir: str | Path) -> Path:
    """The embedded store's folder in a workdir."""
    return Path(workdir) / "store"


def version_store(publish: PublishSettings, workdir: str | Path) -> VersionStore:
    """The versions of one config: a Qdrant server when `publish.url` is set, else the embedded store
    under <workdir>/store."""
    if publish.url:
        return ServerVersions(open_store(publish.url, publish.api_key_env), publish.prefix, publish.url)
    return EmbeddedVersions(embedded_root(workdir), publish.prefix)
