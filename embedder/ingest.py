"""Read items and events with Dask, validate and normalise them, quarantine what cannot be used.

Each input file is one Dask partition, so every row keeps its file and row number, and a rejected
row lands in the quarantine with both and a reason code. Nothing accepted is dropped later without
being counted: per source, ``rows_read = accepted + quarantined + duplicates_dropped``.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from dataclasses import dataclass, field

import dask
import dask.dataframe as dd
import fsspec
import numpy as np
import pandas as pd

from embedder.errors import BadDataError, InputError
from embedder.text import has_content, is_null, normalize_text, render_text, template_fields

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv",
           ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
QUARANTINE_COLUMNS = ["source", "row", "reason", "detail", "record"]
# A timestamp outside this range is a unit or typing error, not an event we can use.
EARLIEST, LATEST = pd.Timestamp("1990-01-01", tz="UTC"), pd.Timestamp("2100-01-01", tz="UTC")


@dataclass(frozen=True)
class SourceSpec:
    """Where one input lives and how to read it. `key` is its config key, used in error messages."""

    path: str
    key: str
    format: str | None = None  # parquet | csv | jsonl; None: from the file extension
    delimiter: str = ","
    encoding: str = "utf-8"
    columns: tuple[str, ...] | None = None  # names for a CSV without a header row
    quotechar: str = '"'


@dataclass(frozen=True)
class ExtraText:
    """A one-to-many text source folded into one item field, e.g. user tags: all `column` values of
    rows with the same `id`, first-seen order, de-duplicated, at most `max_values`, joined by `separator`."""

    spec: SourceSpec
    id_column: str
    column: str
    separator: str = ", "
    max_values: int = 50


@dataclass(frozen=True)
class ItemMapping:
    """How catalog columns become an item: its id, its text (a template over columns and derived
    fields), the metadata to carry, and which row wins when an id repeats."""

    id_column: str
    template: str
    metadata: tuple[str, ...] = ()
    list_separators: dict = field(default_factory=dict)  # field -> separator inside the value ("|")
    flags: dict = field(default_factory=dict)            # field -> one-hot columns rendered as their names
    extra_text: dict = field(default_factory=dict)       # field -> ExtraText
    newest_by: str | None = None                          # keep the row with the largest value; None: the last row
    max_text_chars: int = 10_000                          # longer texts are cut here, and counted (texts_truncated)

    def derived(self) -> set[str]:
        return set(self.flags) | set(self.extra_text)


@dataclass
class Ingested:
    """Accepted rows of one source, its quarantined rows and its accounting."""

    rows: pd.DataFrame
    quarantine: pd.DataFrame
    counts: dict = field(default_factory=dict)


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
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=spec.delimiter, quotechar=spec.quotechar)
    header = list(spec.columns) if spec.columns else next(rows)
    records = []
    for fields in rows:
        if len(fields) == len(header):
            records.append({h: (v if v != "" else None) for h, v in zip(header, fields)})
        elif fields:
            records.append({MALFORMED: spec.delimiter.join(fields)[:1000]})
    return pd.DataFrame.from_records(records, columns=[*header, MALFORMED])


MALFORMED = "_malformed_line"
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


def collect(ddf: dd.DataFrame) -> pd.DataFrame:
    """The frame's partitions brought to this process one at a time, in order, and concatenated here.
    `.compute()` concatenates them on one worker first and ships the whole frame: at 300k items and
    3M events that worker peaked at 2.7 GB. Without a distributed client, the local scheduler."""
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
    return pd.concat(parts, ignore_index=True) if parts else ddf._meta.copy()


def require_columns(columns, required: dict[str, str], spec: SourceSpec) -> None:
    """Fail fast when a mapped column is absent, naming the column, its config key and what was found."""
    found = [c for c in columns if c not in ("_source", "_row", MALFORMED, UNDECODABLE)]
    for key, column in required.items():
        if column not in columns:
            seen = f"columns found: {', '.join(map(str, found))}" if found else "no columns found: are the files empty?"
            raise InputError(f"{key}: column {column!r} not found in {spec.path} ({seen})")


def as_id(values: pd.Series) -> pd.Series:
    """Ids as the strings they were given: 7.0 read from a float column becomes "7", blanks become None."""

    def one(v):
        if is_null(v):
            return None
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        s = str(v).strip()
        return s or None

    return pd.Series([one(v) for v in values], index=values.index, dtype=object)


def parse_timestamps(values: pd.Series, timezone: str = "UTC") -> pd.Series:
    """Timestamps to UTC: epoch seconds or milliseconds, ISO 8601 with an offset, or naive strings
    read in `timezone`. Unparseable values become NaT."""
    out = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
    if pd.api.types.is_datetime64_any_dtype(values):
        s = values if values.dt.tz is not None else values.dt.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT")
        return s.dt.tz_convert("UTC").astype("datetime64[ns, UTC]")
    stamps = values.map(lambda v: isinstance(v, pd.Timestamp))  # already datetimes (among other values)
    if stamps.any():  # converted all at once: one at a time was 6 s of a 10 s ingest of 250k events
        ts = values[stamps]
        aware = ts.map(lambda t: t.tzinfo is not None).astype(bool)
        if aware.any():
            out[ts.index[aware]] = pd.to_datetime(ts[aware].tolist(), utc=True)
        if (~aware).any():
            naive = pd.DatetimeIndex(ts[~aware].tolist())
            out[ts.index[~aware]] = naive.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT").tz_convert("UTC")
    rest = values[~stamps]
    numbers = pd.to_numeric(rest, errors="coerce")
    is_num = numbers.notna()
    if is_num.any():
        n = numbers[is_num].astype(float)
        seconds = n.where(n.abs() < 1e11, n / 1000.0)  # 1e11 s is the year 5138: larger means milliseconds
        out[seconds.index] = pd.to_datetime(seconds, unit="s", utc=True, errors="coerce")
    text = rest[~is_num & rest.notna()].astype(str).str.strip()
    if len(text):
        aware = text.str.contains(r"(?:Z|[+-]\d{2}:?\d{2})$", regex=True)
        if aware.any():
            out[text.index[aware]] = pd.to_datetime(text[aware], utc=True, errors="coerce", format="ISO8601")
        if (~aware).any():
            naive = pd.to_datetime(text[~aware], errors="coerce", format="ISO8601")
            out[naive.index] = naive.dt.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT").dt.tz_convert("UTC")
    return out


def _quarantine(part: pd.DataFrame, mask: pd.Series, reason: str, detail: str) -> pd.DataFrame:
    bad = part[mask]
    raw = bad.drop(columns=[c for c in ("_source", "_row", UNDECODABLE) if c in bad])
    return pd.DataFrame({
        "source": bad["_source"].astype(str), "row": bad["_row"].astype("int64"),
        "reason": reason, "detail": detail,
        "record": [json.dumps({k: _jsonable(v) for k, v in r.items()}, ensure_ascii=False) for r in raw.to_dict("records")],
    }, columns=QUARANTINE_COLUMNS)


def _with_columns(part: pd.DataFrame, names) -> pd.DataFrame:
    """`part` with every mapped column present: a file of only malformed lines has none of them."""
    missing = [n for n in names if n and n not in part]
    return part.assign(**{n: None for n in missing}) if missing else part


def malformed(part: pd.DataFrame) -> pd.Series:
    """Rows that were JSON lines the reader could not parse into an object."""
    return part[MALFORMED].notna() if MALFORMED in part else pd.Series(False, index=part.index)


def undecodable(part: pd.DataFrame) -> pd.Series:
    """Rows holding bytes the source's encoding could not decode (marked by `read_file`)."""
    if UNDECODABLE not in part:
        return pd.Series(False, index=part.index)
    return part[UNDECODABLE].map(lambda v: v is True)


