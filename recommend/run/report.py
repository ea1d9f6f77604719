"""What a run says about itself: report.json (`RefreshReport`), report.md, and one manifest per stage
(manifest-<stage>.json). All are typed models; `schema()` is their one JSON schema (`recs schema`).

A failed run writes report.json too, with `status: "failed"`, the stage it failed in and the error,
so that a scheduler can act on it without reading stderr.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from embedder.encode import EmbedCounts
from embedder.settings import EmbedSettings
from embedder.quarantine import SourceCounts
from index.search import Recall
from index.settings import IndexSettings
from index.tune import Tuning
from recommend.quality.evaluate import EvalResult
from recommend.quality.gate import GateReport, GateSettings
from recommend.ranking.settings import BlendSettings, ListsSettings

STAGES = ("ingest", "embed", "gate", "index", "publish")


class IndexSummary(BaseModel):
    """The index stage: how the lists were searched and what they hold."""

    factory: str                  # the FAISS index built ("Flat" when exact)
    items: int
    users: int
    users_with_history: int
    users_short_of_k: int         # users with fewer than k unseen items to list
    k: int
    cold_items: int               # items with no events
    cold_items_projected: int     # of them, given behaviour vectors from their text
    cold_items_in_user_lists: int
    item_lists_recall: Recall
    user_search_recall: Recall | None = None  # the index's, for held-out users against exact search (None: exact)
    search_depth: Tuning
    layout: dict                  # the blended space's layout (recommend.ranking.blend.Layout)


class RefreshReport(BaseModel):
    """report.json: one refresh, finished or failed. A section is None when its stage did not run."""

    status: Literal["ok", "failed"] = "ok"
    run_id: str | None            # None when the run never started (its config could not be used)
    run_dir: str | None
    failed_stage: Literal["config", "start", "preflight", "ingest", "embed", "gate", "index", "publish", "graph"] | None = None
    error: str | None = None      # the message the user saw
    exit_code: int = 0
    items: SourceCounts | None = None
    events: SourceCounts | None = None
    users: SourceCounts | None = None
    embed: EmbedCounts | None = None
    gate: GateReport | None = None
    index: IndexSummary | None = None
    published_version: str | None = None
    previous_version: str | None = None
    # the text search graph built after the switch (recommend/serving/text_graph.py): "built", or
    # "failed: why" (the version stays live, searched exactly); None when the publish built it or needed none
    text_graph: str | None = None
    seconds: dict[str, float] = Field(default_factory=dict)  # per stage, and "total"


class IngestManifest(BaseModel):
    stage: Literal["ingest"] = "ingest"
    files: dict[str, str] = Field(default_factory=dict)  # artifact -> digest (embedder.artifacts.file_digest)
    inputs: dict[str, str | None]
    items: SourceCounts
    events: SourceCounts
    users: SourceCounts | None
    seconds: float
    config: dict                  # the items, events and users sections as run


class EmbedManifest(BaseModel):
    stage: Literal["embed"] = "embed"
    files: dict[str, str] = Field(default_factory=dict)
    model: str
    model_fingerprint: str
    cache: str
    counts: EmbedCounts
    seconds: float
    config: EmbedSettings


class GateManifest(BaseModel):
    stage: Literal["gate"] = "gate"
    gate: GateReport
    seconds: float
    config: GateSettings


class IndexManifest(IndexSummary):
    stage: Literal["index"] = "index"
    files: dict[str, str] = Field(default_factory=dict)
    rows: Literal["embeddings.parquet order"] = "embeddings.parquet order"
    seconds: float
    index_config: IndexSettings
    lists_config: ListsSettings
    blend_config: BlendSettings


class PublishManifest(BaseModel):
    stage: Literal["publish"] = "publish"
    target: str                   # the Qdrant server URL, or the embedded store's folder
    prefix: str
    points: dict[str, int]        # items, users
    previous_version: str | None
    pruned: list[str]
    points_per_second: float
    seconds: float


Manifest = IngestManifest | EmbedManifest | GateManifest | IndexManifest | PublishManifest


def read_report(path) -> RefreshReport | None:
    """A run's report.json; None when an earlier nightly-recs wrote it (its format had no `status`).
    Raises ValueError when the file is damaged (not JSON, or not a report)."""
    import json

    data = json.loads(open(path).read())
    if isinstance(data, dict) and "status" not in data and "run_id" in data:
        return None
    return RefreshReport.model_validate(data)


def schema() -> dict:
    """One JSON schema for report.json, every manifest and `recs eval`'s result (under `$defs`)."""
    models = [RefreshReport, IngestManifest, EmbedManifest, GateManifest, IndexManifest, PublishManifest, EvalResult]
    _, top = models_json_schema([(m, "serialization") for m in models], title="nightly-recs run artifacts")
    return top


def human_report(r: RefreshReport) -> str:
    """report.md: the report for a person."""
    lines = [f"# Refresh {r.run_id}: {r.status}", ""]
    if r.status == "failed":
        lines += [f"- failed in stage **{r.failed_stage}** (exit code {r.exit_code}): {r.error}", ""]
    if r.items:
        lines.append(f"- items: {r.items.rows_read} read, {r.items.quarantined} quarantined, "
                     f"{r.items.duplicates_dropped} duplicates dropped")
        lines.append(f"- item ids seen twice with different texts: {r.items.conflicting_duplicates}"
                     f" (first: {', '.join(r.items.conflicting_ids[:5]) or 'none'})")
        lines.append(f"- item texts cut to {r.items.max_text_chars} characters: {r.items.texts_truncated}")
    if r.events:
        lines.append(f"- events: {r.events.rows_read} read, {r.events.quarantined} quarantined, "
                     f"{r.events.duplicates_dropped} duplicates dropped")
    if r.embed:
        lines.append(f"- embeddings: {r.embed.items_encoded} encoded, {r.embed.items_from_cache} from cache")
    if r.gate and r.gate.enabled:
        figure = "n/a" if r.gate.ndcg is None else f"{r.gate.ndcg:.4f} (popularity {r.gate.popularity_ndcg:.4f})"
        lines.append(f"- gate: nDCG@{r.gate.k} {figure}")
    if r.index:
        lines.append(f"- users: {r.index.users} ({r.index.users_with_history} with history)")
    lines += [f"- published version: {r.published_version} (previous: {r.previous_version or 'none'})",
              "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r.seconds.items()]
    return "\n".join(lines) + "\n"
