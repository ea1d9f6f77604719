"""`recs serve` under load: 1, 16 and 64 concurrent keep-alive clients on /users (hot: answers
cached; cold: each user asked once; filtered: cold, with --where, answered from what passes of the
stored list and a vector query filling it; strict: --strict, where few items pass, so mostly the
vector query; covered: --where's field, any of the values the user's own stored list holds, so
the list answers alone), /items/<id>/similar, /search (unique texts, so every one is encoded) and POST
/users/batch (1,000 users a call, each user once; filtered: with --where; beside /users: one batch
client while as many clients as the figure's ask /users cold, the apps' traffic beside a batch job), then a
`recs add-items` of --add-items new items (texts not seen before, so all encoded) while 16 clients keep
asking: when the last one is found by /search, failed requests meanwhile, and the add against raw
`model.encode` of the same texts in this process (the baseline, same run); then a second
`recs refresh` while 16 clients (--refresh-clients) keep asking: failed requests across the switch,
and when the answers moved to the new version. One JSON line per figure. The load generator
is raw asyncio streams with prebuilt requests (an httpx client capped at ~800 req/s here), in this
process, on the same cores as the server.

    .venv/bin/python tests/benchmarks/bench_serve.py                   # sample 3,000 items x 20,000 users, real model
    .venv/bin/python tests/benchmarks/bench_serve.py --seconds 3 --users 5000
    .venv/bin/python tests/benchmarks/bench_serve.py --clients 16 --routes "/users hot" --no-refresh
    .venv/bin/python tests/benchmarks/bench_serve.py --config DIR/config.yaml --items 100000 --users 100000 --id-digits 7
        (a workdir bench_scale.py refreshed with --publish: its ids are U0000042, I0000042)

Serve's memory (RSS, with its children) is sampled throughout: steady, and its peak across the refresh.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402

from common import emit, parser, texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


async def _client(port: int, paths, stop: float, out: dict, key: str | None) -> None:
    auth = b"Authorization: Bearer %s\r\n" % key.encode() if key else b""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while time.perf_counter() < stop:
        path = next(paths, None)
        if path is None:
            break
        started = time.perf_counter()
        try:
            if isinstance(path, tuple):  # (path, JSON body): a POST
                path, body = path
                writer.write(b"POST %s HTTP/1.1\r\nHost: bench\r\n%sContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (path, auth, len(body), body))
            else:
                writer.write(b"GET %s HTTP/1.1\r\nHost: bench\r\n%s\r\n" % (path, auth))
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line[15:]) for line in head.split(b"\r\n") if line[:15].lower() == b"content-length:")
            body = await reader.readexactly(length)
            out["latency"].append(time.perf_counter() - started)
            if b"\r\nconnection: close" in head.lower():  # the server closes it (a batch, with several workers)
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if head[9:12] != b"200":
                out["failed"].append(head[9:12].decode())
            elif out.get("versions") is not None:
                out["versions"].append((time.time(), json.loads(body)["version"]))
        except Exception as exc:  # a dropped connection is a failed request
            out["failed"].append(type(exc).__name__)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()


def drive(port: int, paths, clients: int, seconds: float, key: str | None = None, versions: bool = False) -> dict:
    """`clients` closed-loop clients for `seconds` (or until `paths`, an iterator, runs out)."""
    return drive_groups(port, [(paths, clients)], seconds, key, versions)[0]


def drive_groups(port: int, groups: list, seconds: float, key: str | None = None, versions: bool = False) -> list[dict]:
    """Each (paths, clients) group's closed-loop clients at once for `seconds`: the figures of each
    (a batch job's calls beside the apps' lookups)."""
    outs = [{"latency": [], "failed": [], "versions": [] if versions else None} for _ in groups]

    async def main():
        stop = time.perf_counter() + seconds
        await asyncio.gather(*(_client(port, paths, stop, out, key) for (paths, clients), out in zip(groups, outs)
                               for _ in range(clients)))

    started = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - started
    figures = []
    for (_, clients), out in zip(groups, outs):
        lat = sorted(out["latency"])
        pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2)) if lat else (lambda q: None)
        figures.append({"clients": clients, "requests": len(lat), "failed": len(out["failed"]),
                        "req_per_s": round(len(lat) / wall, 1), "p50_ms": pick(0.5), "p99_ms": pick(0.99),
                        "max_ms": pick(1.0), "seconds": round(wall, 2), "_versions": out["versions"]})
    return figures


def _covered(config: Path, users: list[str], field: str, clients: list[int]) -> dict:
    """/users requests for each client count whose filter the user's stored list covers: `field`
    any of the values the list's k items hold (read through the facade in this process, 1,000 users
    a call), so the list answers alone; each user once."""
    from urllib.parse import quote

    from recommend.serving.facade import Recommender

    rec, paths = Recommender.from_config(str(config), poll_s=1e9), []
    for start in range(0, len(users), 1000):
        batch = rec.for_users(users[start:start + 1000])
        for user, answer in zip(batch.user_ids, batch.answers):
            values = sorted({str(r.metadata[field]) for r in (answer.items if answer else []) if r.metadata.get(field) is not None})
            if values:
                paths.append(f"/users/{user}?where={quote(field + '=' + '|'.join(values), safe='=|')}".encode())
    del rec  # its version released (recommend/serving/live.py), the server's pages left in the page cache
    return {n: iter(paths[i::len(clients)]) for i, n in enumerate(clients)}


def _batches(rng, users: list[str], clients: list[int], where: str | None) -> dict:
    """POST /users/batch requests for each client count: 1,000 users a call (fewer in a small shop),
    each user asked once per route; `where` (as in a query string) in each body."""
    body = {"where": [where.replace("%3C", "<")]} if where else {}
    mine, size = rng.sample(users, len(users)), max(1, min(1000, len(users) // len(clients)))
    return {n: iter([(b"/users/batch", json.dumps({"user_ids": part[j:j + size], **body}).encode())
                     for j in range(0, len(part) - size + 1, size)])
            for n, part in ((n, mine[i::len(clients)]) for i, n in enumerate(clients))}


def passes_some(port: int, users: list[str], where: str, flag: str) -> None:
    """Refuse a filter no item passes: its figure would time empty answers (category=7 where the
    catalog's values are c0..c49 did, until 2026-12-06)."""
    import urllib.request

    for user in users:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/users/{user}?where={where}", timeout=30) as resp:
            if json.loads(resp.read())["items"]:
                return
    raise SystemExit(f"bench_serve.py: {flag} {where!r} passes no item for the first {len(users)} users: "
                     "pick values the catalog holds (bench_scale.py's categories are c0..c49)")


def cycle(paths: list[bytes]):
    while True:
        yield from paths


def wait_health(port: int, want=lambda h: h.get("status") == "ok", timeout: float = 300) -> dict:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                health = json.loads(resp.read())
                if want(health):
                    return health
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"serve did not become ready: {health if 'health' in locals() else 'no answer'}")
        time.sleep(0.5)


