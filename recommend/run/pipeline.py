"""`recs refresh`: ingest -> embed -> quality gate -> index & lists -> publish, each stage leaving a manifest.

Example:
    from recommend.config import load_config
    from recommend.run.pipeline import refresh
    report = refresh(load_config("config.yaml"))
    report["published_version"], report["items_encoded"]
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import chain
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from embedder.artifacts import vectors_to_arrow, write_json, write_parquet, write_parquet_blocks
from embedder.encode import embed_items
from embedder.errors import RecsError
from embedder.ingest import (
    QUARANTINE_COLUMNS,
    ExtraText,
    ItemMapping,
    SourceSpec,
    accounting,
    check_bad_fraction,
    ingest_events,
    ingest_items,
    ingest_user_ids,
)
from embedder.model import ModelNotFound, pick_device, resolve_model_path
from embedder.precision import resolve_precision
from index.build import EXACT, choose_factory, save_index
from index.search import sampled_recall
from index.tune import IndexSettings, build_tuned
from recommend.run.cluster import dask_client
from recommend.config import Config, ConfigError
from recommend.quality.evaluate import BlendSettings, holdout_score, space_for
from recommend.quality.gate import check_gate, gate_problems
from recommend.run.memory import release_freed_memory, survivors_frozen
from recommend.ranking.lists import labels, lists_tables, recommended_items, similar_items
from recommend.run.progress import Reporter
from recommend.serving.publish import (
    BLEND_QUERY_VECTOR,
    BLEND_VECTOR,
    ITEM_VECTOR,
    item_payloads,
    live_gate,
    prune_versions,
    stage_version,
    switch_live,
    user_payloads,
)
from recommend.run.workdir import RefreshLock, new_run_id, runs_dir, write_manifest
from recommend.serving.store import open_store

log = logging.getLogger("recs")
BLOCK = 65_536  # rows per block where an artifact is written a block at a time


def _source(cfg, key: str) -> SourceSpec:
    return SourceSpec(cfg.path, f"{key}.path", cfg.format, cfg.delimiter, cfg.encoding,
                      tuple(cfg.columns) if cfg.columns else None, cfg.quotechar)


def item_mapping(ic) -> ItemMapping:
    """The items section of the config as the embedder's ItemMapping."""
    extras = {name: ExtraText(_source(x, f"items.extra_text.{name}"), x.id, x.column, x.separator, x.max_values)
              for name, x in ic.extra_text.items()}
    return ItemMapping(ic.id, ic.text, tuple(ic.metadata), dict(ic.list_separators), dict(ic.flags), extras, ic.newest_by, ic.max_text_chars)


def blend_settings(config: Config) -> BlendSettings:
    """The blend and lists sections of the config as the settings `build_space` and `recs eval` take."""
    b = config.blend
    return BlendSettings(b.behaviour_weight, b.popularity_weight, b.factors, b.l2, b.few_events, b.cold_damping,
                         b.new_item_slots, config.lists.half_life_days, b.factor_memory_mb)


def index_settings(config: Config) -> IndexSettings:
    """The index section of the config as the settings `build_tuned` takes."""
    xc = config.index
    return IndexSettings(xc.kind, xc.exact_below, xc.target_recall, xc.search_depth, xc.exact_fallback_below)


def event_weights(ec) -> dict[str, float]:
    """Weights by event type; without an event_type column every event is of type 'default'."""
    return dict(ec.weights) if ec.event_type else {"default": ec.weights.get("default", 1.0)}


def refresh(config: Config, quiet: bool = False, client=None) -> dict:
    """Run the nightly refresh; return the report (also written to <run>/report.json).

    Raises a RecsError subclass with a clear message when an input, a service or a check fails; the
    live version then stays live. `client`: an existing Dask client to use instead of starting one.
    """
    try:
        resolve_model_path(config.embed.model)
    except ModelNotFound as exc:
        raise ConfigError(f"{config.source_file}: embed.model: {exc}") from None
    try:
        resolve_precision(config.embed.precision, pick_device(config.embed.device))
    except ValueError as exc:
        raise ConfigError(f"{config.source_file}: embed.precision: {exc}") from None
    workdir = Path(config.workdir)
    with RefreshLock(workdir):
        run_id = new_run_id()
        run_dir = runs_dir(workdir) / run_id
        run_dir.mkdir(parents=True)
        out = Reporter(quiet)
        out.say(f"refresh: run {run_id} -> {run_dir}")
        ctx = nullcontext(client) if client is not None else dask_client(
            config.dask.address, config.dask.n_workers, config.dask.threads_per_worker, device=config.embed.device)
        with ctx as dask, out.bars, survivors_frozen():
            report = _run(config, run_id, run_dir, dask, out)
        write_json(report, run_dir / "report.json")
        (run_dir / "report.md").write_text(_human_report(report))
        return report


