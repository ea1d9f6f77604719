"""The stages of a refresh, in order: ingest, embed, gate, index (the lists), publish.

Each stage reads what the one before gave it, writes its artifacts and its manifest into the run
folder, fills its section of the run's report, and raises a RecsError with a clear message when it
cannot go on (recommend/run/pipeline.py then records the failure; nothing is published).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from embedder.artifacts import file_digest, write_parquet
from embedder.encode import EmbedResult, embed_items
from embedder.errors import InputError, RecsError
from embedder.event_blocks import Blocks
from embedder.ingest import ingest_events_to_blocks, ingest_items, ingest_user_ids
from embedder.run_folder import RunFolder
from embedder.quarantine import QUARANTINE_COLUMNS, Ingested, check_bad_fraction
from index.build import APPROXIMATE, EXACT
from index.rows import parquet_rows
from index.search import Recall, sample_rows
from recommend.quality.gate import GateFigures, GateReport, check_gate, gate_problems
from recommend.ranking.blend import Layout
from recommend.run.tasks.item_tasks import build_index, fit_blocks, item_lists_recall, read_item_side, user_search_recall
from recommend.run.tasks.list_tasks import Part, list_blocks, part_files
from recommend.run.tasks.publish_tasks import PointSource, collection_points, vector_sizes
from recommend.run.tasks.user_tasks import gate_figures, sample_users
from recommend.run.infra.memory import release_freed_memory
from recommend.run.infra.preflight import encode_threads
from recommend.run.infra.progress import Reporter
from recommend.run.report import (
    EmbedManifest,
    GateManifest,
    IndexManifest,
    IndexSummary,
    IngestManifest,
    PublishManifest,
    RefreshReport,
)
from recommend.run.plans import EmbedPlan, GatePlan, IngestPlan, ListsPlan, PublishPlan
from recommend.run.workdir import write_manifest
from recommend.serving.filters import indexed_columns
from recommend.serving.publish import live_gate, publish_version
from recommend.serving.text_graph import build_text_graph

log = logging.getLogger("recs")


@dataclass
class Run:
    """What every stage of one run shares: its folder, output, report and cluster. Each stage is given
    its own plan besides (recommend/run/plans.py), never the whole config."""

    folder: RunFolder
    out: Reporter
    report: RefreshReport
    client: object = None  # the Dask client
    current: str = "start"  # the stage running now (a failure is reported against it)

    @property
    def run_id(self) -> str:
        return self.report.run_id

    @contextmanager
    def stage(self, name: str):
        self.current = name
        log.info("stage %s started (run %s)", name, self.run_id)
        start = time.perf_counter()
        yield
        self.release()
        self.report.seconds[name] = round(time.perf_counter() - start, 3)

    def release(self) -> None:
        """What was dropped goes back to the OS, here and on the workers, not kept at its peak: at each
        stage's end, and between the steps of the index stage (a worker that held the fit's arrays
        would otherwise keep their heap through an hour of lists)."""
        release_freed_memory()
        if self.client is not None:
            self.client.run(release_freed_memory)

    def bar(self, stage: str):
        """A progress-bar factory whose bars are named after `stage`."""
        return lambda description, total: self.out.bar(f"{stage}: {description}", total)


@dataclass
class Inputs:
    items: Ingested
    events: Ingested  # quarantine and counts: the accepted events are in `blocks`
    blocks: Blocks
    users: Ingested | None


def ingest(run: Run, plan: IngestPlan) -> Inputs:
    """Items, events and (optional) users read, validated and quarantined; the accepted events
    written by user block on the workers (embedder/event_blocks.py); the bad-row limits checked."""
    s, folder = plan.sources, run.folder
    with run.stage("ingest"):
        items = ingest_items(s.items, s.item_mapping, bar=run.bar("ingest"))
        _require_rows("items", s.items.path, items)
        users = ingest_user_ids(s.users, s.user_id_column) if s.users else None
        events, blocks = ingest_events_to_blocks(
            s.events, s.event_mapping, items.rows["item_id"], folder, block_size=plan.block_size,
            extra_users=users.rows["user_id"] if users else (), bar=run.bar("ingest"))
        _require_rows("events", s.events.path, events)
        quarantine = pd.concat([q.assign(input=name) for name, q in
                                (("items", items.quarantine), ("events", events.quarantine),
                                 ("users", users.quarantine if users else None)) if q is not None and len(q)]
                               or [pd.DataFrame(columns=QUARANTINE_COLUMNS + ["input"])], ignore_index=True)
        write_parquet(pa.Table.from_pandas(quarantine.astype({"row": "int64"}), preserve_index=False), folder.quarantine)
        write_parquet(pa.Table.from_pandas(items.rows, preserve_index=False), folder.items)
    run.report.items, run.report.events = items.counts, events.counts
    run.report.users = users.counts if users else None
    write_manifest(folder, IngestManifest(
        files={**digests(folder, folder.quarantine, folder.items), **blocks.files()},
        inputs={"items": s.items.path, "events": s.events.path, "users": s.users.path if s.users else None},
        items=items.counts, events=events.counts, users=users.counts if users else None, seconds=run.report.seconds["ingest"],
        config=plan.sections))
    run.out.say(f"[ingest] items {items.counts.accepted} accepted, {items.counts.quarantined} quarantined; "
                f"events {events.counts.accepted} accepted, {events.counts.quarantined} quarantined, "
                f"{blocks.users} users in {blocks.n} blocks ({run.report.seconds['ingest']:.1f}s)")
    for name, result in (("items", items), ("events", events), ("users", users)):
        if result is not None:
            check_bad_fraction(name, result.counts, plan.max_bad_fraction[name], str(folder.quarantine))
    if items.rows.empty:
        raise RecsError(f"no usable items in {s.items.path}: all {items.counts.rows_read} rows quarantined "
                        f"(reasons: {items.counts.quarantine_reasons}); see {folder.quarantine}")
    return Inputs(items, events, blocks, users)


def digests(folder: RunFolder, *paths: Path) -> dict[str, str]:
    """The digests of artifacts just written, for the stage's manifest (`recs check` verifies them)."""
    return {folder.relative(path): file_digest(path) for path in paths}


