"""The index stage's settings: the config's `index` section, defined once here (no heavy imports)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


RETIRED = {"exact_below", "exact_fallback_below"}


class IndexSettings(BaseModel):
    """Which index to build and how deep to search it (config: the `index` section)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field("auto", description="auto: exact search, or HNSW32 over bfloat16 where it costs less at "
                                          "target_recall (both measured); exact; or a FAISS factory string such as "
                                          "HNSW32 or IVF1024,SQfp16")
    target_recall: float | None = Field(0.95, gt=0, le=1, description="tune the search depth (IVF nprobe, HNSW "
                                        "efSearch) to this recall@k against exact search on a sample; null: search_depth")
    search_depth: int | None = Field(None, ge=1, description="a fixed nprobe / efSearch when target_recall is null")
    norm_head: float = Field(0.001, ge=0, le=0.2, description="share of the items, the longest by norm, searched "
                             "exactly beside an approximate index and merged with its answers (index/norm_head.py): "
                             "most lists are drawn from them, and a graph finds them poorly from a user's profile; 0: none")
    exact_budget_s: float = Field(7200, gt=0, description="when no depth reaches target_recall: exact search if it "
                                  "costs (by a timed sample) at most this many seconds, else the depth where recall "
                                  "stops growing (reported)")

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data):
        """exact_below and exact_fallback_below (fixed item counts) gave way to measured costs."""
        if isinstance(data, dict) and RETIRED & set(data):
            import logging

            logging.getLogger("recs").warning("index.%s no longer used: exact or approximate search is chosen by "
                                              "their measured cost", " and index.".join(sorted(RETIRED & set(data))))
            data = {k: v for k, v in data.items() if k not in RETIRED}
        return data


EXACT_INDEX = IndexSettings(kind="exact")
