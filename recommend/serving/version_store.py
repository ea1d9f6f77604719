"""What every version store shares: a version, the live pointer's rules, rollback and pruning.

A version is complete (both collections loaded, their counts verified, a completion marker written
last) or invisible: `versions()`, rollback, pruning, the gate's live figure and readers see complete
versions only. The stores: `EmbeddedVersions` (recommend/serving/embedded.py, the default: Qdrant's
engine in-process) and `ServerVersions` (recommend/serving/versions.py, a Qdrant server by URL);
`recommend.serving.versions.version_store` picks one from the config.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import Callable, NamedTuple

from embedder.errors import RecsError
from recommend.serving.store import StoreUnavailable, shown

log = logging.getLogger("recs")
NAMESPACE = uuid.UUID("6f1d7e2a-1c55-4f3e-9a49-2b8f4a6c0d11")
_NS_BYTES = NAMESPACE.bytes


def point_id(kind: str, business_id: str) -> str:
    """Deterministic point id: the same item or user gets the same id in every run (idempotent reruns):
    `str(uuid.uuid5(NAMESPACE, f"{kind}:{business_id}"))`, spelled out without UUID objects (millions per publish)."""
    digest = bytearray(hashlib.sha1(_NS_BYTES + f"{kind}:{business_id}".encode()).digest()[:16])
    digest[6], digest[8] = (digest[6] & 0x0F) | 0x50, (digest[8] & 0x3F) | 0x80  # version 5, RFC 4122 variant
    x = digest.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


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
    added: int = 0  # items added to it since it was published (recommend/serving/additions.py)

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "live": self.live, "items": self.items, "users": self.users,
                "created_at": self.metadata.get("created_at"), "added_items": self.added}


class VersionStore:
    """What both backends share: rollback and pruning over `versions()`, `verify()`, `switch()`, `remove()`."""

    prefix: str
    where: str  # the folder or URL, for messages
    embedded: bool = False  # True: versions are written as engine shards into a folder (publish.write_version)

    def live(self) -> str | None: ...
    def versions(self) -> list[Version]: ...
    def incomplete(self) -> list[str]: ...
    def verify(self, run_id: str, deep: bool = False) -> str | None: ...
    def metadata(self, run_id: str) -> dict: ...
    def publish(self, run_id: str, fill: Callable, metadata: dict) -> dict: ...
    def switch(self, run_id: str) -> str | None: ...
    def remove(self, run_id: str) -> None: ...
    def open(self, run_id: str): ...  # a reader: payload(), metadata(), vectors(), search(), count(), close()
    def add_items(self, run_id: str, points: list, replaces: set[str]) -> int: ...  # today's items (additions.py)

    def changes(self, run_id: str):
        """What changes when version `run_id` changes in place (items added today; the embedded
        store's text graph built after the switch): a reader following the live version opens it
        again when this changes (recommend/serving/live.py)."""
        return None

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