def _require_rows(name: str, path: str, result: Ingested) -> None:
    """A source with no data rows at all (empty files, a header only) stops the run: nothing could be
    judged, and publishing it would replace good lists with popularity."""
    if result.counts.rows_read == 0:
        raise InputError(f"{name}.path: {path} holds no data rows (empty, or a header only); "
                         "nothing was published, the live version stays live")


def embed(run: Run, plan: EmbedPlan, items: Ingested) -> EmbedResult:
    """Item vectors: from the cache, the rest encoded on the workers."""
    client = run.client
    threads = encode_threads(client) if client is not None else os.cpu_count()  # each worker's own share
    bar = {}

    def encode_progress(done: int, total: int) -> None:
        if "tick" not in bar or done < bar["done"]:  # a new bar when a failed precision check starts over in fp32
            name = "embed: encoding" if "tick" not in bar else "embed: encoding again in fp32 (precision check failed)"
            bar["tick"], bar["done"] = run.out.bar(name, total), 0
        bar["tick"](done - bar["done"])
        bar["done"] = done

    with run.stage("embed"):
        # written on a worker from the cache; no vector comes here (items x dim floats): the fit and the
        # publish read the file a row group at a time
        emb = embed_items(items.rows, plan.model, cache_root=plan.cache_root, client=client, threads=threads,
                          progress=encode_progress, out=run.folder.embeddings)
        emb.vectors = parquet_rows(run.folder.embeddings)
    run.report.embed = emb.counts
    write_manifest(run.folder, EmbedManifest(files=digests(run.folder, run.folder.embeddings), model=plan.model.settings.model,
                                              model_fingerprint=emb.model_fingerprint,
                                              cache=plan.cache_root, counts=emb.counts,
                                              seconds=run.report.seconds["embed"], config=plan.model.settings))
    run.out.say(f"[embed] {emb.counts.items_encoded} encoded, {emb.counts.items_from_cache} from cache "
                f"({run.report.seconds['embed']:.1f}s)")
    return emb


