"""A real external Dask cluster (a scheduler and two workers, separate processes, each worker in its
own working directory), reached through dask.address: what runs on its workers, and the preflight
that refuses a worker unlike the driver."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import write_config

ROOT = Path(__file__).parent.parent
DASK = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster(tmp_path, preload: list[str] = ()):
    """Start a scheduler and two single-threaded workers; returns (address, processes)."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([*DASK, "--port", str(port), "--dashboard-address", ":0", "--no-show"], cwd=tmp_path,
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    for n, extra in enumerate([[], list(preload)]):
        folder = tmp_path / f"worker-{n}"
        folder.mkdir()
        procs.append(subprocess.Popen([*WORKER, address, "--nthreads", "1", "--local-directory", str(folder),
                                       "--no-dashboard", *(a for p in extra for a in ("--preload", p))], cwd=folder,
                                      env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    deadline = time.monotonic() + 90
    while True:
        try:
            with Client(address, timeout=5) as client:
                client.wait_for_workers(2, timeout=60)
            return address, procs
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _stop(procs):
    for p in procs:
        p.kill()
        p.wait()


def test_a_refresh_through_dask_address_runs_ingest_embed_behaviour_gate_and_lists_on_the_workers(tmp_path, sample_dir, tiny_model,
                                                                                 dask_client):
    """Oracle: the same refresh on the LocalCluster; the lists are the same. A scheduler plugin
    records where each task ran. (The publish is off: local mode has one writer, the driver; the
    publish's tasks on the workers, for a server, are checked in tests/test_publish_tasks.py.)"""
    from distributed import Client

    from cluster_helpers import TaskRecorder, ran
    from recommend.config import load_config
    from recommend.run.pipeline import refresh

    (tmp_path / "local").mkdir()
    local = refresh(load_config(write_config(tmp_path / "local", sample_dir, tiny_model, publish={"enabled": False})),
                    quiet=True, client=dask_client)
    address, procs = _cluster(tmp_path)
    try:
        with Client(address) as client:
            client.register_plugin(TaskRecorder())
            config = load_config(write_config(tmp_path, sample_dir, tiny_model, publish={"enabled": False},
                                              dask={"address": address}))
            remote = refresh(config, quiet=True)
            records = client.run_on_scheduler(ran)
            workers = set(client.scheduler_info()["workers"])
    finally:
        _stop(procs)
    by_prefix: dict[str, set] = {}
    for prefix, worker in records:
        by_prefix.setdefault(prefix, set()).add(worker)
    # ingest: each file read and validated (fused into one task per file); embed: the texts' hashes,
    # the cache lookup and the encode, spread over both workers
    assert by_prefix["read_file"] <= workers and by_prefix["lookup_bucket"] <= workers, sorted(by_prefix)
    assert by_prefix["hash-texts"] <= workers
    assert by_prefix["encode"] == workers
    assert by_prefix["write-embeddings"] <= workers  # embeddings.parquet from the cache: no vector in the driver
    # ingest: each partition validated and written by user hash, then each user block merged
    assert by_prefix["validate_part"] <= workers and by_prefix["merge-block"] <= workers, sorted(by_prefix)
    # behaviour: the sums over the user blocks (here X gathered: the users side is small), the samples
    assert by_prefix["stats-task"] <= workers and by_prefix["rows-task"] <= workers
    assert by_prefix["first-users"] <= workers
    # the item side made from the fit and saved, the index built and saved: each on a worker
    assert by_prefix["behaviour-from-svd"] <= workers and by_prefix["item-side-of"] <= workers, sorted(by_prefix)
    assert by_prefix["save"] <= workers and by_prefix["index-task"] <= workers
    # gate: the sampled users' fit and scoring, on a worker
    assert by_prefix["gate-task"] <= workers
    # lists: the item blocks (32 rows each) and the user blocks (the event blocks), on both workers
    assert by_prefix["item-block"] | by_prefix["user-block"] == workers
    pd.testing.assert_frame_equal(pd.read_parquet(Path(remote.run_dir) / "lists.parquet"),
                                  pd.read_parquet(Path(local.run_dir) / "lists.parquet"))


def test_a_worker_killed_in_a_user_block_loses_nothing(tmp_path, sample_dir, tiny_model, dask_client):
    """Fault injected: one worker's process dies in its first user block (tests/preload_crash_in_user_block.py).
    Dask runs the block again elsewhere; the refresh finishes, publishes, and its lists and the
    published version equal the LocalCluster run's."""
    from recommend.config import load_config
    from recommend.run.pipeline import refresh
    from recommend.serving.facade import Recommender

    (tmp_path / "local").mkdir()
    local = refresh(load_config(write_config(tmp_path / "local", sample_dir, tiny_model, publish={"enabled": False})),
                    quiet=True, client=dask_client)
    address, procs = _cluster(tmp_path, preload=[str(ROOT / "tests" / "preload_crash_in_user_block.py")])
    try:
        config = load_config(write_config(tmp_path, sample_dir, tiny_model, dask={"address": address}))
        remote = refresh(config, quiet=True)
    finally:
        _stop(procs)
    assert (tmp_path / "worker-1" / "crashed-in-a-user-block").exists()  # the fault did happen
    assert remote.status == "ok" and remote.published_version == remote.run_id
    lists = pd.read_parquet(Path(remote.run_dir) / "lists.parquet")
    pd.testing.assert_frame_equal(lists, pd.read_parquet(Path(local.run_dir) / "lists.parquet"))
    users = lists[lists.subject_kind == "user"]
    rec = Recommender.from_config(config)
    for user in users.subject_id.unique()[::20]:
        assert [r.item_id for r in rec.for_user(user).items] == users[users.subject_id == user].item_id.tolist()


def test_a_worker_unlike_the_driver_stops_the_run_before_any_work(tmp_path, sample_dir, tiny_model):
    """Fault injected: one worker says it runs another nightly-recs version (a stale install). The
    refresh stops in its preflight, naming that worker, with exit code 2 and nothing ingested."""
    from recommend.config import load_config
    from recommend.run.pipeline import refresh
    from recommend.run.infra.preflight import PreflightFailed

    address, procs = _cluster(tmp_path, preload=[str(ROOT / "tests" / "preload_other_version.py")])
    try:
        config = load_config(write_config(tmp_path, sample_dir, tiny_model, publish={"enabled": False},
                                          dask={"address": address}))
        with pytest.raises(PreflightFailed, match="runs nightly-recs 0.0.0-stale, the driver") as err:
            refresh(config, quiet=True)
    finally:
        _stop(procs)
    assert err.value.exit_code == 2 and err.value.report.failed_stage == "preflight"
    assert not list((tmp_path / "work" / "runs").glob("*/items.parquet"))
