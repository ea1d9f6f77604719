"""Values as the validation needs them: ids as the strings they were given, timestamps in UTC."""

from __future__ import annotations

import numpy as np
import pandas as pd

from embedder.text import is_null


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


UNIT = "datetime64[us, UTC]"  # microseconds reach +-290,000 years: the year 9999 is a value, not an overflow


def _us(values) -> pd.Series | pd.DatetimeIndex:
    """Parsed datetimes in microseconds, whatever unit pandas chose for them (seconds for far dates)."""
    return values.astype(UNIT) if isinstance(values, pd.Series) else values.as_unit("us")


def parse_timestamps(values: pd.Series, timezone: str = "UTC") -> pd.Series:
    """Timestamps to UTC: epoch seconds or milliseconds, ISO 8601 with an offset, or naive strings
    read in `timezone`. Unparseable values become NaT. Microsecond resolution: a date far outside
    nanoseconds' years 1677-2262 (a typo such as 9999) is a value the caller can judge, not a crash."""
    out = pd.Series(pd.NaT, index=values.index, dtype=UNIT)
    if pd.api.types.is_datetime64_any_dtype(values):
        s = values if values.dt.tz is not None else values.dt.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT")
        return _us(s.dt.tz_convert("UTC"))
    stamps = values.map(lambda v: isinstance(v, pd.Timestamp))  # already datetimes (among other values)
    if stamps.any():  # converted all at once, not one at a time
        ts = values[stamps]
        aware = ts.map(lambda t: t.tzinfo is not None).astype(bool)
        if aware.any():
            out[ts.index[aware]] = _us(pd.to_datetime(ts[aware].tolist(), utc=True))
        if (~aware).any():
            naive = pd.DatetimeIndex(ts[~aware].tolist())
            out[ts.index[~aware]] = _us(naive.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT").tz_convert("UTC"))
    rest = values[~stamps]
    numbers = pd.to_numeric(rest, errors="coerce")
    is_num = numbers.notna() & pd.Series(np.isfinite(numbers.to_numpy(dtype=float, na_value=np.nan)), index=rest.index)
    if is_num.any():
        n = numbers[is_num].astype(float)
        seconds = n.where(n.abs() < 1e11, n / 1000.0)  # 1e11 s is the year 5138: larger means milliseconds
        seconds = seconds.where(seconds.abs() < 9e12)  # beyond microseconds' range: no date (NaT)
        out[seconds.index] = _us(pd.to_datetime(seconds * 1e6, unit="us", utc=True, errors="coerce"))
    text = rest[~is_num & rest.notna()].astype(str).str.strip()
    if len(text):
        aware = text.str.contains(r"(?:Z|[+-]\d{2}:?\d{2})$", regex=True)
        if aware.any():
            out[text.index[aware]] = _us(pd.to_datetime(text[aware], utc=True, errors="coerce", format="ISO8601"))
        if (~aware).any():
            naive = pd.to_datetime(text[~aware], errors="coerce", format="ISO8601")
            out[naive.index] = _us(naive.dt.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT").dt.tz_convert("UTC"))
    return out



def newest_order(values: pd.Series) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().sum() >= values.notna().sum():
        return numbers
    return parse_timestamps(values)