def gate(run: Run, plan: GatePlan, store, blocks: Blocks) -> GateReport:
    """The quality gate's figures; raises GateFailed when they are not good enough."""
    gc = plan.settings
    if not gc.enabled:
        run.report.gate = GateReport(enabled=False)
        return run.report.gate
    with run.stage("gate"):
        tick = run.out.bar("gate: fit and score on a worker", 1)
        figures = gate_figures(run.client, blocks, plan.ranking, gc)
        tick(1)
        live = live_gate(store, plan.prefix) if store is not None else None
        live = GateFigures(**live) if live is not None else None
        report = GateReport(**figures.model_dump(), enabled=True, live=live)
        report.problems = gate_problems(report, live, gc)
    run.report.gate = report
    write_manifest(run.folder, GateManifest(gate=report, seconds=run.report.seconds["gate"], config=gc))
    figure = "n/a" if report.ndcg is None else f"{report.ndcg:.4f} (popularity {report.popularity_ndcg:.4f})"
    run.out.say(f"[gate] nDCG@{gc.k} on the most recent {gc.holdout:.0%}: {figure} "
                f"{'FAILED' if report.problems else 'passed'} ({run.report.seconds['gate']:.1f}s)")
    check_gate(report)
    return report


@dataclass
class Lists:
    """The index stage's output: the item side's layout (the item side itself and the index are in the
    run folder, recommend/run/tasks/item_tasks.py), the ids, and the parts the workers wrote
    (recommend/run/tasks/list_tasks.py), from which the publish makes its points (recommend/run/tasks/publish_tasks.py)."""

    layout: Layout
    item_ids: np.ndarray
    blocks: Blocks
    parts: list[Part]
    summary: IndexSummary = field(repr=False, default=None)


RECALL_SAMPLE = 1000  # item lists checked against exact search for the reported recall
TUNE_USERS = 4096     # users (the smallest hashes) whose vectors the index's tuning searches with


def lists(run: Run, plan: ListsPlan, blocks: Blocks, emb: EmbedResult) -> Lists:
    """On the workers: the behaviour fit over the user blocks, the item side and the FAISS index
    (built and saved on a worker, recommend/run/tasks/item_tasks.py), then K similar items per item and K
    items per user, a block at a time (recommend/run/tasks/list_tasks.py). The driver holds summaries."""
    k, ranking, client = plan.lists.k, plan.ranking, run.client
    bar = run.bar("index")
    with run.stage("index"):
        item_ids = np.asarray(emb.item_ids, dtype=object)
        sample = sample_users(client, blocks, TUNE_USERS)  # read once: the fit's scale sample is its first users
        saved = fit_blocks(client, blocks, item_ids, emb.vectors, ranking, bar=bar, sample=sample)
        run.release()
        tick = bar("building and tuning the index on a worker", 1)
        built = build_index(client, blocks, k, plan.index, sample, ranking,
                            n_searches=len(item_ids) + saved.users_with_history)
        tick(1)
        del sample
        run.release()
        tuning, files = built.tuning, {**built.files, **saved.files}
        rows = sample_rows(len(item_ids), RECALL_SAMPLE, 0)
        parts = list_blocks(client, len(item_ids), blocks, ranking,
                            plan.job, sample=rows, block_size=plan.lists.block_size, progress=bar)
        files.update(part_files(parts))
        recall = Recall(recall=1.0, k=k, sample=0, exact=True) if built.exact else item_lists_recall(
            client, run.folder, rows, np.concatenate([p.sample_ids for p in parts if p.kind == "item"]),
            min(k, max(len(item_ids) - 1, 0)))
        users_recall = None if built.exact else user_search_recall(client, blocks, RECALL_SAMPLE, k, ranking)
        release_freed_memory()
    factory = EXACT if tuning.exact or tuning.fallback == "exact" else (APPROXIMATE if plan.index.kind == "auto"
                                                                         else plan.index.kind)
    user_parts = [p for p in parts if p.kind == "user"]
    summary = IndexSummary(
        factory=factory, items=len(item_ids), users=blocks.users, users_with_history=saved.users_with_history,
        users_short_of_k=sum(p.short_of_k for p in user_parts), k=k,
        cold_items=saved.cold_items, cold_items_projected=saved.cold_items_projected,
        cold_items_in_user_lists=sum(p.new_items_listed for p in user_parts),
        item_lists_recall=recall, user_search_recall=users_recall, search_depth=tuning, layout=saved.layout.to_dict())
    run.report.index = summary
    write_manifest(run.folder, IndexManifest(**summary.model_dump(), files=files, seconds=run.report.seconds["index"],
                                          index_config=plan.index, lists_config=plan.lists,
                                          blend_config=plan.blend))
    depth = ("exact" if tuning.exact or tuning.fallback == "exact"
             else f"{tuning.knob}={tuning.value if tuning.value is not None else 'faiss default'}")
    users = f", users' {users_recall.recall} (held out)" if users_recall else ""
    run.out.say(f"[index] {factory} searched at {depth}, item lists' recall@{k} {recall.recall}{users}; "
                f"{len(item_ids)} item lists, {blocks.users} user lists in {len(parts)} blocks "
                f"({blocks.users - saved.users_with_history} by popularity, {summary.cold_items} items placed by text alone) "
                f"({run.report.seconds['index']:.1f}s)")
    return Lists(saved.layout, item_ids, blocks, parts, summary)


