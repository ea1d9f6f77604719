"""Shared pieces of the benchmarks: deterministic texts, a timer, one JSON line per benchmark."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import contextmanager

import numpy as np

WORDS = ("trail running shoe grip mud waterproof kettle boil steel handle espresso grinder burr coffee "
         "backpack strap hiking tent pole lantern battery charger cable phone screen glass case leather "
         "wallet jacket wool scarf knit winter summer dress cotton linen shirt pocket denim jeans boot "
         "sole heel lace garden hose nozzle lawn mower blade drill bit screw hammer wrench paint brush "
         "roller canvas easel pencil paper notebook desk lamp chair cushion sofa blanket pillow mattress").split()


def texts(n: int, seed: int = 0, low: int = 10, high: int = 80) -> list[str]:
    """n texts of `low`..`high` words, the same for the same seed."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):  # rng.choice(WORDS, size)'s stream (the same texts), without its conversion of WORDS each call
        picks = rng.integers(0, len(WORDS), rng.integers(low, high + 1)).tolist()
        out.append(" ".join([WORDS[j] for j in picks]) + f". Item {i}.")
    return out


def parser(doc: str) -> argparse.ArgumentParser:
    """A command-line parser whose --help shows the benchmark's docstring (with its example command)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


@contextmanager
def timed(out: dict, key: str):
    start = time.perf_counter()
    yield
    out[key] = time.perf_counter() - start  # unrounded: a ratio of two short runs is not a division by zero


def emit(name: str, figures: dict) -> None:
    print(json.dumps({"benchmark": name, **figures, "machine": machine()}), flush=True)