@dataclass
class _Run:
    """What every stage of one run shares: its config, id, folder, progress output and timings."""

    config: Config
    run_id: str
    run_dir: Path
    out: Reporter
    seconds: dict = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        release_freed_memory()  # what the stage dropped goes back to the OS, not kept at its peak
        self.seconds[name] = time.perf_counter() - start


def _run(config: Config, run_id: str, run_dir: Path, client, out: Reporter) -> dict:
    """The stages in order. Each writes its artifacts and manifest; any failure stops the run before
    publishing, so the live version stays live."""
    run = _Run(config, run_id, run_dir, out)
    started = time.perf_counter()
    if config.publish.url:  # a server that is down fails the run now, not after an hour of encoding
        open_store(config.publish.url, None, config.publish.api_key_env)
    items, events, users, weights = _ingest(run)
    emb = _embed(run, items, client)
    if "text" not in config.items.metadata:  # encoded and written: not needed again (0.4 GB at 1M items)
        items.rows = items.rows.drop(columns="text")
    settings = blend_settings(config)
    pc = config.publish
    store = open_store(pc.url, Path(config.workdir) / "qdrant", pc.api_key_env) if pc.enabled else None
    gate = _gate(run, store, events, emb, weights, settings)  # first: a bad run stops before the expensive lists
    lists = _lists(run, events, users, emb, weights, settings)
    previous = _publish(run, store, items, emb, lists, gate) if store is not None else None
    if store is None:
        out.say("[publish] skipped: publish.enabled is false (lists and vectors are in the run folder)")
    run.seconds["total"] = time.perf_counter() - started
    return {
        "run_id": run_id, "run_dir": str(run_dir),
        "items_read": items.counts["rows_read"], "items_quarantined": items.counts["quarantined"],
        "items_duplicates_dropped": items.counts["duplicates_dropped"],
        "items_conflicting_duplicates": {"ids": items.counts["conflicting_duplicates"],
                                         "first_ids": items.counts["conflicting_ids"]},
        "items_texts_truncated": {"count": items.counts["texts_truncated"], "max_text_chars": items.counts["max_text_chars"]},
        "items_encoded": emb.counts["items_encoded"], "items_from_cache": emb.counts["items_from_cache"],
        "users": len(lists.user_ids), "users_with_history": int(lists.space.has_history.sum()),
        "events_read": events.counts["rows_read"], "events_quarantined": events.counts["quarantined"],
        "events_duplicates_dropped": events.counts["duplicates_dropped"],
        "quarantine_reasons": {"items": items.counts["quarantine_reasons"], "events": events.counts["quarantine_reasons"]},
        "accounting": {name: accounting(r.counts) for name, r in (("items", items), ("events", events), ("users", users))
                       if r is not None},
        "published_version": run_id if store is not None else None, "previous_version": previous,
        "item_lists_recall": lists.recall, "search_depth": lists.tuning, "gate": gate,
        "cold_items": {"count": int((~lists.space.warm).sum()), "in_user_lists": lists.cold_in_user_lists},
        "encode_texts_per_second": emb.counts["texts_per_second"], "encode_precision": emb.counts["precision"],
        "seconds": {k: round(v, 3) for k, v in run.seconds.items()},
    }


