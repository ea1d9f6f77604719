"""config.yaml: validated once, at load. Every error names the file, the key and what is allowed.

Relative paths are resolved against the config file's folder, so `recs` works from any directory.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from embedder.errors import RecsError


class ConfigError(RecsError):
    """config.yaml is unusable: unknown key, wrong type, missing input. Exit code 2."""

    exit_code = 2


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileConfig(Section):
    path: str = Field(description="a file, glob or fsspec URL (s3://, gs://, ...)")
    format: Literal["parquet", "csv", "jsonl"] | None = None
    delimiter: str = Field(",", min_length=1)
    quotechar: str = Field('"', min_length=1, max_length=1)
    encoding: str = "utf-8"
    columns: list[str] | None = Field(None, description="column names for a CSV file without a header row")

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
    separator: str = ", "
    max_values: int = Field(50, ge=1)


class ItemsConfig(SourceConfig):
    id: str = "item_id"
    text: str = "{title}. {description}"
    metadata: list[str] = Field(default_factory=list, description="columns copied into the published payload")
    list_separators: dict[str, str] = Field(default_factory=dict, description="column -> separator of a list value, e.g. genres: '|'")
    flags: dict[str, list[str]] = Field(default_factory=dict, description="field -> one-hot columns, rendered as the names of those set")
    extra_text: dict[str, ExtraTextConfig] = Field(default_factory=dict, description="field -> a one-to-many source folded into the text")
    newest_by: str | None = Field(None, description="when an id repeats, keep the row with the largest value here; default: the last row")
    max_text_chars: int = Field(10_000, ge=100, description="longer item texts are cut to this many characters and counted in the report "
                                "(the model reads only its first 256 tokens, about 1,000-1,500 characters)")

    @field_validator("text")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        from embedder.text import template_fields

        try:
            if not template_fields(value):
                raise ValueError("names no field; use {column} placeholders, e.g. '{title}. {description}'")
        except ValueError as exc:
            raise ValueError(f"template {value!r}: {exc}") from None
        return value


class EventsConfig(SourceConfig):
    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    event_type: str | None = "event_type"
    weights: dict[str, float] = Field(default_factory=lambda: {"view": 1.0, "cart": 3.0, "purchase": 5.0})
    timezone: str = "UTC"

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
    id: str = "user_id"


class EmbedConfig(Section):
    model: str = "all-MiniLM-L6-v2"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto", description="auto: fp16 on a GPU, bf16 on a CPU with bf16 instructions, else fp32; checked "
                            "against fp32 on a sample (mean cosine >= 0.99) before use")
    batch_size: int = Field(64, ge=1)
    chunk_size: int = Field(1024, ge=1, description="texts per Dask task (sorted by length before cutting)")
    cache: str | None = Field(None, description="embedding cache path or URL; default <workdir>/cache")


class IndexConfig(Section):
    kind: str = Field("auto", description="auto (exact below exact_below, HNSW32,SQbf16 above) | exact | a FAISS factory string such as HNSW32 or IVF1024,SQfp16")
    exact_below: int = Field(50_000, ge=1)
    target_recall: float | None = Field(0.95, gt=0, le=1, description="tune the search depth (IVF nprobe, HNSW efSearch) "
                                        "to this recall@k against exact search on a sample; null: use search_depth")
    search_depth: int | None = Field(None, ge=1, description="a fixed nprobe / efSearch when target_recall is null")
    exact_fallback_below: int = Field(100_000, ge=1, description="when no depth reaches target_recall: exact search "
                                      "below this many items, else the depth where recall stops growing (reported)")


class ListsConfig(Section):
    k: int = Field(10, ge=1, le=1000)
    half_life_days: float = Field(14.0, gt=0)


class BlendConfig(Section):
    """How lists blend behaviour (learned from events), text and popularity; see recommend/blend.py.
    The defaults come from `recs eval` on ml-latest-small (README, "Quality")."""

    behaviour_weight: float = Field(0.95, ge=0, le=1, description="share of behaviour vs text in the score; 0 = text only")
    popularity_weight: float = Field(0.3, ge=0, description="pull towards popular items for users with little history")
    few_events: float = Field(5.0, gt=0, description="a user with this many items leans half on popularity")
    factors: int = Field(256, ge=1, description="rank of the behaviour model (low-rank EASE)")
    factor_memory_mb: float | None = Field(1024, gt=0, description="lower the rank to what fits in this much memory "
                                           "(256 stands up to ~130k users and items); null: no limit")
    l2: float = Field(200.0, gt=0, description="the behaviour model's regularisation (EASE lambda)")
    cold_damping: float = Field(0.5, ge=0, le=1, description="weight of text-predicted behaviour for items with no events")
    new_item_slots: int = Field(1, ge=0, description="last places of a user's list kept for the best-matching items with no events yet")


class GateConfig(Section):
    """Before publishing, lists rebuilt without each user's most recent events are scored on them."""

    enabled: bool = True
    holdout: float = Field(0.1, gt=0, lt=1, description="share of each user's most recent items held out")
    k: int = Field(10, ge=1)
    min_ndcg: float = Field(0.0, ge=0, le=1, description="the floor: below it nothing is published")
    min_vs_popularity: float = Field(0.5, ge=0, description="nDCG must reach this multiple of the popularity baseline's")
    max_drop: float = Field(0.2, ge=0, le=1, description="stop when nDCG is this share below the live version's")
    max_users: int = Field(20_000, ge=1, description="users scored (a seeded sample above this)")


class DaskConfig(Section):
    address: str | None = Field(None, description="an existing scheduler; default: a LocalCluster")
    n_workers: int | None = Field(None, ge=1)
    threads_per_worker: int | None = Field(None, ge=1, description="default: 1 on CPU workers, 2 on GPU workers")


class PublishConfig(Section):
    enabled: bool = Field(True, description="false: build lists and run artifacts, publish nothing (dry runs, scale tests)")
    url: str | None = Field(None, description="Qdrant server URL; default: local mode under <workdir>/qdrant")
    api_key_env: str = "QDRANT_API_KEY"
    prefix: str = Field("recs", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    keep_versions: int = Field(3, ge=1)
    batch_size: int = Field(256, ge=1)
    parallel: int = Field(1, ge=1, description="upload processes for a Qdrant server (local mode writes in one)")
    index_wait_s: float = Field(600, gt=0, description="how long to wait for a server to index a new version before failing")


class Config(Section):
    workdir: str = ".recs"
    items: ItemsConfig
    events: EventsConfig
    users: UsersConfig | None = None
    embed: EmbedConfig = EmbedConfig()
    index: IndexConfig = IndexConfig()
    lists: ListsConfig = ListsConfig()
    blend: BlendConfig = BlendConfig()
    gate: GateConfig = GateConfig()
    dask: DaskConfig = DaskConfig()
    publish: PublishConfig = PublishConfig()
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
    return f"{path}: {key}: {error['msg']} (got {error.get('input')!r})"


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
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data or {}, str(path), path.resolve().parent, check_inputs)
