"""Hostile input, one class at a time (issue 27): every file of any shape ends in accepted rows that
are the file's own rows, quarantined rows with a reason, or a one-line refusal naming the file and
the limit, within a memory and time bound; config values that make no sense exit 2 naming the key;
and the operations around a refresh (check, health, metrics, the API key) say what is true.

The shapes are run through the real ingest in a child process held to 3 GB of address space (about
1.7 GB of memory once Python, pandas and Dask are loaded) and 60 s."""

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import write_config
from embedder.errors import InputError
from embedder.ingest import ingest_items
from embedder.specs import ItemMapping, SourceSpec
from recommend.cli import app

ROOT = Path(__file__).parent.parent
MAPPING = ItemMapping("item_id", "{title}")
runner = CliRunner()

INGEST = textwrap.dedent("""
    import json, sys
    from embedder.errors import InputError
    from embedder.ingest import ingest_items
    from embedder.specs import ItemMapping, SourceSpec
    try:
        got = ingest_items(SourceSpec(sys.argv[1], "items.path"), ItemMapping("item_id", "{title}"))
        print(json.dumps({"counts": got.counts.model_dump(), "ids": sorted(got.rows["item_id"])}))
    except InputError as exc:
        print(json.dumps({"refused": str(exc)}))
""")


def _bounded_ingest(path: Path) -> dict:
    """ingest_items on `path` in a child process under the memory and time bound."""
    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    proc = subprocess.run([sys.executable, "-c", INGEST, str(path)], cwd=ROOT, preexec_fn=limits, timeout=60,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _refused(outcome: dict, *words: str) -> str:
    message = outcome.get("refused")
    assert message is not None, outcome
    assert "\n" not in message and len(message) < 600 and all(w in message for w in words), message
    return message


@pytest.mark.timeout(120)
def test_pathological_shapes_are_refused_or_quarantined_within_the_bound(tmp_path):
    wide = tmp_path / "wide.csv"  # a million columns in the header (7.6 MB): the driver used to grow past 13 GB
    wide.write_text(",".join(f"column{i}" for i in range(1_000_000)) + "\n" + "1,a\n")
    _refused(_bounded_ingest(wide), str(wide), "1,000,000 columns", "items.max_columns")

    long_header = tmp_path / "long.csv"  # one line of 40 MB and no line end
    long_header.write_text("x" * (40 * 2**20))
    _refused(_bounded_ingest(long_header), str(long_header), "items.max_field_chars")

    deep = tmp_path / "items.jsonl"  # one line nested 100,000 deep among good lines: that line, not the file
    deep.write_text('{"item_id": "a", "title": "A"}\n'
                    + '{"item_id": "b", "title": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
                    + '{"item_id": "c", "title": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}\n'
                    + '{"item_id": "d", "title": "D", "title": "twice"}\n'
                    + json.dumps({"item_id": "e", "title": "E", **{f"k{i}": i for i in range(1_200)}}) + "\n"
                    + '{"item_id": "f", "title": "F"}\n')
    outcome = _bounded_ingest(deep)
    counts = outcome["counts"]
    assert outcome["ids"] == ["a", "f"] and counts["balanced"] and counts["rows_read"] == 6
    assert counts["quarantine_reasons"] == {"nested_too_deep": 2, "malformed_line": 1, "too_many_fields": 1}


@pytest.mark.timeout(60)
def test_a_named_pipe_among_the_inputs_is_refused_at_once_naming_it(tmp_path):
    folder = tmp_path / "items"
    folder.mkdir()
    (folder / "a.csv").write_text("item_id,title\n1,one\n")
    os.mkfifo(folder / "b.csv")  # nobody writes into it: reading it would wait forever
    with pytest.raises(InputError, match=r"items.path: .*b\.csv is a named pipe \(FIFO\), not a file"):
        ingest_items(SourceSpec(str(folder), "items.path"), MAPPING)


def test_a_bare_carriage_return_never_makes_a_row_of_half_of_another(tmp_path):
    """A CR inside an unquoted field used to end the row there: the item's own row was quarantined and
    its title published as a new item. Now that row is quarantined whole, and nothing else changes."""
    for ending in ("\n", "\r\n"):
        path = tmp_path / f"items{len(ending)}.csv"
        path.write_bytes(ending.join(["item_id,title", "1,Hello\rWorld", '2,"quoted line' + ending + 'break"',
                                      "3,plain", ""]).encode())
        got = ingest_items(SourceSpec(str(path), "items.path"), MAPPING)
        assert sorted(got.rows["item_id"]) == ["2", "3"] and got.counts.balanced and got.counts.rows_read == 3
        q = got.quarantine
        assert q["reason"].tolist() == ["line_break_in_field"] and q["row"].tolist() == [1]
        assert json.loads(q["record"].iloc[0]) == {"item_id": "1", "title": "Hello\rWorld"}
    old_mac = tmp_path / "mac.csv"  # lines that end in CR alone: the CRs are the line ends, as the file says
    old_mac.write_bytes(b"item_id,title\r1,one\r2,two\r")
    assert sorted(ingest_items(SourceSpec(str(old_mac), "items.path"), MAPPING).rows["item_id"]) == ["1", "2"]


def test_folders_with_looping_links_are_read_once_and_the_loops_counted(tmp_path):
    folder = tmp_path / "items"
    (folder / "more").mkdir(parents=True)
    (folder / "a.csv").write_text("item_id,title\n1,one\n")
    (folder / "more" / "b.csv").write_text("item_id,title\n2,two\n")
    (folder / "self").symlink_to(".")            # a link to itself
    (folder / "more" / "up").symlink_to("..")    # a link to its parent
    (folder / "loop.csv").symlink_to("loop.csv")  # a file link to itself
    got = ingest_items(SourceSpec(str(folder), "items.path"), MAPPING)
    assert sorted(got.rows["item_id"]) == ["1", "2"] and got.counts.rows_read == 2
    assert got.counts.links_skipped == 3


def test_names_twice_and_the_wrong_encoding_are_refused_in_words(tmp_path):
    twice = tmp_path / "twice.csv"
    twice.write_text("item_id,title, title\n1,a,b\n")
    with pytest.raises(InputError, match=r"twice\.csv names the column 'title' more than once"):
        ingest_items(SourceSpec(str(twice), "items.path"), MAPPING)
    wide_json = tmp_path / "twice.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_arrays([pa.array(["1"]), pa.array(["a"]), pa.array(["b"])], ["item_id", "title", "title"]),
                   wide_json)
    with pytest.raises(InputError, match="names the column 'title' more than once"):
        ingest_items(SourceSpec(str(wide_json), "items.path"), MAPPING)
    utf16 = tmp_path / "utf16.csv"
    utf16.write_text("item_id,title\n1,caf\u00e9\n", encoding="utf-16")
    with pytest.raises(InputError) as err:
        ingest_items(SourceSpec(str(utf16), "items.path"), MAPPING)
    assert "encoding" in str(err.value) and "UTF-16" in str(err.value) and "\x00" not in str(err.value)
    got = ingest_items(SourceSpec(str(utf16), "items.path", encoding="utf-16"), MAPPING)  # as the message says
    assert got.rows["text"].tolist() == ["caf\u00e9"]