def reader_checks(part: pd.DataFrame) -> list[tuple[pd.Series, str, str]]:
    """The checks every source shares, first in line: rows the reader could only half read."""
    return [(malformed(part), "malformed_line", "not a JSON object, or a CSV row with the wrong number of fields"),
            (undecodable(part), "undecodable_bytes",
             "bytes not valid in the source's encoding (its .encoding key, e.g. utf-8, latin-1, cp1252)")]


def wrong_type(part: pd.DataFrame, column: str) -> tuple[pd.Series, str, str]:
    """The check for an id column holding a list, a mapping or a boolean (from JSON or Parquet)."""
    hit = part[column].map(lambda v: isinstance(v, (list, dict, bool, np.ndarray)))
    return hit, "wrong_type", f"column {column!r}: an id must be a string or a number"


def _jsonable(v):
    if is_null(v):
        return None
    return v if isinstance(v, (int, float, str, bool)) else str(v)


def _split(part: pd.DataFrame, checks: list[tuple[pd.Series, str, str]]) -> tuple[pd.Series, list[pd.DataFrame]]:
    """Apply checks in order; a row is quarantined by the first check it fails. Returns (ok mask, quarantined)."""
    ok = pd.Series(True, index=part.index)
    bad = []
    for failed, reason, detail in checks:
        hit = ok & failed
        if hit.any():
            bad.append(_quarantine(part, hit, reason, detail))
        ok &= ~hit
    return ok, bad