class Memory:
    """The peak RSS of a process and its children, sampled every 50 ms in a thread; and the peak of
    its anonymous part (RSS less the file pages mapped: the store's files, which the page cache holds
    and can drop, are in RSS as far as they were touched)."""

    def __init__(self, pid: int):
        import threading

        import psutil

        self.process, self.peak, self.peak_anon, self.done = psutil.Process(pid), 0, 0, threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.done.wait(0.05):
            try:
                infos = [p.memory_info() for p in (self.process, *self.process.children(recursive=True))]
            except Exception:
                continue
            self.peak = max(self.peak, sum(i.rss for i in infos))
            self.peak_anon = max(self.peak_anon, sum(i.rss - i.shared for i in infos))

    def peak_mb(self) -> int:
        return self.peak // 2**20

    def peak_anon_mb(self) -> int:
        return self.peak_anon // 2**20

    def stop(self) -> None:
        self.done.set()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=5.0, help="per figure")
    ap.add_argument("--clients", default="1,16,64")
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--workdir", default=None, help="reuse a folder (sample and first refresh kept)")
    ap.add_argument("--config", default=None, help="serve this refreshed config instead of a sample")
    ap.add_argument("--id-digits", type=int, default=5, help="digits in the ids (U00042: 5)")
    ap.add_argument("--routes", default="/users hot,/users cold,/users filtered,/users filtered strict,"
                                        "/items/<id>/similar,/search,/users/batch,/users/batch beside /users",
                    help="which figures, comma-separated")
    ap.add_argument("--where", default="category=Running", help="/users filtered's filter (publish.indexed_fields)")
    ap.add_argument("--strict", default="category=Running&where=price%3C20",
                    help="/users filtered strict's: few items pass, so the vector query fills the list")
    ap.add_argument("--no-refresh", action="store_true", help="leave out the refresh under load")
    ap.add_argument("--add-items", type=int, default=1000, help="items `recs add-items` adds under load (0: none)")
    ap.add_argument("--refresh-clients", type=int, default=16, help="clients asking throughout the refresh")
    args = ap.parse_args()
    scratch = not (args.workdir or args.config)  # a folder of its own, removed at the end
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        serve(args, folder)
    finally:
        if scratch:
            shutil.rmtree(folder, ignore_errors=True)


