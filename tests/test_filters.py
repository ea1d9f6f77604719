"""Filters and exclusions on every query (recommend/serving/filters.py, facade.py), on both stores.

The oracle: the stored list's entries that pass, in order, then the exact nearest of the items that
pass among the rest (numpy over every item), the user's seen items, the excluded ones and the subject
left out."""

from __future__ import annotations

import numpy as np
import pytest

from recommend.serving.facade import Recommender
from recommend.serving.filters import BadFilter, Where
from recommend.serving.live import LiveVersion
from recommend.serving.payloads import item_payloads, parse_list, user_payloads
from recommend.serving.publish import Storage, publish_version
from recommend.serving.versions import EmbeddedVersions, ServerVersions

N_ITEMS, N_USERS, DIM, K = 60, 12, 8, 5
FIELDS = {"category": "keyword", "price": "float", "stock": "integer", "sale": "bool", "tags": "keyword"}
CATEGORIES = ("shoes", "hats", "bags")


def _catalog():
    """60 items in 3 categories; user u's list is items u+1..u+8 and u has seen items u+20..u+24,
    which are nearest to their profile (a fill that did not leave them out would take them first)."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    item_ids = np.array([f"i{i}" for i in range(N_ITEMS)], dtype=object)
    metadata = {"category": [CATEGORIES[i % 3] for i in range(N_ITEMS)], "price": [float(i * 2.5) for i in range(N_ITEMS)],
                "stock": [i % 4 for i in range(N_ITEMS)], "sale": [int(i % 5 == 0) for i in range(N_ITEMS)],
                "tags": [["red", "new"] if i % 7 == 0 else ["blue"] for i in range(N_ITEMS)]}
    ids = np.array([[(i + j + 1) % N_ITEMS for j in range(8)] for i in range(N_ITEMS)])
    scores = np.tile(np.linspace(0.9, 0.2, 8, dtype=np.float32), (N_ITEMS, 1))
    seen_items = np.array([(u + 20 + j) % N_ITEMS for u in range(N_USERS) for j in range(5)])
    seen = (np.arange(0, 5 * N_USERS + 1, 5), seen_items)
    users = [f"u{u}" for u in range(N_USERS)]
    items = {"ids": item_ids.tolist(), "vectors": vectors,
             "payloads": item_payloads(item_ids, metadata, scores, ids, ["similar"] * N_ITEMS)}
    profiles = vectors[seen_items].reshape(N_USERS, 5, DIM).sum(axis=1)  # the seen items are each user's nearest
    users_data = {"ids": users, "vectors": profiles,
                  "payloads": user_payloads(users, item_ids, scores[:N_USERS], ids[:N_USERS], ["history"] * N_USERS, seen)}
    return items, users_data, metadata


@pytest.fixture(scope="module", params=["embedded", "server"])
def published(request, tmp_path_factory):
    items, users, metadata = _catalog()
    if request.param == "embedded":
        store = EmbeddedVersions(tmp_path_factory.mktemp("store"), "t")
    else:
        from qdrant_client import QdrantClient

        store = ServerVersions(QdrantClient(":memory:"), "t")
    publish_version(store, "20260101T000000Z-f0", items, users, storage=Storage(fields=tuple(FIELDS.items())),
                    metadata={"run_id": "20260101T000000Z-f0", "created_at": "2026-01-01T00:00:00+00:00",
                              "indexed_fields": FIELDS})
    return Recommender(LiveVersion(store, poll_s=0), k=K), items, users, metadata


def _expected(published, where: Where, stored: list[str], seen: list[str], subject, query: np.ndarray):
    """(item ids, source suffix) the oracle answers."""
    _, items, _, metadata = published
    meta = [{k: v[i] for k, v in metadata.items()} for i in range(N_ITEMS)]
    passing = [i for i in stored if where.matches(i, meta[int(i[1:])])][:K]
    if len(passing) == K:
        return passing, ""
    left_out = set(passing) | set(seen) | {subject}
    candidates = [j for j in range(N_ITEMS) if where.matches(f"i{j}", meta[j]) and f"i{j}" not in left_out]
    order = sorted(candidates, key=lambda j: -float(items["vectors"][j] @ query))
    return passing + [f"i{j}" for j in order[:K - len(passing)]], "+query" if passing else "query"


FILTERS = [
    ({"category": "shoes"}, None),                   # equality
    ({"category": ["hats", "bags"]}, ["i3"]),        # set membership, and an exclusion
    ({"price": {"gte": 20, "lt": 80}}, None),        # a numeric range
    ({"stock": 0, "category": "hats"}, None),        # integer equality with a second condition
    ({"sale": True}, None),                          # a true/false field (published as 1/0)
    ({"tags": "red"}, ["i14"]),                      # a list value matches on any element
    ({}, ["i2", "i4"]),                              # exclusions alone
]


@pytest.mark.parametrize("where,exclude", FILTERS)
def test_user_lists_keep_what_passes_and_a_vector_query_fills_them_never_with_seen_items(published, where, exclude):
    rec, items, users, metadata = published
    for u in (0, 5, 11):
        got = rec.for_user(f"u{u}", where=where, exclude=exclude)
        stored, source, seen = parse_list(users["payloads"][u], "recommended")
        expected, suffix = _expected(published, Where.build(where, exclude, fields=FIELDS),
                                     [i for i, _ in stored], seen, None, users["vectors"][u])
        assert [r.item_id for r in got.items] == expected, (where, u)
        assert got.source == ("history" + suffix if suffix != "query" else "query")
        assert not set(seen) & {r.item_id for r in got.items} and len(seen) == 5


@pytest.mark.parametrize("where,exclude", FILTERS)
def test_similar_items_keep_what_passes_and_a_vector_query_fills_them(published, where, exclude):
    rec, items, users, metadata = published
    for i in (0, 7, 30):
        got = rec.similar(f"i{i}", where=where, exclude=exclude)
        stored, _, _ = parse_list(items["payloads"][i], "similar")
        expected, suffix = _expected(published, Where.build(where, exclude, fields=FIELDS), [j for j, _ in stored], [],
                                     f"i{i}", items["vectors"][i])
        assert [r.item_id for r in got.items] == expected, (where, i)
        assert got.source == ("similar" + suffix if suffix != "query" else "query")
        assert f"i{i}" not in [r.item_id for r in got.items]


@pytest.mark.parametrize("where,exclude", FILTERS)
def test_text_and_real_time_queries_take_the_filter_as_a_payload_filter(published, where, exclude):
    rec, items, users, metadata = published
    found = Where.build(where, exclude, fields=FIELDS)
    vector = items["vectors"][9] + items["vectors"][40]
    from recommend.serving.facade import text_answer

    got = text_answer(rec.live.current(), vector, "anything", K, found)
    assert [r.item_id for r in got.items] == _expected(published, found, [], [], None, vector)[0]
    assert all(found.matches(r.item_id, r.metadata) for r in got.items) and got.items
    realtime = rec.for_items(["i9"], where=where, exclude=exclude)
    assert realtime.items and all(found.matches(r.item_id, r.metadata) and r.item_id != "i9" for r in realtime.items)


def test_a_filter_the_version_cannot_answer_names_the_field_and_the_indexed_ones(published):
    rec = published[0]
    with pytest.raises(BadFilter, match=r"'colour'.*indexed: category, price, sale, stock, tags"):
        rec.for_user("u1", where={"colour": "red"})
    with pytest.raises(BadFilter, match="a range needs a numeric field"):
        rec.similar("i1", where={"category": {"lt": 3}})
    with pytest.raises(BadFilter, match="expected a number"):
        rec.for_user("u1", where={"price": {"lt": "cheap"}})
    with pytest.raises(BadFilter, match="expected a whole number"):
        rec.for_user("u1", where={"stock": "many"})


def test_the_text_form_means_what_the_dict_form_means():
    parsed = Where.parse(["category=shoes|hats", "price>=10", "price<50", "sale=true", "stock=3"], ["i1"], fields=FIELDS)
    built = Where.build({"category": ["shoes", "hats"], "price": {"gte": 10, "lt": 50}, "sale": True, "stock": 3},
                        ["i1"], fields=FIELDS)
    assert parsed.key() == built.key()
    for text in ("price", "=3", "price<", "category=shoes&x"):
        if text == "category=shoes&x":  # a value may hold any character but the set's separator
            assert Where.parse([text], fields=FIELDS).matches("i", {"category": "shoes&x"})
            continue
        with pytest.raises(BadFilter, match="expected FIELD=VALUE"):
            Where.parse([text], fields=FIELDS)
    with pytest.raises(BadFilter, match="a value and a range together"):
        Where.parse(["price=3", "price<5"], fields=FIELDS)
    with pytest.raises(BadFilter, match="not a set"):
        Where.parse(["price=3|4"], fields=FIELDS)


def test_an_unfiltered_query_is_the_stored_list_as_before(published):
    rec, items, users, metadata = published
    got = rec.for_user("u2")
    assert [r.item_id for r in got.items] == [i for i, _ in parse_list(users["payloads"][2], "recommended")[0][:K]]
    assert got.source == "history" and got.items[0].metadata["category"] in CATEGORIES


def test_http_takes_filters_as_typed_query_parameters_and_a_bad_one_is_a_400(published):
    from urllib.parse import quote

    from http_helpers import ServerThread, get

    from recommend.serving.service import create_app
    from recommend.serving.settings import ServeSettings

    rec = published[0]
    settings = ServeSettings(port=0)
    app = create_app(LiveVersion(rec.live.store, poll_s=0.2, freeze=True), settings, default_k=K, encoder=None)
    with ServerThread(app, settings) as server:
        for path, answer in ((f"/users/u3?where=category=hats&where={quote('price<100')}&exclude=i4",
                              rec.for_user("u3", where={"category": "hats", "price": {"lt": 100}}, exclude=["i4"])),
                             # k and where= only: answered before the routing (lookups.FastLookups), filled alike
                             (f"/users/u3?k=4&where=category=hats&where={quote('price<100')}",
                              rec.for_user("u3", 4, where={"category": "hats", "price": {"lt": 100}})),
                             ("/items/i7/similar?k=3&where=" + quote("stock=1|2"), rec.similar("i7", 3, where={"stock": [1, 2]})),
                             ("/users/u3?exclude=i4,i5", rec.for_user("u3", exclude=["i4", "i5"]))):
            for _ in range(2):  # the second from the cache, under the filter's own key
                status, body, _ = get(server.port, path)
                assert status == 200 and [r["item_id"] for r in body["items"]] == [r.item_id for r in answer.items], path
                assert body["source"] == answer.source
        plain = get(server.port, "/users/u3")[1]
        assert [r["item_id"] for r in plain["items"]] == [r.item_id for r in rec.for_user("u3").items]
        status, body, _ = get(server.port, "/users/u3?where=colour=red")
        assert status == 400 and "'colour'" in body["error"] and "indexed: category, price" in body["error"]
        status, body, _ = get(server.port, "/items/i1/similar?where=price")
        assert status == 400 and "expected FIELD=VALUE" in body["error"]
        status, body, _ = get(server.port, "/users/u3?exclude=" + ",".join(f"i{j}" for j in range(1001)))
        assert status == 400 and "at most 1,000" in body["error"]  # refused, never cut silently
        status, body, _ = get(server.port, "/users/u3?" + "&".join(["where=stock=1"] * 21))
        assert status == 400 and "where" in body["error"]
        status, body, _ = get(server.port, "/search?q=x&where=category=hats")
        assert status == 503  # text search is off in this server; the filter was parsed first
        spec = get(server.port, "/openapi.json")[1]
        names = {p["name"] for p in spec["paths"]["/users/{user_id}"]["get"]["parameters"]}
        assert {"where", "exclude"} <= names


def test_a_batch_answers_each_user_as_alone_and_marks_unknown_ids(published):
    rec = published[0]
    asked = ["u4", "nobody", "u0", "u4", "u11"]
    for where, exclude in ((None, None), ({"category": "bags"}, ["i6"])):
        batch = rec.for_users(asked, where=where, exclude=exclude)
        assert batch.unknown == ["nobody"] and batch.answers[1] is None and len(batch.answers) == len(asked)
        for user_id, got in zip(asked, batch.answers):
            if got is not None:
                alone = rec.for_user(user_id, where=where, exclude=exclude)
                assert (got.source, got.items) == (alone.source, alone.items)
        rows = batch.to_dict()["answers"]
        assert [r["user_id"] for r in rows] == asked and rows[1] == {"user_id": "nobody", "error": "unknown user"}
    with pytest.raises(BadFilter, match="at most 1,000"):
        rec.for_users([f"u{i}" for i in range(1001)])


def test_http_batch_of_users(published):
    import http.client
    import json

    from http_helpers import ServerThread

    from recommend.serving.service import create_app
    from recommend.serving.settings import ServeSettings

    rec = published[0]
    settings = ServeSettings(port=0)

    def post(port, body, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/users/batch", body=body, headers={"content-type": "application/json", **(headers or {})},
                     encode_chunked=not isinstance(body, bytes))
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    app = create_app(LiveVersion(rec.live.store, poll_s=0.2, freeze=True), settings, default_k=K, encoder=None)
    with ServerThread(app, settings) as server:
        status, body = post(server.port, json.dumps({"user_ids": ["u1", "ghost", "u2"], "k": 3,
                                                     "where": ["price<100"], "exclude": ["i3"]}).encode())
        assert status == 200 and body["version"] == rec.live_version()
        assert [r["user_id"] for r in body["answers"]] == ["u1", "ghost", "u2"] and body["answers"][1]["error"] == "unknown user"
        alone = rec.for_user("u1", 3, where={"price": {"lt": 100}}, exclude=["i3"])
        assert [r["item_id"] for r in body["answers"][0]["items"]] == [r.item_id for r in alone.items]
        # the HTTP answer is the facade's to_dict, field for field (orjson writes the Recommendations)
        assert body["answers"] == rec.for_users(["u1", "ghost", "u2"], 3, where=["price<100"], exclude=["i3"]).to_dict()["answers"]
        # a batch read in several parts (service.BATCH_PART) is still one answer per id, in order, one unknown list
        asked = [f"u{i % 30}" for i in range(0, 700, 3)] + ["ghost", "nobody", "ghost"]
        status, body = post(server.port, json.dumps({"user_ids": asked, "k": 4}).encode())
        assert status == 200 and body["answers"] == rec.for_users(asked, 4).to_dict()["answers"]
        status, body = post(server.port, json.dumps({"user_ids": [f"u{i}" for i in range(1001)]}).encode())
        assert status == 400 and "user_ids" in body["error"]
        status, body = post(server.port, json.dumps({"user_ids": ["u1"], "where": {"colour": "red"}}).encode())
        assert status == 400 and "'colour'" in body["error"]
        status, body = post(server.port, json.dumps({"user_ids": ["u1"] * 300_000}).encode())
        assert status == 413 and "1,048,576 bytes" in body["error"]
        chunks = iter([b'{"user_ids": ['] + [b'"u1",' * 10_000] * 30 + [b'"u1"]}'])  # no length declared
        status, body = post(server.port, chunks, {"transfer-encoding": "chunked"})
        assert status == 413 and "1,048,576 bytes" in body["error"]


@pytest.mark.parametrize("where,exclude", FILTERS)
def test_a_filter_the_stored_list_answers_needs_no_vector_query(published, where, exclude):
    """What `recs serve` reads beside plain lookups: the answer, when the stored list gives it whole;
    NeedsQuery when a vector query must fill it, whose then() (on the search thread) finishes it."""
    from recommend.serving.facade import NeedsQuery, similar_answer, user_answer

    rec = published[0]
    snap, found = rec.live.current(), Where.build(where, exclude, fields=FIELDS)
    for ask in (lambda q: user_answer(snap, "u4", K, None, found, vector_query=q),
                lambda q: similar_answer(snap, "i7", K, found, vector_query=q)):
        whole = {**ask(True).to_dict(), "age_seconds": 0}
        if whole["source"].endswith("query"):
            with pytest.raises(NeedsQuery) as needs:
                ask(False)
            assert {**needs.value.then().to_dict(), "age_seconds": 0} == whole  # finished on the search thread
        else:
            assert {**ask(False).to_dict(), "age_seconds": 0} == whole


def test_waiting_requests_vector_queries_are_asked_together_and_answered_as_alone(published):
    """`recs serve`'s search thread (query_batches.QueryBatcher): the requests that arrived while it
    was busy are finished as one batch, each with its own answer; one that fails fails alone."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from recommend.serving.facade import NeedsQuery, hit_items, similar_answer, user_answer
    from recommend.serving.publish import ITEM_VECTOR
    from recommend.serving.query_batches import QueryBatcher

    rec = published[0]
    snap = rec.live.current()
    asks = [(lambda q, u=u, f=Where.build(where, exclude, fields=FIELDS): user_answer(snap, f"u{u}", K, None, f, vector_query=q))
            for u, (where, exclude) in zip(range(N_USERS), FILTERS)]
    asks += [lambda q: similar_answer(snap, "i7", K, Where.build({"category": "shoes"}, fields=FIELDS), vector_query=q)]
    thens, needing = [], []
    for ask in asks:
        try:
            ask(False)
        except NeedsQuery as needs:  # those the stored list does not answer alone
            thens.append(needs.then)
            needing.append(ask)
    assert len(thens) >= 5

    def broken(search):  # asks a query first, in the same group as the last one: the others' answers stay theirs
        search(snap, np.ones(DIM, np.float32), K, using=ITEM_VECTOR, where=Where.build({"category": "shoes"}, fields=FIELDS))
        raise RuntimeError("this one fails")

    pool, busy = ThreadPoolExecutor(1), threading.Event()
    batcher = QueryBatcher(pool, hit_items)

    async def main():
        pool.submit(busy.wait)  # the search thread is busy: every request below waits for it
        waiting = [asyncio.ensure_future(batcher.finish(snap.reader, then)) for then in thens[:3] + [broken] + thens[3:]]
        await asyncio.sleep(0.05)
        busy.set()
        return await asyncio.gather(*waiting, return_exceptions=True)

    answers = asyncio.run(main())
    pool.shutdown()
    assert list(batcher.sizes) == [len(thens) + 1]  # one batch
    assert isinstance(answers[3], RuntimeError) and str(answers[3]) == "this one fails"
    for ask, got in zip(needing, answers[:3] + answers[4:]):
        alone = ask(True)
        assert (got.source, got.items) == (alone.source, alone.items) and got.source.endswith("query")


