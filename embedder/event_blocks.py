"""Accepted events written by user block on the Dask workers, so that no process holds them all.

A user's block is fixed by a hash of their id (`user_hash`): block b holds the users whose hash lies
in the b-th of `n` equal ranges of 64-bit hashes. Ingest makes the blocks in two rounds of tasks:

1. each input partition is validated (embedder/ingest.py) and its accepted events are written to
   `<run>/events-raw/part-NNNNN.parquet`, sorted by user hash; the task returns its quarantined rows,
   its counts and a sketch of its users' hashes (the smallest distinct ones), from which the driver
   estimates the number of users, and so `n`, without seeing them (a k-minimum-values estimate);
2. each block reads its hash range from every raw part (row groups outside it are skipped), drops
   exact duplicate events (a duplicate has the same user, so it is always in the same block), and
   writes `<run>/events.parquet/block-NNNNN.parquet` (user_id, item_id, ts, event_type, item: the
   item's row in the catalog) sorted by user, and `<run>/users.parquet/block-NNNNN.parquet` (its
   users, sorted, with their hashes; users of the users file with no events too).

The driver keeps a `Blocks` (counts, the newest event, digests) and no event. The users with the
smallest hashes are in the first blocks: that is the sample the quality gate and the behaviour
scale take (`first_users`), the same users from run to run. pandas and pyarrow read
`events.parquet` as one table (`recs eval` does).

Example:
    blocks = blocks_from_frame(RunFolder(run_dir), events, item_ids, block_size=8192)
    users, events = read_block(blocks.run, 0)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from embedder.artifacts import atomic_path, file_digest
from embedder.run_folder import RunFolder
from embedder.user_hashing import HASH_SPACE, block_of, bounds, user_hash_few  # noqa: F401 (re-exported)

ROW_GROUP = 16_384          # rows per row group of a raw part: a block reads only the groups in its range
SKETCH = 4096               # smallest distinct hashes each part reports: the user count within about 2%


def user_hash(ids) -> np.ndarray:
    """A stable 64-bit hash of each user id (pandas' SipHash with its fixed key): the same in every
    process and run, so blocks and samples are the same users from night to night."""
    values = np.asarray(ids, dtype=object)
    # `hash_pandas_object` of a Series of them, without the Series and its factorising of the ids (unique
    # here): 14x faster for a reader's 100 ids, 6x for a million. It gives a missing id the largest hash
    hashes = pd.util.hash_array(values, categorize=False)
    hashes[pd.isna(values)] = np.iinfo(np.uint64).max
    return hashes


def sketch(hashes: np.ndarray) -> np.ndarray:
    """The SKETCH smallest distinct hashes (k minimum values)."""
    return np.unique(hashes)[:SKETCH]


def estimate_distinct(sketches: Iterable[np.ndarray]) -> int:
    """Distinct hashes across sketches: exact below SKETCH, else (k-1) / (k-th smallest / 2⁶⁴)."""
    merged = np.unique(np.concatenate([np.asarray(s, np.uint64) for s in sketches] or [np.zeros(0, np.uint64)]))
    if len(merged) < SKETCH:
        return len(merged)
    return int((SKETCH - 1) * HASH_SPACE / (int(merged[SKETCH - 1]) + 1))


def write_raw_part(run: RunFolder, partition: int, events: pd.DataFrame, item_index: pd.Index) -> np.ndarray:
    """Round 1 for one partition's accepted events (user_id, item_id, ts, event_type): written sorted by
    user hash. Returns its sketch."""
    hashes = user_hash(events["user_id"])
    order = np.argsort(hashes, kind="stable")
    table = pa.table({
        "user_id": pa.array(np.asarray(events["user_id"], dtype=object)[order], pa.string()),
        "item_id": pa.array(np.asarray(events["item_id"], dtype=object)[order], pa.string()),
        "ts": pa.array(pd.to_datetime(events["ts"], utc=True).to_numpy()[order], pa.timestamp("ns", tz="UTC")),
        "event_type": pa.array(np.asarray(events["event_type"], dtype=object)[order], pa.string()),
        "item": pa.array(item_index.get_indexer(events["item_id"]).astype(np.int32)[order], pa.int32()),
        "_h": pa.array(hashes[order], pa.uint64()),
    })
    path = run.raw_part(partition)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP)
    return sketch(hashes)


@dataclass
class BlockSummary:
    """What one block wrote: counts, its newest event, its files' digests."""

    block: int
    events: int
    duplicates: int
    users: int
    users_with_events: int
    newest: pd.Timestamp | None
    files: dict[str, str] = field(default_factory=dict)


def merge_block(run: RunFolder, block: int, n_blocks: int, extra_users: list[str]) -> BlockSummary:
    """Round 2 for one block: its hash range read from every raw part, exact duplicates dropped,
    written sorted by user. `extra_users`: ids of the users file that fall in this block."""
    lo = bounds(n_blocks)[block]
    where = ds.field("_h") >= pa.scalar(int(lo), pa.uint64())
    if block + 1 < n_blocks:
        where = where & (ds.field("_h") < pa.scalar(int(bounds(n_blocks)[block + 1]), pa.uint64()))
    table = ds.dataset(sorted(str(p) for p in run.events_raw.glob("part-*.parquet")), format="parquet").to_table(filter=where)
    frame = table.to_pandas()
    dup = frame.duplicated(["user_id", "item_id", "ts", "event_type"], keep="first")
    frame = frame[~dup].sort_values(["user_id", "ts"], kind="stable")
    with_events = frame.drop_duplicates("user_id")[["user_id", "_h"]]
    extra = pd.DataFrame({"user_id": pd.Series(extra_users, dtype=object)})
    extra = extra[~extra["user_id"].isin(with_events["user_id"])].drop_duplicates()
    users = pd.concat([with_events, extra.assign(_h=user_hash(extra["user_id"]))], ignore_index=True).sort_values("user_id")
    events_path, users_path = run.event_block(block), run.user_block(block)
    with atomic_path(events_path) as tmp:
        pq.write_table(pa.Table.from_pandas(frame.drop(columns="_h"), schema=_EVENT_SCHEMA, preserve_index=False), tmp)
    with atomic_path(users_path) as tmp:
        pq.write_table(pa.table({"user_id": pa.array(users["user_id"].astype(object), pa.string()),
                                 "_h": pa.array(users["_h"].to_numpy(np.uint64), pa.uint64())}), tmp)
    return BlockSummary(block, len(frame), int(dup.sum()), len(users), len(with_events),
                        frame["ts"].max() if len(frame) else None,
                        {run.relative(p): file_digest(p) for p in (events_path, users_path)})


_EVENT_SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("ts", pa.timestamp("ns", tz="UTC")),
                           ("event_type", pa.string()), ("item", pa.int32())])


