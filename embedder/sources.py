"""Input files: expand a path, glob or URL to files, read each file as one partition of raw values.

Every row keeps its file (`_source`) and 1-based row number (`_row`), so that a rejected row can be
quarantined by both. Rows a reader could only half read are kept, marked (`MALFORMED`, `UNDECODABLE`),
for the validation to quarantine.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from typing import Callable

import dask
import dask.dataframe as dd
import fsspec
import pandas as pd

from embedder.errors import InputError
from embedder.specs import SourceSpec

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv",
           ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}



def raw_values(fn):
    """Run `fn` with Dask's object->string conversion off: validation must see the values as read
    (a list where an id belongs, 7.0 from a float column), not their string forms."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with dask.config.set({"dataframe.convert-string": False}):
            return fn(*args, **kwargs)

    return wrapper


def list_files(spec: SourceSpec) -> list[str]:
    """Expand a path, glob or fsspec URL to the files it names; raise if there are none."""
    try:
        fs, _, paths = fsspec.core.get_fs_token_paths(spec.path)
    except ImportError as exc:  # e.g. s3:// without s3fs: fsspec names the package to install
        raise InputError(f"{spec.key}: {spec.path!r} needs a package that is not installed: {exc}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{spec.key}: cannot open {spec.path!r}: {exc}") from None
    files = []
    for p in paths:  # a folder stands for the data files inside it (Spark's _SUCCESS and hidden files left out)
        inside = fs.find(p) if fs.isdir(p) else [p]
        files += [f for f in inside if not f.rsplit("/", 1)[-1].startswith((".", "_"))]
    files = sorted(set(files))
    if not files:
        raise InputError(f"{spec.key}: no file matches {spec.path!r} (a path, glob or URL of Parquet, CSV or JSON-lines files)")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [p if protocol in ("file", "local") else f"{protocol}://{p}" for p in files]


def file_format(path: str, spec: SourceSpec) -> str:
    if spec.format:
        return spec.format
    name = path.lower().removesuffix(".gz")
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise InputError(f"{spec.key}: cannot tell the format of {path!r} from its name; set {spec.key.rsplit('.', 1)[0]}.format to parquet, csv or jsonl")


def read_file(path: str, spec: SourceSpec) -> pd.DataFrame:
    """One file as a frame of raw values, plus `_source` (the file) and `_row` (1-based data row).

    A text file with bytes its encoding cannot decode is read again with those bytes replaced by
    U+FFFD, so that only the rows holding them are quarantined (see `undecodable`), not the file."""
    fmt = file_format(path, spec)
    try:
        try:
            frame = _read(path, spec, fmt, "strict")
        except UnicodeDecodeError:
            frame = _read(path, spec, fmt, "replace")
            frame[UNDECODABLE] = frame.apply(lambda r: any(isinstance(v, str) and "\ufffd" in v for v in r), axis=1) \
                if len(frame) else pd.Series(dtype=bool)
    except FileNotFoundError:
        raise InputError(f"{spec.key}: file not found: {path}") from None
    except Exception as exc:  # the reader's own error, kept in the message
        raise InputError(f"{spec.key}: cannot read {path} as {fmt}: {type(exc).__name__}: {exc}") from None
    lines = frame.attrs.get("line_numbers")
    frame = frame.astype(object)
    # " item_id " -> "item_id"; a byte-order mark left on the first name by a fallback reader goes too
    frame.columns = [c.lstrip("\ufeff").strip() if isinstance(c, str) else c for c in frame.columns]
    frame["_source"] = path
    frame["_row"] = lines if lines is not None else range(1, len(frame) + 1)
    return frame


def _read(path: str, spec: SourceSpec, fmt: str, errors: str) -> pd.DataFrame:
    with fsspec.open(path, "rb", compression="infer") as fh:
        if fmt == "parquet":
            return pd.read_parquet(fh)
        data = fh.read()
    if not data.strip():
        return pd.DataFrame()  # an empty file is an empty partition, not an error
    if fmt == "csv":
        try:
            return pd.read_csv(io.BytesIO(data), sep=spec.delimiter, encoding=spec.encoding, encoding_errors=errors,
                               dtype=str, quotechar=spec.quotechar, keep_default_na=False, na_values=[""],
                               engine="python" if len(spec.delimiter) > 1 else "c",
                               header=None if spec.columns else "infer", names=list(spec.columns) if spec.columns else None)
        except pd.errors.ParserError:
            return _read_ragged_csv(data.decode(spec.encoding, errors).removeprefix("\ufeff"), spec)
    return _read_json_lines(data.decode(spec.encoding, errors).removeprefix("\ufeff"))


