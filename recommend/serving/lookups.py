"""Answers as JSON bytes, and the plain lookups answered before FastAPI's routing (`FastLookups`).

A plain GET /users/<id> or /items/<id>/similar (no parameter but an exact `k` and `where=` filters)
is the bulk of a server's traffic, and FastAPI's routing and parameter parsing cost more than the
read; those are answered here with the same facade call and cache key as the app's route
(recommend/serving/service.py).

Example:
    app.add_middleware(FastLookups, live=live, metrics=metrics, default_k=10, reads=pool, batcher=batcher,
                       routes={r.path: r for r in app.routes if r.path in HOT_ROUTES})
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request

from recommend.serving import facade
from recommend.serving.filters import BadFilter
from recommend.serving.live import LiveVersion, Snapshot
from recommend.serving.query_batches import QueryBatcher


def envelope(snap: Snapshot, body: bytes) -> bytes:
    """The version fields in front of a cached answer body (`{"query":...}`): the age is always now's."""
    return b'{"version":%s,"created_at":%s,"age_seconds":%s,%s' % (
        orjson.dumps(snap.run_id), orjson.dumps(snap.created_at), orjson.dumps(snap.age_seconds()), body[1:])


def answer_body(answer: facade.Answer) -> bytes:
    """The answer's own fields as JSON (orjson writes the Recommendation dataclasses as objects)."""
    return orjson.dumps({"query": answer.query, "source": answer.source, "items": answer.items})


def lookup(snap: Snapshot, key: tuple, where=None) -> bytes:
    """The body of a plain lookup's answer: key ("u", user id, k, ...) or ("i", item id, k, ...);
    `where` (a filters.Where): facade.NeedsQuery when the stored list does not answer alone."""
    if key[0] == "u":
        return answer_body(facade.user_answer(snap, key[1], key[2], None, where, 0.0, where is None))
    return answer_body(facade.similar_answer(snap, key[1], key[2], where, 0.0, where is None))


HOT_ROUTES = ("/users/{user_id}", "/items/{item_id}/similar")
FAILED = "recs.lookup_failed"  # the scope key where FastLookups leaves the exception its lookup raised
MAX_WHERE = 20  # where= conditions a request may hold (parameters.WhereQuery)


def plain_parameters(query: bytes) -> tuple[int | None, list[str]] | None:
    """(k or None, the where= texts) of a query string holding at most one exact `k` (1 to 1000,
    written plainly) and up to MAX_WHERE `where`s, decoded as the app decodes them; None for anything
    else (another parameter, a k the app would refuse or write otherwise): the app answers that."""
    k, where = None, []
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name == "where":
            where.append(value)
        elif (name == "k" and k is None and value.isascii() and value.isdigit()  # "²" is a digit to str, not to int
              and len(value) <= 4 and value[:1] != "0" and int(value) <= 1000):
            k = int(value)
        else:
            return None
    return (k, where) if len(where) <= MAX_WHERE else None


def failed_before(request: Request) -> None:
    """Raise what this very lookup raised in FastLookups (an unknown id, the store unavailable), so the
    app answers it with its own error, without asking the store again."""
    failed = request.scope.pop(FAILED, None)
    if failed is not None:
        raise failed


class FastLookups:
    """Pure ASGI, inside the Guard: a plain GET /users/<id> or /items/<id>/similar (no parameter but
    an exact `k` and `where=` filters) is answered here, without FastAPI's routing and parameter
    parsing: from the live snapshot's cache, or read from the store in the reads pool by the same
    facade call as the app's route (a filtered list that falls short is filled on the search
    thread, as the app's route fills it), and cached. These are the bulk of a server's traffic, and
    the routing costs more than the read. Anything else (another route or parameter, an id the app would not route) goes on to
    the app unchanged, and so does a failed lookup (an unknown id, the store unavailable), with its
    exception, which the app's route raises and answers as its own; the cached answers are ones the
    app would have made."""

    def __init__(self, app, live: LiveVersion, metrics, default_k: int, routes: dict, reads: ThreadPoolExecutor,
                 batcher: QueryBatcher):
        self.app, self.live, self.metrics, self.default_k = app, live, metrics, default_k
        self.reads, self.batcher = reads, batcher
        self.users, self.similar = routes["/users/{user_id}"], routes["/items/{item_id}/similar"]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET" and (snap := self.live.snap) is not None:
            found = self._key(scope, snap)
            if found is not None:
                key, route, where = found
                body = snap.cache.get(key)
                if body is not None:
                    self.metrics.cache_hits.inc()
                else:
                    loop = asyncio.get_running_loop()
                    try:
                        try:
                            body = await loop.run_in_executor(self.reads, lookup, snap, key, where)
                        except facade.NeedsQuery as needs:  # the filtered list is short: the search thread fills it
                            body = answer_body(await self.batcher.finish(snap.reader, needs.then))
                    except Exception as exc:
                        body, scope[FAILED] = None, exc  # the app's route raises it: its own error answer
                    else:
                        self.metrics.cache_misses.inc()
                        snap.cache.put(key, body)
                if body is not None:
                    scope["route"] = route  # the Guard's metrics label it as the app would
                    data = envelope(snap, body)
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]})
                    await send({"type": "http.response.body", "body": data})
                    return
        await self.app(scope, receive, send)

    def _key(self, scope, snap: Snapshot) -> tuple | None:
        """The cache key the app's route would use, the route and the filter (a filters.Where or
        None); None when this is not plainly one, or its filter is one the app refuses (BadFilter)."""
        query, k, texts = scope["query_string"], None, []
        if query:
            if (found := plain_parameters(query)) is None:
                return None
            k, texts = found
        k = k or self.default_k
        path = scope["path"]
        if path.startswith("/users/"):
            name, key, route = path[7:], ("u", path[7:], k, None, None), self.users
        elif path.startswith("/items/") and path.endswith("/similar"):
            name, key, route = path[7:-8], ("i", path[7:-8], k, None), self.similar
        else:
            return None
        if not 0 < len(name) <= 256 or "/" in name:
            return None
        if not texts:
            return key, route, None
        try:
            where = facade.where_of(snap, texts, []) or None  # as the app's route makes it (service._where)
        except BadFilter:
            return None
        return key + ((where.key(),) if where else ()), route, where
