"""Helpers for the HTTP tests: a real uvicorn server in a thread, a small client, a small version."""

from __future__ import annotations

import http.client
import json
import threading
import time

import numpy as np

from recommend.serving.payloads import item_payloads, user_payloads
from recommend.serving.publish import Storage, publish_version
from recommend.serving.shards import Graph


class ServerThread:
    """`app` served by uvicorn (the service's own protocol and options) on 127.0.0.1, a free port."""

    def __init__(self, app, settings):
        import uvicorn

        from recommend.serving.httpserver import uvicorn_options

        config = uvicorn.Config(app, host="127.0.0.1", port=0, **uvicorn_options(settings))
        self.server = uvicorn.Server(config)
        self.sock = config.bind_socket()
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def get(port: int, path: str, headers: dict | None = None, method: str = "GET", conn=None):
    """(status, JSON body or text, headers) of one request."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        return resp.status, body, dict(resp.getheaders())
    finally:
        if own:
            conn.close()


def small_version(n_items: int = 40, n_users: int = 20, dim: int = 8, seed: int = 0, metadata=None):
    """(items, users) of a small made-up version: item i is similar to i+1..i+3, user u gets u+1..u+5."""
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(n_items, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    item_ids = np.array([f"i{i}" for i in range(n_items)], dtype=object)
    ids = np.array([[(i + j + 1) % n_items for j in range(5)] for i in range(n_items)])
    scores = np.tile(np.linspace(0.9, 0.5, 5, dtype=np.float32), (n_items, 1))
    users = [f"u{u}" for u in range(n_users)]
    return ({"ids": item_ids.tolist(), "vectors": vecs,
             "payloads": item_payloads(item_ids, {"title": [f"title {i}" for i in range(n_items)]}, scores, ids,
                                       ["similar"] * n_items)},
            {"ids": users, "vectors": vecs[:n_users],
             "payloads": user_payloads(users, item_ids, scores[:n_users], ids[:n_users], ["history"] * n_users)})


def publish_small(store, run_id: str, created_at: str = "2026-01-01T00:00:00+00:00", meta: dict | None = None,
                  graph: Graph = Graph(), **kwargs):
    """`small_version` published as `run_id`; `graph`: the HNSW graph over the items' text vectors."""
    return publish_version(store, run_id, *small_version(**kwargs), storage=Storage(graph=graph),
                           metadata={"run_id": run_id, "created_at": created_at, **(meta or {})})


if __name__ == "__main__":  # publish one small version from another process: ROOT PREFIX RUN_ID
    import sys

    from recommend.serving.versions import EmbeddedVersions

    root, prefix, run = sys.argv[1:4]
    publish_small(EmbeddedVersions(root, prefix), run, seed=1, n_items=400, n_users=400)
    print("published", run, flush=True)
