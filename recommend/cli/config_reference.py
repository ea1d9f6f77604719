"""Every setting of config.yaml with its default and what it does, written from the config models
themselves (docs/configuration.md is this module's output; tests/test_docs.py holds them equal).

    .venv/bin/python -m recommend.cli.config_reference > docs/configuration.md
"""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from recommend.config import Config


def settings(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, object, str]]:
    """(dotted key, default, description) of every setting, in the models' order."""
    out = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        args = typing.get_args(field.annotation) or (field.annotation,)
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested and typing.get_origin(field.annotation) is not dict:
            out += settings(nested[0], f"{prefix}{name}.")
            continue
        default = field.default_factory() if field.default_factory else field.default
        out.append((prefix + name, None if default is PydanticUndefined else default, field.description or ""))
        if nested:  # a mapping of named sections (items.extra_text.<name>): their keys too
            out += settings(nested[0], f"{prefix}{name}.<name>.")
    return out


def _shown(default) -> str:
    if default is None:
        return "–"
    return f"`{default!r}`" if not isinstance(default, bool) else f"`{str(default).lower()}`"


def reference() -> str:
    lines = ["# Configuration reference", "",
             "Every key of `config.yaml`, its default and what it does, written from the config models",
             "(`.venv/bin/python -m recommend.cli.config_reference > docs/configuration.md`). `items`, `events`,",
             "`users` and each `items.extra_text.<name>` share the file keys (`path`, `format`, `delimiter`, ...).",
             "Required keys have no default (–). A wrong key or value exits with code 2, naming it.", "",
             "| key | default | what it does |", "|---|---|---|"]
    for key, default, description in settings():
        lines.append(f"| `{key}` | {_shown(default)} | {description.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
