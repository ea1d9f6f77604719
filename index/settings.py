"""The index stage's settings: the config's `index` section, defined once here (no heavy imports)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class IndexSettings(BaseModel):
    """Which index to build and how deep to search it (config: the `index` section)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field("auto", description="auto (exact below exact_below, HNSW32,SQbf16 above) | exact | a FAISS "
                                          "factory string such as HNSW32 or IVF1024,SQfp16")
    exact_below: int = Field(50_000, ge=1)
    target_recall: float | None = Field(0.95, gt=0, le=1, description="tune the search depth (IVF nprobe, HNSW "
                                        "efSearch) to this recall@k against exact search on a sample; null: search_depth")
    search_depth: int | None = Field(None, ge=1, description="a fixed nprobe / efSearch when target_recall is null")
    exact_fallback_below: int = Field(100_000, ge=1, description="when no depth reaches target_recall: exact search "
                                      "below this many items, else the depth where recall stops growing (reported)")


EXACT_INDEX = IndexSettings(kind="exact")
