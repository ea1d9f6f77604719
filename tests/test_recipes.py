"""The ml-latest-small recipe of docs/recipes.md, run as written on the development copy of the data.

Skips cleanly when ../shared/data/ml-latest-small is absent (the data is never committed)."""

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from recommend.config import parse_config
from recommend.run.pipeline import refresh

ROOT = Path(__file__).parent.parent
DATA = ROOT.parent / "shared" / "data" / "ml-latest-small"


RECIPES = ROOT / "docs" / "recipes.md"


def recipe_block(name: str) -> dict:
    text = RECIPES.read_text()
    block = re.search(rf"<!-- recipe: {re.escape(name)} -->\s*```yaml\n(.*?)```", text, re.S)
    assert block, f"recipe {name} not found in {RECIPES}"
    return yaml.safe_load(block.group(1))


@pytest.mark.skipif(not (DATA / "movies.csv").exists(), reason="ml-latest-small not present (../shared/data)")
def test_ml_latest_small_recipe(tmp_path, tiny_model, dask_client):
    recipe = recipe_block("ml-latest-small")
    # as written, except: the tiny model (speed) and a scratch workdir
    recipe["embed"] = {"model": str(tiny_model), "device": "cpu"}
    recipe["workdir"] = str(tmp_path / "work")
    config = parse_config(recipe, "docs/recipes.md#ml-latest-small", base=ROOT)
    report = refresh(config, quiet=True, client=dask_client)

    assert report.items.rows_read == 9742 and report.events.rows_read == 100836
    assert report.index.users == 610 and report.index.users_with_history == 610
    assert report.items.balanced and report.events.balanced
    run = Path(report.run_dir)
    items = pd.read_parquet(run / "items.parquet").set_index("item_id")
    # ids stay strings as given; genres re-joined ("|" -> ", ")
    assert items.loc["1", "text"] == "Toy Story (1995). Adventure, Animation, Children, Comedy, Fantasy."
    lists = pd.read_parquet(run / "lists.parquet")
    users = lists[lists.subject_kind == "user"]
    assert (users.groupby("subject_id").size() == 10).all()
    events = pd.read_parquet(run / "events.parquet")
    seen = set(zip(events["user_id"], events["item_id"]))
    assert not any((u, i) in seen for u, i in zip(users["subject_id"], users["item_id"]))

    # issue 5's bar: the default blend, per-user stratified 75/25 random split, seed 42, K=10
    from recommend.run.commands.evaluation import evaluate_run

    result = evaluate_run(config, split="random", test_ratio=0.25, seed=42, ks=(10,), plots=False)
    ndcg = result.lists.at["10"].ndcg
    assert ndcg >= 0.36, result.lists
    assert ndcg > 1.5 * result.baselines["popularity"].at["10"].ndcg
    assert result.lists.cold_share > 0  # items with no training events reach users
