"""The serving side's settings: the config's `publish` section, defined once here (no heavy imports)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PublishSettings(BaseModel):
    """Where and how versions are published (config: the `publish` section)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="false: build lists and run artifacts, publish nothing (dry runs, scale tests)")
    url: str | None = Field(None, description="Qdrant server URL; default: local mode under <workdir>/qdrant")
    api_key_env: str = "QDRANT_API_KEY"
    prefix: str = Field("recs", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    keep_versions: int = Field(3, ge=1)
    batch_size: int = Field(256, ge=1)
    parallel: int = Field(1, ge=1, description="upload processes for a Qdrant server (local mode writes in one)")
    index_wait_s: float = Field(600, gt=0, description="how long to wait for a server to index a new version before failing")