def test_ids_left_out_after_the_engine_answers_as_in_its_filter(published, monkeypatch):
    """The embedded store drops up to POST_EXCLUDED left-out ids from a deeper answer
    (recommend/serving/shard_search.py); past that they go into the engine's filter: the same answers."""
    from recommend.serving import shard_search

    from recommend.serving import filter_subsets

    if not isinstance(published[0].live.store, EmbeddedVersions):
        pytest.skip("the embedded store's queries")
    monkeypatch.setattr(filter_subsets, "HOT_AFTER", 10**9)  # the engine answers every query, none held
    rec = Recommender(LiveVersion(published[0].live.store, poll_s=0), k=K)
    asks = [lambda u=u, w=w, x=x: rec.for_user(f"u{u}", where=w, exclude=x) for u in (0, 5, 11) for w, x in FILTERS]
    asks += [lambda i=i, w=w, x=x: rec.similar(f"i{i}", where=w, exclude=x) for i in (0, 7) for w, x in FILTERS]
    asks += [lambda: rec.for_items(["i9", "i12"], where={"category": ["hats", "shoes"]}, exclude=["i3", "i30"])]
    dropped = [(a.source, a.items) for a in (ask() for ask in asks)]
    assert len({str(d) for d in dropped}) > len(asks) // 2  # many different answers, not one asked again
    monkeypatch.setattr(shard_search, "POST_EXCLUDED", 0)
    assert [(a.source, a.items) for a in (ask() for ask in asks)] == dropped