def _read_ragged_csv(text: str, spec: SourceSpec) -> pd.DataFrame:
    """A CSV whose rows do not all have the header's number of fields: the rows that do are read as
    usual, each other row is kept whole in `_malformed_line`, so that it is quarantined by number."""
    if len(spec.delimiter) > 1:
        raise InputError(f"{spec.key}: rows with the wrong number of fields; a multi-character delimiter "
                         f"({spec.delimiter!r}) cannot be read row by row")
    limit = csv.field_size_limit()
    csv.field_size_limit(MAX_FIELD)  # pandas' own reader has no limit; Python's stops at 128 KB
    try:
        rows = csv.reader(io.StringIO(text, newline=""), delimiter=spec.delimiter, quotechar=spec.quotechar)
        header = list(spec.columns) if spec.columns else next(rows)
        records = []
        while True:
            try:
                fields = next(rows)
            except StopIteration:
                break
            except csv.Error as exc:  # the reader goes on at the next line: only this row is lost
                records.append({OVERSIZED if "field larger" in str(exc) else MALFORMED: str(exc)})
                continue
            if len(fields) == len(header):
                records.append({h: (v if v != "" else None) for h, v in zip(header, fields)})
            elif fields:
                records.append({MALFORMED: spec.delimiter.join(fields)[:1000]})
    finally:
        csv.field_size_limit(limit)
    return pd.DataFrame.from_records(records, columns=[*header, MALFORMED, OVERSIZED])


MALFORMED = "_malformed_line"
OVERSIZED = "_field_too_long"  # a CSV field over MAX_FIELD: that row is quarantined, not the file
MAX_FIELD = 16 * 2**20  # characters; the model reads about the first thousand of an item's text
ARROW_STRING = pd.StringDtype("pyarrow")
UNDECODABLE = "_undecodable"  # set only on files that needed U+FFFD replacements: a U+FFFD already in valid text is kept


def _read_json_lines(text: str) -> pd.DataFrame:
    """JSON lines, one record per non-blank line; a line that is not a JSON object is kept as a row
    holding only its text in `_malformed_line`, so that it is quarantined with its row number.
    A file holding one JSON array of objects is read as those objects (`_row` is the position)."""
    if text.lstrip().startswith("["):
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None
        if isinstance(whole, list):
            return pd.DataFrame.from_records([r if isinstance(r, dict) else {MALFORMED: json.dumps(r)[:1000]} for r in whole])
    records, lines = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        records.append(record if isinstance(record, dict) else {MALFORMED: line[:1000]})
        lines.append(number)
    frame = pd.DataFrame.from_records(records)
    frame.attrs["line_numbers"] = lines  # `_row` is the line in the file, blank lines counted
    return frame


def read_source(spec: SourceSpec) -> dd.DataFrame:
    """All files of a source as one Dask frame, one partition per file, every column of object dtype.

    Files of one source must share their columns; the first file's columns are checked here.
    """
    files = list_files(spec)
    for path in files:  # the first file that is not empty gives the columns
        first = read_file(path, spec).head(0)
        if len(first.columns) > 2:
            break
    return dd.from_map(read_file, files, spec=spec, meta=first, enforce_metadata=False)


def once_in_graph(value):
    """`value` as one task that every partition's task refers to. Passed as is, a large argument (the
    catalog's ids checked by every event partition) is copied into each task of the graph: at 1M items
    and 16 partitions, 16 pickled copies of a million ids, held by the scheduler in the driver."""
    return dask.delayed(value, pure=False, traverse=False)


def collect(ddf: dd.DataFrame, tick: Callable[[int], None] | None = None) -> pd.DataFrame:
    """The frame's partitions brought to this process one at a time, in order, and concatenated here.
    `.compute()` would concatenate them on one worker first and ship the whole frame, so that worker
    would hold several copies of it. Without a distributed client, the local scheduler.
    `tick(1)` as each partition arrives."""
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        return ddf.compute()
    futures = client.compute(ddf.to_delayed())
    parts = []
    for future in futures:  # in partition order; each is released as soon as it is here
        parts.append(future.result())
        future.release()
        if tick:
            tick(1)
    return pd.concat(parts, ignore_index=True) if parts else ddf._meta.copy()


def require_columns(columns, required: dict[str, str], spec: SourceSpec) -> None:
    """Fail fast when a mapped column is absent, naming the column, its config key and what was found."""
    found = [c for c in columns if c not in ("_source", "_row", MALFORMED, OVERSIZED, UNDECODABLE)]
    for key, column in required.items():
        if column not in columns:
            seen = f"columns found: {', '.join(map(str, found))}" if found else "no columns found: are the files empty?"
            raise InputError(f"{key}: column {column!r} not found in {spec.path} ({seen})")

