"""`recs refresh`: ingest -> embed -> index & lists -> publish, each stage leaving a manifest.

Example:
    from recommend.config import load_config
    from recommend.pipeline import refresh
    report = refresh(load_config("config.yaml"))
    report["published_version"], report["items_encoded"]
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from embedder.artifacts import vectors_to_arrow, write_json, write_parquet
from embedder.encode import embed_items
from embedder.errors import RecsError
from embedder.ingest import (QUARANTINE_COLUMNS, ExtraText, ItemMapping, SourceSpec, accounting, check_bad_fraction,
                             ingest_events, ingest_items, ingest_user_ids)
from embedder.model import ModelNotFound, pick_device, resolve_model_path
from embedder.precision import resolve_precision
from index.build import build_index, choose_factory, save_index
from index.search import sampled_recall
from recommend.config import Config, ConfigError
from recommend.lists import lists_frame, recommended_items, similar_items
from recommend.evaluate import BlendSettings, holdout_score, space_for
from recommend.gate import check_gate, gate_problems
from recommend.publish import (BLEND_QUERY_VECTOR, BLEND_VECTOR, ITEM_VECTOR, item_payloads, live_gate, prune_versions,
                               stage_version, switch_live, user_payloads)
from recommend.runs import RefreshLock, new_run_id, runs_dir, write_manifest
from recommend.store import open_store

log = logging.getLogger("recs")


class DaskUnavailable(RecsError):
    pass


def cuda_devices() -> int:
    """GPUs torch can see (0 without torch's CUDA build)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver install means no GPU, not a failed run
        return 0


def worker_layout(device: str, n_workers: int | None, threads_per_worker: int, gpus: int | None = None) -> dict:
    """How many local workers, and of which kind: one per GPU when encoding on GPUs (dask-cuda pins
    each to its own GPU; without dask-cuda one worker uses the first GPU), else one single-threaded
    worker per core. `dask.n_workers` overrides the count."""
    gpus = cuda_devices() if gpus is None and device != "cpu" else (gpus or 0)
    if device != "cpu" and gpus > 0:
        try:
            import dask_cuda  # noqa: F401
            kind = "cuda"
        except ImportError:
            kind, gpus = "single-gpu", 1
        return {"kind": kind, "n_workers": n_workers or gpus, "threads_per_worker": 1}
    return {"kind": "cpu", "n_workers": n_workers or max(1, (os.cpu_count() or 1) // threads_per_worker),
            "threads_per_worker": threads_per_worker}


@contextmanager
def dask_client(address: str | None, n_workers: int | None, threads_per_worker: int, keep_malloc_trim: bool = False,
                device: str = "cpu"):
    """A distributed Client: to `address` when given, else to a local cluster laid out by `worker_layout`."""
    from distributed import Client, LocalCluster

    if address:
        try:
            client = Client(address, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise DaskUnavailable(f"dask.address {address}: scheduler unreachable ({exc})") from None
        with client:
            yield client
        return
    layout = worker_layout(device, n_workers, threads_per_worker)
    # dashboard on a free port: a second cluster on the host (another refresh, a test run) never collides
    options = {"n_workers": layout["n_workers"], "threads_per_worker": layout["threads_per_worker"],
               "dashboard_address": ":0", "silence_logs": logging.ERROR}
    if layout["kind"] == "cuda":
        from dask_cuda import LocalCUDACluster as Cluster  # one process per GPU, each seeing only its own
    else:
        Cluster, options["processes"] = LocalCluster, True
    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ(keep_malloc_trim)}), \
            Cluster(**options) as cluster, Client(cluster) as client:
        yield client


def worker_environ(keep_malloc_trim: bool = False) -> dict:
    """The environment the nanny sets before it starts a worker: Dask's, less MALLOC_TRIM_THRESHOLD_=65536.
    That setting makes glibc hand memory back after every free; with it our encode ran at 0.81x raw
    `model.encode`, without it at 1.02x (STACK-NOTES; tests/benchmarks/bench_encode.py measures it again)."""
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    if not keep_malloc_trim:
        env.pop("MALLOC_TRIM_THRESHOLD_", None)
    return env


class Reporter:
    """Stage lines and progress bars on stderr, so stdout stays clean for --json."""

    def __init__(self, quiet: bool = False):
        self.console = Console(stderr=True, quiet=quiet, soft_wrap=True)  # whole lines in log files
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             console=self.console, transient=False, disable=quiet)

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def bar(self, description: str, total: int):
        """A progress callback `advance(n)`. Off a terminal (cron, CI logs) a live bar draws nothing
        until the end, so a plain line is printed at every 10% instead."""
        task = self.bars.add_task(description, total=total)
        state = {"done": 0, "shown": 0}
        live = self.console.is_terminal

        def advance(n: int = 1) -> None:
            self.bars.advance(task, n)
            state["done"] += n
            step = int(10 * state["done"] / max(total, 1))
            if not live and step > state["shown"]:
                state["shown"] = step
                self.say(f"  {description}: {state['done']}/{total}")

        return advance


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
                         b.new_item_slots, config.lists.half_life_days)


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
        with ctx as dask, out.bars:
            report = _run(config, run_id, run_dir, dask, out)
        write_json(report, run_dir / "report.json")
        (run_dir / "report.md").write_text(_human_report(report))
        return report