def publish(run: Run, plan: PublishPlan, store, items: Ingested, emb: EmbedResult, lists: Lists, gate: GateReport) -> str | None:
    """Publish the new version as one transaction (written, verified, marked complete, switched live),
    prune old ones. Returns the previous live run id. `store`: a recommend.serving.versions.VersionStore.
    The points are made a lists part at a time (recommend/run/tasks/publish_tasks.py): the embedded store's
    shards are written by tasks on the workers, a server's points uploaded from the workers."""
    pc, run_id = plan.settings, run.run_id
    side = read_item_side(run.folder)
    layout = side.layout
    on_workers = bool(pc.url and pc.upload_on_workers and run.client is not None)
    with run.stage("publish"):
        source = PointSource(run.folder, emb.vectors)
        target = plan.target(on_workers)
        sizes = vector_sizes(layout, emb.vectors.shape[1])
        fields, stored = indexed_columns(items.rows, pc.indexed_fields)
        metadata = {c: stored.get(c, items.rows[c]) for c in plan.metadata}
        points = {kind: collection_points(run.client, source, lists.parts, kind, metadata, sizes[kind], target)
                  for kind in ("item", "user")}
        meta = {"run_id": run_id, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model": plan.model, "model_fingerprint": emb.model_fingerprint,
                "dim": int(emb.vectors.shape[1]), "k": plan.k, "layout": layout.to_dict(),
                "query_scale": float(side.query_scale), "indexed_fields": fields,
                "gate": gate.model_dump(include={"ndcg", "popularity_ndcg", "users", "holdout", "k", "method"})}
        tick = run.out.bar("publish: writing shards" if store.embedded else
                           "publish: upserting" + (" from the workers" if on_workers else ""),
                           points["item"].count * (2 if store.embedded else 1) + points["user"].count)  # + text shards
        done = publish_version(store, run_id, points["item"], points["user"], metadata=meta, progress=tick,
                               storage=plan.storage(points["item"].count, fields), dask=run.client)
        previous, written, pruned = done.previous, done.counts, done.pruned
        run.report.published_version, run.report.previous_version = run_id, previous  # live from here on
    seconds = run.report.seconds["publish"]
    write_manifest(run.folder, PublishManifest(target=store.where, prefix=pc.prefix,
                                                points=written, previous_version=previous, pruned=pruned,
                                                points_per_second=round(sum(written.values()) / max(seconds, 1e-9), 1),
                                                seconds=seconds))
    cleaned = f"; incomplete leftovers removed: {len(done.removed_incomplete)}" if done.removed_incomplete else ""
    run.out.say(f"[publish] version {run_id} live (previous: {previous or 'none'}; pruned: {len(pruned)}{cleaned}) ({seconds:.1f}s)")
    if done.graph_pending:
        text_graph(run, store, run_id, written["items"])
    return previous


def text_graph(run: Run, store, run_id: str, items: int) -> None:
    """The text shards' graph, when the publish left it to build after the switch (no graph was live:
    recommend/serving/text_graph.py). The version is live already and text search scans exactly until
    this ends. A failure is reported, not the run's: the version stays live and sound, and the next
    publish builds the graph again."""
    with run.stage("graph"):
        tick = run.out.bar("graph: text search graph", items)
        try:
            build_text_graph(store, run_id, dask=run.client, progress=tick)
        except Exception as exc:
            run.report.text_graph = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    seconds = run.report.seconds["graph"]
    if run.report.text_graph:
        log.warning("the text search graph of version %s was not built: %s", run_id, run.report.text_graph)
        run.out.say(f"[graph] {run.report.text_graph}; version {run_id} stays live, its text search scans every "
                    f"item until a publish builds the graph ({seconds:.1f}s)")
    else:
        run.report.text_graph = "built"
        run.out.say(f"[graph] text search graph built over {items} items, after the switch ({seconds:.1f}s)")
