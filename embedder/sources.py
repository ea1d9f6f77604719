"""Input files: expand a path, glob or URL to files, read each file as one partition of raw values.

Every row keeps its file (`_source`) and 1-based row number (`_row`), so that a rejected row can be
quarantined by both. Rows a reader could only half read are kept, marked (`MALFORMED`, `UNDECODABLE`),
for the validation to quarantine.
"""

from __future__ import annotations

import codecs
import csv
import errno
import functools
import io
import json
import os
import re
import stat
from collections import Counter
from typing import Callable

import dask
import dask.dataframe as dd
import fsspec
import pandas as pd
import pyarrow.parquet as pq

from embedder.errors import InputError
from embedder.specs import ReadLimits, SourceSpec

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


class Files(list):
    """The files of a source, in order; `loops_skipped`: folder links that lead back into a folder
    already listed (a link to itself, to a parent), skipped and counted in the report."""

    loops_skipped: int = 0


def list_files(spec: SourceSpec) -> Files:
    """Expand a path, glob or fsspec URL to the files it names; raise if there are none, or if one
    is not a regular file (a named pipe would be read forever, a device or socket not at all)."""
    try:
        fs, _, paths = fsspec.core.get_fs_token_paths(spec.path)
    except ImportError as exc:  # e.g. s3:// without s3fs: fsspec names the package to install
        raise InputError(f"{spec.key}: {spec.path!r} needs a package that is not installed: {exc}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{spec.key}: cannot open {spec.path!r}: {exc}") from None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")
    files, loops = [], 0
    for p in paths:  # a folder stands for the data files inside it (Spark's _SUCCESS and hidden files left out)
        if local and os.path.isdir(p):
            inside, skipped = _walk(p)
            loops += skipped
        else:
            inside = fs.find(p) if fs.isdir(p) else [p]
        files += [f for f in inside if not f.rsplit("/", 1)[-1].startswith((".", "_"))]
    found = Files(sorted(set(files)))
    found.loops_skipped = loops
    if not found:
        raise InputError(f"{spec.key}: no file matches {spec.path!r} (a path, glob or URL of Parquet, CSV or JSON-lines files)")
    if local:
        for f in found:
            _require_regular(f, spec)
        return found
    found[:] = [f"{protocol}://{p}" for p in found]
    return found


def _walk(root: str) -> tuple[list[str], int]:
    """Every file under a local folder, following links to folders but never into one already
    walked: (files, links skipped because they loop). A link to a file that loops is skipped too."""
    seen, files, loops = {os.path.realpath(root)}, [], 0
    for folder, subfolders, names in os.walk(root, followlinks=True):
        keep = []
        for name in subfolders:
            real = os.path.realpath(os.path.join(folder, name))
            if real in seen:
                loops += 1
            else:
                seen.add(real)
                keep.append(name)
        subfolders[:] = keep
        for name in names:
            path = os.path.join(folder, name)
            try:
                os.stat(path)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    loops += 1
                    continue
            files.append(path)
    return files, loops


