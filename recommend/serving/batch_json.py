"""POST /users/batch's answers written as JSON straight from the stored lists, no object per item.

A batch of 1,000 users names 10,000 items. Made into `Recommendation`s, each with a copy of its
item's metadata, and then written by orjson, they took over half of a server's time under 16 batch
clients (py-spy), and a warm batch of 1,000 took 49-70 ms in one process, against 15-17 ms here
(docs/performance.md; the garbage collector scans those objects too). Here
each answer is one JSON object made from the user's stored list, and each item's part of it
(`{"item_id": .., "score": ` and `, "metadata": {..}}`) is written once per version and kept
(`Snapshot.entries`), so an item costs one join. The bytes are what `BatchAnswer.to_dict` gives
orjson for the same answers (tests/test_batch_json.py holds them equal).

Only the plain case is written here: no filter and no diversity, where an answer is the stored list's
first k. A user whose stored list is empty (a vector query makes it) is answered by the facade.

Example:
    rows = user_rows(snap, ["U1", "U2"], k=10)   # one JSON object per id, in order
    body = batch_body(snap, rows)                # the whole answer, as the HTTP batch writes it
"""

from __future__ import annotations

import orjson

from recommend.serving.facade import item_metadata, users_answers
from recommend.serving.live import Snapshot
from recommend.serving.payloads import list_columns

_dumps = orjson.dumps


def user_rows(snap: Snapshot, user_ids: list[str], k: int) -> list[bytes]:
    """Each id's answer, in order: {"user_id", "source", "items"} as bytes, or {"user_id", "error"}
    for an id the version does not hold. The stored lists read in one call per shard."""
    stored = {}
    for user, payload in snap.reader.payloads("user", list(dict.fromkeys(user_ids))).items():
        ids, scores, source, _ = list_columns(payload, "recommended")
        stored[user] = (ids[:k], scores, source or "recommended")
    parts = _entry_parts(snap, {i for ids, _, _ in stored.values() for i in ids})
    empty = [u for u, (ids, _, _) in stored.items() if not ids]  # no stored list: the facade's vector query makes one
    made = dict(zip(empty, users_answers(snap, empty, k).to_dict(recommendations=True)["answers"])) if empty else {}
    rows = []
    for user in user_ids:
        if (found := stored.get(user)) is None:
            rows.append(b'{"user_id":%s,"error":"unknown user"}' % _dumps(user))
        elif user in made:
            rows.append(_dumps(made[user]))
        else:
            ids, scores, source = found
            items = b",".join([head + _dumps(score) + tail for (head, tail), score in zip([parts[i] for i in ids], scores)])
            rows.append(b'{"user_id":%s,"source":%s,"items":[%s]}' % (_dumps(user), _dumps(source), items))
    return rows


def batch_body(snap: Snapshot, rows: list[bytes]) -> bytes:
    """The HTTP answer around `rows`: the version's fields and "answers", as `BatchAnswer.to_dict` has them."""
    head = _dumps({"version": snap.run_id, "created_at": snap.created_at, "age_seconds": snap.age_seconds()})
    return head[:-1] + b',"answers":[' + b",".join(rows) + b"]}"


def _entry_parts(snap: Snapshot, item_ids: set[str]) -> dict[str, tuple[bytes, bytes]]:
    """item id -> (its answer entry's JSON before the score, after it), from the snapshot's cache;
    the metadata of those not there read at once (the facade's item cache, then the store)."""
    parts = {i: p for i in item_ids if (p := snap.entries.get(i)) is not None}
    if missing := [i for i in item_ids if i not in parts]:
        for i, meta in item_metadata(snap, missing).items():
            parts[i] = (b'{"item_id":%s,"score":' % _dumps(i), b',"metadata":%s}' % _dumps(meta))
            snap.entries.put(i, parts[i])
    return parts
