"""The HTTP API's typed parameters and request bodies (recommend/serving/service.py), as the
OpenAPI describes them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from recommend.serving.facade import MAX_BATCH
from recommend.serving.intake import MAX_POSTED

IdPath = Annotated[str, Path(min_length=1, max_length=256, description="the id as in the catalog or the events")]
KQuery = Annotated[int | None, Query(ge=1, le=1000, description="how many items, 1 to 1000 (default: lists.k)")]
WhereQuery = Annotated[list[str] | None, Query(max_length=20, description="conditions on the items' indexed fields, "
                                               "all of which must hold: FIELD=VALUE, FIELD=A|B (any of), FIELD<N, "
                                               "FIELD<=N, FIELD>N, FIELD>=N; e.g. where=category=Shoes&where=price<100")]
DiversityQuery = Annotated[float | None, Query(ge=0, le=1, description="variety over relevance, 0 (none, the default) "
                                               "to 1: maximal marginal relevance over a deeper pool of candidates")]
ExcludeQuery = Annotated[str | None, Query(max_length=8192, description="comma-separated item ids never answered "
                                           "(already in the cart)")]


class UsersBatch(BaseModel):
    """The body of POST /users/batch."""

    model_config = ConfigDict(extra="forbid")
    user_ids: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] = Field(
        min_length=1, max_length=MAX_BATCH, description=f"at most {MAX_BATCH:,} user ids")
    k: int | None = Field(None, ge=1, le=1000, description="how many items each, 1 to 1000 (default: lists.k)")
    where: dict[str, Any] | list[str] | None = Field(None, description='conditions on indexed item fields: '
                                                     '{"category": "Shoes", "brand": ["a", "b"], "price": {"lt": 100}} '
                                                     'or ["category=Shoes", "price<100"]')
    exclude: list[str] | None = Field(None, max_length=1000, description="item ids never answered")
    diversity: float = Field(0.0, ge=0, le=1, description="variety over relevance, 0 to 1 (as for /users)")


class NewItems(BaseModel):
    """The body of POST /items."""

    model_config = ConfigDict(extra="forbid")
    items: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_POSTED, description=(
        f"at most {MAX_POSTED:,} items, each with the catalog's columns (items.id, the text template's fields, "
        "items.metadata), e.g. {\"item_id\": \"I9001\", \"title\": \"Trail shoe\", \"category\": \"Shoes\", \"price\": 89}"))