def test_a_held_filter_answers_as_the_engine(published, monkeypatch):
    """A filter asked often has its items held and its vector queries answered by numpy
    (recommend/serving/filter_subsets.py): the same answers as the engine's, on every query that takes
    a filter; one that passes more than MOST_POINTS items is left to the engine."""
    from recommend.serving import filter_subsets
    from recommend.serving.facade import text_answer

    rec = published[0]
    if not isinstance(rec.live.store, EmbeddedVersions):
        pytest.skip("the embedded store's queries")
    _, items, _, _ = published

    def answers(rec):
        asks = [lambda u=u, w=w, x=x: rec.for_user(f"u{u}", where=w, exclude=x) for u in (0, 5, 11) for w, x in FILTERS]
        asks += [lambda i=i, w=w, x=x: rec.similar(f"i{i}", where=w, exclude=x) for i in (0, 7) for w, x in FILTERS]
        asks += [lambda w=w, x=x: rec.for_items(["i9", "i12"], where=w, exclude=x) for w, x in FILTERS]
        asks += [lambda w=w, x=x: text_answer(rec.live.current(), items["vectors"][9], "q", K, Where.build(w, x, fields=FIELDS))
                 for w, x in FILTERS]
        asks += [lambda: rec.for_user("u3", where={"category": "bags"}, diversity=0.5)]
        return [(a.source, [r.item_id for r in a.items], [r.score for r in a.items], [r.metadata for r in a.items])
                for a in (ask() for ask in asks)]

    monkeypatch.setattr(filter_subsets, "HOT_AFTER", 10**9)
    engine = answers(Recommender(LiveVersion(rec.live.store, poll_s=0), k=K))
    assert len({str(a) for a in engine}) > len(engine) // 2  # many different answers, not one asked again
    monkeypatch.setattr(filter_subsets, "HOT_AFTER", 1)
    for most, block, none_refused in ((10**6, 64, True), (10**6, 2, True), (5, 64, False)):  # block 2: the bound on the k-th
        monkeypatch.setattr(filter_subsets, "MOST_POINTS", most)                    # best prunes (best_rows)
        monkeypatch.setattr(filter_subsets, "BLOCK", block)
        fresh = Recommender(LiveVersion(rec.live.store, poll_s=0), k=K)  # a reader of its own: nothing held yet
        # the engine answers while the subsets are read, in threads of their own
        assert [(s, i, m) for s, i, _, m in answers(fresh)] == [(s, i, m) for s, i, _, m in engine]
        for subsets in fresh.live.current().reader.subsets:
            subsets.wait()
        got = answers(fresh)
        assert [(s, i, m) for s, i, _, m in got] == [(s, i, m) for s, i, _, m in engine]
        assert all(a == pytest.approx(b, abs=1e-4) for (_, _, a, _), (_, _, b, _) in zip(got, engine))
        subsets = fresh.live.current().reader.subsets  # this version has no blend: its fills ask the text vector
        assert subsets[1].held and all(len(s.ids) <= most for s in subsets[1].held.values())
        assert bool(subsets[1].refused) != none_refused  # with at most 5 items, the broader filters are left to the engine


