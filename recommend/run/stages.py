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
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from embedder.artifacts import file_digest, vectors_to_arrow, write_parquet, write_parquet_blocks
from embedder.encode import EmbedResult, embed_items
from embedder.errors import InputError, RecsError
from embedder.ingest import ingest_events, ingest_items, ingest_user_ids
from embedder.quarantine import QUARANTINE_COLUMNS, Ingested, check_bad_fraction
from index.build import APPROXIMATE, EXACT, save_index
from index.search import sampled_recall
from index.tune import build_tuned
from recommend.config import Config, StageSettings
from recommend.quality.evaluate import holdout_score
from recommend.quality.gate import GateFigures, GateReport, check_gate, gate_problems
from recommend.ranking.blend import Space, build_space
from recommend.ranking.lists import labels, lists_tables, recommended_items, similar_items
from recommend.run.memory import release_freed_memory
from recommend.run.preflight import encode_threads
from recommend.run.progress import Reporter
from recommend.run.report import (
    EmbedManifest,
    GateManifest,
    IndexManifest,
    IndexSummary,
    IngestManifest,
    PublishManifest,
    RefreshReport,
)
from recommend.run.workdir import write_manifest
from recommend.serving.publish import (
    BLEND_QUERY_VECTOR,
    BLEND_VECTOR,
    ITEM_VECTOR,
    item_payloads,
    live_gate,
    publish_version,
    user_payloads,
)

BLOCK = 65_536  # rows per block where an artifact is written a block at a time
log = logging.getLogger("recs")


@dataclass
class Run:
    """What every stage of one run shares: its config, settings, folder, output and report."""

    config: Config
    settings: StageSettings
    run_dir: Path
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
        release_freed_memory()  # what the stage dropped goes back to the OS, not kept at its peak
        self.report.seconds[name] = round(time.perf_counter() - start, 3)

    def bar(self, stage: str):
        """A progress-bar factory whose bars are named after `stage`."""
        return lambda description, total: self.out.bar(f"{stage}: {description}", total)


@dataclass
class Inputs:
    items: Ingested
    events: Ingested
    users: Ingested | None


def ingest(run: Run) -> Inputs:
    """Items, events and (optional) users read, validated and quarantined; the bad-row limits checked."""
    config, s, run_dir = run.config, run.settings, run.run_dir
    with run.stage("ingest"):
        items = ingest_items(s.items, s.item_mapping, bar=run.bar("ingest"))
        _require_rows("items", config.items.path, items)
        events = ingest_events(s.events, s.event_columns, s.ranking.weights, items.rows["item_id"], s.timezone,
                               bar=run.bar("ingest"))
        _require_rows("events", config.events.path, events)
        users = ingest_user_ids(s.users, s.user_id_column) if s.users else None
        quarantine = pd.concat([q.assign(input=name) for name, q in
                                (("items", items.quarantine), ("events", events.quarantine),
                                 ("users", users.quarantine if users else None)) if q is not None and len(q)]
                               or [pd.DataFrame(columns=QUARANTINE_COLUMNS + ["input"])], ignore_index=True)
        write_parquet(pa.Table.from_pandas(quarantine.astype({"row": "int64"}), preserve_index=False), run_dir / "quarantine.parquet")
        write_parquet(pa.Table.from_pandas(items.rows, preserve_index=False), run_dir / "items.parquet")
        write_parquet(pa.Table.from_pandas(events.rows, preserve_index=False), run_dir / "events.parquet")
    run.report.items, run.report.events = items.counts, events.counts
    run.report.users = users.counts if users else None
    write_manifest(run_dir, IngestManifest(
        files=digests(run_dir, "quarantine.parquet", "items.parquet", "events.parquet"), inputs={"items": config.items.path, "events": config.events.path, "users": config.users.path if config.users else None},
        items=items.counts, events=events.counts, users=users.counts if users else None, seconds=run.report.seconds["ingest"],
        config={"items": config.items.model_dump(), "events": config.events.model_dump(),
                "users": config.users.model_dump() if config.users else None}))
    run.out.say(f"[ingest] items {items.counts.accepted} accepted, {items.counts.quarantined} quarantined; "
                f"events {events.counts.accepted} accepted, {events.counts.quarantined} quarantined "
                f"({run.report.seconds['ingest']:.1f}s)")
    for name, result, section in (("items", items, config.items), ("events", events, config.events),
                                  ("users", users, config.users)):
        if result is not None:
            check_bad_fraction(name, result.counts, section.max_bad_fraction, str(run_dir / "quarantine.parquet"))
    if items.rows.empty:
        raise RecsError(f"no usable items in {config.items.path}: all {items.counts.rows_read} rows quarantined "
                        f"(reasons: {items.counts.quarantine_reasons}); see {run_dir / 'quarantine.parquet'}")
    return Inputs(items, events, users)


def digests(run_dir: Path, *names: str) -> dict[str, str]:
    """The digests of artifacts just written, for the stage's manifest (`recs check` verifies them)."""
    return {name: file_digest(run_dir / name) for name in names}


