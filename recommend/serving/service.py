"""`recs serve`: the facade over HTTP, JSON in and out, standard library only.

    GET /health                              {"status": "ok", "version": "<live run id>"}
    GET /users/<user_id>?k=10&recent=a,b     the user's list; `recent` = real-time fallback for a user the batch has not seen
    GET /items/<item_id>/similar?k=10        the item's similar items
    GET /search?q=trail+running+shoes&k=10   items nearest to a text, encoded now
    GET /versions                            published versions, which one is live

Answers carry the version they came from (see facade.Answer). Unknown users and items are 404,
bad parameters 400, an unavailable store 503; the body is always {"error": "..."}, never a traceback.
Requests are answered one at a time (Qdrant's local mode is one process, one caller); the
facade's in-memory cache keeps the hot lists out of the store.

Example:
    server = make_server(Recommender.from_config("config.yaml"), "127.0.0.1", 8000)
    server.serve_forever()
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from embedder.errors import RecsError
from recommend.serving.facade import NotFound, Recommender


class BadRequest(ValueError):
    pass


def _k(query: dict) -> int | None:
    if "k" not in query:
        return None
    try:
        k = int(query["k"][0])
    except ValueError:
        raise BadRequest(f"k must be a whole number, got {query['k'][0]!r}") from None
    if not 1 <= k <= 1000:
        raise BadRequest(f"k must be between 1 and 1000, got {k}")
    return k


def route(rec: Recommender, path: str, query: dict) -> dict | list:
    """The answer for one GET, as JSON-ready data. Raises NotFound, BadRequest or RecsError."""
    parts = [unquote(p) for p in path.strip("/").split("/") if p]
    if parts == ["health"]:
        return {"status": "ok", "version": rec.live_version()}
    if parts == ["versions"]:
        return [asdict(v) for v in rec.versions()]
    if len(parts) == 2 and parts[0] == "users":
        recent = [i for i in query.get("recent", [""])[0].split(",") if i]
        return rec.for_user(parts[1], _k(query), recent_items=recent or None).to_dict()
    if len(parts) == 3 and parts[0] == "items" and parts[2] == "similar":
        return rec.similar(parts[1], _k(query)).to_dict()
    if parts == ["search"]:
        text = query.get("q", [""])[0].strip()
        if not text:
            raise BadRequest("search needs a text: /search?q=...")
        return rec.search(text, _k(query)).to_dict()
    raise NotFound(f"no such endpoint {path!r}; try /health, /users/<id>, /items/<id>/similar, /search?q=, /versions")


def make_server(rec: Recommender, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server answering from `rec` (port 0 picks a free port: see server.server_address)."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the name http.server calls)
            url = urlsplit(self.path)
            try:
                with lock:
                    status, body = 200, route(rec, url.path, parse_qs(url.query))
            except BadRequest as exc:
                status, body = 400, {"error": str(exc)}
            except NotFound as exc:
                status, body = 404, {"error": str(exc)}
            except RecsError as exc:
                status, body = 503, {"error": str(exc)}
            except Exception as exc:  # a bug must not take the service down or leak a traceback
                status, body = 500, {"error": f"{type(exc).__name__}: {exc}"}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):  # one line per request on stderr, as http.server does, unless quiet
            if not getattr(self.server, "quiet", False):
                super().log_message(format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
