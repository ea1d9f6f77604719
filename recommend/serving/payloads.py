"""The payloads of a version's points, and reading their lists back.

A list in a payload (an item's `similar`, a user's `recommended`) is one JSON text,
`[[ids], [scores], source]`, and a user's carries a fourth element, the items they have seen
(`[[ids], [scores], source, [seen ids]]`: a vector query that fills a filtered list leaves them out,
recommend/serving/facade.py). One string field costs the engine a fraction of a list of objects per
point, and every payload field is one more value its writer converts and stores for every point, so
a payload holds the id, the list and the catalog's chosen metadata, nothing else.

Example:
    text = list_text(["I1", "I2"], [0.9, 0.8], "history", seen=["I7"])
    parse_list({"recommended": text}, "recommended")   # ([("I1", 0.9), ("I2", 0.8)], "history", ["I7"])
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import orjson


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def list_text(ids: Sequence[str], scores: Sequence[float], source: str | None = None, seen: Sequence[str] | None = None) -> str:
    """A list of (item id, score), the path that made it (`source`: "similar", "history",
    "popular", ...) and a user's seen items as the one JSON text a payload holds."""
    body = [list(ids), [round(float(x), 5) for x in scores]]
    if source is not None or seen is not None:
        body.append(source)
    if seen is not None:
        body.append(list(seen))
    return orjson.dumps(body).decode()


def read_list(value) -> list[tuple[str, float]]:
    """(item id, score) pairs of a payload's list: the JSON text `list_text` writes, or a list of
    {"item_id", "score"} objects (versions published before the text form)."""
    return parse_list({"list": value}, "list")[0]


def payload_list(payload: dict, field_name: str) -> tuple[list[tuple[str, float]], str | None]:
    """The (item id, score) pairs of a payload's list `field_name` and the path that made them."""
    return parse_list(payload, field_name)[:2]


def parse_list(payload: dict, field_name: str) -> tuple[list[tuple[str, float]], str | None, list[str]]:
    """(the (item id, score) pairs of a payload's list `field_name`, the path that made them or None
    when not recorded, the seen items: [] when not recorded)."""
    ids, scores, source, seen = list_columns(payload, field_name)
    return list(zip(ids, scores)), source, seen


def list_columns(payload: dict, field_name: str) -> tuple[list[str], list[float], str | None, list[str]]:
    """`parse_list`'s answer with the item ids and scores as two lists (no pair per entry: a batch's
    answers written as JSON, recommend/serving/batch_json.py). Versions published before the path
    moved into the list's text held it in the payload's "source", and before the text form the list
    was a list of {"item_id", "score"}."""
    value = payload.get(field_name)
    if isinstance(value, str):
        parsed = orjson.loads(value)
        source = parsed[2] if len(parsed) > 2 else payload.get("source")
        return parsed[0], parsed[1], source, (parsed[3] if len(parsed) > 3 else [])
    value = value or []
    return [e["item_id"] for e in value], [e["score"] for e in value], payload.get("source"), []


def list_texts(item_ids, scores: np.ndarray, ids: np.ndarray, sources, seen: tuple | None = None) -> list[str]:
    """`list_text` of each row of a block of lists: `ids` (rows x K) index `item_ids`, -1 where a row
    holds fewer than K; the whole block's names and rounded scores made at once. `seen`: (indptr,
    indices) of each row's seen items (a CSR matrix's, indices into `item_ids`)."""
    ids = np.asarray(ids)
    if not len(ids):
        return []
    valid = ids >= 0
    names = np.asarray(item_ids, dtype=object)[np.where(valid, ids, 0)].tolist()
    rounded = np.round(np.asarray(scores, dtype=np.float64), 5).tolist()
    full = valid.all(axis=1)
    if seen is not None:
        indptr, seen_names = np.asarray(seen[0]), np.asarray(item_ids, dtype=object)[np.asarray(seen[1])].tolist()
    dumps, out = orjson.dumps, []
    for r, source in enumerate(sources):
        if full[r]:
            body = [names[r], rounded[r], str(source)]
        else:
            keep = np.flatnonzero(valid[r]).tolist()
            body = [[names[r][j] for j in keep], [rounded[r][j] for j in keep], str(source)]
        if seen is not None:
            body.append(seen_names[indptr[r]:indptr[r + 1]])
        out.append(dumps(body).decode())
    return out


LIST_FIELDS = ("similar", "recommended", "run_id", "source")  # payload fields that are not item metadata


def item_payloads(item_ids, metadata: dict[str, list], scores: np.ndarray, ids: np.ndarray, sources,
                  subjects=None) -> list[dict]:
    """Item point payloads: the id, its similar items with scores and the path that made them (one
    text, `list_text`), and the chosen metadata. `ids` index `item_ids`; `subjects`: the ids of the
    rows (default `item_ids`: every item, in order; a block of items passes its own, with its rows of
    `metadata`). The run id is the version's, not repeated in every point: each payload field
    is work for the engine's writer at every point."""
    subjects = list(item_ids if subjects is None else subjects)
    texts = list_texts(item_ids, scores, ids, sources)
    return [{"item_id": p["item_id"], "similar": texts[r], **{k: v for k, v in p.items() if k != "item_id"}}
            for r, p in enumerate(metadata_payloads(subjects, metadata))]


def metadata_payloads(subjects: list, metadata: dict[str, list]) -> list[dict]:
    """The id and chosen metadata of each item in `subjects` (`metadata`: column -> their rows'
    values): an item payload without its list, what a text shard holds (text_shards.py)."""
    columns = {k: [_clean(x) for x in (v.tolist() if hasattr(v, "tolist") else v)] for k, v in metadata.items()}
    return [{"item_id": item_id, **{k: values[r] for k, values in columns.items()}} for r, item_id in enumerate(subjects)]


def user_payloads(user_ids, item_ids, scores: np.ndarray, ids: np.ndarray, sources, seen: tuple | None = None) -> list[dict]:
    """User point payloads: the id and the recommended items with scores, the path that made them
    and the seen items (`seen`: (indptr, indices into `item_ids`) of each user's; one text, `list_text`)."""
    texts = list_texts(item_ids, scores, ids, sources, seen)
    return [{"user_id": user_id, "recommended": text} for user_id, text in zip(user_ids, texts)]
