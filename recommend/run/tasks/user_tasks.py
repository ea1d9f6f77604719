"""The behaviour fit and the quality gate over user blocks on the Dask workers: the events never
come to the driver.

Ingest wrote the accepted events by user block (embedder/event_blocks.py). Here each task reads a
group of blocks, builds their interaction matrices (`ranking.blend.user_block`) and returns a sum:

- `block_stats`: the items' decayed popularity, which items have events, and the count and mean
  square of the fitted values (one round);
- `BlockedFit`: the fitted matrix X as the fit reads it (ranking.behaviour.FitMatrix): XᵀX z as
  Σ_b X_bᵀ(X_b z) for the subspace iteration, XᵀX itself when the items side is small, X whole only
  when the users side is small. z (items x r) goes to every worker once per product; each chain of
  groups adds into one running sum, the chains' sums are added pairwise on the workers, and the
  total stays there: the fit's (items x r) arrays
  (z, the products, their normalisation) live on the workers as futures (`BlockedFit.run`), and
  the driver receives only the (c x c) Rayleigh–Ritz matrix. Each worker process keeps the blocks'
  fitted rows it read until the fit ends (`fit_rows`);
- `gate_figures`: the quality gate's fit and scoring, on one worker, over the users of smallest
  hash (in the first blocks).

Users and events stay in the blocks, and the item side is built on a worker
(recommend/run/tasks/item_tasks.py). Without a client the same tasks run one after another in this
process, and the sums are added in the same order: the fit is the same with or without workers.

Example:
    stats, pop = block_stats(client, blocks, n_items, settings)
    side = fit_item_side(BlockedFit(client, blocks, n_items, settings), stats, pop, text, settings, ...)  # a future
"""

from __future__ import annotations

import math
import os
import threading
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import scipy.sparse as sp
from distributed import Future
from threadpoolctl import threadpool_limits

from embedder.event_blocks import Blocks, first_users, read_block
from embedder.run_folder import RunFolder
from embedder.task_window import one_task, task_key
from index.rows import parquet_rows
from recommend.quality.evaluate import holdout_score
from recommend.quality.gate import GateFigures, GateSettings
from recommend.ranking.behaviour import FitMatrix, FitStats
from recommend.ranking.blend import UserBlock, user_block
from recommend.ranking.profiles import popularity
from recommend.ranking.settings import RankingSettings

GROUP = 8  # blocks per task of the fit: fewer, larger partial sums (each is items x r)
ADD_ROWS = 1 << 16  # rows of a block's product added into the partial sum at a time


def load_user_block(run: RunFolder, block: int, n_items: int, settings: RankingSettings, now) -> tuple[np.ndarray, UserBlock]:
    """(user ids, interaction matrices) of one block, rows in the block's user order."""
    users, events = read_block(run, block)
    return users, user_block(events, n_items=n_items, user_ids=users, settings=settings, now=now)


CACHE_BYTES = 512 << 20  # fitted rows a worker process keeps between the fit's rounds (a few tens of bytes per event)
_cache: dict[tuple, sp.csr_matrix] = {}
_cache_lock = threading.Lock()


def _key(run: RunFolder, block: int, n_items: int, settings: RankingSettings, now) -> tuple:
    return run, block, n_items, settings.blend.fit_input, tuple(sorted(settings.weights.items())), now


def _keep(key: tuple, rows: sp.csr_matrix) -> None:
    with _cache_lock:
        held = sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in _cache.values())
        if held + rows.data.nbytes + rows.indices.nbytes + rows.indptr.nbytes <= CACHE_BYTES:
            _cache[key] = rows


def fit_rows(run: RunFolder, block: int, n_items: int, settings: RankingSettings, now) -> sp.csr_matrix:
    """One block's rows of the fitted matrix X, kept in this worker process (up to CACHE_BYTES) for
    the fit's next rounds, which read every block again (7 products: 7 times reading and coding the
    same events otherwise)."""
    key = _key(run, block, n_items, settings, now)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    rows = load_user_block(run, block, n_items, settings, now)[1].fit_on
    _keep(key, rows)
    return rows


def forget_fit_rows() -> None:
    """Drop the kept rows (run on every worker when the fit ends)."""
    with _cache_lock:
        _cache.clear()


def _groups(n_blocks: int) -> list[range]:
    return [range(g, min(g + GROUP, n_blocks)) for g in range(0, n_blocks, GROUP)]


