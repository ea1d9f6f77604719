"""What the ingest reads and how: a source's files and format, and how catalog columns become items.
Plain frozen dataclasses with no heavy imports (the config maps its sections to them)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    limits: "ReadLimits" = None  # None: ReadLimits()

    def __post_init__(self):
        if self.limits is None:
            object.__setattr__(self, "limits", ReadLimits())


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what one file may hold, so that no file's shape can take unbounded memory or time:
    past them a row is quarantined, or the file refused in one line naming the limit. Far above any
    real catalog or event log (config: <source>.max_columns, max_field_chars, max_nesting)."""

    max_columns: int = 1_000            # a header, Parquet schema or the union of a JSON file's keys
    max_field_chars: int = 16 * 2**20   # a CSV field, or a whole JSON line
    max_nesting: int = 32               # lists and objects inside one JSON line


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


@dataclass(frozen=True)
class EventMapping:
    """How event columns become events: the source column of each field (user_id, item_id,
    timestamp, event_type; None where absent), each event type's weight, and the time zone of naive
    timestamps."""

    columns: dict  # field -> source column or None
    weights: dict  # event type -> weight
    timezone: str = "UTC"
