"""Read items and events with Dask, validate and normalise them, quarantine what cannot be used.

Each input file is one Dask partition (embedder/sources.py); each partition is validated on a worker.
A rejected row lands in the quarantine with its file, row and a reason code (embedder/quarantine.py).
"""

from __future__ import annotations

from typing import Callable

import dask
import numpy as np
import pandas as pd

from embedder.event_blocks import Blocks, estimate_distinct, event_blocks, sketch, user_hash, write_raw_part
from embedder.parsing import as_id, newest_order, parse_timestamps
from embedder.quarantine import (
    QUARANTINE_COLUMNS,
    Ingested,
    SourceCounts,
    apply_checks,
    combine,
    reader_checks,
    unpack,
    with_columns,
    wrong_type,
)
from embedder.sources import collect, list_files, once_in_graph, raw_values, read_source, require_columns
from embedder.run_folder import RunFolder
from embedder.specs import EventMapping, ExtraText, ItemMapping, SourceSpec
from embedder.text import has_content, is_null, normalize_text, render_text, template_fields

# A progress bar factory: bar(description, total) -> tick(n)
Bar = Callable[[str, int], Callable[[int], None]]
# A timestamp outside this range is a unit or typing error, not an event we can use.
EARLIEST, LATEST = pd.Timestamp("1990-01-01", tz="UTC"), pd.Timestamp("2100-01-01", tz="UTC")


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
    part = with_columns(part, [mapping.id_column, mapping.newest_by, *mapping.list_separators,
                                *(c for cols in mapping.flags.values() for c in cols),
                                *(f for f in (*template_fields(mapping.template), *mapping.metadata) if f not in derived)])
    ids = as_id(part[mapping.id_column])
    fields = derive_fields(part, ids, mapping, extras or {})
    records = fields.to_dict("records")
    content = pd.Series([has_content(mapping.template, r) for r in records], index=part.index, dtype=bool)
    ok, bad = apply_checks(part, [
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
    return combine(good, bad, ("item_id", "text"))  # metadata stays objects: a missing value must stay None



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



@raw_values
def ingest_items(spec: SourceSpec, mapping: ItemMapping, *, bar: Bar | None = None) -> Ingested:
    """Read and validate the catalog. An id seen twice keeps one row (the last in file order, or the
    largest `newest_by` value), the others counted as duplicates; conflicting texts are counted too.

    Example: ``ingest_items(SourceSpec("data/items.parquet", "items.path"), ItemMapping("item_id", "{title}. {description}"))``
    """
    files = list_files(spec)
    ddf = read_source(spec, files)
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
    frame = collect(ddf.map_partitions(validate_items, mapping, once_in_graph(extras), meta=meta),
                    bar("items", ddf.npartitions) if bar else None)
    result = unpack(frame, ["item_id", "text", *mapping.metadata, "_newest", "_truncated", "_source", "_row"])
    rows = result.rows
    if mapping.newest_by:  # stable sort: ties keep file order, and the last row wins
        rows = rows.assign(_order=newest_order(rows["_newest"])).sort_values("_order", kind="stable", na_position="first")
    dup = rows.duplicated("item_id", keep="last")
    conflicting = rows[rows["item_id"].isin(rows.loc[dup, "item_id"])].groupby("item_id")["text"].nunique()
    conflicting = conflicting[conflicting > 1]
    kept = rows[~dup].sort_values(["_source", "_row"], kind="stable") if mapping.newest_by else rows[~dup]
    truncated = int(kept["_truncated"].fillna(False).astype(bool).sum())
    result.rows = kept.drop(columns=[c for c in ("_newest", "_order", "_truncated", "_source", "_row") if c in kept]).reset_index(drop=True)
    result.counts = SourceCounts(links_skipped=files.loops_skipped, rows_read=len(frame), accepted=len(result.rows),
                                 quarantined=len(result.quarantine),
                                 duplicates_dropped=int(dup.sum()), conflicting_duplicates=len(conflicting),
                                 conflicting_ids=[str(i) for i in conflicting.index[:20]], texts_truncated=truncated,
                                 max_text_chars=mapping.max_text_chars,
                                 quarantine_reasons=result.quarantine["reason"].value_counts().to_dict(),
                                 extra_text_rows_without_id_or_value=extra_ignored or None)
    return result


# ---- events ----------------------------------------------------------------------------------------

def validate_events(part: pd.DataFrame, columns: dict[str, str], weights: dict[str, float],
                    known_items: frozenset, timezone: str) -> pd.DataFrame:
    """One partition of raw events -> accepted (user_id, item_id, ts, event_type) and quarantined rows."""
    part = with_columns(part, columns.values())
    users = as_id(part[columns["user_id"]])
    items = as_id(part[columns["item_id"]])
    ts = parse_timestamps(part[columns["timestamp"]], timezone)
    if columns.get("event_type"):  # matched without regard to case: "VIEW" is a view
        canonical = {str(k).casefold(): k for k in weights}
        kinds = as_id(part[columns["event_type"]]).map(lambda v: canonical.get(v.casefold(), v) if isinstance(v, str) else v)
    else:
        kinds = pd.Series("default", index=part.index, dtype=object)
    ok, bad = apply_checks(part, [
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
    # an accepted event keeps no file name or row: only quarantined rows are reported with them (the
    # repeated file names of millions of events would be hundreds of MB)
    good = pd.DataFrame({"user_id": users[ok], "item_id": items[ok], "ts": ts[ok], "event_type": kinds[ok],
                         "_source": None, "_row": np.int64(-1)})
    out = combine(good, bad, ("user_id", "item_id", "event_type"))
    out["ts"] = pd.to_datetime(out["ts"], utc=True)
    return out


@raw_values
def ingest_events(spec: SourceSpec, columns: dict[str, str], weights: dict[str, float],
                  known_items, timezone: str = "UTC", *, bar: Bar | None = None) -> Ingested:
    """Read and validate the event log. `columns` maps user_id, item_id, timestamp, event_type (optional)
    to source columns; exact duplicate events are dropped and counted."""
    files = list_files(spec)
    ddf = read_source(spec, files)
    require_columns(ddf.columns, {f"events.{k}": v for k, v in columns.items() if v}, spec)
    known = frozenset(known_items)
    meta = validate_events(ddf._meta.assign(_source="", _row=0).head(0), columns, weights, known, timezone)
    frame = collect(ddf.map_partitions(validate_events, columns, weights, once_in_graph(known), timezone, meta=meta),
                    bar("events", ddf.npartitions) if bar else None)
    result = unpack(frame, ["user_id", "item_id", "ts", "event_type"])
    result.rows["ts"] = pd.to_datetime(result.rows["ts"], utc=True).astype("datetime64[ns, UTC]")
    dup = result.rows.duplicated(keep="first")
    # ids as categories: a 4-byte code per event, and grouping, splitting and mapping ids to rows work
    # on the distinct ids instead of hashing ten million strings each time
    result.rows = result.rows[~dup].reset_index(drop=True).astype({c: "category" for c in ("user_id", "item_id", "event_type")})
    result.counts = SourceCounts(links_skipped=files.loops_skipped, rows_read=len(frame), accepted=len(result.rows),
                                 quarantined=len(result.quarantine),
                                 duplicates_dropped=int(dup.sum()),
                                 quarantine_reasons=result.quarantine["reason"].value_counts().to_dict())
    return result


@raw_values
def ingest_user_ids(spec: SourceSpec, id_column: str) -> Ingested:
    """Optional list of users to precompute lists for, even with no events yet (they get a fallback)."""
    files = list_files(spec)
    ddf = read_source(spec, files)
    require_columns(ddf.columns, {"users.id": id_column}, spec)
    frame = with_columns(collect(ddf), [id_column])
    ids = as_id(frame[id_column])
    ok, bad = apply_checks(frame, [
        *reader_checks(frame),
        wrong_type(frame, id_column),
        (ids.isna(), "missing_id", f"column {id_column!r} is empty"),
    ])
    rows = pd.DataFrame({"user_id": ids[ok]}).drop_duplicates()
    q = pd.concat(bad, ignore_index=True) if bad else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    return Ingested(rows=rows.reset_index(drop=True), quarantine=q,
                    counts=SourceCounts(links_skipped=files.loops_skipped, rows_read=len(frame), accepted=len(rows), quarantined=len(q),
                                        duplicates_dropped=int(ok.sum()) - len(rows),
                                        quarantine_reasons=q["reason"].value_counts().to_dict()))



def _validate_part(part: pd.DataFrame, partition: int, run: RunFolder, mapping: EventMapping,
                   item_index: pd.Index) -> tuple[pd.DataFrame, int, np.ndarray]:
    """Round 1 of the event blocks for one partition (on a worker): validated, its accepted events
    written by user hash (embedder/event_blocks.py). Returns (its quarantined rows, rows read, sketch)."""
    frame = validate_events(part, mapping.columns, mapping.weights, item_index, mapping.timezone)
    bad = frame["_reason"].notna()
    hashes = write_raw_part(run, partition, frame.loc[~bad, ["user_id", "item_id", "ts", "event_type"]], item_index)
    return frame[bad], len(frame), hashes


@raw_values
def ingest_events_to_blocks(spec: SourceSpec, mapping: EventMapping, item_ids, run: RunFolder, *, block_size: int,
                            extra_users=(), bar: Bar | None = None) -> tuple[Ingested, Blocks]:
    """`ingest_events`, with the accepted events written by user block on the workers instead of
    brought here (embedder/event_blocks.py): about `block_size` users per block. `extra_users`: the
    users file's ids (users with no events get a place in their block). Returns the quarantine and
    counts (`rows` is empty) and the blocks."""
    files = list_files(spec)
    ddf = read_source(spec, files)
    require_columns(ddf.columns, {f"events.{k}": v for k, v in mapping.columns.items() if v}, spec)
    item_index = pd.Index(np.asarray(item_ids, dtype=object))
    run.events_raw.mkdir(parents=True, exist_ok=True)
    task = dask.delayed(_validate_part, pure=False, nout=3)
    index_once = once_in_graph(item_index)
    parts = [task(p, i, run, mapping, index_once) for i, p in enumerate(ddf.to_delayed())]
    tick = bar("events", len(parts)) if bar else None
    results = _compute_in_order(parts, tick)
    quarantined = [q for q, _, _ in results]
    rows_read = sum(n for _, n, _ in results)
    users = estimate_distinct([s for _, _, s in results] + [sketch(user_hash(list(extra_users)))])
    n_blocks = max(1, -(-users // block_size))
    blocks = event_blocks(run, n_blocks, extra_users, client=_client(),
                          tick=bar("events by user block", n_blocks) if bar else None)
    frame = pd.concat(quarantined, ignore_index=True) if quarantined else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    result = unpack(frame, ["user_id", "item_id", "ts", "event_type"]) if len(frame) else Ingested(
        rows=None, quarantine=pd.DataFrame(columns=QUARANTINE_COLUMNS))
    accepted = sum(s.events for s in blocks.summaries)
    result.counts = SourceCounts(links_skipped=files.loops_skipped, rows_read=rows_read, accepted=accepted, quarantined=len(result.quarantine),
                                 duplicates_dropped=sum(s.duplicates for s in blocks.summaries),
                                 quarantine_reasons=result.quarantine["reason"].value_counts().to_dict())
    result.rows = pd.DataFrame()  # the accepted events are in the blocks
    return result, blocks


def _client():
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _compute_in_order(tasks: list, tick: Callable[[int], None] | None) -> list:
    """Each task's result, in order, on the Dask client when there is one (each released once here)."""
    client = _client()
    if client is None:
        out = list(dask.compute(*tasks))
        if tick:
            tick(len(out))
        return out
    futures = client.compute(tasks)
    out = []
    for future in futures:
        out.append(future.result())
        future.release()
        if tick:
            tick(1)
    return out
