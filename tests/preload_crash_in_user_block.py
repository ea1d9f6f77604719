"""Preloaded into one worker of the external test cluster (tests/test_cluster.py): the first user
block it is given kills its process, as the kernel's out-of-memory killer would. A marker file in
the worker's own folder makes it happen once (the nanny restarts the worker, which preloads this again)."""

import os
from pathlib import Path

import recommend.run.tasks.list_tasks as list_tasks

MARKER = Path.cwd() / "crashed-in-a-user-block"
_user_block = list_tasks.user_block


def crashing_user_block(*args, **kwargs):
    if not MARKER.exists():
        MARKER.write_text("killed here once\n")
        os._exit(137)
    return _user_block(*args, **kwargs)


list_tasks.user_block = crashing_user_block
