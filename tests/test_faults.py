"""Faults injected on purpose: a second refresh, a killed holder, damaged files. Each must end in a
clear message or a recovery, never a traceback and never a wrong version live."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_config
from recommend.run.lock import LockHeld, RefreshLock

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
HOLD = ("import sys, time\nfrom recommend.run.lock import RefreshLock\n"
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
