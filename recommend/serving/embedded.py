"""The embedded default store: each version a folder of engine shards (recommend/serving/shards.py).

    <workdir>/store/<prefix>/LIVE                         the live version, replaced atomically
    <workdir>/store/<prefix>/versions/<run_id>/           one version:
        items-000/ ...  users-000/ ...                    its shards (users routed by hash, items in shards of their own)
        texts-000/ ...  texts-000.keys.npz                the items' text vectors (their search graph), routed by
                                                          the item id's hash, each carried from the live version
                                                          when it can (recommend/serving/text_shards.py);
                                                          texts-000.graph/ once a graph is built after the
                                                          switch (recommend/serving/text_graph.py)
        version.json                                      the completion marker, written last: counts, every
                                                          shard's files with sizes and digests, metadata
    <workdir>/store/<prefix>/views/<pid>-<token>/         readers' private views (removed when they close)

A version without a sound version.json is incomplete: invisible to versions, rollback, pruning and readers, and
removed by the next publish. Shards are written by tasks on the Dask workers, side by side (publish.py,
`write_version`); the driver holds no points. Readers open a version without reading it whole (`ShardReader`).

Example:
    store = EmbeddedVersions(Path(".recs") / "store", "recs")
    reader = store.open(store.live())
    reader.payload("user", "U0000042")["recommended"]
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

from recommend.serving.additions import added_token, read_added
from recommend.serving.filter_subsets import FilterSubsets
from recommend.serving.payloads import LIST_FIELDS
from recommend.serving.publish import ITEM_VECTOR
from recommend.serving.shard_search import search_shards
from recommend.serving.shards import ENGINE, ShardView, problems, shard_of_user, user_shard
from embedder.artifacts import write_json
from recommend.serving.store import DamagedVersion, StoreUnavailable, track_reader
from recommend.serving.text_graph import has_graph, pending, shard_folder
from recommend.serving.version_store import NAMESPACE, PublishError, Version, VersionStore, point_id

log = logging.getLogger("recs")


class ShardReader:
    """One version opened through private views of its shards: reads by id, vector queries over the
    items. Thread-safe for reads (the engine's own locking); `close()` ends the views."""

    def __init__(self, folder: Path, marker: dict, views: Path, added: dict | None = None):
        self.run_id, self.folder = marker["run_id"], folder
        self.user_shards = int(marker["user_shards"])
        # the text search graph: "pending" while it is built after the switch (text_graph.py), "none" below graph_min_items
        self.text_graph = "pending" if pending(marker) else "built" if has_graph(marker) else "none"
        self.counts = marker["points"]
        self.view_root = view_root = views / f"{os.getpid()}-{secrets.token_hex(4)}-{self.run_id}"
        self.views: dict[str, ShardView] = {}
        try:
            for name in sorted(marker["shards"]) + ([added["shard"]] if added else []):
                self.views[name] = ShardView(folder / shard_folder(marker, name), view_root / name)
        except Exception as exc:
            self.close()
            raise DamagedVersion(f"version {self.run_id}: shard {folder / name} cannot be opened "
                                 f"({type(exc).__name__}: {str(exc)[:200]})") from None
        track_reader(self)  # closed at exit, if nobody did
        self.items = [v.engine for n, v in sorted(self.views.items()) if n.startswith("items-")]
        self.users = [v.engine for n, v in sorted(self.views.items()) if n.startswith("users-")]
        # the items' text vectors, in shards of their own (text_shards.py; a version before them: the item shards')
        self.texts = [v.engine for n, v in sorted(self.views.items()) if n.startswith("texts-")] or self.items
        # today's items (recommend/serving/additions.py): read before the version's own, searched beside
        # them, the version's points of the items they replace left out
        self.added = [self.views[added["shard"]].engine] if added else []
        self.added_items = len(added["items"]) if added else 0
        self.replaced = [point_id("item", i) for i in added["replaces"]] if added else []
        # the items of the filters asked most, held for their vector queries (filter_subsets.py): item shards, text shards
        self.subsets = [FilterSubsets(e, self.added, self.replaced) for e in (self.items, self.texts)]

    def _item_engines(self, first_added: bool = True) -> list:
        """The engines holding items: today's additions first (they win a lookup by id) or last
        (they override in a merge)."""
        return self.added + self.items if first_added else self.items + self.added

    def held(self, item_ids: list[str]) -> set[str]:
        """The ids among `item_ids` that the version's own item shards hold (not today's additions)."""
        pids = [point_id("item", i) for i in item_ids]
        return {r.payload["item_id"] for e in self.items for r in e.retrieve(pids, with_payload=True, with_vector=False)}

    def _user_engine(self, user_id: str):
        return self.users[shard_of_user(user_id, self.user_shards)]

    def payload(self, kind: str, business_id: str) -> dict | None:
        """The whole payload of one item or user, or None."""
        pid = point_id(kind, business_id)
        for engine in ([self._user_engine(business_id)] if kind == "user" else self._item_engines()):
            found = engine.retrieve([pid], with_payload=True, with_vector=False)
            if found:
                return found[0].payload
        return None

    def payloads(self, kind: str, business_ids: list[str]) -> dict[str, dict]:
        """business id -> whole payload of the points found, one read per shard (a batch's users routed at once)."""
        key, groups = f"{kind}_id", {}
        shards = user_shard(business_ids, self.user_shards).tolist() if kind == "user" and self.user_shards > 1 else ()
        for n, b in enumerate(business_ids):
            for engine in [self.users[shards[n] if shards else 0]] if kind == "user" else self._item_engines(False):
                groups.setdefault(id(engine), (engine, []))[1].append(point_id(kind, b))
        return {rec.payload[key]: rec.payload for engine, pids in groups.values()
                for rec in engine.retrieve(pids, with_payload=True, with_vector=False)}

    def metadata(self, item_ids: list[str]) -> dict[str, dict]:
        """item id -> its payload without the lists, for the ids found."""
        from qdrant_edge import PayloadSelector

        pids, out = [point_id("item", i) for i in item_ids], {}
        for engine in self._item_engines(first_added=False):
            for rec in engine.retrieve(pids, with_payload=PayloadSelector.Exclude(list(LIST_FIELDS)), with_vector=False):
                out[rec.payload["item_id"]] = rec.payload
        return out

    def vectors(self, item_ids: list[str], name: str) -> tuple[list, list]:
        """(point ids, vectors `name`) of the items found."""
        pids, found, rows, seen = [point_id("item", i) for i in item_ids], [], [], set()
        for engine in self.added + (self.texts if name == ITEM_VECTOR else self.items):
            for rec in engine.retrieve(pids, with_payload=False, with_vector=[name]):
                if rec.id not in seen:  # an item replaced today: its added point, not the version's
                    seen.add(rec.id)
                    if name in (rec.vector or {}):  # an item added today has no blended vectors
                        found.append(rec.id)
                        rows.append(rec.vector[name])
        return found, rows

    def vector(self, kind: str, business_id: str, name: str) -> list[float] | None:
        """One point's vector `name` (a user's profile), or None when the point is not there."""
        pid = point_id(kind, business_id)
        engines = ([self._user_engine(business_id)] if kind == "user"
                   else self.added + (self.texts if name == ITEM_VECTOR else self.items))
        for engine in engines:
            found = engine.retrieve([pid], with_payload=False, with_vector=[name])
            if found:
                return (found[0].vector or {}).get(name)
        return None

    def search(self, vector, using: str, k: int, exclude: list | None = None, where=None) -> list[tuple[dict, float]]:
        """The `k` items of highest dot product with `vector` on vector `using` across the item shards, `exclude`
        (point ids) left out, those matching `where` (filters.py) only: [(payload without the lists, score)]."""
        return self.search_many([(vector, exclude)], using, k, where)[0]

    def search_many(self, queries: list, using: str, k: int, where=None) -> list[list[tuple[dict, float]]]:
        """`search` of each (vector, exclude) in `queries`, asked as one planned batch per shard
        (recommend/serving/shard_search.py: the exclusions dropped after the engine answers)."""
        texts = using == ITEM_VECTOR
        return search_shards(self.texts if texts else self.items, self.added, self.replaced, queries, using, k, where,
                             self.subsets[texts])

    def count(self, kind: str) -> int:
        from qdrant_edge import CountRequest

        if kind == "user":
            return sum(e.count(CountRequest(exact=True)) for e in self.users)
        own = sum(e.count(CountRequest(exact=True)) for e in (self.texts if kind == "text" else self.items))
        return own - len(self.replaced) + sum(e.count(CountRequest(exact=True)) for e in self.added)

    def warm(self, held: "ShardReader | None" = None) -> None:
        """Read the files queries touch into the page cache (a server, before it serves this version);
        `held`: a reader of this version already serving, whose shards' files are there: the others only."""
        started, known = time.perf_counter(), {v.shard for v in (held.views.values() if held is not None else ())}
        done = sum(view.warm() for view in self.views.values() if view.shard not in known)
        log.info("version %s: %.0f MB read into memory in %.2fs", self.run_id, done / 2**20, time.perf_counter() - started)

    def changed(self) -> list[str]:
        """Shard files linked into this reader's views whose time or size changed (should be none)."""
        return [p for v in self.views.values() for p in v.changed()]

    def close(self) -> None:
        for view in self.views.values():
            try:
                view.close()
            except Exception as exc:
                log.warning("closing a view of %s: %s", view.shard, exc)
        self.views = {}
        shutil.rmtree(self.view_root, ignore_errors=True)

    def release(self) -> None:
        """Remove the views, the engines' memory maps left to the process's end (ShardView.release: no eviction)."""
        for view in self.views.values():
            view.release()
        self.views = {}
        shutil.rmtree(self.view_root, ignore_errors=True)


class EmbeddedVersions(VersionStore):
    """Versions as folders of engine shards under `root`/<prefix> (the layout in the module's doc)."""

    embedded = True

    def __init__(self, root: str | Path, prefix: str = "recs"):
        self.prefix, self.root = prefix, Path(root)
        self.home = self.root / prefix
        self.folder, self.pointer, self.views = self.home / "versions", self.home / "LIVE", self.home / "views"
        self.where = str(self.home)

    def _marker(self, run_id: str) -> dict | None:
        """The version's marker; None when there is none (incomplete), {} when it is damaged."""
        path = self.folder / run_id / "version.json"
        try:
            marker = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        fields = {"points": dict, "metadata": dict, "shards": dict, "user_shards": int}
        return marker if all(isinstance(marker.get(k), t) for k, t in fields.items()) else {}

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
            if marker := self._marker(run_id):
                found.append(Version(run_id, run_id == live, marker["points"].get("items"), marker["points"].get("users"),
                                     marker["metadata"], self._added_count(run_id)))
        return found

    def _added_count(self, run_id: str) -> int:
        """Items added to a version today; 0 when its added.json is damaged (`verify` names it)."""
        try:
            added = read_added(self.folder / run_id)
        except (OSError, ValueError):
            return 0
        return len(added["items"]) if added else 0

    def incomplete(self) -> list[str]:
        return [r for r in self._folders() if not self._marker(r)]

    def metadata(self, run_id: str) -> dict:
        return (self._marker(run_id) or {}).get("metadata", {})

    def verify(self, run_id: str, deep: bool = False) -> str | None:
        """What is wrong with a version's shards (None: sound): files missing or of another size;
        `deep`: their digests too, and the engine's own count of each shard."""
        folder, marker = self.folder / run_id, self._marker(run_id)
        if marker is None:
            return "incomplete: no version.json (its publish did not finish)"
        if not marker:
            return f"{folder / 'version.json'} is damaged"
        try:
            added = read_added(folder)
        except (OSError, ValueError):
            return f"{folder / 'added.json'} is damaged (the items added to this version today)"
        for name, shard in sorted(marker["shards"].items()) + ([(added["shard"], added)] if added else []):
            if found := problems(folder / shard_folder(marker, name), shard["files"], deep=deep):
                return "; ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        if deep:
            try:
                reader = ShardReader(folder, marker, self.views, added)
            except DamagedVersion as exc:
                return str(exc)
            try:
                for kind in ("items", "users") + (("texts",) if marker.get("texts") else ()):
                    expected = marker["points"].get("items" if kind == "texts" else kind)
                    if kind != "users" and added:
                        expected += len(added["items"]) - len(added["replaces"])
                    if (n := reader.count(kind[:-1])) != expected:
                        return f"the {kind} shards of {folder} hold {n} points, version.json says {expected}"
            finally:
                reader.release()
        return None

    def publish(self, run_id: str, fill: Callable[[Path], tuple[dict, dict, dict]], metadata: dict) -> dict:
        """Write version `run_id` with `fill(folder) -> (counts, shards, layout)` (the shards written in
        `folder`; layout: the marker's "user_shards" and "texts"), then its marker. Any failure removes
        the folder and raises."""
        folder = self.folder / run_id
        try:
            if folder.exists():
                shutil.rmtree(folder)  # a leftover of a crashed attempt at this run
            folder.mkdir(parents=True)
            counts, shards, layout = fill(folder)
            for kind in ("items", "users"):
                stored = sum(s["points"] for n, s in shards.items() if n.startswith(kind))
                if stored != counts[kind]:
                    raise PublishError(f"version {run_id}: {counts[kind]} {kind} to write, {stored} in the shards of {folder}")
            write_json({"run_id": run_id, "prefix": self.prefix, "engine": ENGINE, "namespace": str(NAMESPACE),
                        "points": counts, **layout, "shards": shards, "metadata": metadata}, folder / "version.json", durable=True)
            return counts
        except BaseException as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, OSError) or type(exc) is Exception:  # the engine raises plain Exceptions
                raise PublishError(f"publishing version {run_id} into {folder} failed: {type(exc).__name__}: "
                                   f"{str(exc)[:300]}; the partial version was removed and the live version "
                                   "stays live") from None
            raise

    def written(self, run_id: str | None) -> tuple[Path, dict] | None:
        """(folder, marker) of complete version `run_id`, what a publish may start its text shards
        from (recommend/serving/text_shards.py); None when there is none."""
        marker = self._marker(run_id) if run_id else None
        return (self.folder / run_id, marker) if marker else None

    def switch(self, run_id: str) -> str | None:
        try:
            previous = self.live()
        except StoreUnavailable:
            previous = None  # a damaged pointer is replaced
        self.home.mkdir(parents=True, exist_ok=True)
        write_json({"run_id": run_id, "previous": previous, "switched_at": time.time()}, self.pointer, durable=True)
        return previous

    def remove(self, run_id: str) -> None:
        shutil.rmtree(self.folder / run_id, ignore_errors=True)

    def open(self, run_id: str) -> ShardReader:
        """A reader of a complete version (DamagedVersion naming the file when its shards are not
        what was written: missing, or of another size)."""
        marker = self._marker(run_id)
        if not marker:
            raise DamagedVersion(f"version {run_id} in {self.folder} is not there or incomplete" if marker is None
                                 else f"{self.folder / run_id / 'version.json'} is damaged")
        folder = self.folder / run_id
        try:
            added = read_added(folder)
        except (OSError, ValueError):
            raise DamagedVersion(f"{folder / 'added.json'} is damaged (today's added items)") from None
        for name, shard in list(marker["shards"].items()) + ([(added["shard"], added)] if added else []):
            if found := problems(folder / shard_folder(marker, name), shard["files"]):
                raise DamagedVersion(f"version {run_id} is damaged: {found[0]}")
        self._clean_views()
        return ShardReader(folder, marker, self.views, added)

    def changes(self, run_id: str):
        """Today's additions (additions.added_token) and version.json, replaced once the text graph
        is built after the switch (recommend/serving/text_graph.py)."""
        try:
            st = (self.folder / run_id / "version.json").stat()
        except FileNotFoundError:
            return added_token(self.folder / run_id), None
        return added_token(self.folder / run_id), (st.st_ino, st.st_mtime_ns)

    def graphed(self, run_id: str, shards: dict, settings: dict) -> None:
        """Version `run_id`'s marker replaced whole with `shards` (name: entry, each with the folder
        its files are in) for its text shards, written with graph settings `settings`
        (recommend/serving/text_graph.py)."""
        marker = self._marker(run_id)
        if not marker:
            raise PublishError(f"version {run_id} is not there or incomplete in {self.folder}")
        marker["shards"].update(shards)
        marker["texts"] = {"settings": settings}
        write_json(marker, self.folder / run_id / "version.json", durable=True)

    def add_items(self, run_id: str, points: list, replaces: set[str]) -> int:
        """Add today's items to version `run_id` (recommend/serving/additions.py); returns how many
        items it holds added."""
        from recommend.serving.additions import write_added

        if not self._marker(run_id):
            raise PublishError(f"version {run_id} is not there or incomplete in {self.folder}")
        return len(write_added(self.folder / run_id, self.metadata(run_id), points, replaces)["items"])

    def _clean_views(self) -> None:
        """Remove views left by readers that died without closing (their process is gone)."""
        if not self.views.is_dir():
            return
        for view in self.views.iterdir():
            pid = view.name.split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(view, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