def _require_rows(name: str, path: str, result: Ingested) -> None:
    """A source with no data rows at all (empty files, a header only) stops the run: nothing could be
    judged, and publishing it would replace good lists with popularity."""
    if result.counts.rows_read == 0:
        raise InputError(f"{name}.path: {path} holds no data rows (empty, or a header only); "
                         "nothing was published, the live version stays live")


def embed(run: Run, items: Ingested) -> EmbedResult:
    """Item vectors: from the cache, the rest encoded on the workers."""
    config, client = run.config, run.client
    threads = encode_threads(client) if client is not None else os.cpu_count()  # each worker's own share
    bar = {}

    def encode_progress(done: int, total: int) -> None:
        if "tick" not in bar or done < bar["done"]:  # a new bar when a failed precision check starts over in fp32
            name = "embed: encoding" if "tick" not in bar else "embed: encoding again in fp32 (precision check failed)"
            bar["tick"], bar["done"] = run.out.bar(name, total), 0
        bar["tick"](done - bar["done"])
        bar["done"] = done

    with run.stage("embed"):
        emb = embed_items(items.rows, config.embed, cache_root=config.cache_root, client=client, threads=threads,
                          progress=encode_progress)
        write_parquet_blocks((pa.table({"item_id": pa.array(emb.item_ids[i:i + BLOCK], pa.string()),
                                        "content_hash": pa.array(emb.content_hashes[i:i + BLOCK], pa.string()),
                                        "vector": vectors_to_arrow(emb.vectors[i:i + BLOCK])})
                              for i in range(0, max(len(emb.item_ids), 1), BLOCK)), run.run_dir / "embeddings.parquet")
        emb.content_hashes = None  # written: not needed again
    run.report.embed = emb.counts
    write_manifest(run.run_dir, EmbedManifest(files=digests(run.run_dir, "embeddings.parquet"), model=config.embed.model, model_fingerprint=emb.model_fingerprint,
                                              cache=config.cache_root, counts=emb.counts,
                                              seconds=run.report.seconds["embed"], config=config.embed))
    run.out.say(f"[embed] {emb.counts.items_encoded} encoded, {emb.counts.items_from_cache} from cache "
                f"({run.report.seconds['embed']:.1f}s)")
    return emb


def gate(run: Run, store, events: Ingested, emb: EmbedResult) -> GateReport:
    """The quality gate's figures; raises GateFailed when they are not good enough."""
    gc = run.config.gate
    if not gc.enabled:
        run.report.gate = GateReport(enabled=False)
        return run.report.gate
    with run.stage("gate"):
        figures = holdout_score(events.rows, item_ids=emb.item_ids, text=emb.vectors, settings=run.settings.ranking,
                                holdout=gc.holdout, k=gc.k, max_users=gc.max_users, bar=run.bar("gate"))
        live = live_gate(store, run.config.publish.prefix) if store is not None else None
        live = GateFigures(**live) if live is not None else None
        report = GateReport(**figures.model_dump(), enabled=True, live=live)
        report.problems = gate_problems(report, live, gc)
    run.report.gate = report
    write_manifest(run.run_dir, GateManifest(gate=report, seconds=run.report.seconds["gate"], config=gc))
    figure = "n/a" if report.ndcg is None else f"{report.ndcg:.4f} (popularity {report.popularity_ndcg:.4f})"
    run.out.say(f"[gate] nDCG@{gc.k} on the most recent {gc.holdout:.0%}: {figure} "
                f"{'FAILED' if report.problems else 'passed'} ({run.report.seconds['gate']:.1f}s)")
    check_gate(report)
    return report


@dataclass
class Lists:
    """The index stage's output: the blended space and both kinds of lists, rows as in `item_ids`/`user_ids`."""

    space: Space
    item_ids: np.ndarray
    user_ids: list[str]
    item_lists: tuple  # (scores, ids, source)
    user_lists: tuple
    summary: IndexSummary = field(repr=False, default=None)


