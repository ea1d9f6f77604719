"""What each stage of a refresh is given: a plan, built once from the config when the run starts.

No stage sees the whole `Config`. `plan_run` resolves what needs resolving once (the model: its folder,
fingerprint and precision) and raises ConfigError (exit 2) for what cannot run, before any work.

Example:
    plan = plan_run(load_config("config.yaml"))
    plan.embed.model.precision, plan.lists.job.k, plan.publish.storage(n_items=3000).shards
"""

from __future__ import annotations

from dataclasses import dataclass

from embedder.encode import ResolvedModel, resolve_model
from embedder.model import ModelNotFound
from index.settings import IndexSettings
from recommend.config import Config, ConfigError, StageSettings, stage_settings
from recommend.quality.gate import GateSettings
from recommend.ranking.settings import BlendSettings, ListsSettings, RankingSettings
from recommend.run.tasks.list_tasks import ListJob
from recommend.run.tasks.publish_tasks import Target
from recommend.serving.publish import Storage
from recommend.serving.settings import PublishSettings
from recommend.serving.shards import Graph


@dataclass(frozen=True)
class IngestPlan:
    sources: StageSettings        # the inputs as the embedder reads them, and their mappings
    block_size: int               # users per event block (about)
    max_bad_fraction: dict        # input name -> the share of quarantined rows that stops the run
    sections: dict                # input name -> its config section (dumped), for the manifest


@dataclass(frozen=True)
class EmbedPlan:
    model: ResolvedModel
    cache_root: str


@dataclass(frozen=True)
class GatePlan:
    settings: GateSettings
    ranking: RankingSettings
    prefix: str                   # the store's, where the live version's figures are read


@dataclass(frozen=True)
class ListsPlan:
    lists: ListsSettings
    index: IndexSettings
    blend: BlendSettings
    ranking: RankingSettings

    @property
    def job(self) -> ListJob:
        return ListJob(self.lists.k, self.blend.new_item_slots, self.blend.new_item_boost, self.lists.keep)


@dataclass(frozen=True)
class PublishPlan:
    settings: PublishSettings
    metadata: tuple[str, ...]     # the catalog's columns carried in the item points
    model: str                    # as configured, recorded in the version
    k: int

    def storage(self, n_items: int, fields: dict[str, str] | None = None) -> Storage:
        """How the version is stored: with an HNSW graph over the items' text vectors from
        `graph_min_items` items on, and a payload index on each of `fields` ({name: kind})."""
        pc = self.settings
        graph = Graph(pc.hnsw_m if n_items >= pc.graph_min_items else 0, pc.hnsw_ef_construct)
        return Storage(pc.shards, pc.replicas, pc.vectors_on_disk, pc.payload_on_disk, graph, batch_size=pc.batch_size,
                       parallel=pc.parallel, index_wait_s=pc.index_wait_s, keep=pc.keep_versions,
                       fields=tuple((fields or {}).items()))

    def target(self, on_workers: bool) -> Target:
        """Where the points go from: the workers (a server by URL), or this process."""
        pc = self.settings
        return Target(url=pc.url if on_workers else None, api_key_env=pc.api_key_env, batch_size=pc.batch_size,
                      parallel=pc.parallel)


@dataclass(frozen=True)
class RunPlan:
    ingest: IngestPlan
    embed: EmbedPlan
    gate: GatePlan
    lists: ListsPlan
    publish: PublishPlan


def plan_run(config: Config) -> RunPlan:
    """Every stage's plan from one config; ConfigError when the model is missing or its precision
    cannot run on the device."""
    try:
        model = resolve_model(config.embed)
    except ModelNotFound as exc:
        raise ConfigError(f"{config.source_file}: embed.model: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{config.source_file}: embed.precision: {exc}") from None
    settings = stage_settings(config)
    inputs = {"items": config.items, "events": config.events, "users": config.users}
    ingest = IngestPlan(settings, config.lists.block_size,
                        {name: section.max_bad_fraction for name, section in inputs.items() if section is not None},
                        {name: section.model_dump() if section is not None else None for name, section in inputs.items()})
    return RunPlan(
        ingest=ingest,
        embed=EmbedPlan(model, config.cache_root),
        gate=GatePlan(config.gate, settings.ranking, config.publish.prefix),
        lists=ListsPlan(config.lists, config.index, config.blend, settings.ranking),
        publish=PublishPlan(config.publish, tuple(config.items.metadata), config.embed.model, config.lists.k))
