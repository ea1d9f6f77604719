"""What `recs serve` puts around the FastAPI app: limits uvicorn does not enforce, one pure ASGI
guard (in-flight limit, API key, metrics), and the uvicorn server itself.

- `LimitedHttpTools`: uvicorn's httptools protocol with a bound on the request line (414) and on the
  headers (431), a deadline for a request's head (408; uvicorn has none, so a silent connection was
  held forever), and JSON instead of text for a request it cannot parse (400). Idle keep-alive
  connections close after `serve.keep_alive_s` (uvicorn's own timer).
- `Guard`: more than `serve.max_requests` in flight: 503; with an API key, every route but /health
  needs `Authorization: Bearer <key>` (compared in constant time): 401; every request counted and
  timed by route; a client that went away is not an error (no traceback).
"""

from __future__ import annotations

import hmac
import logging
import socket
import time

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from recommend.serving.settings import ServeSettings

log = logging.getLogger("recs")
OPEN_PATHS = ("/health",)


def _reply(status: int, reason: bytes, error: str, headers: bytes = b"") -> bytes:
    body = orjson.dumps({"error": error})
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n%s"
            % (status, reason, len(body), headers, body))


class LimitedHttpTools(HttpToolsProtocol):
    """Limits are class attributes, set from the `serve` section by `configure_limits` (in each worker)."""

    max_url, max_headers, head_timeout_s = 8192, 16384, 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_bytes, self._url_bytes, self._rejected = 0, 0, False
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def _reject(self, status: int, reason: bytes, error: str) -> None:
        if self._rejected:
            return
        self._rejected = True
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.write(_reply(status, reason, error))
            self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request under way: its head is late
            self._reject(408, b"Request Timeout", f"no complete request head within {self.head_timeout_s:g}s")

    def data_received(self, data: bytes) -> None:
        if not self._rejected:
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        if self._url_bytes > self.max_url:
            self._reject(414, b"URI Too Long", f"request line longer than {self.max_url} bytes")
        else:
            self._reject(400, b"Bad Request", "invalid HTTP request (unknown method or malformed request line or headers)")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._url_bytes = 0
        if self._head_timer is None:  # the next request on a kept-alive connection
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > self.max_url:
            self._reject(414, b"URI Too Long", f"request line longer than {self.max_url} bytes")
        elif not self._rejected:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.max_headers:
            self._reject(431, b"Request Header Fields Too Large", f"request headers larger than {self.max_headers} bytes")
        elif not self._rejected:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        if not self._rejected:
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._rejected:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._rejected:
            super().on_message_complete()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


def configure_limits(settings: ServeSettings) -> None:
    LimitedHttpTools.max_url = settings.max_url_bytes
    LimitedHttpTools.max_headers = settings.max_header_bytes
    LimitedHttpTools.head_timeout_s = settings.head_timeout_s


class Metrics:
    """The service's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("recs_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram("recs_request_duration_seconds", "time to answer a request", ["route"], registry=r,
                                 buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.cache_hits = Counter("recs_cache_hits", "answers served from the hot cache", registry=r)
        self.cache_misses = Counter("recs_cache_misses", "answers fetched from the store", registry=r)
        self.search_batch = Histogram("recs_search_batch_size", "texts encoded together", registry=r,
                                      buckets=(1, 2, 4, 8, 16, 32, 64))
        self.version = Gauge("recs_live_version_info", "the live version being served (value 1)", ["version"], registry=r)
        self.created = Gauge("recs_live_version_created_timestamp_seconds", "when the live version was made", registry=r)
        self.age = Gauge("recs_live_version_age_seconds", "age of the live version", registry=r)
        self.in_flight = Gauge("recs_requests_in_flight", "requests being answered", registry=r)


class Guard:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it costs throughput): limit, auth, metrics."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_requests: int):
        self.app, self.metrics, self.max_requests = app, metrics, max_requests
        self.key = f"Bearer {api_key}".encode() if api_key else None
        self.in_flight = 0
        metrics.in_flight.set_function(lambda: self.in_flight)  # read when /metrics is scraped

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            try:
                await send(message)
            except OSError:
                pass  # the client went away: nothing to answer, nothing to report

        self.in_flight += 1
        try:
            if self.in_flight > self.max_requests:
                await _json(send_status, 503, {"error": f"more than {self.max_requests} requests in flight; retry shortly"},
                            [(b"retry-after", b"1")])
            elif self.key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
                await _json(send_status, 401, {"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
                            [(b"www-authenticate", b"Bearer")])
            elif _declared_length(scope) > MAX_BODY_BYTES:
                await _json(send_status, 413, {"error": f"request body over {MAX_BODY_BYTES:,} bytes"})
            else:
                await self.app(scope, receive if scope["method"] in ("GET", "HEAD") else _bounded(receive), send_status)
        finally:
            self.in_flight -= 1
            route = scope.get("route")
            path = route.path if route is not None else ("unauthorized" if status[0] == 401 else "other")
            self.metrics.requests.labels(path, str(status[0] or 499)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)

    def _authorized(self, scope) -> bool:
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(given, self.key)


MAX_BODY_BYTES = 1 << 20  # a request body (POST /users/batch: 1,000 ids of 256 characters is a quarter of it)


def _declared_length(scope) -> int:
    given = next((v for k, v in scope["headers"] if k == b"content-length"), b"0")
    return int(given) if given.isdigit() else 0


def _bounded(receive):
    """`receive` that stops a body (chunked, of no declared length) once it passes MAX_BODY_BYTES: 413."""
    seen = [0]

    async def bounded():
        message = await receive()
        seen[0] += len(message.get("body", b""))
        if seen[0] > MAX_BODY_BYTES:
            raise HTTPException(413, f"request body over {MAX_BODY_BYTES:,} bytes")
        return message
    return bounded


async def _json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


def uvicorn_options(settings: ServeSettings) -> dict:
    configure_limits(settings)
    return dict(http=LimitedHttpTools, loop="uvloop", timeout_keep_alive=settings.keep_alive_s, access_log=False,
                timeout_graceful_shutdown=5, log_level="warning", lifespan="on", server_header=False)


def run_server(app, settings: ServeSettings, announce=print) -> None:
    """Serve `app` on settings.host:settings.port until Ctrl-C or SIGTERM. `announce(url)` once listening
    (port 0: the port picked)."""
    import uvicorn

    config = uvicorn.Config(app, host=settings.host, port=settings.port, **uvicorn_options(settings))
    sock = config.bind_socket()
    host, port = sock.getsockname()[:2]

    class Announcing(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # listening, the live version loaded
                announce(f"http://{host if sock.family != socket.AF_INET6 else f'[{host}]'}:{port}")

    Announcing(config).run(sockets=[sock])


def free_port(host: str) -> int:
    """A port free on `host` now (the OS's pick for port 0), for workers that must share one."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_workers(factory: str, settings: ServeSettings) -> None:
    """`settings.workers` server processes on one socket, each building its app with `factory`."""
    import uvicorn

    opts = uvicorn_options(settings)
    opts["http"] = "recommend.serving.httpserver:LimitedHttpTools"
    uvicorn.run(factory, factory=True, host=settings.host, port=settings.port, workers=settings.workers, **opts)
