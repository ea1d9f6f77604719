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
    return [" ".join(rng.choice(WORDS, rng.integers(low, high + 1))) + f". Item {i}." for i in range(n)]


def parser(doc: str) -> argparse.ArgumentParser:
    """A command-line parser whose --help shows the benchmark's docstring (with its example command)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


@contextmanager
def timed(out: dict, key: str):
    start = time.perf_counter()
    yield
    out[key] = round(time.perf_counter() - start, 3)


def emit(name: str, figures: dict) -> None:
    print(json.dumps({"benchmark": name, **figures, "machine": machine()}), flush=True)
