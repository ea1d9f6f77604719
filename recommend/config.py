"""config.yaml: validated once, at load. Every error names the file, the key and what is allowed.

Each section is the settings model of the stage that uses it, defined there once (`embed`:
embedder/settings.py, `index`: index/settings.py, `blend` and `lists`: recommend/ranking/settings.py,
`gate`: recommend/quality/gate.py, `publish` and `serve`: recommend/serving/settings.py);
the input sections and `dask` are defined here. `stage_settings` is the one adapter from the sections
to what the stages take. Relative paths are resolved against the config file's folder, so `recs`
works from any directory.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from embedder.errors import RecsError
from embedder.settings import EmbedSettings
from embedder.specs import EventMapping, ExtraText, ItemMapping, ReadLimits, SourceSpec
from index.settings import IndexSettings
from recommend.quality.gate import GateSettings
from recommend.ranking.settings import BlendSettings, ListsSettings, RankingSettings
from recommend.serving.settings import PublishSettings, ServeSettings


class ConfigError(RecsError):
    """config.yaml is unusable: unknown key, wrong type, missing input. Exit code 2."""

    exit_code = 2


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no setting means NaN or infinity


class FileConfig(Section):
    path: str = Field(description="a file, glob or fsspec URL (s3://, gs://, ...)")
    format: Literal["parquet", "csv", "jsonl"] | None = Field(None, description="default: from each file's extension "
                                                                               "(.parquet, .csv/.tsv, .jsonl/.ndjson/.json)")
    delimiter: str = Field(",", min_length=1, description="a CSV file's field separator")
    quotechar: str = Field('"', min_length=1, max_length=1, description="a CSV file's quote character")
    encoding: str = Field("utf-8", description="the text files' encoding (utf-8, latin-1, cp1252, utf-16, ...)")
    columns: list[str] | None = Field(None, description="column names for a CSV file without a header row")
    # limits no real input meets, so that no file's shape takes unbounded memory or time (README, "Input limits")
    max_columns: int = Field(ReadLimits.max_columns, ge=1, le=1_000_000,
                             description="a file with more columns is refused; a JSON line that would add more is quarantined")
    max_field_chars: int = Field(ReadLimits.max_field_chars, ge=1_000, le=2**31 - 1,
                                 description="a CSV field or JSON line longer than this is quarantined")
    max_nesting: int = Field(ReadLimits.max_nesting, ge=1, le=500,
                             description="a JSON line nesting lists and objects deeper than this is quarantined")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r} (e.g. utf-8, latin-1, cp1252)") from None
        return value


class SourceConfig(FileConfig):
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="above this share of quarantined rows the run stops before publishing")


class ExtraTextConfig(FileConfig):
    id: str = Field(description="the column holding the item id")
    column: str = Field(description="the column whose values are folded into the field")
    separator: str = Field(", ", description="joins the values in the field")
    max_values: int = Field(50, ge=1, description="values kept per item (first seen, without repeats)")


class ItemsConfig(SourceConfig):
    id: str = Field("item_id", description="the column holding the item id")
    text: str = Field("{title}. {description}", description="the text encoded for each item: a template over columns")
    metadata: list[str] = Field(default_factory=list, description="columns copied into the published payload")
    list_separators: dict[str, str] = Field(default_factory=dict, description="column -> separator of a list value, e.g. genres: '|'")
    flags: dict[str, list[str]] = Field(default_factory=dict, description="field -> one-hot columns, rendered as the names of those set")
    extra_text: dict[str, ExtraTextConfig] = Field(default_factory=dict, description="field -> a one-to-many source folded into the text")
    newest_by: str | None = Field(None, description="when an id repeats, keep the row with the largest value here; default: the last row")
    max_text_chars: int = Field(ItemMapping.max_text_chars, ge=100,
                                description="longer item texts are cut to this many characters and counted in the report "
                                "(the model reads only its first 256 tokens, about 1,000-1,500 characters)")

    @field_validator("text")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        from embedder.template import template_fields  # not embedder.text: it imports pandas, slow for a config load

        try:
            if not template_fields(value):
                raise ValueError("names no field; use {column} placeholders, e.g. '{title}. {description}'")
        except ValueError as exc:
            raise ValueError(f"template {value!r}: {exc}") from None
        return value


class EventsConfig(SourceConfig):
    user_id: str = Field("user_id", description="the column holding the user id")
    item_id: str = Field("item_id", description="the column holding the item id")
    timestamp: str = Field("timestamp", description="the column holding when: epoch seconds or ms, or ISO 8601")
    event_type: str | None = Field("event_type", description="the column holding the event's type; null: every event "
                                                              "is of type 'default'")
    weights: dict[str, float] = Field(default_factory=lambda: {"view": 1.0, "cart": 3.0, "purchase": 5.0},
                                      description="event type -> how much it counts (finite, >= 0); types not "
                                                  "listed are quarantined")
    timezone: str = Field("UTC", description="the zone of timestamps that carry none (an IANA name)")

    @field_validator("weights")
    @classmethod
    def _usable_weights(cls, value: dict[str, float]) -> dict[str, float]:
        for name, weight in value.items():
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"the weight of {brief(name)} must be a finite number >= 0 (0 leaves that event "
                                 f"type out), got {weight}")
        if value and not any(w > 0 for w in value.values()):
            raise ValueError("every weight is 0: no event would count; give at least one event type a weight above 0")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(value)
        except Exception:
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as 'UTC' or 'Europe/Paris')") from None
        return value


class UsersConfig(SourceConfig):
    id: str = Field("user_id", description="the column holding the user id")


class RunsSettings(Section):
    """What is kept of past runs under <workdir>/runs/."""

    keep: int = Field(10, ge=1, description="run folders kept: the newest N (failed ones too), plus every run "
                                            "behind a published version")


class DaskSettings(Section):
    """The cluster a refresh runs on (recommend/run/infra/cluster.py)."""

    address: str | None = Field(None, description="an existing scheduler; default: a LocalCluster")
    n_workers: int | None = Field(None, ge=1, description="local workers; default: one per core (one per GPU)")
    threads_per_worker: int | None = Field(None, ge=1, description="default: 1 on CPU workers, 4 on GPU workers")


class Config(Section):
    workdir: str = Field(".recs", description="runs/, cache/, store/ and the refresh lock live here")
    runs: RunsSettings = RunsSettings()
    items: ItemsConfig
    events: EventsConfig
    users: UsersConfig | None = None
    embed: EmbedSettings = EmbedSettings()
    index: IndexSettings = IndexSettings()
    lists: ListsSettings = ListsSettings()
    blend: BlendSettings = BlendSettings()
    gate: GateSettings = GateSettings()
    dask: DaskSettings = DaskSettings()
    publish: PublishSettings = PublishSettings()
    serve: ServeSettings = ServeSettings()
    source_file: str | None = Field(None, exclude=True)

    @property
    def cache_root(self) -> str:
        return self.embed.cache or str(Path(self.workdir) / "cache")


def _resolve(path: str, base: Path) -> str:
    if "://" in path:
        return path
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else (base / p).resolve())


def _allowed(model: type[BaseModel], loc: tuple) -> list[str]:
    """Keys allowed at `loc` (the parent of an unknown key)."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


