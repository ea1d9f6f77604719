"""Exact search and ScaNN on the refresh's own vectors, for bench_lists.py (issue: lists at a million).

The `workers` system of bench_lists.py runs the refresh's lists stage and leaves its run folder:
the saved item side (what the index holds and the item->item queries, `read_item_side`) and the
user parts (each user's profile vector and seen items). Here the same vectors are searched by:
- `exact_search`: FAISS's flat inner-product index over every item, each user's top 10 with seen
  items left out (asked for 10 + the most seen in the block, then filtered) and each item's top 10
  without itself; the oracle. `share` < 1 searches that share of the users and of the items, chosen
  at random, and scales the time to every list (`all_lists_s`), saying so; its answers are saved
  for `scann_search`'s recall;
- `scann_search`: ScaNN (tree, asymmetric hashing with anisotropic loss, exact reorder: the settings
  of the issue's table) built over the same items and asked the same sampled queries at a few depths,
  with its recall@10 against the oracle and its time scaled to every list.

Example (what bench_lists.py runs after the `workers` system):
    figures = exact_search(run_dir, share=0.1, saved=run_dir / "exact-sample.npz")
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

K = 10
BLOCK = 4096


def load_vectors(run_dir: Path) -> dict:
    """The run's item documents and item queries (float32, items x D), and its users' profile vectors
    with their seen items (CSR over item rows), from the lists stage's run folder."""
    from embedder.run_folder import RunFolder
    from recommend.run.tasks.item_tasks import read_item_side

    side = read_item_side(RunFolder(run_dir))
    n = len(side.popularity)
    docs, queries = side.docs(), side.queries()
    every = np.arange(n)
    out = {"docs": np.ascontiguousarray(docs[every], dtype=np.float32),
           "item_queries": np.ascontiguousarray(queries[every], dtype=np.float32)}
    vectors, indptr, seen = [], [0], []
    for part in sorted((run_dir / "parts").glob("user-*.npz")):
        with np.load(part) as z:
            vectors.append(z["vectors"].astype(np.float32))
            indptr.extend((z["seen_indptr"][1:] + indptr[-1]).tolist())
            seen.append(z["seen_items"])
    out["users"] = np.ascontiguousarray(np.concatenate(vectors))
    out["seen_indptr"], out["seen"] = np.asarray(indptr, np.int64), np.concatenate(seen).astype(np.int64)
    return out


def _sample(n: int, share: float, seed: int) -> np.ndarray:
    if share >= 1:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max(1, int(n * share)), replace=False))


def _top_without(ids: np.ndarray, scores: np.ndarray, drop: list[set]) -> np.ndarray:
    """Each row's first K ids not in its `drop` set (-1 where fewer remain)."""
    out = np.full((len(ids), K), -1, np.int64)
    for r, (row, gone) in enumerate(zip(ids, drop)):
        kept = [i for i in row[np.argsort(-scores[r], kind="stable")] if i >= 0 and i not in gone][:K]
        out[r, :len(kept)] = kept
    return out


def _user_drops(v: dict, rows: np.ndarray) -> list[set]:
    p, s = v["seen_indptr"], v["seen"]
    return [set(s[p[r]:p[r + 1]].tolist()) for r in rows]


def exact_search(run_dir: Path, share: float = 1.0, saved: Path | None = None) -> dict:
    """The oracle's time for every user's and item's top 10 on the run's vectors (the module's doc)."""
    import faiss

    v = load_vectors(run_dir)
    n_items, n_users = len(v["docs"]), len(v["users"])
    users, items = _sample(n_users, share, 1), _sample(n_items, share, 2)
    index = faiss.IndexFlatIP(v["docs"].shape[1])
    index.add(v["docs"])
    answers, seconds = {}, {}
    for kind, rows, queries in (("users", users, v["users"]), ("items", items, v["item_queries"])):
        found, began = [], time.perf_counter()
        for start in range(0, len(rows), BLOCK):
            block = rows[start:start + BLOCK]
            drops = _user_drops(v, block) if kind == "users" else [{int(r)} for r in block]
            scores, ids = index.search(np.ascontiguousarray(queries[block]), K + max(len(d) for d in drops))
            found.append(_top_without(ids, scores, drops))
        seconds[kind], answers[kind] = time.perf_counter() - began, np.concatenate(found)
    if saved is not None:
        np.savez(saved, users=users, items=items, user_top=answers["users"], item_top=answers["items"])
    measured = seconds["users"] + seconds["items"]
    scaled = seconds["users"] * n_users / len(users) + seconds["items"] * n_items / len(items)
    return {"index": "exact", "recall": 1.0, "share_searched": share, "users_searched": len(users),
            "items_searched": len(items), "search_s": round(measured, 4), "all_lists_s": round(scaled, 4),
            "all_lists": "measured" if share >= 1 else f"{share:g} of the queries searched, the time scaled to every list",
            "dims": int(v["docs"].shape[1]), "faiss": faiss.__version__}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Recall@K of `found` against `truth` (rows of ids, -1 for none)."""
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


def scann_search(run_dir: Path, oracle: Path, leaves: tuple[int, ...] = (10, 30, 100, 300)) -> dict:
    """ScaNN over the same items, asked the oracle's sampled queries at `leaves` leaves searched."""
    from importlib.metadata import version

    import scann

    v, truth = load_vectors(run_dir), np.load(oracle)
    n_items, n_users = len(v["docs"]), len(v["users"])
    began = time.perf_counter()
    searcher = (scann.scann_ops_pybind.builder(v["docs"], 100, "dot_product")
                .tree(num_leaves=min(1000, max(2, int(np.sqrt(n_items)))), num_leaves_to_search=100,
                      training_sample_size=min(n_items, 250_000))
                .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(100).build())
    build = time.perf_counter() - began
    depths = []
    for leaf in leaves:
        row = {"leaves_searched": leaf}
        for kind, rows, queries, drops in (
                ("users", truth["users"], v["users"], _user_drops(v, truth["users"])),
                ("items", truth["items"], v["item_queries"], [{int(r)} for r in truth["items"]])):
            t = time.perf_counter()
            ids, scores = searcher.search_batched_parallel(np.ascontiguousarray(queries[rows]), leaves_to_search=leaf,
                                                           final_num_neighbors=100)
            took = time.perf_counter() - t
            top = _top_without(np.asarray(ids, np.int64), np.asarray(scores), drops)
            row[f"{kind}_recall"] = round(recall(top, truth[f"{'user' if kind == 'users' else 'item'}_top"]), 4)
            row[f"{kind}_s_per_1m_queries"] = round(took * 1e6 / len(rows), 1)
            row[f"{kind}_all_lists_s"] = round(took * (n_users if kind == "users" else n_items) / len(rows), 1)
        depths.append(row)
    return {"index": "scann", "scann": version("scann"), "build_s": round(build, 1), "depths": depths,
            "settings": "tree sqrt(items) leaves (at most 1,000), AH 2 dims a block with anisotropic 0.2, reorder 100"}
