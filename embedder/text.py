"""Item text: render the configured template from a record, then normalise it.

Normalisation is part of the cache key (see `PREPROCESSING_VERSION`): change what it does and bump
the version, so that no vector computed from differently normalised text is reused.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pandas as pd

from embedder.template import template_fields  # noqa: F401 (re-exported: the ingest renders with it)

PREPROCESSING_VERSION = "1"

_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Unicode NFC, every run of whitespace (newlines, tabs, NBSP) to one space, stripped.

    Example: ``normalize_text("Cafe\\u0301\\n  au  lait ")`` -> ``"Café au lait"``
    """
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def render_text(template: str, record: dict) -> str:
    """Fill the template with the record's values, each normalised (missing or null values render as
    empty), then normalise the whole."""
    values = {}
    for name in template_fields(template):
        value = record.get(name)
        if isinstance(value, (list, tuple, np.ndarray)):  # a JSON or Parquet list: ["Drama", "War"] -> "Drama, War"
            value = ", ".join(str(v) for v in value if not _is_blank(v))
        values[name] = "" if _is_blank(value) else normalize_text(str(value))  # "Title " -> "Title"
    return normalize_text(template.format(**values))


def is_null(value) -> bool:
    """None, NaN, pd.NA or NaT (a scalar; lists, arrays and other objects are not null)."""
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _is_blank(value) -> bool:
    """Null, a string of whitespace, or a list of those."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return all(_is_blank(v) for v in value)
    return not value.strip() if isinstance(value, str) else is_null(value)


def has_content(template: str, record: dict) -> bool:
    """True when at least one field the template uses has non-blank text."""
    return any(not _is_blank(record.get(name)) for name in template_fields(template))
