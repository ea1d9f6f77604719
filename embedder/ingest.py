"""Read items and events with Dask, validate and normalise them, quarantine what cannot be used.

Each input file is one Dask partition, so every row keeps its file and row number, and a rejected
row lands in the quarantine with both and a reason code. Nothing accepted is dropped later without
being counted: per source, ``rows_read = accepted + quarantined + duplicates_dropped``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import dask.dataframe as dd
import fsspec
import pandas as pd

from embedder.errors import BadDataError, InputError
from embedder.text import has_content, render_text, template_fields

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


@dataclass
class Ingested:
    """Accepted rows of one source, its quarantined rows and its accounting."""

    rows: pd.DataFrame
    quarantine: pd.DataFrame
    counts: dict = field(default_factory=dict)


def list_files(spec: SourceSpec) -> list[str]:
    """Expand a path, glob or fsspec URL to the files it names; raise if there are none."""
    try:
        fs, _, paths = fsspec.core.get_fs_token_paths(spec.path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{spec.key}: cannot open {spec.path!r}: {exc}") from None
    files = sorted(p for p in paths if not fs.isdir(p))
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
    """One file as a frame of raw values, plus `_source` (the file) and `_row` (1-based data row)."""
    fmt = file_format(path, spec)
    try:
        with fsspec.open(path, "rb", compression="infer") as fh:
            if fmt == "parquet":
                frame = pd.read_parquet(fh)
            elif fmt == "csv":
                frame = pd.read_csv(fh, sep=spec.delimiter, encoding=spec.encoding, dtype=str,
                                    keep_default_na=False, na_values=[""])
            else:
                frame = pd.read_json(fh, lines=True, dtype=False, encoding=spec.encoding)
    except FileNotFoundError:
        raise InputError(f"{spec.key}: file not found: {path}") from None
    except Exception as exc:  # the reader's own error, kept in the message
        raise InputError(f"{spec.key}: cannot read {path} as {fmt}: {type(exc).__name__}: {exc}") from None
    frame = frame.astype(object)
    frame["_source"] = path
    frame["_row"] = range(1, len(frame) + 1)
    return frame


def read_source(spec: SourceSpec) -> dd.DataFrame:
    """All files of a source as one Dask frame, one partition per file, every column of object dtype.

    Files of one source must share their columns; the first file's columns are checked here.
    """
    files = list_files(spec)
    first = read_file(files[0], spec).head(0)
    return dd.from_map(read_file, files, spec=spec, meta=first, enforce_metadata=False)


def require_columns(columns, required: dict[str, str], spec: SourceSpec) -> None:
    """Fail fast when a mapped column is absent, naming the column, its config key and what was found."""
    found = [c for c in columns if c not in ("_source", "_row")]
    for key, column in required.items():
        if column not in columns:
            raise InputError(f"{key}: column {column!r} not found in {spec.path} (columns found: {', '.join(map(str, found))})")


def is_null(v) -> bool:
    """None, NaN, pd.NA or NaT (a scalar; lists and other objects are not null)."""
    return v is None or (not isinstance(v, (list, dict, tuple)) and bool(pd.isna(v)))


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
    stamps = values.map(lambda v: isinstance(v, pd.Timestamp))
    for idx in values.index[stamps]:
        ts = values[idx]
        out[idx] = ts.tz_convert("UTC") if ts.tzinfo else ts.tz_localize(timezone).tz_convert("UTC")
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
    raw = bad.drop(columns=["_source", "_row"])
    return pd.DataFrame({
        "source": bad["_source"].astype(str), "row": bad["_row"].astype("int64"),
        "reason": reason, "detail": detail,
        "record": [json.dumps({k: _jsonable(v) for k, v in r.items()}, ensure_ascii=False) for r in raw.to_dict("records")],
    }, columns=QUARANTINE_COLUMNS)


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

def validate_items(part: pd.DataFrame, id_column: str, template: str, metadata: list[str]) -> pd.DataFrame:
    """One partition of raw items -> accepted rows (item_id, text, metadata, _source, _row) and
    quarantined rows, in one frame told apart by `_reason` (None for accepted)."""
    ids = as_id(part[id_column])
    records = part.to_dict("records")
    content = pd.Series([has_content(template, r) for r in records], index=part.index, dtype=bool)
    ok, bad = _split(part, [
        (ids.isna(), "missing_id", f"column {id_column!r} is empty"),
        (~content, "empty_text", f"every field of the text template is empty: {template!r}"),
    ])
    good = pd.DataFrame({"item_id": ids[ok], "text": [render_text(template, r) for r, keep in zip(records, ok) if keep]},
                        index=part.index[ok])
    for column in metadata:
        good[column] = part.loc[ok, column].map(lambda v: None if is_null(v) else str(v))
    good["_source"] = part.loc[ok, "_source"].astype(str)
    good["_row"] = part.loc[ok, "_row"].astype("int64")
    return _combine(good, bad)


def _combine(good: pd.DataFrame, bad: list[pd.DataFrame]) -> pd.DataFrame:
    good = good.assign(_reason=None, _detail=None, _record=None)
    if bad:
        q = pd.concat(bad).rename(columns={"source": "_source", "row": "_row", "reason": "_reason",
                                           "detail": "_detail", "record": "_record"})
        good = pd.concat([good, q], ignore_index=True)
    return good.reset_index(drop=True).astype({c: object for c in good.columns if c != "_row"})


def _unpack(frame: pd.DataFrame, columns: list[str]) -> Ingested:
    bad = frame["_reason"].notna()
    q = frame[bad].rename(columns={"_source": "source", "_row": "row", "_reason": "reason",
                                   "_detail": "detail", "_record": "record"})[QUARANTINE_COLUMNS]
    rows = frame[~bad][columns].reset_index(drop=True)
    return Ingested(rows=rows, quarantine=q.reset_index(drop=True))


def ingest_items(spec: SourceSpec, id_column: str, template: str, metadata: list[str]) -> Ingested:
    """Read and validate the catalog. An id seen twice keeps its last row (file order), counted as a duplicate.

    Example: ``ingest_items(SourceSpec("data/items.parquet", "items.path"), "item_id", "{title}. {description}", ["title"])``
    """
    ddf = read_source(spec)
    required = {"items.id": id_column}
    required.update({f"items.text (field {{{f}}})": f for f in template_fields(template)})
    required.update({f"items.metadata ({m})": m for m in metadata})
    require_columns(ddf.columns, required, spec)
    meta = validate_items(ddf._meta.assign(_source="", _row=0).head(0), id_column, template, metadata)
    frame = ddf.map_partitions(validate_items, id_column, template, metadata, meta=meta).compute()
    result = _unpack(frame, ["item_id", "text", *metadata, "_source", "_row"])
    rows = result.rows
    read = len(frame)
    dup = rows.duplicated("item_id", keep="last")
    conflicting = rows[rows["item_id"].isin(rows.loc[dup, "item_id"])].groupby("item_id")["text"].nunique().gt(1).sum()
    result.rows = rows[~dup].drop(columns=["_source", "_row"]).reset_index(drop=True)
    result.counts = {"rows_read": read, "accepted": len(result.rows), "quarantined": len(result.quarantine),
                     "duplicates_dropped": int(dup.sum()), "conflicting_duplicates": int(conflicting),
                     "quarantine_reasons": result.quarantine["reason"].value_counts().to_dict()}
    return result


# ---- events ----------------------------------------------------------------------------------------

def validate_events(part: pd.DataFrame, columns: dict[str, str], weights: dict[str, float],
                    known_items: frozenset, timezone: str) -> pd.DataFrame:
    """One partition of raw events -> accepted (user_id, item_id, ts, event_type) and quarantined rows."""
    users = as_id(part[columns["user_id"]])
    items = as_id(part[columns["item_id"]])
    ts = parse_timestamps(part[columns["timestamp"]], timezone)
    kinds = as_id(part[columns["event_type"]]) if columns.get("event_type") else pd.Series("default", index=part.index, dtype=object)
    ok, bad = _split(part, [
        (users.isna(), "missing_user_id", f"column {columns['user_id']!r} is empty"),
        (items.isna(), "missing_item_id", f"column {columns['item_id']!r} is empty"),
        (ts.isna(), "bad_timestamp", f"column {columns['timestamp']!r}: not epoch seconds/ms or ISO 8601"),
        ((ts < EARLIEST) | (ts > LATEST), "impossible_timestamp", f"outside {EARLIEST.date()}..{LATEST.date()}"),
        (~kinds.isin(list(weights)), "unknown_event_type", f"allowed: {', '.join(weights)} (events.weights)"),
        (~items.isin(known_items), "unknown_item", "item id not in the accepted catalog"),
    ])
    good = pd.DataFrame({"user_id": users[ok], "item_id": items[ok], "ts": ts[ok], "event_type": kinds[ok],
                         "_source": part.loc[ok, "_source"].astype(str), "_row": part.loc[ok, "_row"].astype("int64")})
    out = _combine(good, bad)
    out["ts"] = pd.to_datetime(out["ts"], utc=True)
    return out


def ingest_events(spec: SourceSpec, columns: dict[str, str], weights: dict[str, float],
                  known_items, timezone: str = "UTC") -> Ingested:
    """Read and validate the event log. `columns` maps user_id, item_id, timestamp, event_type (optional)
    to source columns; exact duplicate events are dropped and counted."""
    ddf = read_source(spec)
    require_columns(ddf.columns, {f"events.{k}": v for k, v in columns.items() if v}, spec)
    known = frozenset(known_items)
    meta = validate_events(ddf._meta.assign(_source="", _row=0).head(0), columns, weights, known, timezone)
    frame = ddf.map_partitions(validate_events, columns, weights, known, timezone, meta=meta).compute()
    result = _unpack(frame, ["user_id", "item_id", "ts", "event_type"])
    dup = result.rows.duplicated(keep="first")
    result.rows = result.rows[~dup].reset_index(drop=True)
    result.counts = {"rows_read": len(frame), "accepted": len(result.rows), "quarantined": len(result.quarantine),
                     "duplicates_dropped": int(dup.sum()),
                     "quarantine_reasons": result.quarantine["reason"].value_counts().to_dict()}
    return result


def ingest_user_ids(spec: SourceSpec, id_column: str) -> Ingested:
    """Optional list of users to precompute lists for, even with no events yet (they get a fallback)."""
    ddf = read_source(spec)
    require_columns(ddf.columns, {"users.id": id_column}, spec)
    frame = ddf.compute()
    ids = as_id(frame[id_column])
    ok, bad = _split(frame, [(ids.isna(), "missing_id", f"column {id_column!r} is empty")])
    rows = pd.DataFrame({"user_id": ids[ok]}).drop_duplicates()
    q = pd.concat(bad) if bad else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    return Ingested(rows=rows.reset_index(drop=True), quarantine=q,
                    counts={"rows_read": len(frame), "accepted": len(rows), "quarantined": len(q),
                            "duplicates_dropped": int(ok.sum()) - len(rows)})


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