def _ingest(run: _Run):
    """Items, events and (optional) users read, validated and quarantined; the bad-row limits checked."""
    config, run_dir = run.config, run.run_dir
    ic, ec = config.items, config.events
    with run.stage("ingest"):
        items = ingest_items(_source(ic, "items"), item_mapping(ic))
        columns = {"user_id": ec.user_id, "item_id": ec.item_id, "timestamp": ec.timestamp, "event_type": ec.event_type}
        weights = event_weights(ec)
        events = ingest_events(_source(ec, "events"), columns, weights, items.rows["item_id"], ec.timezone)
        users = ingest_user_ids(_source(config.users, "users"), config.users.id) if config.users else None
        quarantine = pd.concat([q.assign(input=name) for name, q in
                                (("items", items.quarantine), ("events", events.quarantine),
                                 ("users", users.quarantine if users else None)) if q is not None and len(q)]
                               or [pd.DataFrame(columns=QUARANTINE_COLUMNS + ["input"])], ignore_index=True)
        write_parquet(pa.Table.from_pandas(quarantine.astype({"row": "int64"}), preserve_index=False), run_dir / "quarantine.parquet")
        write_parquet(pa.Table.from_pandas(items.rows, preserve_index=False), run_dir / "items.parquet")
        write_parquet(pa.Table.from_pandas(events.rows, preserve_index=False), run_dir / "events.parquet")
    write_manifest(run_dir, "ingest", {"inputs": {"items": ic.path, "events": ec.path, "users": config.users.path if config.users else None},
                                       "items": items.counts, "events": events.counts, "users": users.counts if users else None,
                                       "seconds": run.seconds["ingest"], "config": {"items": ic.model_dump(), "events": ec.model_dump()}})
    run.out.say(f"[ingest] items {items.counts['accepted']} accepted, {items.counts['quarantined']} quarantined; "
                f"events {events.counts['accepted']} accepted, {events.counts['quarantined']} quarantined "
                f"({run.seconds['ingest']:.1f}s)")
    for name, result, cfg in (("items", items, ic), ("events", events, ec), ("users", users, config.users)):
        if result is not None:
            check_bad_fraction(name, result.counts, cfg.max_bad_fraction, str(run_dir / "quarantine.parquet"))
    if items.rows.empty:
        raise RecsError(f"no usable items in {ic.path}: all {items.counts['rows_read']} rows quarantined "
                        f"(reasons: {items.counts['quarantine_reasons']}); see {run_dir / 'quarantine.parquet'}")
    return items, events, users, weights


