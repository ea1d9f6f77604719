"""Input files: expand a path, glob or URL to files, read each file as one partition of raw values.

Every row keeps its file (`_source`) and 1-based row number (`_row`), so that a rejected row can be
quarantined by both. Rows a reader could only half read are kept, marked (`MALFORMED`, `UNDECODABLE`),
for the validation to quarantine.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from typing import Callable

import dask
import dask.dataframe as dd
import fsspec
import pandas as pd
import pyarrow.parquet as pq

from embedder.errors import InputError
from embedder.file_rows import (BARE_CR, MALFORMED, MARKERS, MAX_FIELD, OVERSIZED, TOO_DEEP, TOO_WIDE,  # noqa: F401 (re-exported)
                                UNDECODABLE, check_columns, check_encoding, read_csv_rows, read_json_lines)
from embedder.specs import SourceSpec

ARROW_STRING = pd.StringDtype("pyarrow")
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
    raise InputError(f"{spec.key}: cannot tell the format of {path!r} from its name; "
                     f"set {spec.key.rsplit('.', 1)[0]}.format to parquet, csv or jsonl")


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
            check_columns(pq.ParquetFile(fh).schema_arrow.names, path, spec)
            fh.seek(0)
            return pd.read_parquet(fh)
        data = fh.read()
    if not data.strip():
        return pd.DataFrame()  # an empty file is an empty partition, not an error
    check_encoding(data, path, spec)
    if fmt == "csv":
        return read_csv_rows(data, path, spec, errors)
    return read_json_lines(data.decode(spec.encoding, errors).removeprefix("\ufeff"), spec.limits)


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