@pytest.mark.parametrize("events, words", [
    ({"weights": {"view": float("nan")}}, ["events.weights.view", "finite"]),
    ({"weights": {"view": 1.0, "cart": -3.0}}, ["events.weights", "'cart'", ">= 0"]),
    ({"weights": {"view": 0.0}}, ["events.weights", "every weight is 0"]),
    ({"max_bad_fraction": float("inf")}, ["events.max_bad_fraction", "finite"]),
])
def test_config_values_that_make_no_sense_exit_2_naming_the_key(tmp_path, sample_dir, tiny_model, events, words):
    path = write_config(tmp_path, sample_dir, tiny_model, events=events)
    result = runner.invoke(app, ["refresh", "--config", str(path)])
    assert result.exit_code == 2 and all(w in result.output for w in words), result.output
    assert "Traceback" not in result.output


def test_a_workdir_that_is_a_file_an_alias_bomb_and_a_huge_value_exit_2_in_a_line(tmp_path, sample_dir, tiny_model):
    (tmp_path / "afile").write_text("not a folder")
    path = write_config(tmp_path, sample_dir, tiny_model, workdir=str(tmp_path / "afile"))
    result = runner.invoke(app, ["refresh", "--config", str(path)])
    assert result.exit_code == 2 and "workdir" in result.output and "is not a folder" in result.output

    base = yaml.safe_load(path.read_text())
    bomb = "\n".join([f"a0: &a0 [{', '.join(['x'] * 9)}]"]
                     + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)])
    path.write_text(bomb + "\n" + yaml.safe_dump({**base, "workdir": str(tmp_path / "w")}).replace(
        "events:\n", "events:\n  weights: *a9\n", 1))
    result = runner.invoke(app, ["refresh", "--config", str(path)])  # 9^10 values once expanded
    assert result.exit_code == 2 and "YAML aliases" in result.output and len(result.output) < 1000

    huge = {**base, "workdir": str(tmp_path / "w"), "events": {**base["events"], "weights": {"view": "9" * 4_000_000 + "x"}}}
    path.write_text(yaml.safe_dump(huge))
    result = runner.invoke(app, ["refresh", "--config", str(path)])
    assert result.exit_code == 2 and "events.weights.view" in result.output and len(result.output) < 1000