def _stats_task(run: RunFolder, blocks: range, n_items: int, settings: RankingSettings, now) -> tuple:
    pop = np.zeros(n_items, np.float64)
    counts = np.zeros(n_items, np.int64)
    nnz, squares = 0, 0.0
    for b in blocks:
        _, rows = load_user_block(run, b, n_items, settings, now)
        _keep(_key(run, b, n_items, settings, now), rows.fit_on)
        pop += popularity(rows.weighted)
        counts += rows.fit_on.getnnz(axis=0)
        nnz += rows.fit_on.nnz
        squares += float(np.square(rows.fit_on.data, dtype=np.float64).sum())
    return pop, counts, nnz, squares


def _gram_times_task(run: RunFolder, blocks: range, n_items: int, settings: RankingSettings, now, z: np.ndarray,
                     into: np.ndarray | None = None) -> np.ndarray:
    """The blocks' share of XᵀXz, added into `into` (its chain's running total) when given."""
    out = np.zeros((n_items, z.shape[1]), np.float32, order="F") if into is None else into  # Fortran: the LU works in place
    for b in blocks:  # only the items a block touches: no second (items x r) array per block
        x = fit_rows(run, b, n_items, settings, now)
        touched = np.unique(x.indices)
        local = sp.csr_matrix((x.data, np.searchsorted(touched, x.indices), x.indptr), shape=(x.shape[0], len(touched)))
        xz = np.asarray(local @ z[touched], dtype=np.float32)  # (block users x c); z's rows gathered, then dropped
        product = np.asarray(local.T @ xz, dtype=np.float32)  # (touched x c): one such array at a time
        for start in range(0, len(touched), ADD_ROWS):  # added in slices: no second (touched x c) gathered copy
            rows = touched[start:start + ADD_ROWS]
            out[rows] += product[start:start + ADD_ROWS]
    return out


def _gram_task(run: RunFolder, blocks: range, n_items: int, settings: RankingSettings, now) -> np.ndarray:
    out = np.zeros((n_items, n_items), np.float64)
    for b in blocks:
        x = fit_rows(run, b, n_items, settings, now).astype(np.float64)
        out += (x.T @ x).toarray()
    return out


def _rows_task(run: RunFolder, blocks: range, n_items: int, settings: RankingSettings, now) -> sp.csr_matrix:
    return sp.vstack([fit_rows(run, b, n_items, settings, now) for b in blocks]).tocsr()


def _add(a, b):
    """a + b, in a's memory: each partial sum is used by its one sum only (a sum that failed is
    recomputed from its inputs, which a failure loses too), and is items x r at scale."""
    a += b
    return a


def _step(fn, combine, adds_into: bool, total, run: RunFolder, group: range, *args):
    """One group's result added to its chain's running total (None: the chain's first group). With
    `adds_into`, `fn` adds its share into that total's memory itself (`into=`): a chain then holds
    one total, not one per group."""
    if total is not None and adds_into:
        return fn(run, group, *args, into=total)
    part = fn(run, group, *args)
    return part if total is None else combine(total, part)


