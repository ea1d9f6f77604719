"""Answers as JSON bytes, and the plain lookups answered before FastAPI's routing (`FastLookups`).

A plain GET /users/<id> or /items/<id>/similar (no parameter but an exact `k`) is the bulk of a
server's traffic, and FastAPI's routing and parameter parsing cost more than the read; those are
answered here with the same facade call and cache key as the app's route (recommend/serving/service.py).

Example:
    app.add_middleware(FastLookups, live=live, metrics=metrics, default_k=10, reads=pool,
                       routes={r.path: r for r in app.routes if r.path in HOT_ROUTES})
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import orjson
from starlette.requests import Request

from recommend.serving import facade
from recommend.serving.live import LiveVersion, Snapshot


def envelope(snap: Snapshot, body: bytes) -> bytes:
    """The version fields in front of a cached answer body (`{"query":...}`): the age is always now's."""
    return b'{"version":%s,"created_at":%s,"age_seconds":%s,%s' % (
        orjson.dumps(snap.run_id), orjson.dumps(snap.created_at), orjson.dumps(snap.age_seconds()), body[1:])


def answer_body(answer: facade.Answer) -> bytes:
    """The answer's own fields as JSON (orjson writes the Recommendation dataclasses as objects)."""
    return orjson.dumps({"query": answer.query, "source": answer.source, "items": answer.items})


def lookup(snap: Snapshot, key: tuple) -> bytes:
    """The body of a plain lookup's answer: key ("u", user id, k, None) or ("i", item id, k)."""
    return answer_body((facade.user_answer if key[0] == "u" else facade.similar_answer)(snap, key[1], key[2]))


HOT_ROUTES = ("/users/{user_id}", "/items/{item_id}/similar")
FAILED = "recs.lookup_failed"  # the scope key where FastLookups leaves the exception its lookup raised


def failed_before(request: Request) -> None:
    """Raise what this very lookup raised in FastLookups (an unknown id, the store unavailable), so the
    app answers it with its own error, without asking the store again."""
    failed = request.scope.pop(FAILED, None)
    if failed is not None:
        raise failed


class FastLookups:
    """Pure ASGI, inside the Guard: a plain GET /users/<id> or /items/<id>/similar (no parameter but
    an exact `k`) is answered here, without FastAPI's routing and parameter parsing: from the live
    snapshot's cache, or read from the store in the reads pool by the same facade call as the app's
    route, and cached. These are the bulk of a server's traffic, and the routing costs more than
    the read. Anything else (another route or parameter, an id the app would not route) goes on to
    the app unchanged, and so does a failed lookup (an unknown id, the store unavailable), with its
    exception, which the app's route raises and answers as its own; the cached answers are ones the
    app would have made."""

    def __init__(self, app, live: LiveVersion, metrics, default_k: int, routes: dict, reads: ThreadPoolExecutor):
        self.app, self.live, self.metrics, self.default_k, self.reads = app, live, metrics, default_k, reads
        self.users, self.similar = routes["/users/{user_id}"], routes["/items/{item_id}/similar"]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET" and (snap := self.live.snap) is not None:
            found = self._key(scope)
            if found is not None:
                key, route = found
                body = snap.cache.get(key)
                if body is not None:
                    self.metrics.cache_hits.inc()
                else:
                    try:
                        body = await asyncio.get_running_loop().run_in_executor(self.reads, lookup, snap, key)
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

    def _key(self, scope) -> tuple | None:
        """The cache key the app's route would use, and the route; None when this is not plainly one."""
        query, k = scope["query_string"], self.default_k
        if query:
            digits = query[2:]
            if query[:2] != b"k=" or not digits.isdigit() or len(digits) > 4 or digits[:1] == b"0":
                return None
            k = int(digits)
            if k > 1000:
                return None
        path = scope["path"]
        if path.startswith("/users/"):
            name = path[7:]
            return (("u", name, k, None, None), self.users) if 0 < len(name) <= 256 and "/" not in name else None
        if path.startswith("/items/") and path.endswith("/similar"):
            name = path[7:-8]
            return (("i", name, k, None), self.similar) if 0 < len(name) <= 256 and "/" not in name else None
        return None
