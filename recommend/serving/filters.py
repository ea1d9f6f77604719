"""Filters and exclusions on every query: conditions on the items' payload fields, and item ids left out.

A filter is a few conditions that must all hold, each on one field the version indexed
(`publish.indexed_fields`: its version's metadata says each field's kind):

    equality          category=Shoes                {"category": "Shoes"}
    set membership    brand=Acme|Zed                {"brand": ["Acme", "Zed"]}
    numeric range     price<100, price>=10          {"price": {"lt": 100, "gte": 10}}

The same `Where` is checked two ways, with the same meaning: in Python over an item's metadata (the
fast path: the stored list, recommend/serving/facade.py) and by the store as a payload filter in a
vector query (each reader translates `conditions`: recommend/serving/embedded.py, versions.py). A
field that is not indexed, a range on a text field or a value of the wrong kind is a `BadFilter`
(HTTP 400) that names the field and the indexed ones.

Example:
    where = Where.build({"category": "Shoes", "price": {"lt": 100}}, exclude=["I7"], fields={"category": "keyword", "price": "float"})
    where.matches("I3", {"category": "Shoes", "price": 59.0})   # True
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from embedder.errors import RecsError

KINDS = ("keyword", "integer", "float", "bool")  # the kinds a field can have
# The payload index of each kind. A true/false field is published as 1/0 with an integer index
# (`stored_value`): qdrant-edge 0.9's MatchValue turns true into 1, so it never matches a stored true.
INDEX = {"keyword": "Keyword", "integer": "Integer", "float": "Float", "bool": "Integer"}
RANGES = ("gt", "gte", "lt", "lte")
_TEXT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*(>=|<=|>|<|=)(.*)$")


class BadFilter(RecsError):
    """A filter the version cannot answer (a field not indexed, a value of the wrong kind): HTTP 400, exit code 2."""

    exit_code = 2


@dataclass(frozen=True)
class Condition:
    """One field's condition: `any_of` (equality or set membership) or a range (`gt`, `gte`, `lt`, `lte`)."""

    field: str
    kind: str
    any_of: tuple = ()
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None

    @property
    def is_range(self) -> bool:
        return not self.any_of

    def matches(self, value) -> bool:
        """As the store's filter decides: a list value matches when one of its values does; a missing one never."""
        if isinstance(value, list):
            return any(self.matches(v) for v in value)
        if value is None:
            return False
        if self.any_of:  # of the field's own kind only, as the store's index holds it (a bool as 1/0)
            stored = _stored_kind(value)
            return (stored == self.kind or (self.kind == "bool" and stored == "integer")) and value in self.any_of
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        return ((self.gt is None or value > self.gt) and (self.gte is None or value >= self.gte)
                and (self.lt is None or value < self.lt) and (self.lte is None or value <= self.lte))


