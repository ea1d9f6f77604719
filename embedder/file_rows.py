"""How the bytes of a CSV or JSON-lines file become rows, whatever they hold: the checks that refuse a
file in one line (too many columns, a name twice, the wrong encoding) and the markers that send one
row to quarantine (malformed, too long, a bare carriage return, nested too deep, too wide), within
the source's `ReadLimits`. embedder/sources.py finds the files and calls these.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections import Counter

import pandas as pd

from embedder.errors import InputError
from embedder.specs import ReadLimits, SourceSpec


def check_columns(names: list, path: str, spec: SourceSpec) -> None:
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


def check_encoding(data: bytes, path: str, spec: SourceSpec) -> None:
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
_BARE_CR_BYTES = re.compile(rb"\r(?!\n)")


def read_csv_rows(data: bytes, path: str, spec: SourceSpec, errors: str) -> pd.DataFrame:
    """A CSV file's rows. The header is checked first (column limit, names twice). A carriage return
    that ends no line (a bare CR) in a file whose lines end in LF or CRLF would split its row in
    two; the row holding one is read whole and marked (`BARE_CR`) for quarantine instead."""
    encoding, bare = spec.encoding, None
    if b"\n" in data and _BARE_CR_BYTES.search(data) and not codecs.lookup(encoding).name.startswith(("utf-16", "utf-32")):
        text = data.decode(encoding, errors)
        bare = next(chr(c) for c in range(0xE000, 0xF8FF) if chr(c) not in text)  # a private-use character
        data, encoding = _BARE_CR.sub(bare, text).encode("utf-8"), "utf-8"
    check_columns(list(spec.columns) if spec.columns else _header(data, encoding, path, spec), path, spec)
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
    if len(data) > spec.limits.max_field_chars:  # only a file this long can hold a field this long
        _mark_long_fields(frame, spec.limits.max_field_chars)
    return frame


def _mark_long_fields(frame: pd.DataFrame, limit: int) -> None:
    """Mark (`OVERSIZED`) the rows holding a field longer than `limit` characters, each such field cut
    to its first thousand for the quarantine's record."""
    hit = pd.Series(False, index=frame.index)
    for column in [c for c in frame.columns if c not in (MALFORMED, OVERSIZED)]:
        try:
            long = frame[column].str.len().gt(limit).fillna(False).astype(bool)  # vectorised: every cell of a big file
        except AttributeError:  # no strings in this column
            continue
        if long.any():
            hit |= long
            frame.loc[long, column] = frame.loc[long, column].map(lambda v: v[:1000] + f"... ({len(v):,} characters)")
    if hit.any():
        marks = hit.map(lambda h: f"a field longer than {limit:,} characters" if h else None)
        frame[OVERSIZED] = marks if OVERSIZED not in frame else frame[OVERSIZED].where(frame[OVERSIZED].notna(), marks)


def _header(data: bytes, encoding: str, path: str, spec: SourceSpec) -> list[str]:
    """The names in a CSV file's first line, read from at most its first `max_field_chars`
    characters; a first line longer than that is refused."""
    limit = spec.limits.max_field_chars
    head = data[:limit * 4].decode(encoding, errors="replace")[:limit].removeprefix("\ufeff")
    ends = [i for i in (head.find("\n"), head.find("\r")) if i >= 0]
    if not ends and len(head) >= limit:
        raise InputError(f"{spec.key}: the first line of {path} is longer than {limit:,} characters "
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


def read_json_lines(text: str, limits: ReadLimits = ReadLimits()) -> pd.DataFrame:
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