def lists(run: Run, events: Ingested, users: Ingested | None, emb: EmbedResult) -> Lists:
    """The blended space, the FAISS index over it, K similar items per item and K items per user."""
    config, k = run.config, run.config.lists.k
    bar = run.bar("index")
    with run.stage("index"):
        item_ids = np.asarray(emb.item_ids, dtype=object)
        user_ids = sorted(set(events.rows["user_id"].unique()) | (set(users.rows["user_id"]) if users is not None else set()))
        space = build_space(events.rows, item_ids=emb.item_ids, text=emb.vectors, user_ids=user_ids,
                            settings=run.settings.ranking, bar=bar)
        events.rows = None  # in the space and in events.parquet now: not held beside the index
        release_freed_memory()
        index, tuning = build_tuned(space.item_docs, space.item_queries, k, config.index, space.users,
                                    np.flatnonzero(space.has_history), progress=bar)
        save_index(index, run.run_dir / "index.faiss")
        i_scores, i_ids, i_filled = similar_items(index, space.item_queries, k, space.popularity,
                                                  progress=bar("item->item", len(item_ids)), item_vectors=space.item_docs)
        recall = sampled_recall(index, space.item_docs, space.item_queries, i_ids, k)  # item lists vs exact search
        space.item_queries = None  # not needed again: free it before the user lists
        u_scores, u_ids, u_source = recommended_items(
            index, space.users, space.has_history, space.seen, k, space.item_docs, space.popularity,
            progress=bar("user->item", int(space.has_history.sum())),
            new_items=np.flatnonzero(~space.warm), new_slots=config.blend.new_item_slots,
            new_boost=config.blend.new_item_boost)
        u_source = labels(np.where((u_source == "history") & space.few_events, "few-events", u_source))
        i_source = labels(np.where(i_filled, "similar+popular", np.where(space.warm, "similar", "similar-from-text")))
        write_parquet_blocks(chain(lists_tables("item", item_ids, i_scores, i_ids, item_ids, i_source),
                                   lists_tables("user", user_ids, u_scores, u_ids, item_ids, u_source)),
                             run.run_dir / "lists.parquet")
    factory = EXACT if tuning.exact or tuning.fallback == "exact" else (APPROXIMATE if config.index.kind == "auto"
                                                                         else config.index.kind)
    summary = IndexSummary(
        factory=factory, items=len(item_ids), users=len(user_ids), users_with_history=int(space.has_history.sum()),
        users_short_of_k=int(((u_ids >= 0).sum(axis=1) < min(k, len(item_ids))).sum()), k=k,
        cold_items=int((~space.warm).sum()), cold_items_projected=space.cold_items_projected,
        cold_items_in_user_lists=int(np.isin(u_ids[u_ids >= 0], np.flatnonzero(~space.warm)).sum()),
        item_lists_recall=recall, search_depth=tuning, layout=space.layout.to_dict())
    run.report.index = summary
    write_manifest(run.run_dir, IndexManifest(**summary.model_dump(), files=digests(run.run_dir, "index.faiss", "lists.parquet"),
                                              seconds=run.report.seconds["index"],
                                              index_config=config.index, lists_config=config.lists,
                                              blend_config=config.blend))
    depth = ("exact" if tuning.exact or tuning.fallback == "exact"
             else f"{tuning.knob}={tuning.value if tuning.value is not None else 'faiss default'}")
    run.out.say(f"[index] {factory} searched at {depth}, item lists' recall@{k} {recall.recall}; "
                f"{len(item_ids)} item lists, {len(user_ids)} user lists "
                f"({int((~space.has_history).sum())} by popularity, {summary.cold_items} items placed by text alone) "
                f"({run.report.seconds['index']:.1f}s)")
    return Lists(space, item_ids, user_ids, (i_scores, i_ids, i_source), (u_scores, u_ids, u_source), summary)


def publish(run: Run, store, items: Ingested, emb: EmbedResult, lists: Lists, gate: GateReport) -> str | None:
    """Publish the new version as one transaction (written, verified, marked complete, switched live),
    prune old ones. Returns the previous live run id. `store`: a recommend.serving.versions.VersionStore."""
    config, pc, run_id = run.config, run.config.publish, run.run_id
    space, item_ids, user_ids = lists.space, lists.item_ids, lists.user_ids
    (i_scores, i_ids, i_source), (u_scores, u_ids, u_source) = lists.item_lists, lists.user_lists
    with run.stage("publish"):
        metadata = {c: items.rows[c].tolist() for c in config.items.metadata}
        meta = {"run_id": run_id, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model": config.embed.model, "model_fingerprint": emb.model_fingerprint,
                "dim": int(emb.vectors.shape[1]), "k": config.lists.k, "layout": space.layout.to_dict(),
                "gate": gate.model_dump(include={"ndcg", "popularity_ndcg", "users", "holdout", "k", "method"})}
        tick = run.out.bar("publish: upserting", len(item_ids) + len(user_ids))
        done = publish_version(store, run_id,
                               {"ids": item_ids.tolist(), "vectors": {ITEM_VECTOR: emb.vectors, BLEND_VECTOR: space.item_docs,
                                                                      BLEND_QUERY_VECTOR: space.item_raw_queries},
                                "payloads": item_payloads(item_ids, metadata, i_scores, i_ids, run_id, i_source)},
                               {"ids": user_ids, "vectors": space.users,
                                "payloads": user_payloads(user_ids, item_ids, u_scores, u_ids, run_id, u_source)},
                               metadata=meta, keep=pc.keep_versions, batch_size=pc.batch_size, progress=tick,
                               parallel=pc.parallel, index_wait_s=pc.index_wait_s)
        previous, written, pruned = done.previous, done.counts, done.pruned
        run.report.published_version, run.report.previous_version = run_id, previous  # live from here on
    seconds = run.report.seconds["publish"]
    write_manifest(run.run_dir, PublishManifest(target=store.where, prefix=pc.prefix,
                                                points=written, previous_version=previous, pruned=pruned,
                                                points_per_second=round(sum(written.values()) / max(seconds, 1e-9), 1),
                                                seconds=seconds))
    cleaned = f"; incomplete leftovers removed: {len(done.removed_incomplete)}" if done.removed_incomplete else ""
    run.out.say(f"[publish] version {run_id} live (previous: {previous or 'none'}; pruned: {len(pruned)}{cleaned}) ({seconds:.1f}s)")
    return previous