@dataclass
class Blocks:
    """The event blocks of one run, as the driver knows them."""

    run: RunFolder  # where the blocks are
    summaries: list[BlockSummary]

    @property
    def n(self) -> int:
        return len(self.summaries)

    @property
    def newest(self) -> pd.Timestamp | None:
        stamps = [s.newest for s in self.summaries if s.newest is not None]
        return max(stamps) if stamps else None

    @property
    def users(self) -> int:
        return sum(s.users for s in self.summaries)

    @property
    def starts(self) -> np.ndarray:
        """Each block's first user row in the run's user order (blocks in order, users sorted within)."""
        return np.concatenate([[0], np.cumsum([s.users for s in self.summaries])[:-1]]).astype(np.int64)

    def files(self) -> dict[str, str]:
        return {name: digest for s in self.summaries for name, digest in s.files.items()}


def event_blocks(run: RunFolder, n_blocks: int, extra_users: Iterable[str] = (), *, client=None,
                 tick: Callable[[int], None] | None = None) -> Blocks:
    """Round 2 for every block, on the workers (in this process without a client); the raw parts are
    removed after. `extra_users`: the users file's ids, each sent to its block."""
    run.events.mkdir(exist_ok=True)
    run.users.mkdir(exist_ok=True)
    extra = pd.Series(list(extra_users), dtype=object)
    which = block_of(user_hash(extra), n_blocks) if len(extra) else np.zeros(0, np.int64)
    per_block = [extra[which == b].tolist() for b in range(n_blocks)]
    summaries: list[BlockSummary | None] = [None] * n_blocks
    if client is None:
        for b in range(n_blocks):
            summaries[b] = merge_block(run, b, n_blocks, per_block[b])
            if tick:
                tick(1)
    else:
        from distributed import as_completed

        futures = [client.submit(merge_block, run, b, n_blocks, per_block[b], pure=False,
                                 key=f"merge-block-{b}-{run.run_id}") for b in range(n_blocks)]
        for future in as_completed(futures):
            summary = future.result()
            summaries[summary.block] = summary
            future.release()
            if tick:
                tick(1)
    shutil.rmtree(run.events_raw, ignore_errors=True)
    return Blocks(run, summaries)


