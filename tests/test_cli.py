"""The command line: exit codes and messages for bad input, --json output, help with examples."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from conftest import write_config
from recommend.cli import app

runner = CliRunner()


def test_every_command_has_help_with_an_example():
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example:" in result.output and "recs " in result.output.split("Example:")[1], name


def test_version_and_short_help():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"nightly-recs {version('nightly-recs')}"
    for args in (["-h"], ["refresh", "-h"], ["schema", "-h"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage:" in result.output, args


def test_verbose_and_quiet_set_the_recs_logger():
    import logging

    from recommend.run.infra.progress import STDERR_HANDLER, configure_logging

    for verbose, quiet, level in ((0, False, logging.WARNING), (1, False, logging.INFO), (2, False, logging.DEBUG),
                                  (1, True, logging.ERROR)):
        configure_logging(verbose, quiet)
        assert logging.getLogger("recs").level == level
    # configured again, not stacked (pytest's capture handlers may sit beside it, left by an earlier test)
    assert [h.name for h in logging.getLogger("recs").handlers].count(STDERR_HANDLER) == 1
    configure_logging()


def test_unknown_config_key_exits_2_naming_key(tmp_path, sample_dir, tiny_model):
    path = write_config(tmp_path, sample_dir, tiny_model, lists={"k": 5, "top_n": 3})
    result = runner.invoke(app, ["refresh", "--config", str(path)])
    assert result.exit_code == 2
    assert "unknown key 'lists.top_n' (allowed here: k, half_life_days, block_size, keep)" in result.output
    assert "Traceback" not in result.output
    # with --json a scheduler gets the failure as the last line of stdout too
    result = runner.invoke(app, ["refresh", "--config", str(path), "--json"])
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.exit_code == 2 and failed["status"] == "failed" and failed["failed_stage"] == "config"
    assert failed["exit_code"] == 2 and "unknown key 'lists.top_n'" in failed["error"] and failed["run_id"] is None


def test_wrong_type_and_missing_input_exit_2(tmp_path, sample_dir, tiny_model):
    path = write_config(tmp_path, sample_dir, tiny_model, lists={"k": "ten"})
    result = runner.invoke(app, ["refresh", "-c", str(path)])
    assert result.exit_code == 2 and "lists.k: Input should be a valid integer" in result.output
    path = write_config(tmp_path, sample_dir, tiny_model, lists={"k": 10, "keep": 5})
    result = runner.invoke(app, ["refresh", "-c", str(path)])
    assert result.exit_code == 2 and "keep (5) is fewer than k (10)" in result.output, result.output
    path = write_config(tmp_path, sample_dir, tiny_model, events={"path": str(tmp_path / "missing.parquet")})
    result = runner.invoke(app, ["refresh", "-c", str(path)])
    assert result.exit_code == 2 and f"events.path: no file matches '{tmp_path / 'missing.parquet'}'" in result.output


def test_missing_column_exits_2_naming_column_and_key(tmp_path, sample_dir, tiny_model):
    path = write_config(tmp_path, sample_dir, tiny_model, events={"path": str(sample_dir / "events.parquet"),
                                                                   "timestamp": "when"})
    result = runner.invoke(app, ["refresh", "-c", str(path), "--json"])
    assert result.exit_code == 2
    assert "events.timestamp: column 'when' not found" in result.output
    assert "columns found: user_id, item_id, timestamp, event_type" in result.output
    # the run started: its report.json says where it failed, and --json printed the same report last
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert failed["status"] == "failed" and failed["failed_stage"] == "ingest" and failed["exit_code"] == 2
    assert "column 'when' not found" in failed["error"] and failed["published_version"] is None
    assert json.loads((Path(failed["run_dir"]) / "report.json").read_text()) == failed
    assert "failed in stage **ingest**" in (Path(failed["run_dir"]) / "report.md").read_text()


def test_unknown_model_exits_2(tmp_path, sample_dir):
    path = write_config(tmp_path, sample_dir, tmp_path / "no-such-model")
    result = runner.invoke(app, ["refresh", "-c", str(path)])
    assert result.exit_code == 2 and "embed.model" in result.output and "never downloaded" in result.output


def test_refresh_json_then_queries(tmp_path, sample_dir, tiny_model):
    """The real entry point in a fresh process: it starts its own LocalCluster."""
    path = write_config(tmp_path, sample_dir, tiny_model, items={"metadata": ["title", "category", "price"]},
                        publish={"indexed_fields": ["category", "price"]})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "recommend.cli", "refresh", "-c", str(path), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["status"] == "ok" and report["items"]["rows_read"] == 240 and report["published_version"]
    assert "[publish]" in proc.stderr  # progress goes to stderr, stdout stays parseable

    events = pd.read_parquet(sample_dir / "events.parquet")
    user = events["user_id"].iloc[0]
    result = runner.invoke(app, ["recommend", user, "-c", str(path), "--json"])
    answer = json.loads(result.output)
    assert result.exit_code == 0 and answer["version"] == report["published_version"] and len(answer["items"]) == 5
    assert not set(events.loc[events.user_id == user, "item_id"]) & {r["item_id"] for r in answer["items"]}
    # a filter on the published version (its blended vectors): what passes of the list, then a vector query
    items = pd.read_parquet(sample_dir / "items.parquet").set_index("item_id")
    category = items.loc[answer["items"][0]["item_id"], "category"]
    result = runner.invoke(app, ["recommend", user, "-c", str(path), "--json", "--where", f"category={category}",
                                 "--where", "price<60", "--exclude", answer["items"][0]["item_id"]])
    filtered = json.loads(result.output)
    got = [r["item_id"] for r in filtered["items"]]
    seen = set(events.loc[events.user_id == user, "item_id"]) | {answer["items"][0]["item_id"]}
    there = items[(items.category == category) & (items.price < 60) & ~items.index.isin(seen)]
    assert result.exit_code == 0 and len(got) == min(5, len(there)) > 0 and filtered["source"].endswith("query"), filtered
    assert all(items.loc[i, "category"] == category and items.loc[i, "price"] < 60 for i in got)
    assert answer["items"][0]["item_id"] not in got and not set(events.loc[events.user_id == user, "item_id"]) & set(got)
    similar = json.loads(runner.invoke(app, ["similar", got[0], "-c", str(path), "--json", "--where", "price>=60"]).output)
    assert len(similar["items"]) == 5 and all(r["metadata"]["price"] >= 60 and r["item_id"] != got[0] for r in similar["items"])
    result = runner.invoke(app, ["recommend", user, "-c", str(path), "--where", "title=x"])
    assert result.exit_code == 2 and "'title'" in result.output and "indexed: category, price" in result.output
    _add_items_then_find_them(tmp_path, path, items, report["published_version"])
    result = runner.invoke(app, ["recommend", "no-such-user", "-c", str(path)])
    assert result.exit_code == 1 and "unknown user 'no-such-user'" in result.output
    result = runner.invoke(app, ["similar", "no-such-item", "-c", str(path)])
    assert result.exit_code == 1 and "unknown item 'no-such-item'" in result.output
    result = runner.invoke(app, ["versions", "-c", str(path), "--json"])
    assert json.loads(result.output)[0]["live"] is True
    result = runner.invoke(app, ["rollback", "-c", str(path)])
    assert result.exit_code == 1 and "no version older" in result.output

    # offline evaluation of that run: metrics beside baselines, a sweep, plots beside the report
    result = runner.invoke(app, ["eval", "-c", str(path), "--json", "--k", "5,10", "--sweep", "0,1"])
    assert result.exit_code == 0, result.output
    both = json.loads(result.output)  # random and temporal by default
    assert set(both) == {"random", "temporal"} and both["temporal"]["split"] == "temporal"
    scored = both["random"]
    assert {"item-knn", "popularity", "random"} <= set(scored["baselines"])
    assert scored["run_id"] == report["run_id"] and scored["split"] == "random" and scored["seed"] == 42
    lists, pop, rnd = (s["at"]["10"]["ndcg"] for s in (scored["lists"], scored["baselines"]["popularity"],
                                                        scored["baselines"]["random"]))
    assert lists > pop > rnd
    assert scored["sweep"]["behaviour_weight"] == [0.0, 1.0] and len(scored["sweep"]["value"]) == 2
    assert all(Path(p).is_file() for p in scored["written"]) and any(p.endswith("weight-sweep.png") for p in scored["written"])
    result = runner.invoke(app, ["eval", "-c", str(path), "--split", "sideways"])
    assert result.exit_code == 2 and "--split must be random, temporal or both" in result.output


def _add_items_then_find_them(tmp_path, path, items, version):
    """`recs add-items` and POST /items on the refresh's version: found by text search and filters at
    once; a changed item once, with its new metadata; bad rows named, never added."""
    changed = items.index[3]
    rows = pd.DataFrame({"item_id": ["NEW-1", changed, "BAD-1", None],
                         "title": ["Glacier kayak paddle", "Renamed thing", "x", "y"],
                         "description": ["Carbon shaft.", "Now blue.", "z", "w"], "category": ["Kayaks"] * 4,
                         "price": ["55.5", "12", "cheap", "1"]})
    rows.to_csv(tmp_path / "new_items.csv", index=False)
    result = runner.invoke(app, ["add-items", str(tmp_path / "new_items.csv"), "-c", str(path), "--json"])
    added = json.loads(result.output)
    assert result.exit_code == 0 and (added["added"], added["new"], added["replaced"], added["quarantined"]) == (2, 1, 1, 2)
    assert added["version"] == version and added["encoded"] == 2
    assert any("BAD-1: price: 'cheap' is not a number" in p for p in added["problems"])
    assert any("row 4: missing_id" in p for p in added["problems"]), added["problems"]
    text = "Glacier kayak paddle. Carbon shaft. Category: Kayaks."  # the template, rendered
    found = json.loads(runner.invoke(app, ["search", text, "-c", str(path), "--json", "--where", "price<60"]).output)
    assert found["items"][0]["item_id"] == "NEW-1" and found["items"][0]["metadata"]["price"] == 55.5
    kayaks = json.loads(runner.invoke(app, ["search", "anything", "-c", str(path), "--json", "--k", "50",
                                            "--where", "category=Kayaks"]).output)
    assert sorted(r["item_id"] for r in kayaks["items"]) == sorted(["NEW-1", changed])
    similar = json.loads(runner.invoke(app, ["similar", "NEW-1", "-c", str(path), "--json"]).output)
    assert similar["source"] == "query" and len(similar["items"]) == 5 and "NEW-1" not in [r["item_id"] for r in similar["items"]]
    assert json.loads(runner.invoke(app, ["versions", "-c", str(path), "--json"]).output)[0]["added_items"] == 2
    result = runner.invoke(app, ["add-items", str(tmp_path / "nothing.csv"), "-c", str(path)])
    assert result.exit_code == 2 and "nothing.csv" in result.output

    # POST /items: the key required; the server answers with them at once
    import http.client

    from http_helpers import ServerThread

    from recommend.config import load_config
    from recommend.serving.intake import Intake
    from recommend.serving.live import LiveVersion
    from recommend.serving.service import create_app
    from recommend.serving.settings import ServeSettings
    from recommend.serving.versions import version_store

    cfg, settings = load_config(path, check_inputs=False), ServeSettings(port=0)

    def post(port, body, key=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/items", body=json.dumps(body), headers={"content-type": "application/json",
                                                                       **({"authorization": f"Bearer {key}"} if key else {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    def get(port, route):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", route, headers={"authorization": "Bearer k"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    new = {"item_id": "NEW-2", "title": "Alpine tent", "description": "Two poles.", "category": "Tents", "price": 300}
    live = LiveVersion(version_store(cfg.publish, cfg.workdir), poll_s=60)  # only the POST makes it look again
    with ServerThread(create_app(live, settings, default_k=5, encoder=None, intake=Intake.from_config(cfg)), settings) as server:
        assert post(server.port, {"items": [new]})[0] == 403  # no key configured: adding is off
    app_ = create_app(LiveVersion(version_store(cfg.publish, cfg.workdir), poll_s=60), settings, default_k=5,
                      encoder=None, intake=Intake.from_config(cfg), api_key="k")
    with ServerThread(app_, settings) as server:
        assert post(server.port, {"items": [new]})[0] == 401
        status, body = post(server.port, {"items": [new, {"title": "no id"}]}, key="k")
        assert status == 200 and body["added"] == 1 and body["added_today"] == 3, body
        assert any("POST /items row 2: missing_id" in p for p in body["problems"]), body
        status, body = get(server.port, "/items/NEW-2/similar?k=3")
        assert status == 200 and body["source"] == "query"
        status, body = post(server.port, {"items": [{"title": "no id"}]}, key="k")
        assert status == 400 and "column 'item_id' not found in POST /items" in body["error"], body
        assert get(server.port, "/health")[1]["added_items"] == 3