def _reduce(client, fn, blocks: Blocks, *args, combine=_add, keep: bool = False, adds_into: bool = False):
    """fn over every group of blocks, combined in one fixed order whatever the cluster: the groups in
    runs of √(groups) (chains), each chain adding its groups into one running total in turn (`_step`),
    then the chains' totals combined pairwise, in block order (X's rows stay in order). Only a
    chain's total is alive, not one result per group (at scale, many items x rank products would
    otherwise wait for their sums at once). On the
    workers with a client (only the total comes here; with `keep`, it stays on its worker and its
    future comes here), else in this process, in the same order: the same numbers either way."""
    groups = _groups(blocks.n)
    per_chain = max(1, math.isqrt(len(groups)))
    chains: list = [None] * -(-len(groups) // per_chain)
    if client is None:
        for j, g in enumerate(groups):
            chains[j // per_chain] = _step(fn, combine, adds_into, chains[j // per_chain], blocks.run, g, *args)
        parts = chains
        while len(parts) > 1:
            parts = [combine(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)] + parts[len(parts) - 1:][:len(parts) % 2]
        return parts[0]
    stamp = time.time_ns()
    name = fn.__name__.strip("_").replace("_", "-")
    for j, g in enumerate(groups):  # a chain's next task runs where its total is (the largest input)
        chains[j // per_chain] = client.submit(_step, fn, combine, adds_into, chains[j // per_chain], blocks.run, g,
                                               *args, pure=False, key=f"{name}-{g.start}-{stamp}")
    parts, level = chains, 0
    while len(parts) > 1:
        level += 1
        parts = [client.submit(combine, parts[i], parts[i + 1], pure=False, priority=level,
                               key=f"{name}-sum-{level}-{i}-{stamp}")
                 for i in range(0, len(parts) - 1, 2)] + parts[len(parts) - 1:][:len(parts) % 2]
    if keep:
        return parts[0]
    result = parts[0].result()
    parts[0].release()
    return result


def block_stats(client, blocks: Blocks, n_items: int, settings: RankingSettings) -> tuple[FitStats, np.ndarray]:
    """(the fit's stats, the items' decayed popularity) summed over the blocks."""
    pop, counts, nnz, squares = _reduce(client, _stats_task, blocks, n_items, settings, blocks.newest,
                                        combine=lambda a, b: tuple(x + y for x, y in zip(a, b)))
    return FitStats(counts > 0, int(nnz), squares / nnz if nnz else 0.0), pop.astype(np.float32)


class BlockedFit(FitMatrix):
    """X (users x items) in user blocks on the workers, read by the fit through sums (see the module)."""

    def __init__(self, client, blocks: Blocks, n_items: int, settings: RankingSettings):
        self.client, self.blocks, self.n_items, self.settings = client, blocks, n_items, settings

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.users, self.n_items

    def _args(self):
        return self.n_items, self.settings, self.blocks.newest

    def gather(self) -> sp.csr_matrix:
        return _reduce(self.client, _rows_task, self.blocks, *self._args(),
                       combine=lambda a, b: sp.vstack([a, b]).tocsr())

    def gram(self) -> np.ndarray:
        return _reduce(self.client, _gram_task, self.blocks, *self._args())

    def gram_times(self, z):
        """XᵀX z: `z` an array, or a future of one (`run`'s); with a client the result stays on a
        worker (a future): (items x r) arrays of the fit never come to the driver."""
        if isinstance(z, np.ndarray):
            z = np.ascontiguousarray(z, dtype=np.float32)
            if self.client is not None:
                z = self.client.scatter(z, broadcast=True, hash=False)
        return _reduce(self.client, _gram_times_task, self.blocks, *self._args(), z, keep=True, adds_into=True)

    def columns(self, keep: np.ndarray) -> "BlockedFit":
        return self

    def run(self, fn, *args):
        if self.client is None:
            return fn(*args)
        return self.client.submit(fn, *args, pure=False, key=task_key(fn))

    def fetch(self, x):
        return x.result() if isinstance(x, Future) else x


def sample_users(client, blocks: Blocks, n: int) -> tuple[list[str], pd.DataFrame]:
    """`first_users` (the n users with events of smallest hash, and their events), read on a worker."""
    return one_task(client, first_users, blocks.run, blocks.n, n)


def _gate_task(run: RunFolder, n_blocks: int, settings: RankingSettings, gate: GateSettings) -> GateFigures:
    with threadpool_limits(os.cpu_count()):  # the only task while it runs: BLAS on the host's cores, not Dask's 1
        return _gate(run, n_blocks, settings, gate)


def _gate(run: RunFolder, n_blocks: int, settings: RankingSettings, gate: GateSettings) -> GateFigures:
    events = first_users(run, n_blocks, gate.max_users)[1]
    path = run.embeddings
    text = parquet_rows(path)  # read a row group at a time, as the driver's fit reads it (items x dim floats never held)
    item_ids = pq.read_table(path, columns=["item_id"]).column(0).to_pylist()
    return holdout_score(events, item_ids=item_ids, text=text, settings=settings, gate=gate)


def gate_figures(client, blocks: Blocks, settings: RankingSettings, gate: GateSettings) -> GateFigures:
    """The quality gate's figures (`quality.evaluate.holdout_score`), computed on a worker: the
    `gate.max_users` users of smallest hash read from the first blocks, the item vectors from the
    run's embeddings.parquet. The driver receives the figures only."""
    return one_task(client, _gate_task, blocks.run, blocks.n, settings, gate)