def _describe(error: dict, path: str) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p in ("str", "float", "int")))
    key = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        allowed = [k for k in _allowed(Config, loc[:-1]) if k != "source_file"]
        return f"{path}: unknown key {key!r} (allowed here: {', '.join(allowed)})"
    if error["type"] == "missing":
        return f"{path}: missing required key {key!r}"
    return f"{path}: {key}: {brief(error['msg'], 300, text=True)} (got {brief(error.get('input'))})"


def brief(value, limit: int = 80, text: bool = False) -> str:
    """A value as an error message shows it: its repr (`text`: the string itself) on one line, cut to
    `limit` characters (a pasted file, or an alias expanded a million times, is never echoed whole)."""
    text = " ".join(str(value).split("\n")) if text else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


MAX_CONFIG_VALUES = 100_000  # values in a config once YAML aliases are expanded; a real one has a few hundred


def _expanded_size(data, limit: int = MAX_CONFIG_VALUES) -> int:
    """How many values `data` holds with every YAML alias expanded, counted up to `limit` (an alias
    bomb, a few lines of YAML that expand to billions of values, stops the count at once)."""
    count, stack = 0, [data]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


def parse_config(data: dict, path: str = "<config>", base: Path | None = None, check_inputs: bool = True) -> Config:
    """Validate a config mapping; resolve relative paths against `base`; check input paths exist."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (items, events, ...), got {type(data).__name__}")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(e, path) for e in exc.errors())) from None
    base = base or Path.cwd()
    config.workdir = _resolve(config.workdir, base)
    if Path(config.workdir).exists() and not Path(config.workdir).is_dir():
        raise ConfigError(f"{path}: workdir: {config.workdir} exists and is not a folder (the refresh keeps its runs, "
                          f"cache and store in it): point workdir at a folder")
    if unknown := [f for f in config.publish.indexed_fields if f not in config.items.metadata]:
        raise ConfigError(f"{path}: publish.indexed_fields: {', '.join(map(repr, unknown))} not in items.metadata "
                          f"({', '.join(config.items.metadata) or 'empty'}): only published metadata can be filtered on")
    if config.embed.cache:
        config.embed.cache = _resolve(config.embed.cache, base)
    sources = [(name, getattr(config, name)) for name in ("items", "events", "users")]
    sources += [(f"items.extra_text.{name}", extra) for name, extra in config.items.extra_text.items()]
    for name, source in sources:
        if source is None:
            continue
        source.path = _resolve(source.path, base)
        if check_inputs and "://" not in source.path and not glob.glob(source.path):
            raise ConfigError(f"{path}: {name}.path: no file matches {source.path!r}"
                              + (" (make the sample with: recs sample data/sample)" if "sample" in source.path else ""))
    model = config.embed.model
    if "/" in model and not model.startswith("sentence-transformers/"):
        config.embed.model = _resolve(model, base)
    config.source_file = path
    return config


def load_config(path: str | Path = "config.yaml", check_inputs: bool = True) -> Config:
    """Read and validate config.yaml. Raises ConfigError (exit code 2) naming the key or path.

    Example: ``config = load_config("config.yaml"); config.lists.k`` -> 10
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass --config PATH)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {brief(exc, 500, text=True)}") from None
    if _expanded_size(data) > MAX_CONFIG_VALUES:
        raise ConfigError(f"{path}: holds more than {MAX_CONFIG_VALUES:,} values once its YAML aliases (*name) are "
                          f"expanded; a config holds a few hundred: write the values out")
    return parse_config(data or {}, str(path), path.resolve().parent, check_inputs)