# ---- items -----------------------------------------------------------------------------------------

def derive_fields(part: pd.DataFrame, ids: pd.Series, mapping: ItemMapping, extras: dict[str, dict]) -> pd.DataFrame:
    """Fields the template may use beyond the raw columns: lists re-joined with ", ", one-hot flag
    columns as the names of those set, and folded extra text looked up by item id."""
    part = part.copy()
    for name, sep in mapping.list_separators.items():
        part[name] = part[name].map(lambda v: None if is_null(v) else ", ".join(x.strip() for x in str(v).split(sep) if x.strip()))
    for name, columns in mapping.flags.items():
        on = pd.DataFrame({c: part[c].map(lambda v: not is_null(v) and str(v).strip() not in ("", "0", "false", "False"))
                           for c in columns}, index=part.index)
        part[name] = [", ".join(c for c in columns if row[c]) or None for _, row in on.iterrows()]
    for name, lookup in extras.items():
        part[name] = ids.map(lambda i: lookup.get(i) if i is not None else None)
    return part


def validate_items(part: pd.DataFrame, mapping: ItemMapping, extras: dict[str, dict] | None = None) -> pd.DataFrame:
    """One partition of raw items -> accepted rows (item_id, text, metadata, _source, _row, _newest)
    and quarantined rows, in one frame told apart by `_reason` (None for accepted)."""
    derived = mapping.derived()
    part = _with_columns(part, [mapping.id_column, mapping.newest_by, *mapping.list_separators,
                                *(c for cols in mapping.flags.values() for c in cols),
                                *(f for f in (*template_fields(mapping.template), *mapping.metadata) if f not in derived)])
    ids = as_id(part[mapping.id_column])
    fields = derive_fields(part, ids, mapping, extras or {})
    records = fields.to_dict("records")
    content = pd.Series([has_content(mapping.template, r) for r in records], index=part.index, dtype=bool)
    ok, bad = _split(part, [
        *reader_checks(part),
        wrong_type(part, mapping.id_column),
        (ids.isna(), "missing_id", f"column {mapping.id_column!r} is empty"),
        (~content, "empty_text", f"every field of the text template is empty: {mapping.template!r}"),
    ])
    texts = pd.Series([render_text(mapping.template, r) for r, keep in zip(records, ok) if keep], index=part.index[ok], dtype=object)
    long = texts.str.len() > mapping.max_text_chars
    good = pd.DataFrame({"item_id": ids[ok], "text": texts.where(~long, texts.str.slice(0, mapping.max_text_chars))},
                        index=part.index[ok])
    good["_truncated"] = long
    for column in mapping.metadata:
        good[column] = fields.loc[ok, column].map(lambda v: None if is_null(v) else str(v))
    good["_newest"] = part.loc[ok, mapping.newest_by] if mapping.newest_by else None
    good["_source"] = part.loc[ok, "_source"].astype(str)
    good["_row"] = part.loc[ok, "_row"].astype("int64")
    return _combine(good, bad, ("item_id", "text"))  # metadata stays objects: a missing value must stay None


