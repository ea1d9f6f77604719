"""Published versions: which exist, which one is live, and the transaction that adds one.

A version is complete (both collections loaded, their counts verified, a completion marker written
last) or invisible: `versions()`, rollback, pruning, the gate's live figure and readers see complete
versions only. Two backends, one interface, chosen by `publish.url`:

- `LocalVersions` (the embedded default): one local-mode store folder per version,
  `<workdir>/qdrant/<prefix>/versions/<run_id>/`, whose `version.json` (counts, metadata) is the
  marker; `<workdir>/qdrant/<prefix>/LIVE` names the live version and is replaced atomically. A
  refresh writes a new folder while readers keep the old one in memory (store.load_readonly).
- `ServerVersions` (a Qdrant server): collections `<prefix>_items_<run_id>` / `<prefix>_users_<run_id>`,
  the marker is `complete: true` in the items collection's metadata, and the aliases
  `<prefix>_items` / `<prefix>_users` are the live pointer, switched in one atomic alias update.

Example:
    store = version_store(config.publish, config.workdir)
    store.live(), [v.run_id for v in store.versions()]
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from embedder.errors import RecsError
from recommend.serving.settings import PublishSettings
from recommend.serving.store import (DamagedVersion, StoreUnavailable, collections_in, load_readonly, open_local,
                                     open_store, shown, stored_points, write_json_atomic)

log = logging.getLogger("recs")


class PublishError(RecsError):
    """A version could not be published or switched; the live version stays live."""


def alias(prefix: str, kind: str) -> str:
    return f"{prefix}_{kind}"


def collection(prefix: str, kind: str, run_id: str) -> str:
    return f"{prefix}_{kind}_{run_id}"


class Rollback(NamedTuple):
    previous: str | None
    live: str
    skipped: list[str]  # damaged versions passed over, each with its problem


@dataclass
class Version:
    run_id: str
    live: bool
    items: int | None
    users: int | None
    metadata: dict

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "live": self.live, "items": self.items, "users": self.users,
                "created_at": self.metadata.get("created_at")}


class VersionStore:
    """What both backends share: rollback and pruning over `versions()`, `verify()`, `switch()`, `remove()`."""

    prefix: str
    where: str  # the folder or URL, for messages

    def live(self) -> str | None: ...
    def versions(self) -> list[Version]: ...
    def incomplete(self) -> list[str]: ...
    def verify(self, run_id: str, deep: bool = False) -> str | None: ...
    def metadata(self, run_id: str) -> dict: ...
    def publish(self, run_id: str, fill: Callable, metadata: dict) -> dict: ...
    def switch(self, run_id: str) -> str | None: ...
    def remove(self, run_id: str) -> None: ...
    def open(self, run_id: str): ...

    def live_gate(self) -> dict | None:
        """The quality-gate figures the live version was published with, and its run id (None before
        the first publish, or when the live version is not complete)."""
        try:
            run_id = self.live()
        except StoreUnavailable as exc:
            log.warning("%s; the gate has no live figure to compare with", exc)
            return None
        if run_id is None or run_id not in {v.run_id for v in self.versions()}:
            return None
        return {**(self.metadata(run_id).get("gate") or {}), "run_id": run_id}

    def clean_incomplete(self, protect: set = frozenset()) -> list[str]:
        """Remove what crashed or failed publishes left behind (never a run in `protect`)."""
        removed = [r for r in self.incomplete() if r not in protect]
        for run_id in removed:
            self.remove(run_id)
        return removed

    def prune(self, keep: int, protect: set = frozenset()) -> list[str]:
        """Delete complete versions beyond the `keep` newest, never the live one or one in `protect`
        (the version live before the switch). Returns the deleted run ids."""
        live = self.live()
        deleted = [v.run_id for v in self.versions()[keep:] if v.run_id != live and v.run_id not in protect]
        for run_id in deleted:
            self.remove(run_id)
        return deleted

    def rollback(self, run_id: str | None = None) -> Rollback:
        """Make `run_id` live; by default the newest sound version older than the live one (a damaged
        one is skipped and named). PublishError when there is none."""
        versions, live, skipped = self.versions(), self.live(), []
        if run_id is None:
            for v in versions:
                if live is not None and v.run_id >= live:
                    continue
                problem = self.verify(v.run_id)
                if problem is None:
                    run_id = v.run_id
                    break
                skipped.append(f"{v.run_id} ({problem})")
            if run_id is None:
                raise PublishError(f"no version older than the live one ({live}) to roll back to"
                                   + (f"; damaged: {'; '.join(skipped)}" if skipped else ""))
        elif run_id not in {v.run_id for v in versions}:
            raise PublishError(f"unknown version {shown(run_id)}; published: "
                               f"{', '.join(v.run_id for v in versions) or 'none'}")
        elif (problem := self.verify(run_id)) is not None:
            raise PublishError(f"version {run_id} is damaged, not switching: {problem}")
        self.switch(run_id)
        return Rollback(live, run_id, skipped)


class LocalVersions(VersionStore):
    def __init__(self, root: str | Path, prefix: str = "recs"):
        self.prefix, self.root = prefix, Path(root)
        self.home = self.root / prefix
        self.folder, self.pointer = self.home / "versions", self.home / "LIVE"
        self.where = str(self.home)
        if (self.root / "meta.json").exists():
            log.warning("%s holds a store in the layout before one folder per version; it is not read "
                        "(delete %s and %s)", self.root, self.root / "meta.json", self.root / "collection")

    def _marker(self, run_id: str) -> dict | None:
        path = self.folder / run_id / "version.json"
        try:
            marker = json.loads(path.read_text())
            return marker if isinstance(marker.get("points"), dict) and isinstance(marker.get("metadata"), dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # damaged: not complete

    def live(self) -> str | None:
        try:
            return json.loads(self.pointer.read_text())["run_id"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreUnavailable(f"{self.pointer} is damaged ({type(exc).__name__}); "
                                   "`recs rollback <version>` writes it again") from None

    def _folders(self) -> list[str]:
        return sorted((p.name for p in self.folder.iterdir() if p.is_dir()), reverse=True) if self.folder.is_dir() else []

    def versions(self) -> list[Version]:
        live, found = self.live(), []
        for run_id in self._folders():
            marker = self._marker(run_id)
            if marker:
                points = marker["points"]
                found.append(Version(run_id, run_id == live, points.get("items"), points.get("users"), marker["metadata"]))
        return found

    def incomplete(self) -> list[str]:
        return [r for r in self._folders() if not self._marker(r)]

    def metadata(self, run_id: str) -> dict:
        return (self._marker(run_id) or {}).get("metadata", {})

    def verify(self, run_id: str, deep: bool = False) -> str | None:
        """What is wrong with a version's files (None: sound). `deep`: SQLite's quick_check too."""
        folder, marker = self.folder / run_id, self._marker(run_id)
        if marker is None:
            return "incomplete: no version.json (its publish did not finish)"
        if not marker:
            return f"{folder / 'version.json'} is damaged"
        try:
            names = collections_in(folder)
            for kind in ("items", "users"):
                name = collection(self.prefix, kind, run_id)
                if name not in names:
                    return f"{folder / 'meta.json'} does not list {name}"
                if (n := stored_points(folder, name, check=deep)) != marker["points"].get(kind):
                    return f"{name} holds {n} points on disk, version.json says {marker['points'].get(kind)}"
        except DamagedVersion as exc:
            return str(exc)
        return None

    def publish(self, run_id: str, fill: Callable, metadata: dict) -> dict:
        """Write version `run_id` into its own folder with `fill(client) -> counts`, check the counts on
        disk, then write version.json. Any failure removes the folder and raises PublishError naming it."""
        folder, client = self.folder / run_id, None
        try:
            if folder.exists():
                shutil.rmtree(folder)  # a leftover of a crashed attempt at this run
            client = open_local(folder)
            counts = fill(client)
            client.close()  # every write is on disk and the folder's lock is released
            client = None
            for kind, n in counts.items():
                on_disk = stored_points(folder, collection(self.prefix, kind, run_id))
                if on_disk != n:
                    raise PublishError(f"version {run_id}: {n} {kind} written, {on_disk} on disk in {folder}")
            if leftovers := [p.name for p in folder.rglob("*") if p.name.endswith(("-wal", "-journal", "-shm"))]:
                raise PublishError(f"version {run_id}: SQLite left {', '.join(leftovers)} in {folder}")
            write_json_atomic(folder / "version.json", {"run_id": run_id, "prefix": self.prefix, "points": counts,
                                                        "metadata": metadata})
            return counts
        except BaseException as exc:
            if client is not None:
                try:
                    client.close()
                except Exception:
                    pass
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, (OSError, sqlite3.Error)):
                raise PublishError(f"publishing version {run_id} into {folder} failed: {type(exc).__name__}: {exc}; "
                                   "the partial version was removed and the live version stays live") from None
            raise

    def switch(self, run_id: str) -> str | None:
        try:
            previous = self.live()
        except StoreUnavailable:
            previous = None  # a damaged pointer is replaced
        write_json_atomic(self.pointer, {"run_id": run_id, "previous": previous, "switched_at": time.time()})
        return previous

    def remove(self, run_id: str) -> None:
        shutil.rmtree(self.folder / run_id, ignore_errors=True)

    def open(self, run_id: str):
        """(client, items name, users name, metadata) of a complete version, loaded in memory."""
        marker = self._marker(run_id)
        if not marker:
            raise DamagedVersion(f"version {run_id} in {self.folder} is "
                                 + ("not there or incomplete" if marker is None else "damaged (version.json)"))
        client = load_readonly(self.folder / run_id)
        items, users = collection(self.prefix, "items", run_id), collection(self.prefix, "users", run_id)
        return client, items, users, marker["metadata"]


class ServerVersions(VersionStore):
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
        return [Version(r, r == live, m["points"].get("items"), m["points"].get("users"), m)
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
            if (n := self.client.count(name, exact=True).count) != meta["points"].get(kind):
                return f"{name} holds {n} points, its metadata says {meta['points'].get(kind)}"
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

    def open(self, run_id: str):
        return (self.client, collection(self.prefix, "items", run_id), collection(self.prefix, "users", run_id),
                self.metadata(run_id))


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


for _name in ("live", "versions", "incomplete", "metadata", "verify", "switch", "remove"):
    setattr(ServerVersions, _name, _unreachable_is_unavailable(getattr(ServerVersions, _name)))


def version_store(publish: PublishSettings, workdir: str | Path) -> VersionStore:
    """The versions of one config: a Qdrant server when `publish.url` is set, else local folders."""
    if publish.url:
        return ServerVersions(open_store(publish.url, publish.api_key_env), publish.prefix, publish.url)
    return LocalVersions(Path(workdir) / "qdrant", publish.prefix)
