"""POST /users/batch's plain answers written from the stored lists (recommend/serving/batch_json.py).

The oracle: the facade's own answers (`users_answers`, then `BatchAnswer.to_dict`), which the HTTP
batch wrote before; the bytes must read back to the same JSON, on both stores."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from recommend.serving.batch_json import batch_body, user_rows
from recommend.serving.facade import BatchAnswer, users_answers
from recommend.serving.live import LiveVersion
from recommend.serving.payloads import item_payloads, user_payloads
from recommend.serving.publish import publish_version
from recommend.serving.versions import EmbeddedVersions, ServerVersions

N_ITEMS, DIM = 30, 8
# ids a hand-written JSON would get wrong: quotes, a backslash, control characters, non-ASCII
USERS = ["u0", 'u"quoted"', "u\\back", "u\ttab\n", "ü-日本", "u5", "u-empty", "u-short"]


def _version():
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    item_ids = np.array([f"i{i}" for i in range(N_ITEMS - 2)] + ['i"q', "i-ü"], dtype=object)
    metadata = {"category": [["shoes", "hats", 'a "b"'][i % 3] for i in range(N_ITEMS)],
                "price": [i * 2.5 if i % 4 else None for i in range(N_ITEMS)],  # some items without a price
                "tags": [["red", "new"] if i % 7 == 0 else [] for i in range(N_ITEMS)]}
    ids = np.array([[(u * 3 + j) % N_ITEMS for j in range(8)] for u in range(len(USERS))])
    ids[USERS.index("u-empty")] = -1      # no stored list: the facade's vector query makes one
    ids[USERS.index("u-short"), 3:] = -1  # 3 items stored where k asks more
    ids[0, :2] = [N_ITEMS - 2, N_ITEMS - 1]
    scores = np.sort(rng.uniform(-1, 1, size=ids.shape), axis=1)[:, ::-1].astype(np.float32)
    scores[1, 0] = 1e-7  # a tiny score, in exponent form
    seen = (np.arange(0, 2 * len(USERS) + 1, 2), np.array([(u + 20 + j) % N_ITEMS for u in range(len(USERS)) for j in range(2)]))
    items = {"ids": item_ids.tolist(), "vectors": vectors,
             "payloads": item_payloads(item_ids, metadata, scores[:1].repeat(N_ITEMS, 0), np.zeros((N_ITEMS, 8), int),
                                       ["similar"] * N_ITEMS)}
    users = {"ids": USERS, "vectors": rng.normal(size=(len(USERS), DIM)).astype(np.float32),
             "payloads": user_payloads(USERS, item_ids, scores, ids, ["history", "few-events"] * 4, seen)}
    return items, users


@pytest.fixture(scope="module", params=["embedded", "server"])
def snap(request, tmp_path_factory):
    if request.param == "embedded":
        store = EmbeddedVersions(tmp_path_factory.mktemp("store"), "t")
    else:
        from qdrant_client import QdrantClient

        store = ServerVersions(QdrantClient(":memory:"), "t")
    items, users = _version()
    publish_version(store, "20260101T000000Z-b0", items, users,
                    metadata={"run_id": "20260101T000000Z-b0", "created_at": "2026-01-01T00:00:00+00:00"})
    return LiveVersion(store, poll_s=0).current()


@pytest.mark.parametrize("k", [1, 5, 10])
def test_a_plain_batch_is_written_as_the_facade_answers_it(snap, k):
    asked = USERS + ["ghost", "u0", 'ghost"2']  # unknown ids, and one asked twice
    expected = BatchAnswer(snap.run_id, snap.created_at, 0.0, asked, users_answers(snap, asked, k).answers, []).to_dict()
    rows = user_rows(snap, asked, k)
    assert len(rows) == len(asked)
    written = orjson.loads(batch_body(snap, rows))
    assert {**written, "age_seconds": 0.0} == expected
    answers = {a["user_id"]: a for a in written["answers"]}
    assert answers["ghost"] == {"user_id": "ghost", "error": "unknown user"}
    assert answers["u-empty"]["source"] == "query" and len(answers["u-empty"]["items"]) == k  # made by the facade
    assert len(answers["u-short"]["items"]) == min(k, 3)
    # the second batch reads every item's part from the snapshot's cache: the same bytes
    assert user_rows(snap, asked, k) == rows
