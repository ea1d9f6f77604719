"""A fuzz suite over the readers (embedder/sources.py) and the ingest behind them: generated rows
written as CSV (quoted or not, LF or CRLF, with commas, quotes, bare carriage returns and any
Unicode in the fields), JSON lines (nested values, keys twice, lines too deep or too wide) and random
bytes. Every input must end in accepted rows that are the file's own rows, quarantined rows with a
reason, or a one-line refusal; never another exception, and within a memory and time bound.

The default run is short enough for CI. The long run:
    RECS_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_fuzz_readers.py
"""

import csv
import io
import json
import os
import resource
import time

import pandas as pd
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedder.errors import InputError
from embedder.ingest import ingest_items
from embedder.sources import MARKERS, read_file
from embedder.specs import ItemMapping, ReadLimits, SourceSpec

EXAMPLES = int(os.environ.get("RECS_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                              HealthCheck.too_slow])
LIMITS = ReadLimits(max_columns=12, max_field_chars=2_000, max_nesting=4)  # small, so that the fuzz meets them
SECONDS = 10  # per input; the readers take milliseconds on these sizes


@pytest.fixture(autouse=True)
def memory_bound():
    """No input may take this process more than 2 GB of address space beyond what it holds now: past
    that an allocation fails (the test with it) instead of the machine swapping."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + 2 * 2**30, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _read(path, **spec) -> pd.DataFrame | InputError:
    started = time.perf_counter()
    try:
        out = read_file(str(path), SourceSpec(str(path), "items.path", limits=LIMITS, **spec))
    except InputError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 1000 and message.startswith("items.path: "), message
        out = exc
    assert time.perf_counter() - started < SECONDS
    return out


def _marked(row) -> bool:
    return any(m in row and row[m] is not None and not (isinstance(row[m], float) and pd.isna(row[m])) for m in MARKERS)


def _value(v):
    return None if v is None or (isinstance(v, float) and pd.isna(v)) else v


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from(list(',"\r\n \t;\\\ufeff')),
               max_size=12)
plain = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters='"\n,\x00')
                | st.sampled_from(list("\r \t;")), max_size=12)


@st.composite
def csv_files(draw):
    """(bytes of a CSV file, its rows as written, whether it holds a NUL byte)."""
    quoting = draw(st.sampled_from(["minimal", "all", "none"]))
    ending = draw(st.sampled_from(["\n", "\r\n"]))
    rows = draw(st.lists(st.tuples(*[(plain if quoting == "none" else text)] * 3), min_size=1, max_size=15))
    if quoting == "none":  # unquoted: a field may not end the row with a CR (CR LF is a line end, as the dialect says)
        rows = [(a, b, c.rstrip("\r")) for a, b, c in rows]
        body = ending.join(",".join(r) for r in [("item_id", "title", "description"), *rows]) + ending
    else:
        out = io.StringIO()
        writer = csv.writer(out, quoting=csv.QUOTE_ALL if quoting == "all" else csv.QUOTE_MINIMAL, lineterminator=ending)
        writer.writerows([("item_id", "title", "description"), *rows])
        body = out.getvalue()
    data = (draw(st.sampled_from(["", "\ufeff"])) + body).encode("utf-8")
    return data, rows, b"\x00" in data


@FUZZ
@given(case=csv_files())
def test_csv_rows_read_are_the_rows_written(tmp_path_factory, case):
    data, rows, has_nul = case
    path = tmp_path_factory.mktemp("csv") / "items.csv"
    path.write_bytes(data)
    got = _read(path)
    if isinstance(got, InputError):
        assert has_nul and "encoding" in str(got)  # NUL bytes: refused in a line, as not this encoding's text
        return
    assert not has_nul and len(got) == len(rows)  # one row per row written: none split, none merged
    for record in got.to_dict("records"):
        if _marked(record):
            continue  # quarantined by the validation, with the marker's reason
        written = rows[record["_row"] - 1]
        assert tuple(_value(record[c]) for c in ("item_id", "title", "description")) == tuple(v or None for v in written)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=8)


@st.composite
def json_lines(draw):
    """(text of a JSON-lines file, each line's expected record or None where the line must be marked)."""
    lines, expected = [], []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["record", "record", "record", "garbage", "deep", "twice", "blank"]))
        if kind == "record":
            record = draw(st.dictionaries(st.sampled_from(["item_id", "title", "a", "b", "c"]) | text, json_values,
                                          max_size=4))
            line = json.dumps(record, ensure_ascii=draw(st.booleans()))
            names = [k.lstrip("\ufeff").strip() for k in record]  # keys are named as columns are: " a" is "a"
            record = dict(zip(names, record.values())) if len(set(names)) == len(names) else None
        elif kind == "garbage":
            line = draw(text.filter(lambda t: "\n" not in t and "\r" not in t))
            record = "blank" if not line.strip() else None
            try:
                if isinstance(json.loads(line), dict):
                    continue
            except ValueError:
                pass
        elif kind == "deep":
            depth = draw(st.integers(LIMITS.max_nesting + 1, 3000))
            line, record = '{"item_id": "x", "v": ' + "[" * depth + "]" * depth + "}", None
        elif kind == "twice":
            line, record = '{"item_id": "1", "title": "a", "title": "b"}', None
        else:
            line, record = "  ", "blank"
        lines.append(line)
        expected.append(record)
    return lines, expected, draw(st.sampled_from(["\n", "\r\n"]))


@FUZZ
@given(case=json_lines())
def test_json_lines_read_are_the_lines_written(tmp_path_factory, case):
    lines, expected, ending = case
    path = tmp_path_factory.mktemp("jsonl") / "items.jsonl"
    path.write_text(ending.join(lines) + ending, encoding="utf-8", newline="")
    got = _read(path)
    if isinstance(got, InputError):
        assert "\x00" in "".join(lines) or "\ufeff" in "".join(lines[:1]), got  # NUL: not text
        return
    wanted = {n: e for n, e in enumerate(expected, 1) if e != "blank"}
    records = got.to_dict("records") if len(got.columns) else []
    assert sorted(r["_row"] for r in records) == sorted(wanted)  # every line a row, blank lines none
    columns = set()
    for record in records:
        if _marked(record):
            continue
        line = wanted[record["_row"]]
        assert line is not None, record  # a hostile line is never accepted
        assert {k: _value(record[k]) for k in line} == {k: _value(v) for k, v in line.items()}
        columns |= line.keys()
    assert len(columns) <= LIMITS.max_columns


@FUZZ
@given(data=st.binary(max_size=3000), fmt=st.sampled_from(["csv", "jsonl"]), encoding=st.sampled_from(["utf-8", "latin-1"]))
def test_random_bytes_end_in_rows_or_one_line(tmp_path_factory, data, fmt, encoding):
    path = tmp_path_factory.mktemp("bytes") / f"items.{fmt}"
    path.write_bytes(data)
    got = _read(path, encoding=encoding)
    assert isinstance(got, InputError) or "_row" in got or not len(got)


@settings(max_examples=max(5, EXAMPLES // 4), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=csv_files(), garbage=st.binary(max_size=200))
def test_the_ingest_accounts_for_every_row_of_any_file(tmp_path_factory, case, garbage):
    data, rows, _ = case
    path = tmp_path_factory.mktemp("ingest") / "items.csv"
    path.write_bytes(data + garbage)
    try:
        got = ingest_items(SourceSpec(str(path), "items.path", limits=LIMITS), ItemMapping("item_id", "{title}"))
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    assert got.counts.balanced and got.counts.rows_read >= len(got.rows)
    assert set(got.quarantine["reason"]) <= {"malformed_line", "field_too_long", "line_break_in_field", "nested_too_deep",
                                             "too_many_fields", "undecodable_bytes", "missing_id", "missing_text",
                                             "wrong_type", "empty_text"}