QUARANTINE_STRINGS = ("_source", "_reason", "_detail", "_record")


def _combine(good: pd.DataFrame, bad: list[pd.DataFrame], strings: tuple[str, ...] = ()) -> pd.DataFrame:
    """Accepted and quarantined rows of a partition in one frame, told apart by `_reason`. `strings`
    (and the quarantine's text columns) become Arrow strings: as Python objects, 10M events held
    about 4 GB on the driver; the other columns stay objects, as read."""
    good = good.assign(_reason=None, _detail=None, _record=None)
    if bad:
        q = pd.concat(bad).rename(columns={"source": "_source", "row": "_row", "reason": "_reason",
                                           "detail": "_detail", "record": "_record"})
        good = pd.concat([good, q], ignore_index=True)
    compact = {*strings, *QUARANTINE_STRINGS}
    return good.reset_index(drop=True).astype({c: ARROW_STRING if c in compact else object
                                               for c in good.columns if c != "_row"})


def _unpack(frame: pd.DataFrame, columns: list[str]) -> Ingested:
    bad = frame["_reason"].notna()
    q = frame[bad].rename(columns={"_source": "source", "_row": "row", "_reason": "reason",
                                   "_detail": "detail", "_record": "record"})[QUARANTINE_COLUMNS]
    rows = frame[~bad][columns].reset_index(drop=True)
    return Ingested(rows=rows, quarantine=q.reset_index(drop=True))


@raw_values
def read_extra_text(extra: ExtraText, key: str) -> tuple[dict[str, str], int]:
    """{item id: folded text} from an extra source, and how many of its rows had no id or no value."""
    ddf = read_source(extra.spec)
    require_columns(ddf.columns, {f"{key}.id": extra.id_column, f"{key}.column": extra.column}, extra.spec)
    frame = collect(ddf[[extra.id_column, extra.column]])
    ids = as_id(frame[extra.id_column])
    values = frame[extra.column].map(lambda v: None if is_null(v) else normalize_text(str(v)) or None)
    usable = ids.notna() & values.notna()
    folded: dict[str, list[str]] = {}
    for i, v in zip(ids[usable], values[usable]):
        seen = folded.setdefault(i, [])
        if len(seen) < extra.max_values and v.casefold() not in (x.casefold() for x in seen):
            seen.append(v)
    return {i: extra.separator.join(v) for i, v in folded.items()}, int((~usable).sum())


def _newest_order(values: pd.Series) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().sum() >= values.notna().sum():
        return numbers
    return parse_timestamps(values)


