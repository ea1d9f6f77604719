"""Faults injected on purpose: a second refresh, a killed holder, damaged files. Each must end in a
clear message or a recovery, never a traceback and never a wrong version live."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import mount_small_filesystem, write_config
from recommend.run.infra.lock import LockHeld, RefreshLock

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
HOLD = ("import sys, time\nfrom recommend.run.infra.lock import RefreshLock\n"
        "held = RefreshLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(600)")
PROBE = ("import sys\nfrom recommend.cli import app\ntry:\n    app(['refresh', '-c', sys.argv[1]])\n"
         "except SystemExit as exit:\n    print('exit', exit.code, *(m in sys.modules for m in ('torch', 'faiss', 'distributed')))")


def test_a_second_refresh_is_refused_before_anything_slow_and_a_dead_holders_lock_is_free(tmp_path, sample_dir,
                                                                                          tiny_model):
    config = write_config(tmp_path, sample_dir, tiny_model)
    workdir = tmp_path / "work"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, env=ENV)
    try:
        assert holder.stdout.readline().strip() == b"held"
        proc = subprocess.run([sys.executable, "-c", PROBE, str(config)], capture_output=True, text=True, env=ENV,
                              timeout=120)
        # refused with exit 1, naming the holder, before torch, faiss or Dask were even imported
        assert proc.stdout.split() == ["exit", "1", "False", "False", "False"], proc.stdout + proc.stderr
        assert f"another refresh is running on {workdir}" in proc.stderr and f"pid {holder.pid}" in proc.stderr
        assert "Traceback" not in proc.stderr
        with pytest.raises(LockHeld):
            RefreshLock(workdir).acquire()
    finally:
        holder.kill()  # kill -9: the operating system releases its lock
        holder.wait()
    (workdir / "refresh.lock").write_text("garbled {")  # the file's content plays no part
    with RefreshLock(workdir), RefreshLock(workdir):  # free now, and reentrant within one process
        assert (workdir / "refresh.lock.json").exists()
    assert not (workdir / "refresh.lock.json").exists()


def _copy_sample(sample_dir, data):
    data.mkdir()
    for name in ("items", "events", "users"):
        (data / f"{name}.parquet").write_bytes((sample_dir / f"{name}.parquet").read_bytes())
    return data


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "garbled":  # eight bytes in the middle of the vectors' data (a Parquet file's last column) or the file
        middle = len(data) // 2
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            chunk = meta.row_group(0).column(meta.num_columns - 1)
            middle = chunk.data_page_offset + chunk.total_compressed_size // 2
        data[middle:middle + 8] = bytes(255 - b for b in data[middle:middle + 8])
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["garbled", "truncated"])
def test_a_damaged_cache_file_is_set_aside_and_its_items_encoded_again(tmp_path, sample_dir, tiny_model, dask_client,
                                                                       how):
    """Oracle: the first run's embeddings and lists. The damaged file is named, moved aside, its items
    encoded again, and the run publishes exactly what a sound cache gives."""
    import pandas as pd

    from embedder.cache import EmbeddingCache
    from recommend.config import load_config
    from recommend.run.pipeline import refresh

    # fp32: a reduced precision's vectors move in their last bit with the other texts in their batch,
    # and the damaged file's texts are encoded again in other batches than the first time
    config = load_config(write_config(tmp_path, _copy_sample(sample_dir, tmp_path / "data"), tiny_model,
                                      embed={"precision": "fp32"}))
    first = refresh(config, quiet=True, client=dask_client)
    victim = sorted(Path(config.cache_root).glob("bucket=*/*.parquet"))[3]
    rows = EmbeddingCache(config.cache_root).size()  # every text once
    import pyarrow.parquet as pq

    in_victim = pq.ParquetFile(victim).metadata.num_rows
    _damage(victim, how)
    second = refresh(config, quiet=True, client=dask_client)
    assert second.status == "ok" and second.embed.items_encoded == in_victim and rows == 240
    assert len(second.embed.cache_files_set_aside) == 1 and str(victim) in second.embed.cache_files_set_aside[0]
    assert not victim.exists() and list((Path(config.cache_root) / "damaged").glob("*.parquet"))
    run1, run2 = Path(first.run_dir), Path(second.run_dir)
    for name in ("embeddings.parquet", "lists.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(run1 / name), pd.read_parquet(run2 / name))


def test_finished_encoding_survives_a_crash(tmp_path, tiny_model, monkeypatch):
    """A crash half way through the encode: the chunks done before it are in the cache, so the rerun
    encodes only the rest."""
    import pandas as pd

    import embedder.encode as encode
    from embedder.settings import EmbedSettings

    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(240)], "text": [f"item {i} " + "w " * (i % 9) for i in range(240)]})
    settings = EmbedSettings(model=str(tiny_model), device="cpu", precision="fp32", chunk_size=16)
    real, calls = encode.encode_chunk, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 8:
            raise MemoryError("injected: the worker died")
        return real(*args, **kwargs)

    monkeypatch.setattr(encode, "encode_chunk", crashing)
    with pytest.raises(MemoryError):
        encode.embed_items(items, settings, cache_root=str(tmp_path / "cache"))
    monkeypatch.setattr(encode, "encode_chunk", real)
    rerun = encode.embed_items(items, settings, cache_root=str(tmp_path / "cache"))
    assert rerun.counts.items_encoded == 240 - 8 * 16 and rerun.counts.items_from_cache == 8 * 16


def test_check_names_damage_and_eval_refuses_a_damaged_run(tmp_path, sample_dir, tiny_model):
    """`recs check` finds a damaged cache file, a truncated artifact and a truncated report; --repair
    moves the cache file aside; `recs eval` names the damaged file instead of a traceback."""
    import json as jsonlib

    config = write_config(tmp_path, _copy_sample(sample_dir, tmp_path / "data"), tiny_model)

    def recs(*args):
        return subprocess.run([sys.executable, "-m", "recommend.cli", *args, "-c", str(config)], capture_output=True,
                              text=True, env=ENV, timeout=300)

    assert recs("refresh", "-q").returncode == 0
    second = jsonlib.loads(recs("refresh", "-q", "--json").stdout.strip().splitlines()[-1])
    assert recs("check").returncode == 0
    run = Path(second["run_dir"])
    _damage(run / "events.parquet" / "block-00000.parquet", "truncated")  # one user block of the events
    _damage(sorted((tmp_path / "work" / "cache").glob("bucket=*/*.parquet"))[0], "garbled")
    found = recs("check", "--json")
    report = jsonlib.loads(found.stdout)
    problems = [f["problem"] for f in report["findings"]]
    assert found.returncode == 1 and any("events.parquet/block-00000.parquet is damaged" in p for p in problems)
    assert any("embedding cache file" in p for p in problems) and "Traceback" not in found.stderr
    evaluated = recs("eval", "--run", second["run_id"], "--no-plots")
    assert evaluated.returncode == 1 and "events.parquet/block-00000.parquet is damaged" in evaluated.stderr
    assert "Traceback" not in evaluated.stderr
    repaired = jsonlib.loads(recs("check", "--repair", "--json").stdout)
    assert [f["repaired"] for f in repaired["findings"] if f["where"] == "cache"] == ["moved aside"]
    (run / "report.json").write_text((run / "report.json").read_text()[:40])  # truncated
    assert any("report.json is damaged" in f["problem"] for f in jsonlib.loads(recs("check", "--json").stdout)["findings"])
    assert recs("refresh", "-q").returncode == 0  # and the workdir keeps working


def _cli(config, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "recommend.cli", *args, "-c", str(config)], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def _live_and_versions(config):
    """(the live version a query answers from, the versions `recs versions` lists) in a fresh process."""
    import json as jsonlib

    import pandas as pd

    user = pd.read_parquet(Path(str(config)).parent / "data" / "events.parquet")["user_id"].iloc[0]
    answer = _cli(config, "recommend", str(user), "--json")
    listed = _cli(config, "versions", "--json")
    assert answer.returncode == 0 and listed.returncode == 0, answer.stderr + listed.stderr
    return jsonlib.loads(answer.stdout)["version"], jsonlib.loads(listed.stdout)


def test_a_refresh_killed_in_any_stage_leaves_the_live_version_answering(tmp_path, sample_dir, tiny_model):
    """kill -9 (the whole process group: the driver and its Dask workers) as each stage starts; after
    each, the live version still answers, nothing incomplete is listed, and the next refresh completes."""
    import json as jsonlib
    import signal

    config = write_config(tmp_path, _copy_sample(sample_dir, tmp_path / "data"), tiny_model)
    good = jsonlib.loads(_cli(config, "refresh", "-q", "--json").stdout.strip().splitlines()[-1])
    for stage in ("ingest", "embed", "gate", "index"):
        proc = subprocess.Popen([sys.executable, "-m", "recommend.cli", "refresh", "-v", "-c", str(config)],
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV,
                                start_new_session=True)
        for line in proc.stderr:
            if f"stage {stage} started" in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=120)
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, f"the refresh ended before stage {stage}"
        live, versions = _live_and_versions(config)
        assert live == good["published_version"], stage
        assert [v["run_id"] for v in versions] == [good["run_id"]] and all(v["items"] and v["users"] for v in versions)
    check = jsonlib.loads(_cli(config, "check", "--json").stdout)
    killed = [f for f in check["findings"] if "no report.json" in f["problem"]]
    assert len(killed) == 4
    repaired = jsonlib.loads(_cli(config, "check", "--repair", "--json").stdout)
    assert sum(f["repaired"] == "removed" for f in repaired["findings"]) == 4
    final = _cli(config, "refresh", "-q", "--json")
    assert final.returncode == 0 and "Traceback" not in final.stderr
    assert _live_and_versions(config)[0] == jsonlib.loads(final.stdout.strip().splitlines()[-1])["published_version"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KB filesystem (tmpfs) mounted for the test, where the machine allows it."""
    unmount = mount_small_filesystem(tmp_path / "tiny", "64k")
    yield tmp_path / "tiny"
    unmount()


def test_a_full_disk_ends_in_one_message_naming_the_path(tmp_path, sample_dir, tiny_model, dask_client, tiny_disk):
    """The run folders on a full filesystem: the refresh stops with a message naming the file it could
    not write, leaves no temporary file, publishes nothing; the live version still answers."""
    from embedder.errors import StorageError
    from recommend.config import load_config
    from recommend.run.pipeline import refresh
    from recommend.serving.facade import Recommender

    config = load_config(write_config(tmp_path, _copy_sample(sample_dir, tmp_path / "data"), tiny_model))
    good = refresh(config, quiet=True, client=dask_client)
    runs = Path(config.workdir) / "runs"
    subprocess.run(["mount", "--bind", str(tiny_disk), str(runs)], check=True)  # runs/ is now 64 KB
    try:
        with pytest.raises(StorageError, match=f"cannot write {runs}/.*: no space left on the device"):
            refresh(config, quiet=True, client=dask_client)
        assert not list(runs.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(runs)], capture_output=True)
    assert Recommender.from_config(config).live_version() == good.published_version
    assert refresh(config, quiet=True, client=dask_client).status == "ok"