def _require_regular(path: str, spec: SourceSpec) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{spec.key}: file not found: {path} (a link to nothing?)") from None
    except OSError as exc:
        raise InputError(f"{spec.key}: cannot open {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise InputError(f"{spec.key}: {path} is {kind}, not a file: a source reads regular files and folders of them")


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
    U+FFFD, so that only the rows holding them are quarantined (see `undecodable`), not the file.
    A file past `spec.limits` is refused, naming the limit; a row past them is marked for quarantine."""
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
    except InputError:
        raise
    except Exception as exc:  # the reader's own error, kept in the message (its first line, cut short)
        detail = " ".join(str(exc).split())[:300]
        raise InputError(f"{spec.key}: cannot read {path} as {fmt}: {type(exc).__name__}: {detail}") from None
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
            _check_columns(pq.ParquetFile(fh).schema_arrow.names, path, spec)
            fh.seek(0)
            return pd.read_parquet(fh)
        data = fh.read()
    if not data.strip():
        return pd.DataFrame()  # an empty file is an empty partition, not an error
    _check_encoding(data, path, spec)
    if fmt == "csv":
        return _read_csv(data, path, spec, errors)
    return _read_json_lines(data.decode(spec.encoding, errors).removeprefix("\ufeff"), spec.limits)


def _check_columns(names: list, path: str, spec: SourceSpec) -> None:
    """Refuse a file with more columns than the limit, or a column name twice (naming them)."""
    section = spec.key.rsplit(".", 1)[0]
    if len(names) > spec.limits.max_columns:
        raise InputError(f"{spec.key}: {path} has {len(names):,} columns, more than {section}.max_columns "
                         f"({spec.limits.max_columns:,}); raise it if this file is what you meant")
    cleaned = [n.lstrip("\ufeff").strip() if isinstance(n, str) else n for n in names]
    counts = Counter(cleaned)
    twice = sorted(str(n) for n, c in counts.items() if c > 1)
    if twice:
        listed = ", ".join(repr(n[:80]) for n in twice[:5]) + (f" and {len(twice) - 5} more" if len(twice) > 5 else "")
        raise InputError(f"{spec.key}: {path} names the column {listed} more than once: which one to read "
                         f"would be a guess; rename or drop the copies")


def _check_encoding(data: bytes, path: str, spec: SourceSpec) -> None:
    """Refuse a UTF-16 or UTF-32 file read as a one-byte encoding (its text would be NUL bytes and
    garbage), saying so in words."""
    if codecs.lookup(spec.encoding).name.startswith(("utf-16", "utf-32")):
        return
    head = data[:4096]
    boms = [(codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
            (codecs.BOM_UTF16_BE, "UTF-16")]
    found = next((enc for bom, enc in boms if head.startswith(bom)), None)
    if found or b"\x00" in head:
        why = f"it starts with a {found} byte-order mark" if found else "it holds NUL bytes"
        raise InputError(f"{spec.key}: {path} is not {spec.encoding} text ({why}): wrong encoding, or not a text "
                         f"file; set {spec.key.rsplit('.', 1)[0]}.encoding to the file's encoding (e.g. utf-16)")


_BARE_CR = re.compile(r"\r(?!\n)")


def _read_csv(data: bytes, path: str, spec: SourceSpec, errors: str) -> pd.DataFrame:
    """A CSV file's rows. The header is checked first (column limit, names twice). A carriage return
    that ends no line (a bare CR) in a file whose lines end in LF or CRLF would split its row in
    two; the row holding one is read whole and marked (`BARE_CR`) for quarantine instead."""
    encoding, bare = spec.encoding, None
    if b"\r" in data and b"\n" in data and re.search(rb"\r(?!\n)", data) \
            and not codecs.lookup(encoding).name.startswith(("utf-16", "utf-32")):
        text = data.decode(encoding, errors)
        bare = next(chr(c) for c in range(0xE000, 0xF8FF) if chr(c) not in text)  # a private-use character
        data, encoding = _BARE_CR.sub(bare, text).encode("utf-8"), "utf-8"
    _check_columns(list(spec.columns) if spec.columns else _header(data, encoding, spec), path, spec)
    try:
        frame = pd.read_csv(io.BytesIO(data), sep=spec.delimiter, encoding=encoding, encoding_errors=errors,
                            dtype=str, quotechar=spec.quotechar, keep_default_na=False, na_values=[""],
                            engine="python" if len(spec.delimiter) > 1 else "c",
                            header=None if spec.columns else "infer", names=list(spec.columns) if spec.columns else None)
    except pd.errors.ParserError:
        frame = _read_ragged_csv(data.decode(encoding, errors).removeprefix("\ufeff"), spec)
    if bare is not None:
        hit = pd.Series(False, index=frame.index)
        for column in list(frame.columns):
            values = frame[column]
            has = values.map(lambda v: isinstance(v, str) and bare in v)
            if has.any():
                hit |= has
                frame[column] = values.map(lambda v: v.replace(bare, "\r") if isinstance(v, str) else v)
        frame[BARE_CR] = hit.map(lambda h: True if h else None)
    return frame


def _header(data: bytes, encoding: str, spec: SourceSpec) -> list[str]:
    """The names in a CSV file's first line, read from at most its first `max_field_chars`
    characters; a first line longer than that is refused."""
    limit = spec.limits.max_field_chars
    head = data[:limit * 4].decode(encoding, errors="replace")[:limit].removeprefix("\ufeff")
    ends = [i for i in (head.find("\n"), head.find("\r")) if i >= 0]
    if not ends and len(head) >= limit:
        raise InputError(f"{spec.key}: the first line of this file is longer than {limit:,} characters "
                         f"({spec.key.rsplit('.', 1)[0]}.max_field_chars): not a CSV header")
    line = head[:min(ends)] if ends else head
    if len(spec.delimiter) > 1:
        return line.split(spec.delimiter)
    return next(csv.reader([line], delimiter=spec.delimiter, quotechar=spec.quotechar), [])


def _read_ragged_csv(text: str, spec: SourceSpec) -> pd.DataFrame:
    """A CSV whose rows do not all have the header's number of fields: the rows that do are read as
    usual, each other row is kept whole in `_malformed_line`, so that it is quarantined by number."""
    if len(spec.delimiter) > 1:
        raise InputError(f"{spec.key}: rows with the wrong number of fields; a multi-character delimiter "
                         f"({spec.delimiter!r}) cannot be read row by row")
    limit = csv.field_size_limit()
    csv.field_size_limit(spec.limits.max_field_chars)  # pandas' own reader has no limit; Python's stops at 128 KB
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
OVERSIZED = "_field_too_long"  # a CSV field or JSON line over max_field_chars: that row is quarantined, not the file
BARE_CR = "_bare_carriage_return"  # a CSV row holding a carriage return that ends no line
TOO_DEEP = "_nested_too_deep"  # a JSON line nested deeper than max_nesting
TOO_WIDE = "_too_many_fields"  # a JSON line whose keys would take its file past max_columns
MAX_FIELD = ReadLimits.max_field_chars  # the default limit, in characters (the model reads about the first thousand of a text)
ARROW_STRING = pd.StringDtype("pyarrow")
UNDECODABLE = "_undecodable"  # set only on files that needed U+FFFD replacements: a U+FFFD already in valid text is kept
MARKERS = (MALFORMED, OVERSIZED, BARE_CR, TOO_DEEP, TOO_WIDE, UNDECODABLE)  # the columns a reader adds to mark a row


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    record = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


def _named(record: dict) -> dict:
    """A line's record with its keys named as columns are (" title " -> "title"); two keys that
    become one name are a key twice."""
    named = {}
    for key, value in record.items():
        name = key.lstrip("\ufeff").strip()
        if name in named:
            raise _DuplicateKey(name)
        named[name] = value
    return named


def _depth(value, limit: int) -> int:
    """How deeply lists and objects nest in `value`, counted up to `limit` + 1."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _read_json_lines(text: str, limits: ReadLimits = ReadLimits()) -> pd.DataFrame:
    """JSON lines, one record per non-blank line; a line that is not a JSON object is kept as a row
    holding only its text in `_malformed_line`, so that it is quarantined with its row number. So is
    a line with a key twice, and one nested deeper than `max_nesting`, longer than
    `max_field_chars`, or whose keys would take the file's columns past `max_columns` (each marked
    with its own reason). A file holding one JSON array of objects is read as those objects (`_row`
    is the position)."""
    columns: set = set()

    def checked(record, shown: str, maybe_deep: bool = True) -> dict:
        """The record, or a row marking why it is not one (`maybe_deep`: False when the line holds
        too few brackets to nest past the limit, which spares walking it)."""
        if not isinstance(record, dict):
            return {MALFORMED: shown}
        if maybe_deep and _depth(record, limits.max_nesting) > limits.max_nesting:
            return {TOO_DEEP: shown}
        if len(columns | record.keys()) > limits.max_columns:
            return {TOO_WIDE: f"{len(record):,} keys"}
        columns.update(record.keys())
        return record

    if text.lstrip().startswith("["):
        try:
            whole = json.loads(text, object_pairs_hook=_no_duplicates)
        except (ValueError, RecursionError):
            whole = None
        if isinstance(whole, list):
            out = []
            for record in whole:
                shown = json.dumps(record)[:1000]
                try:
                    out.append(checked(_named(record) if isinstance(record, dict) else record, shown))
                except _DuplicateKey:
                    out.append({MALFORMED: shown})
            return pd.DataFrame.from_records(out)
    records, lines = [], []
    end = "\n" if "\n" in text or "\r" not in text else "\r"  # lines end in LF or CRLF (or CR alone, old Macs)
    for number, line in enumerate(text.split(end), 1):  # not splitlines(): U+2028 and friends may sit in a string
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        lines.append(number)
        if len(line) > limits.max_field_chars:
            records.append({OVERSIZED: f"a line of {len(line):,} characters"})
            continue
        try:
            record = json.loads(line, object_pairs_hook=_no_duplicates)
            record = _named(record) if isinstance(record, dict) else record
        except _DuplicateKey as key:
            records.append({MALFORMED: f"the key {str(key)[:80]!r} twice: {line[:1000]}"})
            continue
        except RecursionError:
            records.append({TOO_DEEP: line[:1000]})
            continue
        except ValueError:
            record = None
        records.append(checked(record, line[:1000], line.count("[") + line.count("{") > limits.max_nesting))
    frame = pd.DataFrame.from_records(records)
    frame.attrs["line_numbers"] = lines  # `_row` is the line in the file, blank lines counted
    return frame


def read_source(spec: SourceSpec, files: list[str] | None = None) -> dd.DataFrame:
    """All files of a source (`files`: as `list_files` gave them) as one Dask frame, one partition
    per file, every column of object dtype.

    Files of one source must share their columns; the first file's columns are checked here.
    """
    files = list_files(spec) if files is None else files
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
    found = [c for c in columns if c not in ("_source", "_row", *MARKERS)]
    for key, column in required.items():
        if column not in columns:
            seen = f"columns found: {', '.join(map(str, found))}" if found else "no columns found: are the files empty?"
            raise InputError(f"{key}: column {column!r} not found in {spec.path} ({seen})")