def serve(args, folder: Path) -> None:
    """The sample and its first refresh (unless --config), then `recs serve` under load."""
    recs = [sys.executable, "-m", "recommend.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    config = Path(args.config) if args.config else folder / "config.yaml"
    if not config.exists():
        subprocess.run([*recs, "sample", str(folder / "data" / "sample"), "--items", str(args.items), "--users", str(args.users)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        data = yaml.safe_load((ROOT / "config.yaml").read_text())
        data["embed"]["model"] = args.model
        data["serve"]["port"] = 0
        config.write_text(yaml.safe_dump(data))
        subprocess.run([*recs, "refresh", "-q", "-c", str(config)], check=True, env=env, stdout=subprocess.DEVNULL)
    live_file = Path(yaml.safe_load(config.read_text())["workdir"])
    live_file = (live_file if live_file.is_absolute() else config.parent / live_file) / "store" / "recs" / "LIVE"
    server = subprocess.Popen([*recs, "serve", "-q", "-c", str(config), "--port", "0"], env=env, stderr=subprocess.PIPE,
                              text=True)
    memory = Memory(server.pid)
    try:
        line = server.stderr.readline()
        port = int(line.split("http://")[1].split(":")[1].split()[0])
        first = wait_health(port, lambda h: h.get("search") == "ready")["version"]
        clients = [int(c) for c in args.clients.split(",")]
        users = [f"U{u:0{args.id_digits}d}" for u in range(args.users)]
        items = [f"I{i:0{args.id_digits}d}" for i in range(args.items)]
        rng = random.Random(0)
        hot = [f"/users/{u}".encode() for u in rng.sample(users, min(1000, len(users)))]
        drive(port, iter(hot), 4, 30)  # warm: every hot answer cached once
        shuffled = rng.sample(users, len(users))
        cold = {n: iter([f"/users/{u}".encode() for u in shuffled[i::len(clients)]]) for i, n in enumerate(clients)}
        similar = [f"/items/{i}/similar".encode() for i in rng.sample(items, min(1000, len(items)))]
        filtered = {(name, n): iter([f"/users/{u}?where={where}".encode() for u in rng.sample(users, len(users))[i::len(clients)]])
                    for name, where in (("/users filtered", args.where), ("/users filtered strict", args.strict))
                    for i, n in enumerate(clients)}  # cold: each user asked once per filter
        drive(port, iter(similar), 4, 30)
        routes = args.routes.split(",")
        for flag, where, named in (("--where", args.where, ("/users filtered", "/users/batch filtered")),
                                   ("--strict", args.strict, ("/users filtered strict",))):
            if set(named) & set(routes):
                passes_some(port, users[:50], where, flag)
        covered = (_covered(config, rng.sample(users, min(len(users), 20_000 * len(clients))), args.where.split("=")[0],
                            clients) if "/users filtered covered" in args.routes.split(",") else {})
        batched = {"/users/batch": _batches(rng, users, clients, None),
                   "/users/batch filtered": _batches(rng, users, clients, args.where),
                   "/users/batch beside": _batches(rng, users, clients, None)}
        cold_beside = {n: iter([f"/users/{u}".encode() for u in rng.sample(users, len(users))[i::len(clients)]])
                       for i, n in enumerate(clients)}
        queries = iter([("/search?q=" + t.replace(" ", "+")).encode() for t in texts(200_000, seed=1, low=3, high=12)])
        for n in clients:
            for route, paths in (("/users hot", cycle(hot)), ("/users cold", cold[n]),
                                 ("/users filtered", filtered["/users filtered", n]),
                                 ("/users filtered strict", filtered["/users filtered strict", n]),
                                 ("/users filtered covered", covered.get(n)),
                                 ("/items/<id>/similar", cycle(similar)), ("/search", queries),
                                 ("/users/batch", batched["/users/batch"][n]),
                                 ("/users/batch filtered", batched["/users/batch filtered"][n])):
                if route not in args.routes.split(","):
                    continue
                figures = drive(port, paths, n, args.seconds)
                figures.pop("_versions")
                emit("serve", {"route": route, **figures, "items": args.items, "users": args.users, "model": args.model})
            if "/users/batch beside /users" in args.routes.split(","):  # one batch job while n apps' clients ask
                alone, apps = drive_groups(port, [(batched["/users/batch beside"][n], 1), (cold_beside[n], n)], args.seconds)
                emit("serve", {"route": "/users/batch beside /users", **{k: v for k, v in alone.items() if k != "_versions"},
                               "lookup_clients": n, "lookups": {k: v for k, v in apps.items() if k != "_versions"},
                               "items": args.items, "users": args.users, "model": args.model})
        steady_mb = memory.peak_mb()
        emit("serve_memory", {"steady_peak_rss_mb": steady_mb, "steady_peak_anon_mb": memory.peak_anon_mb(),
                              "items": args.items, "users": args.users})
        if args.add_items:
            emit("serve", {**add_under_load(args, config, port, hot), "items": args.items, "users": args.users,
                           "model": args.model})
        if args.no_refresh:
            return

        # a refresh in the middle: 16 clients (--refresh-clients) on /users (hot) throughout, then until answers move
        refresh = subprocess.Popen([*recs, "refresh", "-q", "-c", str(config)], env=env, stdout=subprocess.DEVNULL)
        results: list[dict] = []
        while refresh.poll() is None:
            results.append(drive(port, cycle(hot), args.refresh_clients, 2.0, versions=True))
        finished = time.monotonic()
        while not (results[-1]["_versions"] and results[-1]["_versions"][-1][1] != first):
            results.append(drive(port, cycle(hot), args.refresh_clients, 1.0, versions=True))
            if time.monotonic() - finished > 120:
                break
        results.append(drive(port, cycle(hot), args.refresh_clients, 1.0, versions=True))
        seen = [v for r in results for v in r["_versions"]]
        moved = next((t for t, v in seen if v != first), None)
        switched = json.loads(live_file.read_text())["switched_at"]
        p99s = [r["p99_ms"] for r in results if r["p99_ms"] is not None]
        emit("serve", {"route": "/users hot across a refresh", "clients": args.refresh_clients, "refresh_exit_code": refresh.returncode,
                       "requests": sum(r["requests"] for r in results), "failed": sum(r["failed"] for r in results),
                       "versions": sorted({v for _, v in seen}), "new_version_served_s_after_switch":
                       round(moved - switched, 2) if moved else None, "worst_2s_p99_ms": max(p99s),
                       "worst_max_ms": max(r["max_ms"] for r in results if r["max_ms"] is not None),
                       "median_window_p99_ms": sorted(p99s)[len(p99s) // 2], "items": args.items, "users": args.users,
                       "serve_peak_rss_mb": memory.peak_mb(), "serve_peak_over_steady": round(memory.peak_mb() / steady_mb, 2),
                       "serve_peak_anon_mb": memory.peak_anon_mb()})
        if refresh.returncode:  # its figures are above; the benchmark still failed
            sys.exit(f"bench_serve.py: the refresh under load failed (exit code {refresh.returncode})")
    finally:
        memory.stop()
        server.terminate()
        server.wait(30)


def add_under_load(args, config: Path, port: int, hot: list[bytes]) -> dict:
    """`recs add-items` of --add-items new items while --refresh-clients clients ask /users (hot):
    seconds until /search finds the last one, failed requests meanwhile, and the add against raw
    `model.encode` of the same texts here (before the load)."""
    import urllib.parse
    import urllib.request

    import pandas as pd

    from bench_encode import raw_encode

    data = yaml.safe_load(config.read_text())
    import glob

    path = Path(data["items"]["path"])
    path = path if path.is_absolute() else config.parent / path
    catalog = pd.read_parquet((sorted(glob.glob(str(path))) or [str(path)])[0])  # a glob of parts: the first one
    new = catalog.sample(args.add_items, replace=len(catalog) < args.add_items, random_state=1).reset_index(drop=True)
    stamp = time.time_ns()
    new["item_id"] = [f"ADD{stamp}-{i}" for i in range(len(new))]
    new["title"] = texts(len(new), seed=stamp % 1000, low=3, high=6)  # unseen texts: every one encoded
    file = config.parent / f"added-{stamp}.parquet"
    new.to_parquet(file)
    from embedder.text import render_text

    rendered = [render_text(data["items"]["text"], row) for row in new.to_dict("records")]
    _, raw_s = raw_encode(rendered, "fp32", model=data["embed"]["model"])  # the model the items are encoded with
    search = f"/search?k=1&q={urllib.parse.quote_plus(rendered[-1])}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    adder = subprocess.Popen([sys.executable, "-m", "recommend.cli", "add-items", str(file), "-q", "-c", str(config), "--json"],
                             env=env, stdout=subprocess.PIPE, text=True)
    started, results, found = time.monotonic(), [], None
    while found is None and time.monotonic() - started < 600:
        results.append(drive(port, cycle(hot), args.refresh_clients, 0.5))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{search}", timeout=30) as resp:
            if [r["item_id"] for r in json.loads(resp.read())["items"]] == [new["item_id"].iloc[-1]]:
                found = time.monotonic() - started
    report = json.loads(adder.communicate(timeout=600)[0].strip().splitlines()[-1])
    file.unlink()
    p99s = [r["p99_ms"] for r in results if r["p99_ms"] is not None]
    return {"route": "/users hot while adding items", "clients": args.refresh_clients, "items_added": report["added"],
            "add_exit_code": adder.returncode, "searchable_after_s": round(found, 2) if found else None,
            "add_items_s": report["seconds"], "add_steps_s": report["steps"], "raw_encode_s": round(raw_s, 2),
            "add_over_raw_encode": round(report["seconds"] / raw_s, 2), "requests": sum(r["requests"] for r in results),
            "failed": sum(r["failed"] for r in results), "worst_p99_ms": max(p99s) if p99s else None}


if __name__ == "__main__":
    main()