# ---- the adapter: config sections -> the settings each stage takes ------------------------------------

@dataclass(frozen=True)
class StageSettings:
    """What each stage takes, from one config. The sections that are a stage's own settings model
    (embed, index, gate, publish, dask) are passed as they are."""

    items: SourceSpec
    item_mapping: ItemMapping
    events: SourceSpec
    event_mapping: EventMapping  # columns, weights by event type, time zone
    users: SourceSpec | None
    user_id_column: str | None
    ranking: RankingSettings


def source_spec(section: FileConfig, key: str) -> SourceSpec:
    """A file section as the embedder's SourceSpec; `key` names it in error messages."""
    return SourceSpec(section.path, f"{key}.path", section.format, section.delimiter, section.encoding,
                      tuple(section.columns) if section.columns else None, section.quotechar,
                      ReadLimits(section.max_columns, section.max_field_chars, section.max_nesting))


def event_weights(events: EventsConfig) -> dict[str, float]:
    """Weights by event type; without an event_type column every event is of type 'default'."""
    return dict(events.weights) if events.event_type else {"default": events.weights.get("default", 1.0)}


def stage_settings(config: Config) -> StageSettings:
    """The one mapping from config sections to stage settings (the refresh, `recs eval`, notebooks)."""
    ic, ec = config.items, config.events
    extras = {name: ExtraText(source_spec(x, f"items.extra_text.{name}"), x.id, x.column, x.separator, x.max_values)
              for name, x in ic.extra_text.items()}
    mapping = ItemMapping(ic.id, ic.text, tuple(ic.metadata), dict(ic.list_separators), dict(ic.flags), extras,
                          ic.newest_by, ic.max_text_chars)
    return StageSettings(
        items=source_spec(ic, "items"), item_mapping=mapping, events=source_spec(ec, "events"),
        event_mapping=EventMapping({"user_id": ec.user_id, "item_id": ec.item_id, "timestamp": ec.timestamp,
                                    "event_type": ec.event_type}, event_weights(ec), ec.timezone),
        users=source_spec(config.users, "users") if config.users else None,
        user_id_column=config.users.id if config.users else None,
        ranking=RankingSettings(weights=event_weights(ec), half_life_days=config.lists.half_life_days, blend=config.blend))
