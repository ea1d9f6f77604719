"""The item text template's syntax: which fields it names. Without pandas or numpy, so that the config
validates a template at load without importing them (embedder/text.py renders it)."""

from __future__ import annotations

import string


def template_fields(template: str) -> list[str]:
    """The field names a template refers to, in order: ``"{title}. {genres}"`` -> ``["title", "genres"]``."""
    fields = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in fields:
            if not name.isidentifier():
                raise ValueError(f"template field {{{name}}} must be a plain column name")
            fields.append(name)
    return fields
