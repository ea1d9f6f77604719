"""Test helpers for run folders."""

from dataclasses import replace
from pathlib import Path

from embedder.event_blocks import Blocks
from embedder.run_folder import RunFolder


def blocks_in(blocks: Blocks, folder: Path) -> Blocks:
    """The same event blocks seen from another run folder (their files linked there): a test's item
    side and lists go into `folder`, beside blocks a module-scoped fixture wrote once."""
    run = RunFolder(folder)
    run.root.mkdir(parents=True, exist_ok=True)
    for name in ("events", "users"):
        link = getattr(run, name)
        if not link.exists():
            link.symlink_to(getattr(blocks.run, name), target_is_directory=True)
    return replace(blocks, run=run)