@raw_values
def ingest_items(spec: SourceSpec, mapping: ItemMapping) -> Ingested:
    """Read and validate the catalog. An id seen twice keeps one row (the last in file order, or the
    largest `newest_by` value), the others counted as duplicates; conflicting texts are counted too.

    Example: ``ingest_items(SourceSpec("data/items.parquet", "items.path"), ItemMapping("item_id", "{title}. {description}"))``
    """
    ddf = read_source(spec)
    required = {"items.id": mapping.id_column}
    derived = mapping.derived()
    required.update({f"items.text (field {{{f}}})": f for f in template_fields(mapping.template) if f not in derived})
    required.update({f"items.metadata ({m})": m for m in mapping.metadata if m not in derived})
    required.update({f"items.list_separators ({f})": f for f in mapping.list_separators})
    required.update({f"items.flags.{name}": c for name, cols in mapping.flags.items() for c in cols})
    if mapping.newest_by:
        required["items.newest_by"] = mapping.newest_by
    require_columns(ddf.columns, required, spec)
    extras, extra_ignored = {}, {}
    for name, extra in mapping.extra_text.items():
        extras[name], extra_ignored[name] = read_extra_text(extra, f"items.extra_text.{name}")
    meta = validate_items(ddf._meta.assign(_source="", _row=0).head(0), mapping, {})
    frame = collect(ddf.map_partitions(validate_items, mapping, once_in_graph(extras), meta=meta))
    result = _unpack(frame, ["item_id", "text", *mapping.metadata, "_newest", "_truncated", "_source", "_row"])
    rows = result.rows
    if mapping.newest_by:  # stable sort: ties keep file order, and the last row wins
        rows = rows.assign(_order=_newest_order(rows["_newest"])).sort_values("_order", kind="stable", na_position="first")
    dup = rows.duplicated("item_id", keep="last")
    conflicting = rows[rows["item_id"].isin(rows.loc[dup, "item_id"])].groupby("item_id")["text"].nunique()
    conflicting = conflicting[conflicting > 1]
    kept = rows[~dup].sort_values(["_source", "_row"], kind="stable") if mapping.newest_by else rows[~dup]
    truncated = int(kept["_truncated"].fillna(False).astype(bool).sum())
    result.rows = kept.drop(columns=[c for c in ("_newest", "_order", "_truncated", "_source", "_row") if c in kept]).reset_index(drop=True)
    result.counts = {"rows_read": len(frame), "accepted": len(result.rows), "quarantined": len(result.quarantine),
                     "duplicates_dropped": int(dup.sum()), "conflicting_duplicates": len(conflicting),
                     "conflicting_ids": conflicting.index[:20].tolist(),
                     "texts_truncated": truncated, "max_text_chars": mapping.max_text_chars,
                     "quarantine_reasons": result.quarantine["reason"].value_counts().to_dict()}
    if extra_ignored:
        result.counts["extra_text_rows_without_id_or_value"] = extra_ignored
    return result


# ---- events ----------------------------------------------------------------------------------------

def validate_events(part: pd.DataFrame, columns: dict[str, str], weights: dict[str, float],
                    known_items: frozenset, timezone: str) -> pd.DataFrame:
    """One partition of raw events -> accepted (user_id, item_id, ts, event_type) and quarantined rows."""
    part = _with_columns(part, columns.values())
    users = as_id(part[columns["user_id"]])
    items = as_id(part[columns["item_id"]])
    ts = parse_timestamps(part[columns["timestamp"]], timezone)
    if columns.get("event_type"):  # matched without regard to case: "VIEW" is a view
        canonical = {str(k).casefold(): k for k in weights}
        kinds = as_id(part[columns["event_type"]]).map(lambda v: canonical.get(v.casefold(), v) if isinstance(v, str) else v)
    else:
        kinds = pd.Series("default", index=part.index, dtype=object)
    ok, bad = _split(part, [
        *reader_checks(part),
        wrong_type(part, columns["user_id"]),
        wrong_type(part, columns["item_id"]),
        (users.isna(), "missing_user_id", f"column {columns['user_id']!r} is empty"),
        (items.isna(), "missing_item_id", f"column {columns['item_id']!r} is empty"),
        (ts.isna(), "bad_timestamp", f"column {columns['timestamp']!r}: not epoch seconds/ms or ISO 8601"),
        ((ts < EARLIEST) | (ts > LATEST), "impossible_timestamp", f"outside {EARLIEST.date()}..{LATEST.date()}"),
        (~kinds.isin(list(weights)), "unknown_event_type", f"allowed: {', '.join(weights)} (events.weights)"),
        (~items.isin(known_items), "unknown_item", "item id not in the accepted catalog"),
    ])
    # an accepted event keeps no file name or row: only quarantined rows are reported with them (at
    # 10M events the repeated file names alone were 400 MB)
    good = pd.DataFrame({"user_id": users[ok], "item_id": items[ok], "ts": ts[ok], "event_type": kinds[ok],
                         "_source": None, "_row": np.int64(-1)})
    out = _combine(good, bad, ("user_id", "item_id", "event_type"))
    out["ts"] = pd.to_datetime(out["ts"], utc=True)
    return out


