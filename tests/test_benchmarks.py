"""The benchmarks still run (issue 28): `tests/benchmarks/run.py --smoke` runs every one at its tiniest
size, each in a fresh process, and each prints its figures as JSON lines; run.py stops at the first
benchmark that fails, naming it. Speed is not asserted here: the figures at these sizes mean nothing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parent / "benchmarks" / "run.py"

# per benchmark (run.py's name): the figures it promises, {line's "benchmark": [key figures]}, each
# figure a number > 0 in every such line (a dotted name looks inside a nested object)
PROMISED = {
    "encode": {"encode_fp32_pipeline_vs_raw": ["raw_texts_per_s", "pipeline_texts_per_s", "workers"]},
    "incremental": {"incremental_vs_cold": ["ratio_total", "ratio_embed", "cold_s", "incremental_s", "encoded_cold"]},
    "index": {"index_approx_vs_exact": ["speed_ratio", "recall_at_20"]},
    "publish": {"publish_points_per_s": ["speedup", "embedded_points_per_s", "baseline_points_per_s"]},
    "text_shards": {"text_shard_night": ["items", "night", "whole_s", "whole_recall_at_10"]},
    "serve": {"serve": ["requests"], "serve_memory": ["steady_peak_rss_mb"]},
    "filters": {"filters_keep": ["ms_per_request", "speedup_vs_k_deep", "asked"]},
    "lists": {"lists_ours": ["total_s", "users_listed"], "lists_workers": ["total_s", "users_listed"],
              "lists_ratio": ["ours_total_over_workers"], "lists_exact": ["all_lists_s", "users_searched", "items_searched"],
              "lists_index_stage": ["index_stage_s", "exact_search_s", "index_stage_over_exact"]},
    "list_blocks": {"list_blocks": ["one_worker_over_two", "workers_1_s", "workers_2_s", "blocks"]},
    "scale": {"scale_out_of_core": ["seconds.total", "driver_peak_rss_mb", "items_encoded", "events_read"]},
}
SERVE_ROUTES = {"/users hot", "/users cold", "/users filtered", "/users filtered strict", "/items/<id>/similar", "/search",
                "/users/batch", "/users/batch beside /users", "/users hot while adding items", "/users hot across a refresh"}


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN), *args], capture_output=True, text=True, timeout=timeout)


def _figure(line: dict, name: str):
    for part in name.split("."):
        line = line.get(part) if isinstance(line, dict) else None
    return line


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_every_benchmark_runs_at_smoke_size_and_prints_its_figures():
    done = _run("--smoke", timeout=540)
    log = f"stderr (last 4000 characters):\n{done.stderr[-4000:]}"
    assert done.returncode == 0, log
    lines = [json.loads(text) for text in done.stdout.splitlines() if text.startswith("{")]
    by_name: dict[str, list[dict]] = {}
    for line in lines:
        by_name.setdefault(line["benchmark"], []).append(line)
    for benchmark, promised in PROMISED.items():
        for name, figures in promised.items():
            assert by_name.get(name), f"bench_{benchmark}.py printed no {name!r} line; {log}"
            for line in by_name[name]:
                for figure in figures:
                    assert _positive(_figure(line, figure)), f"bench_{benchmark}.py: {name}.{figure} = {_figure(line, figure)!r}"
    # the pieces each benchmark goes through, not only its first figure
    assert {line["kind"] for line in by_name["index_approx_vs_exact"]} == {"auto", "IVF1024,SQfp16", "HNSW32"}
    assert isinstance(by_name["encode_fp32_pipeline_vs_raw"][0]["ratio"], (int, float))
    assert {line["route"] for line in by_name["serve"]} == SERVE_ROUTES
    filtered = [line for line in by_name["serve"] if line["route"].startswith(("/users filtered", "/users/batch"))]
    assert all(line["failed"] == 0 and line["requests"] > 0 for line in filtered), filtered  # filters and batches answered
    assert all(line["lookups"]["failed"] == 0 and line["lookups"]["requests"] > 0 for line in filtered if "lookups" in line)
    adding = next(line for line in by_name["serve"] if line["route"] == "/users hot while adding items")
    assert adding["add_exit_code"] == 0 and adding["items_added"] == 20 and adding["searchable_after_s"], adding
    assert adding["failed"] == 0, adding
    across = next(line for line in by_name["serve"] if line["route"] == "/users hot across a refresh")
    assert across["refresh_exit_code"] == 0 and len(across["versions"]) >= 2, across  # the new version was served
    assert all(line["error"] is None for line in by_name["scale_out_of_core"])
    assert by_name["incremental_vs_cold"][0]["encoded_incremental"] < by_name["incremental_vs_cold"][0]["encoded_cold"]


def test_run_stops_at_the_first_failing_benchmark_and_names_it():
    # a real failure: bench_index.py refuses an option it does not have (argparse: exit code 2)
    done = _run("--smoke", "index", "publish", "--", "--no-such-option", timeout=120)
    assert done.returncode != 0
    assert "bench_index.py failed (exit code 2)" in done.stderr and "not run after it: publish" in done.stderr, done.stderr
    assert "--no-such-option" in done.stderr  # the benchmark's own error is shown above run.py's
    assert "publish_points_per_s" not in done.stdout

    unknown = _run("--smoke", "index", "nosuch", timeout=60)
    assert unknown.returncode != 0 and "unknown benchmark(s) nosuch" in unknown.stderr, unknown.stderr