def test_a_reader_asked_ever_new_filters_holds_a_bounded_count_of_them(published, monkeypatch):
    """An app asking ever new price ranges: the filters counted towards HOT_AFTER and those refused
    (past MOST_POINTS) stay at most MOST_FILTERS, and the answers are still the engine's."""
    from recommend.serving import filter_subsets

    rec = published[0]
    if not isinstance(rec.live.store, EmbeddedVersions):
        pytest.skip("the embedded store's queries")
    monkeypatch.setattr(filter_subsets, "HOT_AFTER", 2)
    monkeypatch.setattr(filter_subsets, "MOST_FILTERS", 4)
    monkeypatch.setattr(filter_subsets, "MOST_POINTS", 0)  # every filter refused once read
    monkeypatch.setattr(filter_subsets, "IN_BACKGROUND", False)
    fresh = Recommender(LiveVersion(rec.live.store, poll_s=0), k=K)
    subsets = fresh.live.current().reader.subsets[1]  # the text vector: this version has no blend
    for n in range(12):
        where = {"price": {"gte": 100.0 + n}}  # items i40 and up: none of u0's stored list (i1..i8)
        first, second = (fresh.for_user("u0", where=where) for _ in range(2))
        assert [r.item_id for r in first.items] == [r.item_id for r in second.items] and first.source.endswith("query")
        assert len(subsets.asked) <= 4 and len(subsets.refused) <= 4
    assert subsets.refused and not subsets.held


@pytest.mark.parametrize("block", [1, 3, 64])
def test_best_rows_are_each_rows_largest_with_ties_by_column(block, monkeypatch):
    """filter_subsets.best_rows against a full sort: values with many ties, rows with left-out (-inf) values."""
    from recommend.serving import filter_subsets

    monkeypatch.setattr(filter_subsets, "BLOCK", block)
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 6, size=(9, 500)).astype(np.float32)
    scores[2, :490] = -np.inf  # fewer finite values than k
    scores[3] = -np.inf
    scores[4, rng.choice(500, 300, replace=False)] = -np.inf
    for k in (1, 10, 40):
        expected = [[(c, float(row[c])) for c in sorted(range(500), key=lambda c: (-row[c], c)) if row[c] != -np.inf][:k]
                    for row in scores]
        assert filter_subsets.best_rows(scores.copy(), k) == expected
