"""Items in during the day: `recs add-items FILE` and POST /items add new or changed items to the
live version (what becomes of them there: recommend/serving/additions.py).

The items are read and validated as the catalog is (embedder/ingest.py, with the config's items
section: id, text template, metadata; a bad row is quarantined with its row and reason, never added
silently wrong). Their texts are encoded through the embedding cache with the live version's model
and precision, under the refresh's keys: an unchanged text is not encoded again, and tonight's
refresh finds today's texts there. Indexed fields are typed as the version indexes them; a value
that does not fit (a price that is not a number) quarantines its row, naming the field. One addition
at a time per workdir (a lock file); a refresh never waits for one.

Example:
    report = Intake.from_config(load_config("config.yaml")).add_file("new_items.csv")
    report.added, report.encoded, report.version
"""

from __future__ import annotations

import fcntl
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import BaseModel, Field

from embedder.errors import InputError, RecsError
from embedder.specs import ItemMapping, SourceSpec
from recommend.serving.live import NotFound
from recommend.serving.settings import PublishSettings

MAX_POSTED = 1000  # items in one POST /items
SHOWN = 20  # quarantined rows named in a report


class AddReport(BaseModel):
    """What one addition did."""

    version: str = Field(description="the version the items were added to")
    added: int = Field(description="items added (new or changed)")
    new: int = Field(description="of them, items the version did not hold")
    replaced: int = Field(description="of them, items of the version given new text and metadata")
    added_today: int = Field(description="items the version now holds added since it was published")
    encoded: int = Field(description="texts encoded now (the others came from the embedding cache)")
    from_cache: int
    rows_read: int
    quarantined: int = Field(description="rows not added, each named in `problems` (the first 20)")
    problems: list[str] = Field(default_factory=list)
    still_live: bool = Field(True, description="false when another version went live meanwhile: add them again")
    seconds: float = 0.0
    steps: dict[str, float] = Field(default_factory=dict, description="seconds: read (and validate), encode, store")


@dataclass(frozen=True)
class Intake:
    """What an addition needs from the config (picklable: POST /items runs it in a process of its own)."""

    items: SourceSpec      # the catalog's read settings (format, delimiter, limits), applied to the file given
    mapping: ItemMapping   # id, text template, metadata
    embed: object          # embedder.settings.EmbedSettings
    cache_root: str
    publish: PublishSettings
    workdir: str

    @classmethod
    def from_config(cls, config) -> "Intake":
        from recommend.config import stage_settings

        settings = stage_settings(config)
        return cls(settings.items, settings.item_mapping, config.embed, config.cache_root, config.publish, str(config.workdir))

    def add_records(self, records: list[dict]) -> AddReport:
        """Add items given as records with the catalog's columns (POST /items); a problem names the
        record by its position ("POST /items row 3") or its id."""
        if not records:
            raise InputError("no items to add")
        with tempfile.TemporaryDirectory(prefix="recs-add-") as folder:
            path = Path(folder) / "items.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            try:
                report = self.add_file(str(path), fmt="jsonl")
            except RecsError as exc:  # named as the request, not as the file it went through
                exc.args = (str(exc).replace(str(path), "POST /items"),)
                raise
        report.problems = [p.replace(str(path), "POST /items") for p in report.problems]
        return report

    def add_file(self, path: str, fmt: str | None = None) -> AddReport:
        """Add the items of a catalog file (Parquet, CSV or JSON lines, by its extension or `fmt`) to
        the live version. NotFound before the first publish; InputError (exit 2, HTTP 400) when no
        row can be added; ConfigError when embed.model is not the live version's model."""
        from embedder.ingest import ingest_items
        from recommend.serving.versions import version_store

        started = time.perf_counter()
        store = version_store(self.publish, self.workdir)
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        with open(Path(self.workdir) / "add-items.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one addition at a time: each reads the state the last one left
            run_id = store.live()
            if run_id is None:
                raise NotFound(f"nothing published under prefix {self.publish.prefix!r} yet: run `recs refresh` first")
            meta, steps = store.metadata(run_id), {}
            got = ingest_items(replace(self.items, path=path, key=f"add-items {path}", format=fmt), self.mapping)
            rows, problems = _typed_rows(got.rows, self.mapping.metadata, meta.get("indexed_fields") or {})
            problems = [f"{r.source} row {r.row}: {r.reason}: {r.detail}" for r in got.quarantine.itertuples()] + problems
            if not len(rows):
                raise InputError(f"no item of {path} can be added: " + "; ".join(problems[:5]))
            steps["read"] = time.perf_counter() - started
            embedded = _encode(rows, self.embed, self.cache_root, meta, run_id)
            steps["encode"] = time.perf_counter() - started - steps["read"]
            reader = store.open(run_id)
            try:
                from recommend.serving.additions import added_points

                ids = rows["item_id"].tolist()
                replaces = reader.held(ids)
                fields = [{c: row[c] for c in self.mapping.metadata} for row in rows.to_dict("records")]
                points = added_points(reader, meta, ids, embedded.vectors, fields)
            finally:
                reader.release()
            today = store.add_items(run_id, points, replaces)
            live_now = store.live()
            steps["store"] = time.perf_counter() - started - steps["read"] - steps["encode"]
        return AddReport(version=run_id, added=len(points), new=len(points) - len(replaces), replaced=len(replaces),
                         added_today=today, encoded=embedded.counts.items_encoded, from_cache=embedded.counts.items_from_cache,
                         rows_read=got.counts.rows_read, quarantined=len(problems), problems=problems[:SHOWN],
                         still_live=live_now == run_id, seconds=round(time.perf_counter() - started, 2),
                         steps={k: round(v, 2) for k, v in steps.items()})


def _typed_rows(rows, metadata: tuple[str, ...], indexed: dict[str, str]):
    """The rows whose indexed fields hold values of the version's kinds (those typed as it publishes
    them), and a problem for each row that does not."""
    from recommend.serving.filters import published_value

    problems, keep = [], []
    rows = rows.reset_index(drop=True)
    for r, row in enumerate(rows.to_dict("records")):
        ok = True
        for name in (n for n in metadata if n in indexed and row[n] is not None):
            try:
                rows.at[r, name] = published_value(str(row[name]), indexed[name])
            except ValueError:
                problems.append(f"item {row['item_id']}: {name}: {str(row[name])[:50]!r} is not {_kind_text(indexed[name])}, "
                                "as the live version indexes it")
                ok = False
        keep.append(ok)
    return rows[keep].reset_index(drop=True), problems


def _kind_text(kind: str) -> str:
    return {"integer": "a whole number", "float": "a number", "bool": "true or false"}.get(kind, "text")


def _encode(rows, embed, cache_root: str, meta: dict, run_id: str):
    """The rows' text vectors, through the cache, with the model the version was built with."""
    from embedder.encode import embed_items, resolve_model
    from recommend.config import ConfigError

    model = resolve_model(embed)
    if meta.get("model_fingerprint") and model.fingerprint != meta["model_fingerprint"]:
        raise ConfigError(f"embed.model {embed.model} is not the model version {run_id} was built with "
                        f"({meta.get('model')}): its items would be in another vector space")
    return embed_items(rows[["item_id", "text"]], model, cache_root=cache_root)