def _embed(run: _Run, items, client):
    """Item vectors: from the cache, the rest encoded on the workers."""
    config = run.config
    n_workers = len(client.scheduler_info()["workers"]) if client is not None else 1
    torch_threads = max(1, (os.cpu_count() or 1) // max(1, n_workers)) if not config.dask.address else (config.dask.threads_per_worker or 1)
    bar = {}

    def encode_progress(done: int, total: int) -> None:
        if "tick" not in bar or done < bar["done"]:  # a new bar when a failed precision check starts over in fp32
            name = "embed: encoding" if "tick" not in bar else "embed: encoding again in fp32 (precision check failed)"
            bar["tick"], bar["done"] = run.out.bar(name, total), 0
        bar["tick"](done - bar["done"])
        bar["done"] = done

    with run.stage("embed"):
        emb = embed_items(items.rows, config.embed.model, config.cache_root, client, config.embed.device,
                          config.embed.batch_size, config.embed.chunk_size, torch_threads, encode_progress,
                          precision=config.embed.precision)
        write_parquet_blocks((pa.table({"item_id": pa.array(emb.item_ids[i:i + BLOCK], pa.string()),
                                        "content_hash": pa.array(emb.content_hashes[i:i + BLOCK], pa.string()),
                                        "vector": vectors_to_arrow(emb.vectors[i:i + BLOCK])})
                              for i in range(0, max(len(emb.item_ids), 1), BLOCK)), run.run_dir / "embeddings.parquet")
        emb.content_hashes = None  # written: not needed again (1M hex strings, about 90 MB)
    write_manifest(run.run_dir, "embed", {"model": config.embed.model, "model_fingerprint": emb.model_fingerprint,
                                          "cache": config.cache_root, **emb.counts, "seconds": run.seconds["embed"],
                                          "config": config.embed.model_dump()})
    run.out.say(f"[embed] {emb.counts['items_encoded']} encoded, {emb.counts['items_from_cache']} from cache "
                f"({run.seconds['embed']:.1f}s)")
    return emb


def _gate(run: _Run, store, events, emb, weights, settings: BlendSettings) -> dict:
    """The quality gate's figures; raises GateFailed when they are not good enough."""
    config = run.config
    gate = {"enabled": config.gate.enabled}
    if not config.gate.enabled:
        return gate
    gc = config.gate
    with run.stage("gate"):
        gate.update(holdout_score(events.rows, emb.item_ids, emb.vectors, weights, settings, gc.holdout, gc.k, gc.max_users))
        live = live_gate(store, config.publish.prefix) if store is not None else None
        gate["live"] = live
        gate["problems"] = gate_problems(gate, live, gc.min_ndcg, gc.min_vs_popularity, gc.max_drop)
    write_manifest(run.run_dir, "gate", {**gate, "seconds": run.seconds["gate"], "config": gc.model_dump()})
    figure = "n/a" if gate["ndcg"] is None else f"{gate['ndcg']:.4f} (popularity {gate['popularity_ndcg']:.4f})"
    run.out.say(f"[gate] nDCG@{gc.k} on the most recent {gc.holdout:.0%}: {figure} "
                f"{'FAILED' if gate['problems'] else 'passed'} ({run.seconds['gate']:.1f}s)")
    check_gate(gate, live, gc.min_ndcg, gc.min_vs_popularity, gc.max_drop)
    return gate


@dataclass
class _Lists:
    """The index stage's output: the blended space and both kinds of lists, rows as in `item_ids`/`user_ids`."""

    space: object
    item_ids: np.ndarray
    user_ids: list[str]
    item_lists: tuple  # (scores, ids, source)
    user_lists: tuple
    recall: dict
    tuning: dict
    cold_in_user_lists: int


def _lists(run: _Run, events, users, emb, weights, settings: BlendSettings) -> _Lists:
    """The blended space, the FAISS index over it, K similar items per item and K items per user."""
    config, xc, k = run.config, run.config.index, run.config.lists.k
    with run.stage("index"):
        item_ids = np.asarray(emb.item_ids, dtype=object)
        user_ids = sorted(set(events.rows["user_id"].unique()) | (set(users.rows["user_id"]) if users is not None else set()))
        space = space_for(events.rows, emb.item_ids, emb.vectors, user_ids, weights, settings)
        events.rows = None  # in the space and in events.parquet now: not held beside the index (10M events)
        release_freed_memory()
        index, tuning = build_tuned(space.item_docs, space.item_queries, k, index_settings(config),
                                    space.users, np.flatnonzero(space.has_history))
        save_index(index, run.run_dir / "index.faiss")
        i_scores, i_ids, i_filled = similar_items(index, space.item_queries, k, space.popularity,
                                                  progress=run.out.bar("index: item->item", len(item_ids)),
                                                  item_vectors=space.item_docs)
        recall = sampled_recall(index, space.item_docs, space.item_queries, i_ids, k)  # item lists vs exact search
        space.item_queries = None  # not needed again: free it before the user lists
        u_scores, u_ids, u_source = recommended_items(
            index, space.users, space.has_history, space.seen, k, space.item_docs, space.popularity,
            progress=run.out.bar("index: user->item", int(space.has_history.sum())),
            new_items=np.flatnonzero(~space.warm), new_slots=settings.new_item_slots)
        u_source = labels(np.where((u_source == "history") & space.few_events, "few-events", u_source))
        i_source = labels(np.where(i_filled, "similar+popular", np.where(space.warm, "similar", "similar-from-text")))
        write_parquet_blocks(chain(lists_tables("item", item_ids, i_scores, i_ids, item_ids, i_source),
                                   lists_tables("user", user_ids, u_scores, u_ids, item_ids, u_source)),
                             run.run_dir / "lists.parquet")
    short_users = int(((u_ids >= 0).sum(axis=1) < min(k, len(item_ids))).sum())
    factory = EXACT if tuning.get("fallback") == "exact" else choose_factory(len(item_ids), xc.kind, xc.exact_below)
    cold_in_lists = int(np.isin(u_ids[u_ids >= 0], np.flatnonzero(~space.warm)).sum())
    write_manifest(run.run_dir, "index", {
        "factory": factory, "items": len(item_ids),
        "users": len(user_ids), "users_with_history": int(space.has_history.sum()), "users_short_of_k": short_users,
        "k": k, "rows": "embeddings.parquet order", "layout": space.layout.to_dict(),
        "cold_items": int((~space.warm).sum()), "item_lists_recall": recall, "search_depth": tuning,
        "cold_items_projected": space.cold_items_projected, "cold_items_in_user_lists": cold_in_lists,
        "seconds": run.seconds["index"],
        "config": {"index": xc.model_dump(), "lists": config.lists.model_dump(), "blend": config.blend.model_dump()}})
    depth = ("exact" if tuning.get("exact") or tuning.get("fallback") == "exact"
             else f"{tuning['knob']}={tuning['value'] if tuning['value'] is not None else 'faiss default'}")
    run.out.say(f"[index] {factory} searched at {depth}, "
                f"item lists' recall@{k} {recall['recall']}; {len(item_ids)} item lists, {len(user_ids)} user lists "
                f"({int((~space.has_history).sum())} by popularity, {int((~space.warm).sum())} items placed by text alone) "
                f"({run.seconds['index']:.1f}s)")
    return _Lists(space, item_ids, user_ids, (i_scores, i_ids, i_source), (u_scores, u_ids, u_source), recall, tuning, cold_in_lists)


def _publish(run: _Run, store, items, emb, lists: _Lists, gate: dict) -> str | None:
    """Stage the new version, switch it live, prune old ones. Returns the previous live run id."""
    config, pc, run_id = run.config, run.config.publish, run.run_id
    space, item_ids, user_ids = lists.space, lists.item_ids, lists.user_ids
    (i_scores, i_ids, i_source), (u_scores, u_ids, u_source) = lists.item_lists, lists.user_lists
    with run.stage("publish"):
        metadata = {c: items.rows[c].tolist() for c in config.items.metadata}
        meta = {"run_id": run_id, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model": config.embed.model, "model_fingerprint": emb.model_fingerprint,
                "dim": int(emb.vectors.shape[1]), "k": config.lists.k, "layout": space.layout.to_dict(),
                "gate": {key: gate.get(key) for key in ("ndcg", "popularity_ndcg", "users", "holdout", "k")}}
        tick = run.out.bar("publish: upserting", len(item_ids) + len(user_ids))
        written = stage_version(store, pc.prefix, run_id,
                                {"ids": item_ids.tolist(), "vectors": {ITEM_VECTOR: emb.vectors, BLEND_VECTOR: space.item_docs,
                                                                       BLEND_QUERY_VECTOR: space.item_raw_queries},
                                 "payloads": item_payloads(item_ids, metadata, i_scores, i_ids, run_id, i_source)},
                                {"ids": user_ids, "vectors": space.users,
                                 "payloads": user_payloads(user_ids, item_ids, u_scores, u_ids, run_id, u_source)},
                                meta, pc.batch_size, tick, pc.parallel, pc.index_wait_s)
        previous = switch_live(store, pc.prefix, run_id)
        pruned = prune_versions(store, pc.prefix, pc.keep_versions)
    seconds = run.seconds["publish"]
    write_manifest(run.run_dir, "publish", {"target": pc.url or str(Path(config.workdir) / "qdrant"), "prefix": pc.prefix,
                                            "points": written, "previous_version": previous, "pruned": pruned,
                                            "points_per_second": round(sum(written.values()) / seconds, 1), "seconds": seconds})
    run.out.say(f"[publish] version {run_id} live (previous: {previous or 'none'}; pruned: {len(pruned)}) ({seconds:.1f}s)")
    return previous


def _human_report(r: dict) -> str:
    lines = [f"# Refresh {r['run_id']}", "",
             f"- items: {r['items_read']} read, {r['items_quarantined']} quarantined, {r['items_duplicates_dropped']} duplicates dropped",
             f"- item ids seen twice with different texts: {r['items_conflicting_duplicates']['ids']}"
             f" (first: {', '.join(r['items_conflicting_duplicates']['first_ids'][:5]) or 'none'})",
             f"- item texts cut to {r['items_texts_truncated']['max_text_chars']} characters: {r['items_texts_truncated']['count']}",
             f"- events: {r['events_read']} read, {r['events_quarantined']} quarantined, {r['events_duplicates_dropped']} duplicates dropped",
             f"- embeddings: {r['items_encoded']} encoded, {r['items_from_cache']} from cache",
             f"- users: {r['users']} ({r['users_with_history']} with history)",
             f"- published version: {r['published_version']} (previous: {r['previous_version'] or 'none'})",
             "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["seconds"].items()]
    return "\n".join(lines) + "\n"
