"""Quarantine bookkeeping: rows that fail a check are kept with their file, row, reason and record.

Nothing accepted is dropped later without being counted: per source,
``rows_read = accepted + quarantined + duplicates_dropped`` (`accounting`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, computed_field

from embedder.errors import BadDataError
from embedder.sources import ARROW_STRING, BARE_CR, MALFORMED, OVERSIZED, TOO_DEEP, TOO_WIDE, UNDECODABLE
from embedder.text import is_null

QUARANTINE_COLUMNS = ["source", "row", "reason", "detail", "record"]


class SourceCounts(BaseModel):
    """What happened to one source's rows; `balanced` states rows_read = accepted + quarantined +
    duplicates_dropped, the identity that says no row was lost unaccounted."""

    rows_read: int
    accepted: int
    quarantined: int
    duplicates_dropped: int
    quarantine_reasons: dict[str, int] = Field(default_factory=dict)
    conflicting_duplicates: int | None = None    # items: ids seen twice with different texts
    conflicting_ids: list[str] = Field(default_factory=list)  # the first 20 of them
    texts_truncated: int | None = None           # items: texts cut to max_text_chars
    max_text_chars: int | None = None
    extra_text_rows_without_id_or_value: dict[str, int] | None = None
    links_skipped: int = 0                       # folder links that loop (to itself, to a parent), not followed

    @computed_field
    @property
    def balanced(self) -> bool:
        return self.rows_read == self.accepted + self.quarantined + self.duplicates_dropped


@dataclass
class Ingested:
    """Accepted rows of one source, its quarantined rows and its counts."""

    rows: pd.DataFrame
    quarantine: pd.DataFrame
    counts: SourceCounts | None = None



def quarantine_rows(part: pd.DataFrame, mask: pd.Series, reason: str, detail: str) -> pd.DataFrame:
    bad = part[mask]
    raw = bad.drop(columns=[c for c in ("_source", "_row", UNDECODABLE, BARE_CR) if c in bad])  # the others hold the line
    return pd.DataFrame({
        "source": bad["_source"].astype(str), "row": bad["_row"].astype("int64"),
        "reason": reason, "detail": detail,
        "record": [json.dumps({k: _jsonable(v) for k, v in r.items()}, ensure_ascii=False) for r in raw.to_dict("records")],
    }, columns=QUARANTINE_COLUMNS)


def with_columns(part: pd.DataFrame, names) -> pd.DataFrame:
    """`part` with every mapped column present: a file of only malformed lines has none of them."""
    missing = [n for n in names if n and n not in part]
    return part.assign(**{n: None for n in missing}) if missing else part


def malformed(part: pd.DataFrame) -> pd.Series:
    """Rows that were JSON lines the reader could not parse into an object, or CSV rows it could not split."""
    return _marked(part, MALFORMED)


def _marked(part: pd.DataFrame, column: str) -> pd.Series:
    return part[column].notna() if column in part else pd.Series(False, index=part.index)


def undecodable(part: pd.DataFrame) -> pd.Series:
    """Rows holding bytes the source's encoding could not decode (marked by `read_file`)."""
    if UNDECODABLE not in part:
        return pd.Series(False, index=part.index)
    return part[UNDECODABLE].map(lambda v: v is True)


def reader_checks(part: pd.DataFrame) -> list[tuple[pd.Series, str, str]]:
    """The checks every source shares, first in line: rows the reader could only half read."""
    return [(malformed(part), "malformed_line", "not a JSON object (or one with a key twice), or a CSV row with the "
                                                "wrong number of fields"),
            (_marked(part, OVERSIZED), "field_too_long", "a CSV field or a JSON line longer than the source's max_field_chars"),
            (_marked(part, BARE_CR), "line_break_in_field",
             "a carriage return (\\r) inside a field: a line break in a field must be quoted, or the row would be split in two"),
            (_marked(part, TOO_DEEP), "nested_too_deep", "a JSON line nested deeper than the source's max_nesting"),
            (_marked(part, TOO_WIDE), "too_many_fields", "a JSON line whose keys would take its file past the source's max_columns"),
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


def apply_checks(part: pd.DataFrame, checks: list[tuple[pd.Series, str, str]]) -> tuple[pd.Series, list[pd.DataFrame]]:
    """Apply checks in order; a row is quarantined by the first check it fails. Returns (ok mask, quarantined)."""
    ok = pd.Series(True, index=part.index)
    bad = []
    for failed, reason, detail in checks:
        hit = ok & failed
        if hit.any():
            bad.append(quarantine_rows(part, hit, reason, detail))
        ok &= ~hit
    return ok, bad


# ---- items -----------------------------------------------------------------------------------------


QUARANTINE_STRINGS = ("_source", "_reason", "_detail", "_record")


def combine(good: pd.DataFrame, bad: list[pd.DataFrame], strings: tuple[str, ...] = ()) -> pd.DataFrame:
    """Accepted and quarantined rows of a partition in one frame, told apart by `_reason`. `strings`
    (and the quarantine's text columns) become Arrow strings (a few buffers, not a Python object per
    value); the other columns stay objects, as read."""
    good = good.assign(_reason=None, _detail=None, _record=None)
    if bad:
        q = pd.concat(bad).rename(columns={"source": "_source", "row": "_row", "reason": "_reason",
                                           "detail": "_detail", "record": "_record"})
        good = pd.concat([good, q], ignore_index=True)
    compact = {*strings, *QUARANTINE_STRINGS}
    return good.reset_index(drop=True).astype({c: ARROW_STRING if c in compact else object
                                               for c in good.columns if c != "_row"})


def unpack(frame: pd.DataFrame, columns: list[str]) -> Ingested:
    bad = frame["_reason"].notna()
    q = frame[bad].rename(columns={"_source": "source", "_row": "row", "_reason": "reason",
                                   "_detail": "detail", "_record": "record"})[QUARANTINE_COLUMNS]
    rows = frame[~bad][columns].reset_index(drop=True)
    return Ingested(rows=rows, quarantine=q.reset_index(drop=True))



def check_bad_fraction(name: str, counts: SourceCounts, limit: float, quarantine_path: str = "") -> None:
    """Raise BadDataError when more than `limit` of a source's rows were quarantined, naming the
    source, the fraction and the top reasons (the run then stops before publishing)."""
    read = counts.rows_read
    if not read:
        return
    fraction = counts.quarantined / read
    if fraction > limit:
        reasons = sorted(counts.quarantine_reasons.items(), key=lambda kv: -kv[1])[:3]
        top = ", ".join(f"{r} {n}" for r, n in reasons)
        raise BadDataError(f"{name}: {fraction:.1%} of rows quarantined ({counts.quarantined} of {read}), above "
                           f"{name}.max_bad_fraction {limit:g}; top reasons: {top}"
                           + (f"; see {quarantine_path}" if quarantine_path else "")
                           + ". Nothing was published; the live version stays live.")
