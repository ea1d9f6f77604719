"""`recs serve` over real HTTP (uvicorn, the service's own protocol and limits) on real local-mode
versions: every status code as JSON, the API key, /health and /metrics, and a new version published by
another process while the server answers a steady stream of requests: none fails, and the answers
move to the new version without a restart."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import write_config
from http_helpers import ServerThread, get, publish_small
from recommend.serving import facade
from recommend.serving.live import LiveVersion
from recommend.serving.service import create_app
from recommend.serving.settings import ServeSettings
from recommend.serving.versions import EmbeddedVersions

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
V1, V2 = "20260101T000000-aaaa", "20260102T000000-bbbb"


def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        if data:
            s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (socket.timeout, ConnectionResetError):
            pass
        return b"".join(chunks)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    """A server over one published version built for the tiny model (so /search encodes for real)."""
    from embedder.model import model_fingerprint

    store = EmbeddedVersions(tmp_path_factory.mktemp("serve") / "store", "t")
    publish_small(store, V1, dim=32, meta={"model": str(tiny_model), "model_fingerprint": model_fingerprint(tiny_model)})
    settings = ServeSettings(poll_s=0.2, head_timeout_s=1.0)
    app = create_app(LiveVersion(store, poll_s=0.2, freeze=True), settings, default_k=3, model=str(tiny_model))
    with ServerThread(app, settings) as server:
        yield server.port, store


def test_answers_carry_their_version_and_every_error_is_json(served):
    port, _ = served
    status, body, _ = get(port, "/users/u1?k=2")
    assert status == 200 and body["version"] == V1 and body["created_at"] == "2026-01-01T00:00:00+00:00"
    assert body["age_seconds"] > 0 and [i["item_id"] for i in body["items"]] == ["i2", "i3"]
    assert body["items"][0]["metadata"] == {"title": "title 2"} and body["source"] == "history"
    status, body, _ = get(port, "/items/i3/similar")
    assert status == 200 and [i["item_id"] for i in body["items"]] == ["i4", "i5", "i6"]  # default k: 3
    status, body, _ = get(port, "/users/newcomer?recent=i1,i2&k=4")
    assert status == 200 and body["source"] == "realtime" and not {"i1", "i2"} & {i["item_id"] for i in body["items"]}
    assert get(port, "/versions")[1] == [{"run_id": V1, "live": True, "items": 40, "users": 20,
                                          "created_at": "2026-01-01T00:00:00+00:00", "added_items": 0}]

    status, body, _ = get(port, "/users/nobody")
    assert status == 404 and body["error"].startswith("unknown user 'nobody' in version") and body["version"] == V1
    status, body, _ = get(port, "/items/" + "z" * 200 + "/similar")  # an unknown id is echoed cut short
    assert status == 404 and len(body["error"]) < 200 and "(200 characters)" in body["error"]
    assert get(port, "/nowhere")[:2] == (404, {"error": "no such route '/nowhere'; try /users/<id>, /items/<id>/similar, "
                                                        "/search?q=, /versions, /health, /docs"})
    for path, error in (("/users/u1?k=0", "k: Input should be greater than or equal to 1"),
                        ("/users/u1?k=1001", "k: Input should be less than or equal to 1000"),
                        ("/users/u1?k=ten", "k: Input should be a valid integer, unable to parse string as an integer"),
                        ("/users/" + "x" * 300, "user_id: String should have at most 256 characters"),
                        ("/search", "q: Field required"), ("/search?q=%20", "q: the text is empty")):
        assert get(port, path)[:2] == (400, {"error": error}), path
    assert get(port, "/users/u1", method="POST")[:2] == (405, {
        "error": "method POST not allowed here; this API answers GET (and POST /users/batch, /items)"})
    assert get(port, "/users/" + "x" * 9000)[:2] == (414, {"error": "request line longer than 8192 bytes"})
    assert get(port, "/users/u1", headers={"X-Big": "y" * 20_000})[:2] == (431, {"error": "request headers larger than 16384 bytes"})
    for raw in (b"FOO /users/u1 HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /users/u1 HTTP/1.1\r\nBad Header\r\n\r\n"):
        reply = _raw(port, raw)
        assert reply.startswith(b"HTTP/1.1 400") and b"application/json" in reply and reply.endswith(b'"}'), reply
    started = time.monotonic()  # a client that sends half a head and waits: 408 after serve.head_timeout_s
    reply = _raw(port, b"GET /users/u1 HTTP/1.1\r\nHost: x\r\n")
    assert reply.startswith(b"HTTP/1.1 408") and b"no complete request head within 1s" in reply
    assert 0.8 < time.monotonic() - started < 4
    k_param = get(port, "/openapi.json")[1]["paths"]["/users/{user_id}"]["get"]["parameters"][1]
    assert k_param["name"] == "k" and '"maximum": 1000' in json.dumps(k_param)
    assert get(port, "/docs")[0] == 200


def test_search_encodes_in_batches_and_health_and_metrics(served):
    port, _ = served
    deadline = time.monotonic() + 90
    while get(port, "/health")[1].get("search") != "ready":  # the model loads in the background meanwhile
        assert time.monotonic() < deadline, "the query encoder never became ready"
        assert get(port, "/users/u1")[0] == 200  # other routes answer while it loads
        time.sleep(0.2)
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(get(port, f"/search?q=walking+boots+{i}"))) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s == 200 and b["source"] == "text" and len(b["items"]) == 3 and b["version"] == V1 for s, b, _ in results)
    health = get(port, "/health")
    assert health[0] == 200 and health[1]["status"] == "ok" and health[1]["version"] == V1
    metrics = get(port, "/metrics")[1]
    batches = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("recs_search_batch_size_")}
    assert batches["recs_search_batch_size_count"] < 17  # 16 concurrent texts went in fewer encoder calls
    for name in ('recs_requests_total{route="/users/{user_id}",status="200"}', "recs_request_duration_seconds_bucket",
                 "recs_cache_hits_total", f'recs_live_version_info{{version="{V1}"}} 1.0', "recs_live_version_age_seconds",
                 "recs_requests_in_flight 1.0"):  # the scrape itself is in flight
        assert name in metrics, name


def test_the_api_key_guards_every_route_but_health(tmp_path, monkeypatch):
    store = EmbeddedVersions(tmp_path / "store", "t")
    settings = ServeSettings(poll_s=0.2)
    app = create_app(LiveVersion(store, poll_s=0.2), settings, api_key="s3cret", encoder=None)
    with ServerThread(app, settings) as server:
        port = server.port
        assert get(port, "/health")[:2] == (200, {"status": "empty", "version": None})  # nothing published yet
        for path in ("/users/u1", "/metrics", "/docs", "/openapi.json", "/nowhere"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                status, body, sent = get(port, path, headers)
                assert status == 401 and "missing or wrong API key" in body["error"] and sent["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret"}
        status, body, sent = get(port, "/users/u1", good)
        assert status == 503 and "nothing published" in body["error"] and sent["retry-after"]
        publish_small(store, V1)
        time.sleep(0.6)
        assert get(port, "/users/u1", good)[0] == 200 and get(port, "/metrics", good)[0] == 200
        store.pointer.write_text("{garbled")  # the store cannot be read any more: degraded, the lists still answer
        time.sleep(0.6)
        status, body, _ = get(port, "/health")
        assert status == 503 and body["status"] == "degraded" and "LIVE is damaged" in body["error"]
        assert str(tmp_path) not in json.dumps(body) and "/" not in body["error"]  # open to anyone: no path of the machine
        assert get(port, "/users/u1", good)[0] == 200


def test_a_version_published_by_another_process_is_served_without_a_restart_and_no_request_fails(tmp_path):
    store = EmbeddedVersions(tmp_path / "store", "t")
    publish_small(store, V1, n_items=400, n_users=400)
    settings = ServeSettings(poll_s=0.2)
    app = create_app(LiveVersion(store, poll_s=0.2, freeze=True), settings, encoder=None)
    seen, failures, stop = [], [], threading.Event()

    def client(n: int) -> None:
        import http.client

        conn, i = http.client.HTTPConnection("127.0.0.1", port, timeout=30), n
        while not stop.is_set():
            i = (i + 7) % 400
            try:
                status, body, _ = get(port, f"/users/u{i}?k=5", conn=conn)
                if status != 200:
                    failures.append((status, body))
                else:
                    seen.append((n, time.monotonic(), body["version"]))
            except Exception as exc:  # a dropped connection is a failed request too
                failures.append(repr(exc))
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    with ServerThread(app, settings) as server:
        port = server.port
        clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in clients:
            t.start()
        try:
            time.sleep(0.5)
            publisher = subprocess.run([sys.executable, str(ROOT / "tests" / "http_helpers.py"), str(store.root), "t", V2],
                                       capture_output=True, text=True, env=ENV, timeout=120)
            assert publisher.returncode == 0, publisher.stderr
            switched = time.monotonic()
            deadline = switched + 20
            while not seen or seen[-1][2] != V2:
                assert time.monotonic() < deadline, "the server never answered from the new version"
                time.sleep(0.05)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in clients:
                t.join()
    assert not failures, failures[:5]
    versions = [v for _, _, v in seen]
    assert versions[0] == V1 and versions[-1] == V2 and len(seen) > 100
    for n in range(4):  # each client moved from the old version to the new one once, never back
        mine = [v for c, _, v in seen if c == n]
        assert mine == sorted(mine), f"client {n} saw the old version after the new one"


def test_recs_serve_follows_config_and_clients_that_go_away_leave_no_traceback(tmp_path, sample_dir, tiny_model):
    import psutil

    from embedder.model import model_fingerprint

    config = write_config(tmp_path, sample_dir, tiny_model, serve={"port": 0, "poll_s": 0.2})
    publish_small(EmbeddedVersions(tmp_path / "work" / "store", "recs"), V1, dim=32,
                  meta={"model": str(tiny_model), "model_fingerprint": model_fingerprint(tiny_model)})
    proc = subprocess.Popen([sys.executable, "-m", "recommend.cli", "serve", "-c", str(config)], env=ENV,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith("serving on http://127.0.0.1:"), line
        port = int(line.split(":")[2].split()[0])
        deadline = time.monotonic() + 90
        while get(port, "/health")[1].get("search") != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children  # the query encoder
        for path in ("/search?q=gone+before+the+answer", "/users/u1", "/search?q=another+one"):
            with socket.create_connection(("127.0.0.1", port)) as s:  # ask, then hang up at once
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /users/u1 HT")  # half a head, then gone
        time.sleep(1.5)
        assert get(port, "/search?q=still+here")[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130) and "Traceback" not in err and "Error" not in err, err  # 130: stopped by Ctrl-C
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]  # no encoder left behind


def test_serve_workers_on_any_free_port_say_which_and_each_answers(tmp_path, sample_dir, tiny_model):
    """`--workers 2 --port 0`: the port printed is the one the workers share (uvicorn binds it for them
    and would print 0), and two worker processes answer on it."""
    import psutil

    config = write_config(tmp_path, sample_dir, tiny_model, serve={"port": 0})
    publish_small(EmbeddedVersions(tmp_path / "work" / "store", "recs"), V1)
    proc = subprocess.Popen([sys.executable, "-m", "recommend.cli", "serve", "-c", str(config), "--workers", "2"],
                            env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        port = int(line.split(":")[2].split()[0])
        assert port > 0 and "with 2 workers" in line, line
        deadline = time.monotonic() + 90
        while True:
            try:
                status, body, _ = get(port, "/users/u1")
                break
            except OSError:
                assert time.monotonic() < deadline, "the workers never answered"
                time.sleep(0.2)
        assert status == 200 and body["version"] == V1 and [r["item_id"] for r in body["items"]][:2] == ["i2", "i3"]
        workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 2, [c.cmdline() for c in psutil.Process(proc.pid).children()]
        # the workers run with the flag's settings (the config says 1 worker): a batch's connection is
        # closed after its answer, so that the next call goes to the worker free first
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/users/batch", body=json.dumps({"user_ids": ["u1", "ghost"]}), headers={"content-type": "application/json"})
        resp = conn.getresponse()
        answers = json.loads(resp.read())["answers"]
        assert resp.status == 200 and resp.getheader("connection") == "close" and answers[1]["error"] == "unknown user"
        assert [r["item_id"] for r in answers[0]["items"]][:2] == ["i2", "i3"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err


def test_a_qdrant_server_outage_is_503_and_degraded_never_500():
    """The server code path (on qdrant-client's in-memory mode); the outage is injected by pointing the
    client at a closed port. Cached answers still come; others are 503; /health says degraded."""
    from qdrant_client import QdrantClient

    from recommend.serving.versions import ServerVersions

    store = ServerVersions(QdrantClient(":memory:"), "t")
    publish_small(store, V1)
    live = LiveVersion(store, poll_s=0.2)
    settings = ServeSettings(poll_s=0.2)
    with ServerThread(create_app(live, settings, encoder=None), settings) as server:
        port = server.port
        assert get(port, "/users/u1")[0] == 200 and get(port, "/health")[1]["status"] == "ok"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        store.client = live.snap.reader.client = QdrantClient(url=f"http://127.0.0.1:{closed}", timeout=1,
                                                              check_compatibility=False)
        time.sleep(0.6)
        status, body, _ = get(port, "/users/u2")
        assert status == 503 and body["error"].startswith(f"Qdrant did not answer for version {V1}")
        status, body, _ = get(port, "/health")
        assert status == 503 and body["status"] == "degraded" and body["version"] == V1
        assert get(port, "/users/u1")[0] == 200  # from the hot cache
        assert get(port, "/versions")[0] == 503


def test_plain_lookups_skip_the_routing_and_answer_as_the_app_does(tmp_path):
    """A plain /users/<id> or /items/<id>/similar is answered before FastAPI's routing (FastLookups),
    from the cache or the store: it must be the answer the app makes, counted under the same route;
    a request the app would refuse, and an unknown id, must still reach the app."""
    store = EmbeddedVersions(tmp_path / "store", "t")
    publish_small(store, V1)
    settings = ServeSettings(poll_s=0.2)
    live = LiveVersion(store, poll_s=0.2)
    app = create_app(live, settings, default_k=4, encoder=None)
    with ServerThread(app, settings) as server:
        port = server.port
        status, body, _ = get(port, "/users/u2?k=3")  # a miss, read by FastLookups
        via_app = get(port, "/users/u2?k=3&recent=")[1]  # another key: made by the app's route
        direct = facade.user_answer(live.snap, "u2", 3).to_dict()
        assert status == 200 and {**body, "age_seconds": 0} == {**via_app, "age_seconds": 0}
        assert {k: body[k] for k in ("query", "source", "items")} == {k: direct[k] for k in ("query", "source", "items")}
        reader, asked = live.snap.reader, []
        real = reader.payload
        reader.payload = lambda kind, name: asked.append(name) or real(kind, name)  # counts the reads
        status, body, _ = get(port, "/users/nobody")  # the lookup fails: the app answers with its own error
        assert status == 404 and body["version"] == V1 and "unknown user" in body["error"]
        assert asked == ["nobody"]  # once: the app raised the lookup's own error, not asked again
        reader.payload = real
        for path in ("/users/u1?k=3", "/users/u1", "/items/i2/similar?k=2"):
            made, hot = get(port, path), get(port, path)  # the app made it; then it came from the cache
            assert made[0] == hot[0] == 200 and made[2]["content-type"] == hot[2]["content-type"] == "application/json"
            assert {**made[1], "age_seconds": 0} == {**hot[1], "age_seconds": 0} and hot[1]["version"] == V1
        assert len(get(port, "/users/u1")[1]["items"]) == 4 and len(get(port, "/users/u1?k=03")[1]["items"]) == 3
        for path in ("/users/u1?k=0", "/users/u1?k=1001", "/users/u1?k=3&k=x", "/items/i2/similar?k=-1"):
            assert get(port, path)[0] == 400, path  # refused by the app, never answered from the cache
        assert get(port, "/users/" + "u" * 300)[0] == 400
        metrics = get(port, "/metrics")[1]
        assert 'recs_requests_total{route="/users/{user_id}",status="200"} 8.0' in metrics
        assert 'recs_requests_total{route="/users/{user_id}",status="404"} 1.0' in metrics
        assert 'recs_requests_total{route="/items/{item_id}/similar",status="200"} 2.0' in metrics
        assert "recs_cache_hits_total 5.0" in metrics  # the second of each pair, u1 once more, and k=03 (by the app)


def test_only_an_exact_k_and_where_filters_are_read_before_the_routing():
    """lookups.plain_parameters: what FastLookups answers itself, decoded as the app decodes it;
    anything else (another parameter, a k written otherwise or twice, over 20 filters) goes to the app."""
    from recommend.serving.lookups import plain_parameters

    assert plain_parameters(b"k=3") == (3, [])
    assert plain_parameters(b"where=category%3DRunning+shoes&where=price%3C10&k=1000") == (
        1000, ["category=Running shoes", "price<10"])
    for refused in (b"k=03", b"k=0", b"k=1001", b"k=3&k=4", b"k=x", b"k=%C2%B2", b"recent=i1", b"where=a=1&diversity=0.5",
                    b"&".join([b"where=stock=1"] * 21)):
        assert plain_parameters(refused) is None, refused