def _run(config: Config, run_id: str, run_dir: Path, client, out: Reporter) -> dict:
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if config.publish.url:  # a server that is down fails the run now, not after an hour of encoding
        open_store(config.publish.url, None, config.publish.api_key_env)

    # ---- ingest ---------------------------------------------------------------------------------
    t = time.perf_counter()
    ic, ec = config.items, config.events
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
    seconds["ingest"] = time.perf_counter() - t
    write_manifest(run_dir, "ingest", {"inputs": {"items": ic.path, "events": ec.path, "users": config.users.path if config.users else None},
                                       "items": items.counts, "events": events.counts, "users": users.counts if users else None,
                                       "seconds": seconds["ingest"], "config": {"items": ic.model_dump(), "events": ec.model_dump()}})
    out.say(f"[ingest] items {items.counts['accepted']} accepted, {items.counts['quarantined']} quarantined; "
            f"events {events.counts['accepted']} accepted, {events.counts['quarantined']} quarantined "
            f"({seconds['ingest']:.1f}s)")
    for name, result, cfg in (("items", items, ic), ("events", events, ec), ("users", users, config.users)):
        if result is not None:
            check_bad_fraction(name, result.counts, cfg.max_bad_fraction, str(run_dir / "quarantine.parquet"))
    if items.rows.empty:
        raise RecsError(f"no usable items in {ic.path}: all {items.counts['rows_read']} rows quarantined "
                        f"(reasons: {items.counts['quarantine_reasons']}); see {run_dir / 'quarantine.parquet'}")

    # ---- embed ----------------------------------------------------------------------------------
    t = time.perf_counter()
    n_workers = len(client.scheduler_info()["workers"]) if client is not None else 1
    torch_threads = max(1, (os.cpu_count() or 1) // max(1, n_workers)) if not config.dask.address else config.dask.threads_per_worker
    bar = {}

    def encode_progress(done: int, total: int) -> None:
        if "tick" not in bar:
            bar["tick"], bar["done"] = out.bar("embed: encoding", total), 0
        bar["tick"](done - bar["done"])
        bar["done"] = done

    emb = embed_items(items.rows, config.embed.model, config.cache_root, client, config.embed.device,
                      config.embed.batch_size, config.embed.chunk_size, torch_threads, encode_progress,
                      precision=config.embed.precision)
    write_parquet(pa.table({"item_id": pa.array(emb.item_ids, pa.string()),
                            "content_hash": pa.array(emb.content_hashes, pa.string()),
                            "vector": vectors_to_arrow(emb.vectors)}), run_dir / "embeddings.parquet")
    seconds["embed"] = time.perf_counter() - t
    write_manifest(run_dir, "embed", {"model": config.embed.model, "model_fingerprint": emb.model_fingerprint,
                                      "cache": config.cache_root, **emb.counts, "seconds": seconds["embed"],
                                      "config": config.embed.model_dump()})
    out.say(f"[embed] {emb.counts['items_encoded']} encoded, {emb.counts['items_from_cache']} from cache "
            f"({seconds['embed']:.1f}s)")

    # ---- quality gate: first, so that a bad run stops before the expensive lists ---------------
    settings = blend_settings(config)
    pc = config.publish
    store = open_store(pc.url, Path(config.workdir) / "qdrant", pc.api_key_env) if pc.enabled else None
    gate = {"enabled": config.gate.enabled}
    if config.gate.enabled:
        t = time.perf_counter()
        gc = config.gate
        gate.update(holdout_score(events.rows, emb.item_ids, emb.vectors, weights, settings, gc.holdout, gc.k, gc.max_users,
                                  index_kind=config.index.kind, exact_below=config.index.exact_below))
        live = live_gate(store, pc.prefix) if store is not None else None
        gate["live"] = live
        gate["problems"] = gate_problems(gate, live, gc.min_ndcg, gc.min_vs_popularity, gc.max_drop)
        seconds["gate"] = time.perf_counter() - t
        write_manifest(run_dir, "gate", {**gate, "seconds": seconds["gate"], "config": gc.model_dump()})
        figure = "n/a" if gate["ndcg"] is None else f"{gate['ndcg']:.4f} (popularity {gate['popularity_ndcg']:.4f})"
        out.say(f"[gate] nDCG@{gc.k} on the most recent {gc.holdout:.0%}: {figure} "
                f"{'FAILED' if gate['problems'] else 'passed'} ({seconds['gate']:.1f}s)")
        check_gate(gate, live, gc.min_ndcg, gc.min_vs_popularity, gc.max_drop)

    # ---- index & lists --------------------------------------------------------------------------
    t = time.perf_counter()
    item_ids = np.asarray(emb.item_ids, dtype=object)
    user_ids = sorted(set(events.rows["user_id"]) | (set(users.rows["user_id"]) if users is not None else set()))
    space = space_for(events.rows, emb.item_ids, emb.vectors, user_ids, weights, settings)
    has_history = space.has_history
    xc = config.index
    index = build_index(space.item_docs, xc.kind, xc.exact_below, hnsw_ef_search=xc.hnsw_ef_search)
    save_index(index, run_dir / "index.faiss")
    k = config.lists.k
    i_scores, i_ids, i_filled = similar_items(index, space.item_queries, k, space.popularity,
                                              progress=out.bar("index: item->item", len(item_ids)),
                                              item_vectors=space.item_docs)
    recall = sampled_recall(index, space.item_docs, space.item_queries, i_ids, k)  # item lists vs exact search
    space.item_queries = None  # not needed again: free it before the user lists
    u_scores, u_ids, u_source = recommended_items(index, space.users, has_history, space.seen, k, space.item_docs,
                                                  space.popularity, progress=out.bar("index: user->item", int(has_history.sum())),
                                                  new_items=np.flatnonzero(~space.warm), new_slots=settings.new_item_slots)
    u_source = np.where((u_source == "history") & space.few_events, "few-events", u_source)
    i_source = np.where(i_filled, "similar+popular", np.where(space.warm, "similar", "similar-from-text"))
    lists = pd.concat([lists_frame("item", item_ids, i_scores, i_ids, item_ids, i_source),
                       lists_frame("user", user_ids, u_scores, u_ids, item_ids, u_source)], ignore_index=True)
    write_parquet(pa.Table.from_pandas(lists, preserve_index=False), run_dir / "lists.parquet")
    seconds["index"] = time.perf_counter() - t
    short_users = int(((u_ids >= 0).sum(axis=1) < min(k, len(item_ids))).sum())
    cold_in_lists = int(np.isin(u_ids[u_ids >= 0], np.flatnonzero(~space.warm)).sum())
    write_manifest(run_dir, "index", {"factory": choose_factory(len(item_ids), xc.kind, xc.exact_below), "items": len(item_ids),
                                      "users": len(user_ids), "users_with_history": int(has_history.sum()),
                                      "users_short_of_k": short_users, "k": k, "rows": "embeddings.parquet order",
                                      "layout": space.layout.to_dict(), "cold_items": int((~space.warm).sum()),
                                      "item_lists_recall": recall,
                                      "cold_items_projected": space.cold_items_projected,
                                      "cold_items_in_user_lists": cold_in_lists,
                                      "seconds": seconds["index"], "config": {"index": xc.model_dump(), "lists": config.lists.model_dump(),
                                                                              "blend": config.blend.model_dump()}})
    out.say(f"[index] {len(item_ids)} item lists, {len(user_ids)} user lists ({int((~has_history).sum())} by popularity, "
            f"{int((~space.warm).sum())} items placed by text alone) ({seconds['index']:.1f}s)")

    # ---- publish --------------------------------------------------------------------------------
    previous = None
    if store is not None:
        t = time.perf_counter()
        metadata = {c: items.rows[c].tolist() for c in config.items.metadata}
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta = {"run_id": run_id, "created_at": created, "model": config.embed.model, "model_fingerprint": emb.model_fingerprint,
                "dim": int(emb.vectors.shape[1]), "k": k, "layout": space.layout.to_dict(),
                "gate": {key: gate.get(key) for key in ("ndcg", "popularity_ndcg", "users", "holdout", "k")}}
        tick = out.bar("publish: upserting", len(item_ids) + len(user_ids))
        written = stage_version(store, pc.prefix, run_id,
                                {"ids": item_ids.tolist(), "vectors": {ITEM_VECTOR: emb.vectors, BLEND_VECTOR: space.item_docs,
                                                                       BLEND_QUERY_VECTOR: space.item_raw_queries},
                                 "payloads": item_payloads(item_ids, metadata, i_scores, i_ids, run_id, i_source)},
                                {"ids": user_ids, "vectors": space.users,
                                 "payloads": user_payloads(user_ids, item_ids, u_scores, u_ids, run_id, u_source)},
                                meta, pc.batch_size, tick, pc.parallel, pc.index_wait_s)
        previous = switch_live(store, pc.prefix, run_id)
        pruned = prune_versions(store, pc.prefix, pc.keep_versions)
        seconds["publish"] = time.perf_counter() - t
        write_manifest(run_dir, "publish", {"target": pc.url or str(Path(config.workdir) / "qdrant"), "prefix": pc.prefix,
                                            "points": written, "previous_version": previous, "pruned": pruned,
                                            "points_per_second": round(sum(written.values()) / seconds["publish"], 1),
                                            "seconds": seconds["publish"]})
        out.say(f"[publish] version {run_id} live (previous: {previous or 'none'}; pruned: {len(pruned)}) "
                f"({seconds['publish']:.1f}s)")
    else:
        out.say("[publish] skipped: publish.enabled is false (lists and vectors are in the run folder)")
    seconds["total"] = time.perf_counter() - started
    return {
        "run_id": run_id, "run_dir": str(run_dir),
        "items_read": items.counts["rows_read"], "items_quarantined": items.counts["quarantined"],
        "items_duplicates_dropped": items.counts["duplicates_dropped"],
        "items_conflicting_duplicates": {"ids": items.counts["conflicting_duplicates"],
                                         "first_ids": items.counts["conflicting_ids"]},
        "items_texts_truncated": {"count": items.counts["texts_truncated"], "max_text_chars": items.counts["max_text_chars"]},
        "items_encoded": emb.counts["items_encoded"], "items_from_cache": emb.counts["items_from_cache"],
        "users": len(user_ids), "users_with_history": int(has_history.sum()),
        "events_read": events.counts["rows_read"], "events_quarantined": events.counts["quarantined"],
        "events_duplicates_dropped": events.counts["duplicates_dropped"],
        "quarantine_reasons": {"items": items.counts["quarantine_reasons"], "events": events.counts["quarantine_reasons"]},
        "accounting": {name: accounting(r.counts) for name, r in (("items", items), ("events", events), ("users", users))
                       if r is not None},
        "published_version": run_id if store is not None else None, "previous_version": previous,
        "item_lists_recall": recall, "gate": gate, "cold_items": {"count": int((~space.warm).sum()), "in_user_lists": cold_in_lists},
        "encode_texts_per_second": emb.counts["texts_per_second"], "encode_precision": emb.counts["precision"],
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


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