@dataclass(frozen=True)
class Where:
    """Conditions that must all hold, and item ids never answered. Empty: no filter."""

    conditions: tuple[Condition, ...] = ()
    exclude: frozenset = frozenset()

    def __bool__(self) -> bool:
        return bool(self.conditions or self.exclude)

    def key(self) -> tuple:
        """Hashable, equal for equal filters (a cache key's part)."""
        return (tuple(sorted(self.conditions, key=repr)), tuple(sorted(self.exclude)))

    def matches(self, item_id: str, metadata: dict) -> bool:
        return item_id not in self.exclude and all(c.matches(metadata.get(c.field)) for c in self.conditions)

    @classmethod
    def build(cls, where: dict | None = None, exclude=None, *, fields: dict[str, str]) -> "Where":
        """From {field: value | [values] | {"gt"|"gte"|"lt"|"lte": number}} and item ids, against the
        version's indexed `fields` ({name: kind})."""
        conditions = []
        for name, value in (where or {}).items():
            kind = _kind(name, fields)
            if isinstance(value, dict):
                conditions.append(_range(name, kind, value))
            else:
                values = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
                conditions.append(_any_of(name, kind, list(values)))
        return cls(tuple(conditions), frozenset(str(i) for i in (exclude or ())))

    @classmethod
    def parse(cls, texts: list[str] | None, exclude=None, *, fields: dict[str, str]) -> "Where":
        """From the HTTP and CLI form: each text `field=value`, `field=a|b|c`, `field<n`, `field<=n`,
        `field>n` or `field>=n`; conditions on one field are joined (a range from two bounds)."""
        where: dict = {}
        for text in texts or ():
            found = _TEXT.match(text)
            if not found or not found.group(3).strip():
                raise BadFilter(f"filter {text[:100]!r}: expected FIELD=VALUE, FIELD=A|B, FIELD<N, FIELD<=N, FIELD>N "
                                f"or FIELD>=N (e.g. category=Shoes, price<100)")
            name, op, value = found.group(1), found.group(2), found.group(3).strip()
            if op == "=":
                if isinstance(where.get(name), dict):
                    raise BadFilter(f"filter on {name!r}: a value and a range together; give one")
                where[name] = [v.strip() for v in value.split("|")] if "|" in value else value
            else:
                bounds = where.setdefault(name, {})
                if not isinstance(bounds, dict):
                    raise BadFilter(f"filter on {name!r}: a value and a range together; give one")
                bounds[{"<": "lt", "<=": "lte", ">": "gt", ">=": "gte"}[op]] = value
        return cls.build(where, exclude, fields=fields)


def _kind(name: str, fields: dict[str, str]) -> str:
    if name not in fields:
        indexed = ", ".join(sorted(fields)) or "none (set publish.indexed_fields and refresh)"
        raise BadFilter(f"cannot filter on {name!r}: it is not an indexed field of this version; indexed: {indexed}")
    return fields[name]


def _range(name: str, kind: str, bounds: dict) -> Condition:
    if kind not in ("integer", "float"):
        raise BadFilter(f"filter on {name!r}: a range needs a numeric field; {name!r} is {kind}, give a value or values")
    unknown = set(bounds) - set(RANGES)
    if unknown or not bounds:
        raise BadFilter(f"filter on {name!r}: a range takes {', '.join(RANGES)}, got {sorted(map(str, bounds)) or 'nothing'}")
    return Condition(name, kind, **{op: _number(name, v) for op, v in bounds.items()})


def _any_of(name: str, kind: str, values: list) -> Condition:
    if not values:
        raise BadFilter(f"filter on {name!r}: no value given")
    if kind == "float":  # the store matches floats by range only: equality is the range [v, v]
        if len(values) > 1:
            raise BadFilter(f"filter on {name!r}: a float field takes one value or a range, not a set")
        v = _number(name, values[0])
        return Condition(name, kind, gte=v, lte=v)
    return Condition(name, kind, any_of=tuple(dict.fromkeys(_value(name, kind, v) for v in values)))


