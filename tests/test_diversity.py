"""Diversity (recommend/serving/diversity.py): maximal marginal relevance against a plain greedy
oracle, and on every query of both stores: 0 is the plain answer, more variety lowers how alike the
answered items are, and filters, exclusions and seen items still hold."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from recommend.serving.diversity import mmr
from recommend.serving.facade import text_answer
from recommend.serving.filters import BadFilter, Where
from recommend.serving.live import LiveVersion
from recommend.serving.payloads import parse_list
import test_filters
from test_filters import FIELDS, K


def _oracle(relevance, vectors, k, diversity):
    """Greedy MMR spelled out: relevance min-max scaled, cosine to the closest chosen item."""
    lo, hi = min(relevance), max(relevance)
    scaled = [(r - lo) / (hi - lo) if hi > lo else 1.0 for r in relevance]
    chosen = []
    for _ in range(min(k, len(relevance))):
        def value(i):
            closest = max((float(vectors[i] @ vectors[j]) for j in chosen), default=0.0)
            return (1 - diversity) * scaled[i] - diversity * closest
        chosen.append(max((i for i in range(len(relevance)) if i not in chosen), key=lambda i: (value(i), -i)))
    return chosen


@pytest.mark.parametrize("diversity", [0.0, 0.3, 0.7, 1.0])
def test_mmr_picks_what_the_greedy_rule_says(diversity):
    rng = np.random.default_rng(int(diversity * 10))
    for _ in range(20):
        vectors = rng.normal(size=(30, 6))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        relevance = np.sort(rng.normal(size=30))[::-1] * 7
        assert mmr(relevance, vectors, 10, diversity) == _oracle(list(relevance), vectors, 10, diversity)
    # by hand: b is a near copy of a, c is apart; with variety c comes before b
    vectors = np.array([[1.0, 0.0], [0.995, 0.0998], [0.0, 1.0]])
    assert mmr(np.array([0.9, 0.85, 0.5]), vectors, 3, 0.0) == [0, 1, 2]
    assert mmr(np.array([0.9, 0.85, 0.5]), vectors, 3, 0.6) == [0, 2, 1]


published = test_filters.published  # the same version, on both stores (a fixture of this module too)


def _alike(items, answer) -> float:
    """The mean cosine between the answered items' text vectors."""
    rows = [items["vectors"][int(r.item_id[1:])] for r in answer.items]
    return float(np.mean([a @ b for a, b in itertools.combinations(rows, 2)]))


def test_every_query_takes_diversity_and_more_of_it_answers_items_less_alike(published):
    rec, items, users, metadata = published
    snap = rec.live.current()
    for u in range(0, 12, 3):
        plain, none = rec.for_user(f"u{u}"), rec.for_user(f"u{u}", diversity=0.0)
        assert [r.item_id for r in none.items] == [r.item_id for r in plain.items] and none.source == plain.source
        some, most = rec.for_user(f"u{u}", diversity=0.5), rec.for_user(f"u{u}", diversity=1.0)
        assert some.source == "history+diverse" and len(some.items) == len(most.items) == K
        assert _alike(items, most) < _alike(items, plain)
        _, _, seen = parse_list(users["payloads"][u], "recommended")
        assert not set(seen) & {r.item_id for r in some.items + most.items}
    similar = rec.similar("i7", diversity=1.0)
    assert similar.source == "similar+diverse" and "i7" not in [r.item_id for r in similar.items]
    assert _alike(items, similar) < _alike(items, rec.similar("i7"))
    vector = items["vectors"][9]
    near, varied = text_answer(snap, vector, "q", K), text_answer(snap, vector, "q", K, diversity=1.0)
    assert varied.source == "text+diverse" and varied.items[0].item_id == near.items[0].item_id == "i9"
    assert _alike(items, varied) < _alike(items, near)
    # filters and exclusions hold in the deeper pool too
    where = {"category": "shoes"}
    got = rec.for_user("u4", where=where, exclude=["i9"], diversity=0.7)
    found = Where.build(where, ["i9"], fields=FIELDS)
    assert len(got.items) == K and all(found.matches(r.item_id, {"category": r.metadata["category"]}) for r in got.items)
    assert "i9" not in [r.item_id for r in got.items]
    batch = rec.for_users(["u1", "u2"], diversity=0.5)
    assert [[r.item_id for r in a.items] for a in batch.answers] == [
        [r.item_id for r in rec.for_user(u, diversity=0.5).items] for u in ("u1", "u2")]
    with pytest.raises(BadFilter, match="diversity"):
        rec.for_user("u1", diversity=1.5)


def test_http_takes_diversity(published):
    import http.client
    import json

    from http_helpers import ServerThread

    from recommend.serving.service import create_app
    from recommend.serving.settings import ServeSettings

    rec, settings = published[0], ServeSettings(port=0)

    def get(port, route):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", route)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    app = create_app(LiveVersion(rec.live.store, poll_s=0.2), settings, default_k=K, encoder=None)
    with ServerThread(app, settings) as server:
        status, body = get(server.port, "/users/u3?diversity=0.5")
        assert status == 200 and body["source"] == "history+diverse"
        assert [r["item_id"] for r in body["items"]] == [r.item_id for r in rec.for_user("u3", diversity=0.5).items]
        status, body = get(server.port, "/items/i3/similar?diversity=1")
        assert status == 200 and body["source"] == "similar+diverse"
        status, body = get(server.port, "/users/u3?diversity=2")
        assert status == 400 and "diversity" in body["error"]