def test_check_during_a_publish_reports_it_in_progress_and_exits_0(tmp_path, sample_dir, tiny_model):
    from http_helpers import publish_small
    from recommend.config import load_config
    from recommend.serving.versions import version_store

    path = write_config(tmp_path, sample_dir, tiny_model)
    config = load_config(path)
    store = version_store(config.publish, config.workdir)
    publish_small(store, "20260101T000000-aaaa")
    writing = "20260102T000000-bbbb"  # what a refresh has written so far: its run folder, its version's first shard
    (Path(config.workdir) / "runs" / writing).mkdir(parents=True)
    (store.folder / writing / "items-000").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom recommend.run.infra.lock import RefreshLock\n"
                               "held = RefreshLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(600)",
                               config.workdir], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = runner.invoke(app, ["check", "--config", str(path)])
        assert result.exit_code == 0, result.output
        assert f"version {writing}: being published by the refresh running now" in result.output
        as_json = json.loads(runner.invoke(app, ["check", "--config", str(path), "--json"]).stdout)
        assert as_json["in_progress"] == [writing] and as_json["findings"] == []
    finally:
        holder.kill()
        holder.wait()
    result = runner.invoke(app, ["check", "--config", str(path)])  # the refresh died: now it is a problem
    assert result.exit_code == 1 and f"version {writing}: incomplete" in result.output


def test_an_empty_api_key_is_refused_at_start(tmp_path, sample_dir, tiny_model, monkeypatch):
    path = write_config(tmp_path, sample_dir, tiny_model)
    monkeypatch.setenv("RECS_API_KEY", "  ")
    result = runner.invoke(app, ["serve", "--config", str(path), "--port", "0"])
    assert result.exit_code == 2 and "RECS_API_KEY is set but empty" in result.output


def test_a_field_past_the_limit_quarantines_its_row_in_a_well_formed_csv(tmp_path):
    """The limit holds on pandas' path too, not only on the row-by-row one a ragged file takes."""
    from embedder.specs import ReadLimits

    path = tmp_path / "items.csv"
    path.write_text("item_id,title,note\n1,short,\n2," + "w" * 5000 + ",x\n3,fine,\n")  # empty fields too
    got = ingest_items(SourceSpec(str(path), "items.path", limits=ReadLimits(max_field_chars=2000)), MAPPING)
    assert sorted(got.rows["item_id"]) == ["1", "3"] and got.counts.balanced
    q = got.quarantine
    assert q["reason"].tolist() == ["field_too_long"] and q["row"].tolist() == [2] and len(q["record"].iloc[0]) < 1200