def _number(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise BadFilter(f"filter on {name!r}: expected a number, got {str(value)[:50]!r}")
    return number


def _value(name: str, kind: str, value):
    """A value as the field's kind stores it (a text from a URL: "3" for an integer field, "true" for a bool)."""
    try:
        return _typed(value, kind)
    except (TypeError, ValueError):
        raise BadFilter(f"filter on {name!r}: expected {({'integer': 'a whole number', 'bool': 'true or false'}).get(kind, kind)}, "
                        f"got {str(value)[:50]!r}") from None


def _typed(value, kind: str):
    if kind == "keyword":
        return str(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() not in ("true", "false"):
            raise ValueError(value)
        return str(value).lower() == "true"
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value.strip() if isinstance(value, str) else value)


def _stored_kind(value) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "integer"
    return "keyword" if isinstance(value, str) else None


def published_value(text: str, kind: str):
    """A catalog value (ingest keeps metadata as text) as an indexed field of `kind` holds it, as
    `indexed_columns` publishes it; ValueError when it is not one (an item added during the day,
    recommend/serving/intake.py)."""
    value = _typed(text.strip(), kind)
    if kind == "float" and not math.isfinite(value):
        raise ValueError(text)
    return int(value) if kind == "bool" else value


def stored_value(value, kind: str):
    """A metadata value as an indexed field of `kind` is published (a bool as 1/0; see INDEX)."""
    if kind == "bool" and isinstance(value, bool):
        return int(value)
    return value


def indexed_columns(frame, names) -> tuple[dict[str, str], dict[str, list]]:
    """({name: kind}, {name: values as published}) of the catalog's indexed columns `names`. Ingest
    keeps metadata as text (recommend/embedder ingest: one type whatever the file format), so a text
    column whose every value is a whole number, a number or true/false is published as that kind
    (a bool as 1/0), a range filter can then compare it; missing values are None. A column of no
    indexable kind (a date) is a RecsError."""
    import pandas as pd

    kinds, values = {}, {}
    for name in names:
        column = frame[name]
        kind = field_kind(column.dtype)
        if kind is None:
            raise RecsError(f"publish.indexed_fields: items column {name!r} is {column.dtype}; a filter takes "
                            f"text, whole numbers, numbers or true/false")
        given = [None if not isinstance(v, (list, tuple)) and pd.isna(v) else v for v in column.tolist()]
        if kind == "keyword":
            kind = _text_kind([v for v in given if v is not None])
            if kind != "keyword":
                values[name] = [None if v is None else _typed(str(v).strip(), kind) for v in given]
        elif kind == "bool":
            values[name] = given
        kinds[name] = kind
        if kind == "bool":
            values[name] = [None if v is None else int(v) for v in values[name]]
    return kinds, values


_WHOLE, _BOOL = re.compile(r"^[+-]?(0|[1-9][0-9]*)$"), {"true", "false"}
_DECIMAL = re.compile(r"^[+-]?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$")


def _text_kind(values: list) -> str:
    """The kind every one of a text column's values has: integer, float, bool, or keyword."""
    texts = [str(v).strip() for v in values]
    if not texts or any(isinstance(v, (list, tuple)) for v in values):
        return "keyword"
    if all(t.lower() in _BOOL for t in texts):
        return "bool"
    if all(_WHOLE.match(t) for t in texts):
        return "integer"
    return "float" if all(_DECIMAL.match(t) for t in texts) else "keyword"  # "007" is a code, not a number


def field_kind(dtype) -> str | None:
    """The index kind of a catalog column's pandas dtype (None: none of the kinds; a text column is a keyword)."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "integer"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    if pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype):
        return "keyword"
    return None


def edge_filter(where: Where | None, exclude_points=()):
    """`where`'s conditions as Qdrant's engine filter (qdrant_edge), `exclude_points` (point ids)
    left out; None when there is nothing to filter."""
    import qdrant_edge as q

    return _engine_filter(where, exclude_points, q.Filter, q.FieldCondition, q.MatchValue, q.MatchAny, q.RangeFloat,
                          lambda ids: q.HasIdCondition(set(ids)))


def client_filter(where: Where | None, exclude_points=()):
    """The same for a Qdrant server (qdrant_client's models)."""
    from qdrant_client import models as m

    return _engine_filter(where, exclude_points, m.Filter, lambda key, match=None, range=None: m.FieldCondition(
                              key=key, match=match, range=range),
                          lambda v: m.MatchValue(value=v), lambda vs: m.MatchAny(any=vs),
                          lambda **bounds: m.Range(**bounds), lambda ids: m.HasIdCondition(has_id=list(ids)))


def _engine_filter(where, exclude_points, Filter, FieldCondition, MatchValue, MatchAny, Range, HasId):
    must = []
    for c in where.conditions if where else ():
        values = [stored_value(v, c.kind) for v in c.any_of]
        if c.is_range:
            must.append(FieldCondition(c.field, range=Range(gt=c.gt, gte=c.gte, lt=c.lt, lte=c.lte)))
        elif len(values) == 1:
            must.append(FieldCondition(c.field, match=MatchValue(values[0])))
        else:
            must.append(FieldCondition(c.field, match=MatchAny(values)))
    exclude_points = list(exclude_points)
    if not must and not exclude_points:
        return None
    return Filter(must=must or None, must_not=[HasId(exclude_points)] if exclude_points else None)