def blocks_from_frame(run: RunFolder, events: pd.DataFrame, item_ids, *, block_size: int,
                      extra_users: Iterable[str] = (), client=None) -> Blocks:
    """The event blocks of accepted events already in memory (user_id, item_id, ts, event_type), as
    ingest writes them from its partitions: for tests and notebooks."""
    run.events_raw.mkdir(parents=True, exist_ok=True)
    extra_users = list(extra_users)
    hashes = write_raw_part(run, 0, events, pd.Index(np.asarray(item_ids, dtype=object)))
    users = estimate_distinct([hashes, sketch(user_hash(extra_users))])
    return event_blocks(run, max(1, -(-users // block_size)), extra_users, client=client)


def read_block(run: RunFolder, block: int, columns: list[str] | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """(its users' ids in order, its events) of one block; ids as categories."""
    users = pq.read_table(run.user_block(block), columns=["user_id"]).column(0).to_numpy(zero_copy_only=False)
    events = pq.read_table(run.event_block(block), columns=columns).to_pandas(strings_to_categorical=True)
    return np.asarray(users, dtype=object), events


def block_user_ids(run: RunFolder, block: int) -> list[str]:
    """The user ids of one block, in the run's order."""
    return pq.read_table(run.user_block(block), columns=["user_id"]).column(0).to_pylist()


def read_user_ids(run: RunFolder, n_blocks: int) -> list[str]:
    """Every user id of the run, in the run's order (block by block)."""
    return [u for b in range(n_blocks) for u in
            pq.read_table(run.user_block(b), columns=["user_id"]).column(0).to_pylist()]


def first_users(run: RunFolder, n_blocks: int, n: int, largest: bool = False) -> tuple[list[str], pd.DataFrame]:
    """The `n` users with events whose hashes are the smallest (`largest`: the largest), and their
    events: read from the first (last) blocks only (blocks are hash ranges). Their ids come back in
    hash order (descending for `largest`)."""
    taken: list[pd.DataFrame] = []
    events: list[pd.DataFrame] = []
    found = 0
    for b in (reversed(range(n_blocks)) if largest else range(n_blocks)):
        if found >= n:
            break
        users = pq.read_table(run.user_block(b)).to_pandas()
        block_events = pq.read_table(run.event_block(b)).to_pandas()
        users = users[users["user_id"].isin(block_events["user_id"])]
        taken.append(users)
        events.append(block_events)
        found += len(users)
    users = pd.concat(taken, ignore_index=True) if taken else pd.DataFrame({"user_id": [], "_h": []})
    chosen = users.sort_values("_h", kind="stable", ascending=not largest)["user_id"].head(n).tolist()
    frame = pd.concat(events, ignore_index=True) if events else pd.DataFrame(columns=_EVENT_SCHEMA.names)
    return chosen, frame[frame["user_id"].isin(chosen)].reset_index(drop=True)
