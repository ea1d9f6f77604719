"""`recs serve`: the facade over HTTP (FastAPI on uvicorn), answering while refreshes publish.

    GET /users/{user_id}?k=10&recent=a,b     the user's list; `recent`: real-time list for a user the batch has not seen
    GET /items/{item_id}/similar?k=10        the item's similar items
    GET /search?q=trail+running+shoes&k=10   items nearest to a text, encoded now
        each of the three takes &where=category=Shoes&where=price<100 (filters on publish.indexed_fields,
        recommend/serving/filters.py) and &exclude=I1,I2 (item ids never answered)
    POST /users/batch {"user_ids": [...], "k": 10, "where": {...}, "exclude": [...]}
                                             the lists of up to 1,000 users, one answer per id (unknown ids marked)
    POST /items {"items": [{...catalog columns...}]}
                                             add up to 1,000 new or changed items to the live version now (the
                                             API key required; recommend/serving/intake.py)
    GET /versions                            published versions, which one is live
    GET /health                              {"status": "ok" | "empty" | "degraded", ...}; never needs the API key
    GET /metrics                             Prometheus text format
    GET /docs, /redoc, /openapi.json         the API, described; the pages' scripts are served from here (no CDN)

Every answer carries `version`, `created_at` and `age_seconds`. Errors are JSON `{"error": ...}`:
400 bad parameter, 401 no or wrong API key, 404 unknown id or route, 405 wrong method, 408/414/431
(recommend/serving/httpserver.py), 503 store unavailable, nothing published yet, or busy.

How it stays up: a background task follows the live version (recommend/serving/live.py) and swaps
snapshots; each request takes the snapshot once. Hot answers are kept per snapshot as JSON bytes,
touched only on the event loop (no lock); misses read the store in a thread pool. Plain lookups
(/users/<id>, /items/<id>/similar) skip FastAPI's routing (`FastLookups`, recommend/serving/lookups.py).
Text queries go to one encoder process in small dynamic batches (recommend/serving/encoder.py).

Example:
    app = create_app(LiveVersion(store, freeze=True, warm=True), ServeSettings(), default_k=10, model="all-MiniLM-L6-v2")
    run_server(app, ServeSettings())
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from embedder.errors import InputError, RecsError
from recommend.serving import facade
from recommend.serving.batch_json import batch_body, user_rows
from recommend.serving.encoder import Busy, QueryEncoder
from recommend.serving.filters import BadFilter
from recommend.serving.httpserver import Guard, Metrics, configure_limits
from recommend.serving.intake import AddReport, Intake
from recommend.serving.query_batches import QueryBatcher
from recommend.serving.parameters import DiversityQuery, ExcludeQuery, IdPath, KQuery, NewItems, UsersBatch, WhereQuery
from recommend.serving.live import LiveVersion, NotFound, Snapshot
from recommend.serving.lookups import HOT_ROUTES, FastLookups, answer_body, envelope, failed_before
from recommend.serving.settings import ServeSettings

log = logging.getLogger("recs")
JSON = "application/json"
BATCH_PART = 100  # users of POST /users/batch read in one task: a plain lookup queues behind a part, not a whole batch

class Unavailable(RecsError):
    """Nothing can be answered now (nothing published, the store unreachable): HTTP 503."""


def _json(data, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(data), status, media_type=JSON, headers=headers)


def create_app(live: LiveVersion, settings: ServeSettings = ServeSettings(), *, default_k: int = 10, model: str | None = None,
               device: str = "cpu", api_key: str | None = None, encoder: QueryEncoder | None | bool = True,
               intake: Intake | None = None) -> FastAPI:
    """The HTTP app over `live`. `encoder`: True starts the query encoder process for the live
    version's model (or `model`); None: /search answers 503. `intake`: what POST /items adds with
    (None: it answers 403), in a process of its own (the encoder and the engine's writes hold the GIL)."""
    metrics = Metrics()
    state = {"encoder": None, "adder": None}
    reads = ThreadPoolExecutor(settings.read_threads, thread_name_prefix="recs-store")  # see ServeSettings.read_threads
    searches = ThreadPoolExecutor(1, thread_name_prefix="recs-search")  # a vector query never holds up a read by id
    batcher = QueryBatcher(searches, facade.hit_items)  # the filtered requests' vector queries, asked together

    async def follow() -> None:
        while True:
            await asyncio.sleep(settings.poll_s)
            try:
                await asyncio.to_thread(live.poll_once)
            except Exception:
                log.exception("following the live version failed")

    @asynccontextmanager
    async def lifespan(app):
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(1, "blas")  # request threads each running multi-threaded BLAS oversubscribe the cores
        await asyncio.to_thread(live.poll_once)  # up with the live version, or "empty"
        gc.collect()
        gc.freeze()
        tasks = [asyncio.create_task(follow())]
        if encoder is True:
            state["encoder"] = _encoder_for(live, settings, model, device)
        elif encoder:
            state["encoder"] = encoder
        if state["encoder"] is not None:
            tasks.append(asyncio.create_task(state["encoder"].run()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if state["encoder"] is not None:
                state["encoder"].close()
            for pool in (reads, searches):
                pool.shutdown(wait=False, cancel_futures=True)
            if state["adder"] is not None:  # waited for: an addition under way ends (nothing accepted is lost), and
                # the pool's thread, replacing the process it retired (max_tasks_per_child), is not left racing
                # the shutdown (Python 3.11: "TypeError: object of type 'NoneType' has no len()" in that thread)
                state["adder"].shutdown(wait=True, cancel_futures=True)
            limits.restore_original_limits()

    # FastAPI with /docs and /redoc loading Swagger UI and ReDoc from /static-offline-docs (the files ship in
    # the fastapi-offline package), not from a CDN: the pages work on a machine without internet
    app = FastAPIOffline(title="nightly-recs", version="1", lifespan=lifespan,
                         description="Precomputed recommendations from the live version; every answer says which version.")

    def snapshot() -> Snapshot:
        snap = live.snap
        if snap is None:
            raise Unavailable(live.error or f"nothing published under prefix {live.store.prefix!r} yet: run `recs refresh`")
        return snap

    async def cached(snap: Snapshot, key: tuple, compute, pool: ThreadPoolExecutor = reads) -> Response:
        """The answer from the cache, or `compute`d on `pool`; one that needs a vector query
        (facade.NeedsQuery) is finished on the search thread, beside the others waiting (QueryBatcher)."""
        body = snap.cache.get(key)
        if body is None:
            metrics.cache_misses.inc()
            loop = asyncio.get_running_loop()
            try:
                found = await loop.run_in_executor(pool, compute)
            except facade.NeedsQuery as needs:
                found = await batcher.finish(snap.reader, needs.then)
            body = answer_body(found)
            snap.cache.put(key, body)
        else:
            metrics.cache_hits.inc()
        return Response(envelope(snap, body), media_type=JSON)

    @app.get("/users/{user_id}", response_model=facade.Answer, response_class=Response)
    async def user(request: Request, user_id: IdPath, k: KQuery = None,
                   recent: Annotated[str | None, Query(max_length=4096, description="comma-separated item ids, for a "
                                                       "user the batch has not seen")] = None,
                   where: WhereQuery = None, exclude: ExcludeQuery = None, diversity: DiversityQuery = None):
        """The user's precomputed list (none of the items they interacted with); with a filter, the
        items of it that pass, filled by a vector query when fewer than k do (`source` says so)."""
        failed_before(request)
        snap, n = snapshot(), k or default_k
        items = [i for i in (recent or "").split(",") if i][:100] or None
        found = _where(snap, where, exclude)
        return await cached(snap, ("u", user_id, n, recent, diversity) + ((found.key(),) if found else ()),
                            lambda: facade.user_answer(snap, user_id, n, items, found, diversity or 0.0,
                                                       not found or bool(diversity)),
                            searches if items or diversity else reads)  # these need a vector query; a filter may

    @app.get("/items/{item_id}/similar", response_model=facade.Answer, response_class=Response)
    async def similar(request: Request, item_id: IdPath, k: KQuery = None, where: WhereQuery = None,
                      exclude: ExcludeQuery = None, diversity: DiversityQuery = None):
        """The items most similar to this one (itself excluded); a filter as for /users."""
        failed_before(request)
        snap, n = snapshot(), k or default_k
        found = _where(snap, where, exclude)
        return await cached(snap, ("i", item_id, n, diversity) + ((found.key(),) if found else ()),
                            lambda: facade.similar_answer(snap, item_id, n, found, diversity or 0.0,
                                                          not found or bool(diversity)),
                            searches if diversity else reads)

    @app.get("/search", response_model=facade.Answer, response_class=Response)
    async def search(q: Annotated[str, Query(min_length=1, max_length=1000, description="free text")], k: KQuery = None,
                     where: WhereQuery = None, exclude: ExcludeQuery = None, diversity: DiversityQuery = None):
        """Items nearest to a text, encoded now with the live version's model; only those that pass a filter."""
        snap, n, text = snapshot(), k or default_k, q.strip()
        if not text:
            raise HTTPException(400, "q: the text is empty")
        found = _where(snap, where, exclude)
        key = ("s", text, n, diversity) + ((found.key(),) if found else ())
        body = snap.cache.get(key)
        if body is None:
            enc = state["encoder"]
            if enc is None:
                raise Unavailable("text search is off in this server")
            if enc.fingerprint and snap.meta.get("model_fingerprint") not in (None, enc.fingerprint):
                raise Unavailable(f"version {snap.run_id} was built with another model ({snap.meta.get('model')}) "
                                  "than this server encodes queries with; restart `recs serve`")
            vector = await enc.encode(text)
            metrics.search_batch.observe(enc.batches[-1] if enc.batches else 1)
            return await cached(snap, key, lambda: facade.text_answer(snap, vector, text, n, found, diversity or 0.0), searches)
        metrics.cache_hits.inc()
        return Response(envelope(snap, body), media_type=JSON)

    # with several server processes a batch's connection is closed after its answer: the client's next
    # call connects again, and the process free first accepts it. Kept open, a process given more of
    # the batch clients' connections than the other answers each of them later (uvicorn's workers
    # share one socket, and 16 clients' connections fell 10 to 6 and worse)
    batch_headers = {"connection": "close"} if settings.workers > 1 else None

    @app.post("/users/batch")
    async def users_batch(body: UsersBatch):
        """The lists of up to 1,000 users at once, from one version, in the order asked; an unknown id
        is answered {"user_id", "error"} and never fails the others."""
        snap, ids, k = snapshot(), body.user_ids, body.k or default_k
        found, loop = facade.where_of(snap, body.where, body.exclude) or None, asyncio.get_running_loop()

        async def each_part(pool, read, *args) -> list:  # one version throughout: `snap` is held
            return [await loop.run_in_executor(pool, read, snap, ids[start:start + BATCH_PART], *args)
                    for start in range(0, len(ids), BATCH_PART)]
        if not found and not body.diversity:  # the stored lists' first k: written as JSON from them (batch_json.py)
            rows = await each_part(reads, user_rows, k)
            return Response(batch_body(snap, [r for part in rows for r in part]), media_type=JSON, headers=batch_headers)
        parts = await each_part(searches, facade.users_answers, k, found, body.diversity)
        answer = facade.BatchAnswer(snap.run_id, snap.created_at, snap.age_seconds(), ids, [a for p in parts for a in p.answers],
                                    list(dict.fromkeys(u for p in parts for u in p.unknown)))
        return Response(orjson.dumps(answer.to_dict(recommendations=True)), media_type=JSON, headers=batch_headers)

    @app.post("/items", response_model=AddReport)
    async def add_items(body: NewItems):
        """Add new or changed items to the live version now: text search, similar-from-text and filters
        find them within a poll (serve.poll_s). Needs the API key; rows that cannot be added are named."""
        if intake is None or api_key is None:
            raise HTTPException(403, "adding items needs an API key: set the variable serve.api_key_env names "
                                     "and restart `recs serve`")
        if state["adder"] is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # a fresh process for each addition: what it opened of the version (the engine's maps) goes with it
            state["adder"] = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)
        report = await asyncio.get_running_loop().run_in_executor(state["adder"], intake.add_records, body.items)
        await asyncio.to_thread(live.poll_once)  # this process answers with them at once; others within poll_s
        return _json(report.model_dump())

    @app.get("/versions")
    async def versions():
        """Published versions, newest first, and which one is live."""
        return _json([v.to_dict() for v in await run_in_threadpool(live.store.versions)])

    @app.get("/health")
    async def health():
        """ok: answering from a version; empty: nothing published yet; degraded (503): the store cannot be reached."""
        snap = live.snap
        if not live.reachable or (snap is None and live.error):
            return _json({"status": "degraded", "error": without_paths(live.error),
                          "version": snap.run_id if snap else None}, 503)
        if snap is None:
            return _json({"status": "empty", "version": None})
        return _json({"status": "ok", "version": snap.run_id, "created_at": snap.created_at,
                      "age_seconds": snap.age_seconds(), "added_items": getattr(snap.reader, "added_items", 0),
                      "text_graph": getattr(snap.reader, "text_graph", None),  # "pending": text search scans exactly
                      "pending_error": without_paths(live.error),
                      "search": "ready" if state["encoder"] and state["encoder"].ready else "not ready"})

    @app.get("/metrics")
    async def prometheus():
        """Requests, latency, cache hits, the live version and its age, in Prometheus text format."""
        snap = live.snap
        if snap is not None:
            metrics.version.clear()
            metrics.version.labels(snap.run_id).set(1)
            metrics.created.set(snap.created_ts)
            metrics.age.set(snap.age_seconds())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _errors(app, live)
    app.add_middleware(FastLookups, live=live, metrics=metrics, default_k=default_k, reads=reads, batcher=batcher,
                       routes={r.path: r for r in app.routes if r.path in HOT_ROUTES})
    app.add_middleware(Guard, metrics=metrics, api_key=api_key, max_requests=settings.max_requests)  # outside: first
    app.state.metrics, app.state.live, app.state.serving = metrics, live, state
    return app


def _where(snap: Snapshot, where: list[str] | None, exclude: str | None):
    """The request's filter against `snap`'s indexed fields (BadFilter: 400); None when there is none."""
    if not where and not exclude:
        return None
    left_out = [i for i in (exclude or "").split(",") if i]
    if len(left_out) > 1000:
        raise BadFilter(f"exclude: {len(left_out):,} item ids; at most 1,000")
    return facade.where_of(snap, where, left_out) or None


def _errors(app: FastAPI, live: LiveVersion) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = (f"no such route {request.url.path[:100]!r}; try /users/<id>, /items/<id>/similar, /search?q=, "
                      "/versions, /health, /docs")
        elif exc.status_code == 405:
            detail = f"method {request.method} not allowed here; this API answers GET (and POST /users/batch, /items)"
        return _json({"error": detail}, exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request, exc):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "request"
        return _json({"error": f"{where}: {first['msg']}"}, 400)

    @app.exception_handler(NotFound)
    async def not_found(request, exc):
        snap = live.snap
        extra = {"version": snap.run_id, "created_at": snap.created_at, "age_seconds": snap.age_seconds()} if snap else {}
        return _json({"error": str(exc), **extra}, 404)

    @app.exception_handler(InputError)
    @app.exception_handler(BadFilter)
    async def bad_filter(request, exc):
        return _json({"error": str(exc)}, 400)

    @app.exception_handler(Busy)
    async def busy(request, exc):
        return _json({"error": str(exc)}, 503, {"Retry-After": "2"})

    @app.exception_handler(RecsError)
    async def unavailable(request, exc):
        return _json({"error": str(exc)}, 503, {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def internal(request, exc):
        log.error("%s %s failed: %s: %s", request.method, request.url.path[:100], type(exc).__name__, exc, exc_info=exc)
        return _json({"error": f"internal error ({type(exc).__name__}); see the server's log"}, 500)


def _encoder_for(live: LiveVersion, settings: ServeSettings, model: str | None, device: str) -> QueryEncoder | None:
    from embedder.model import ModelNotFound, model_fingerprint, resolve_model_path

    snap = live.snap
    try:
        path = resolve_model_path((snap.meta.get("model") if snap else None) or model or "all-MiniLM-L6-v2")
    except ModelNotFound as exc:
        log.error("text search is off: %s", exc)
        return None
    return QueryEncoder(str(path), fingerprint=model_fingerprint(path), device="cpu" if device == "auto" else device,
                        threads=settings.search_threads, max_batch=settings.search_batch, max_queue=settings.search_queue)


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/:;,()]+)+")


def without_paths(error: str | None) -> str | None:
    """An error as /health (open to anyone, no key) shows it: each file path cut to its last name
    ("/srv/recs/store/recs/LIVE is damaged" -> "LIVE is damaged"); the whole text is in the log."""
    return _PATH.sub(lambda m: re.split(r"[\\/]", m.group(0))[-1], error) if error else error


def api_key(settings: ServeSettings) -> str | None:
    """The key from the variable `settings.api_key_env`; None when it is not set. A variable set to
    nothing is refused: an empty key would otherwise mean no key at all, without a word."""
    value = os.environ.get(settings.api_key_env)
    if value is None:
        return None
    if not value.strip():
        from recommend.config import ConfigError  # exit code 2, as for any setting that makes no sense

        raise ConfigError(f"{settings.api_key_env} is set but empty: set it to a key (e.g. the output of "
                        f"'openssl rand -hex 32'), or unset it to serve without one")
    return value


def app_from_config(config, *, encoder: bool = True) -> FastAPI:
    """The app for a Config: its versions, its `serve` section, the API key from `serve.api_key_env`."""
    from recommend.serving.versions import version_store

    settings = config.serve
    configure_limits(settings)
    live = LiveVersion(version_store(config.publish, config.workdir), poll_s=settings.poll_s,
                       cache_size=settings.cache_size, freeze=True, warm=True)
    return create_app(live, settings, default_k=config.lists.k, model=config.embed.model, device=config.embed.device,
                      api_key=api_key(settings), encoder=encoder, intake=Intake.from_config(config))


def app_from_env() -> FastAPI:
    """Factory for `serve.workers` > 1: each worker process builds its app from $RECS_CONFIG, with
    the serve settings `recs serve` changed from its flags ($RECS_SERVE, JSON: --workers among them)."""
    import json

    from recommend.config import load_config

    config = load_config(os.environ["RECS_CONFIG"], check_inputs=False)
    config.serve = config.serve.model_copy(update=json.loads(os.environ.get("RECS_SERVE") or "{}"))
    return app_from_config(config)
