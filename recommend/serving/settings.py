"""The serving side's settings: the config's `publish` and `serve` sections, defined once here (no heavy imports)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PublishSettings(BaseModel):
    """Where and how versions are published (config: the `publish` section)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="false: build lists and run artifacts, publish nothing (dry runs, scale tests)")
    url: str | None = Field(None, description="Qdrant server URL; default: the embedded store (Qdrant's engine "
                                               "in-process) under <workdir>/store")
    api_key_env: str = Field("QDRANT_API_KEY", description="the environment variable holding the server's API key")
    prefix: str = Field("recs", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$",
                        description="names the store's folder (embedded) or its collections and aliases (server)")
    keep_versions: int = Field(3, ge=1, description="versions kept for rollback; never the live one or the one before")
    batch_size: int = Field(256, ge=1, description="points per upload request to a Qdrant server")
    parallel: int = Field(1, ge=1, description="upload processes for a Qdrant server when the driver uploads "
                                                 "(the embedded store writes a task per shard)")
    upload_on_workers: bool = Field(True, description="with a server URL and Dask workers: each lists part is "
                                                      "uploaded by a task on a worker, in parallel (false: the driver "
                                                      "uploads them all); the workers need the API key variable too")
    shards: int | None = Field(None, ge=1, le=256, description="shards of the items and of the users each: on a "
                                                              "server Qdrant's shard_number (default: the "
                                                              "server's); embedded, this many item, text and user "
                                                              "shards, one task each (default: one per Dask worker)")
    replicas: int | None = Field(None, ge=1, description="copies of each shard on a cluster (replication_factor); "
                                                        "default: the server's")
    vectors_on_disk: bool = Field(False, description="a server keeps the vectors in memory-mapped files, not in RAM")
    payload_on_disk: bool | None = Field(None, description="a server keeps payloads on disk (on_disk_payload); "
                                                           "default: the server's")
    index_wait_s: float = Field(600, gt=0, description="how long to wait for a server to index a new version before failing")
    hnsw_m: int = Field(16, ge=0, le=64, description="embedded store: edges per node of the HNSW graph over the items' "
                                                   "text vectors (int8-quantized, rescored with the originals) that text "
                                                   "search uses from graph_min_items items on (on a first publish, built after "
                                                   "the switch: text search scans exactly until then); 0: never a graph")
    graph_min_items: int = Field(50_000, ge=0, description="embedded store: below this many items text search scans every "
                                                           "item exactly and no graph is built (a scan of that few is "
                                                           "quick, and the graph adds build time to every publish)")
    indexed_fields: list[str] = Field(default_factory=list, description="item metadata columns (items.metadata) that "
                                      "queries may filter on (where=..., --where, ?where=): each gets a payload index "
                                      "(keyword, integer, float or bool: a column whose every value is a "
                                      "whole number, a number or true/false is published as one)")
    hnsw_ef_construct: int = Field(64, ge=8, le=512, description="embedded store: candidates while building that graph")


class ServeSettings(BaseModel):
    """`recs serve` (config: the `serve` section). The first four are the ones to look at; the rest
    bound what one client can cost the service."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0 for every interface")
    port: int = Field(8000, ge=0, le=65535, description="0: any free port")
    api_key_env: str = Field("RECS_API_KEY", description="when this environment variable is set, every route but "
                                                         "/health needs 'Authorization: Bearer <its value>'")
    workers: int = Field(1, ge=1, description="server processes; each opens the live version itself (mapped, memory by what it reads) "
                                              "and has its own query encoder; 2 on 2 cores: 1.6-1.9x the batch calls a second at 16 batch clients")
    poll_s: float = Field(1.0, gt=0, le=60, description="how often the live version is checked for a switch")
    cache_size: int = Field(10_000, ge=0, description="answers kept hot per worker and version")
    search_batch: int = Field(16, ge=1, le=256, description="most /search texts encoded together")
    search_queue: int = Field(256, ge=1, description="/search texts waiting beyond this: 503")
    search_threads: int = Field(1, ge=1, description="torch threads of the query encoder process")
    read_threads: int = Field(1, ge=1, le=64, description="threads reading the store for answers not cached, per server "
                              "process: the engine's reads slow each other down, so more threads in one process "
                              "answer fewer per second; more processes (workers) scale instead")
    keep_alive_s: float = Field(5, gt=0, description="an idle keep-alive connection is closed after this")
    head_timeout_s: float = Field(10, gt=0, description="a request's head must arrive within this: 408")
    max_url_bytes: int = Field(8192, ge=256, description="longer request lines: 414")
    max_header_bytes: int = Field(16384, ge=1024, description="larger request headers: 431")
    max_requests: int = Field(1000, ge=1, description="requests in flight beyond this: 503")
