"""The text shards' graph, built after the switch when the lists would otherwise wait for it.

Text search asks the items' text vectors through an HNSW graph in the text shards
(recommend/serving/text_shards.py). A publish carries those shards from the live version, so a night
builds the graph for its changed items only. A publish that cannot carry them (the first one, or
settings changed) builds it whole: at 1M items on 2 cores about 190 s of one core for each shard of
500k items, most of a publish that otherwise takes about 90 s. Only text search needs the graph, and
when the live version has none (no version is live yet, or its own graph was never built), nothing
answers text search faster meanwhile. So such a publish writes its text shards without the graph
(text search scans them exactly), switches the version live, and then `build_text_graph` builds it:

1. each text shard copied to `texts-NNN.graph/` beside it, opened with the graph's settings and
   optimised (the engine builds the int8 copies and the graph over them: `graph_text_shard`, a task
   on a worker, in a child process as it holds the GIL for minutes: recommend/serving/shard_process.py);
2. version.json replaced whole (`EmbeddedVersions.graphed`), naming those folders for the text
   shards, with their files and digests, and the graph's settings;
3. the plain text shards removed (a reader that opened them keeps its own links to their files).

A reader following the live version opens it again when its version.json changes
(recommend/serving/live.py). A crash before step 2 leaves the version as it went live: sound and
searched exactly; the next publish writes plain text shards again (carried from these where it can)
and builds the graph after its own switch. When the live version has a graph, a publish that cannot
carry builds its graph before the switch, as before: a switch never makes text search slower.

Example (what the refresh's graph stage runs after a first publish):
    built = build_text_graph(store, run_id, dask=client)   # {} when the version needed none
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from embedder.artifacts import file_digest
from recommend.serving.shard_process import APART_FROM, run_shard_tasks
from recommend.serving.shards import Graph, ShardError, VectorSpec, engine_config, shard_files
from recommend.serving.text_shards import TEXT, keys_path

SUFFIX = ".graph"  # a text shard's folder once its graph is built: texts-000.graph


def pending(marker: dict) -> dict | None:
    """The text settings a version's graph is still to be built with (text_shards.text_settings),
    None when it has its graph or needs none."""
    return (marker.get("texts") or {}).get("pending")


def has_graph(marker: dict | None) -> bool:
    """Whether a version's text shards answer text search through a graph."""
    settings = ((marker or {}).get("texts") or {}).get("settings") or {}
    return bool(settings.get("graph", [0])[0])


def shard_folder(marker: dict, name: str) -> str:
    """The folder of a version's shard `name` (in its version folder): its own name, or where its
    graph was built after the switch."""
    return (marker["shards"].get(name) or {}).get("folder", name)


def graph_text_shard(source: str, folder: str, spec: VectorSpec, graph: Graph) -> dict:
    """Text shard `source` (closed, without a graph) copied to `folder` and given its graph; its keys
    file copied beside it. Returns the shard's info as write_shard's (points, files, seconds, ran, keys)."""
    from qdrant_edge import EdgeShard

    began, clock = time.time(), time.perf_counter()
    source_path, folder_path = Path(source), Path(folder)
    if folder_path.exists():
        shutil.rmtree(folder_path)  # a leftover of an attempt that died
    shutil.copytree(source_path, folder_path)
    copied = time.perf_counter() - clock
    shard = EdgeShard.load(str(folder_path), engine_config({TEXT: spec}, graph))  # the new settings, written to disk
    try:
        shard.optimize()
        shard.flush()
        found = shard.info().points_count
    finally:
        shard.close()
    built = time.perf_counter() - clock - copied
    keys = keys_path(folder_path)
    shutil.copyfile(keys_path(source_path), keys)
    return {"points": found, "files": shard_files(folder_path), "keys": [keys.stat().st_size, file_digest(keys)],
            "seconds": {"copy": round(copied, 3), "optimize": round(built, 3)},
            "ran": [round(began, 3), round(time.time(), 3)], "carried": None}


def build_text_graph(store, run_id: str, *, dask=None, progress: Callable[[int], None] | None = None) -> dict:
    """Build the graph of version `run_id`'s text shards when it is pending (the module's doc): one
    task per shard on `dask`'s workers (None: in this process). Returns {shard name: its new info},
    {} when there was nothing to build."""
    written = store.written(run_id)
    settings = pending(written[1]) if written else None
    if not settings:
        return {}
    folder, marker = written
    spec, graph = VectorSpec(int(settings["size"]), indexed=True), Graph(*settings["graph"])
    names = sorted(n for n in marker["shards"] if n.startswith("texts-"))
    calls = {n: (str(folder / shard_folder(marker, n)), str(folder / f"{n}{SUFFIX}"), spec, graph)
             for n in names}
    # apart: the engine holds the GIL through the build (shard_process.py)
    done = run_shard_tasks(graph_text_shard, calls, names, dask=dask, progress=progress, key="graph",
                           apart=lambda name: marker["shards"][name]["points"] >= APART_FROM)
    for name, info in done.items():
        if info["points"] != marker["shards"][name]["points"]:
            raise ShardError(f"{calls[name][1]}: {info['points']} points after its graph, "
                             f"{marker['shards'][name]['points']} written")
    store.graphed(run_id, {n: {**info, "folder": f"{n}{SUFFIX}"} for n, info in done.items()}, settings)
    for name in names:  # the plain shards, no longer named by version.json
        plain = folder / shard_folder(marker, name)
        shutil.rmtree(plain, ignore_errors=True)
        keys_path(plain).unlink(missing_ok=True)
    return done