@raw_values
def ingest_events(spec: SourceSpec, columns: dict[str, str], weights: dict[str, float],
                  known_items, timezone: str = "UTC") -> Ingested:
    """Read and validate the event log. `columns` maps user_id, item_id, timestamp, event_type (optional)
    to source columns; exact duplicate events are dropped and counted."""
    ddf = read_source(spec)
    require_columns(ddf.columns, {f"events.{k}": v for k, v in columns.items() if v}, spec)
    known = frozenset(known_items)
    meta = validate_events(ddf._meta.assign(_source="", _row=0).head(0), columns, weights, known, timezone)
    frame = collect(ddf.map_partitions(validate_events, columns, weights, once_in_graph(known), timezone, meta=meta))
    result = _unpack(frame, ["user_id", "item_id", "ts", "event_type"])
    result.rows["ts"] = pd.to_datetime(result.rows["ts"], utc=True).astype("datetime64[ns, UTC]")
    dup = result.rows.duplicated(keep="first")
    # ids as categories: a 4-byte code per event, and grouping, splitting and mapping ids to rows work
    # on the distinct ids instead of hashing ten million strings each time
    result.rows = result.rows[~dup].reset_index(drop=True).astype({c: "category" for c in ("user_id", "item_id", "event_type")})
    result.counts = {"rows_read": len(frame), "accepted": len(result.rows), "quarantined": len(result.quarantine),
                     "duplicates_dropped": int(dup.sum()),
                     "quarantine_reasons": result.quarantine["reason"].value_counts().to_dict()}
    return result


@raw_values
def ingest_user_ids(spec: SourceSpec, id_column: str) -> Ingested:
    """Optional list of users to precompute lists for, even with no events yet (they get a fallback)."""
    ddf = read_source(spec)
    require_columns(ddf.columns, {"users.id": id_column}, spec)
    frame = _with_columns(collect(ddf), [id_column])
    ids = as_id(frame[id_column])
    ok, bad = _split(frame, [
        *reader_checks(frame),
        wrong_type(frame, id_column),
        (ids.isna(), "missing_id", f"column {id_column!r} is empty"),
    ])
    rows = pd.DataFrame({"user_id": ids[ok]}).drop_duplicates()
    q = pd.concat(bad, ignore_index=True) if bad else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    return Ingested(rows=rows.reset_index(drop=True), quarantine=q,
                    counts={"rows_read": len(frame), "accepted": len(rows), "quarantined": len(q),
                            "duplicates_dropped": int(ok.sum()) - len(rows),
                            "quarantine_reasons": q["reason"].value_counts().to_dict()})


def check_bad_fraction(name: str, counts: dict, limit: float, quarantine_path: str = "") -> None:
    """Raise BadDataError when more than `limit` of a source's rows were quarantined, naming the
    source, the fraction and the top reasons (the run then stops before publishing)."""
    read = counts.get("rows_read", 0)
    if not read:
        return
    fraction = counts["quarantined"] / read
    if fraction > limit:
        reasons = sorted(counts.get("quarantine_reasons", {}).items(), key=lambda kv: -kv[1])[:3]
        top = ", ".join(f"{r} {n}" for r, n in reasons)
        raise BadDataError(f"{name}: {fraction:.1%} of rows quarantined ({counts['quarantined']} of {read}), above "
                           f"{name}.max_bad_fraction {limit:g}; top reasons: {top}"
                           + (f"; see {quarantine_path}" if quarantine_path else "")
                           + ". Nothing was published; the live version stays live.")


def accounting(counts: dict) -> dict:
    """The per-source identity the report states: rows read = accepted + quarantined + duplicates dropped."""
    ok = counts["rows_read"] == counts["accepted"] + counts["quarantined"] + counts["duplicates_dropped"]
    return {k: counts[k] for k in ("rows_read", "accepted", "quarantined", "duplicates_dropped")} | {"balanced": ok}
