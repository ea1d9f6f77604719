"""How the command line shows answers and evaluations: rich tables, or one JSON line."""

from __future__ import annotations

import json

import typer


def print_answer(answer, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(answer.to_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{answer.query} — version {answer.version} ({answer.source})", title_justify="left")
    extra = list(dict.fromkeys(k for r in answer.items for k in r.metadata))
    for col in ["rank", "item_id", "score", *extra]:
        table.add_column(col)
    for rank, r in enumerate(answer.items, 1):
        table.add_row(str(rank), r.item_id, f"{r.score:.4f}", *[str(r.metadata.get(c, "")) for c in extra])
    Console(soft_wrap=True).print(table)



def eval_table(result, ks) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {result.run_id}: {result.split} split, {result.test_ratio:.0%} held out, seed {result.seed}; "
                        f"{result.users} users, {result.items} items ({result.cold_items} without training events)",
                  title_justify="left")
    for col in ["lists / baseline", "K", "nDCG", "precision", "recall", "MAP", "hit rate", "coverage", "new-item reach"]:
        table.add_column(col)
    for name, scored in {"lists": result.lists, **result.baselines}.items():
        for kk in ks:
            m = scored.at[str(kk)]
            table.add_row(name, str(kk), f"{m.ndcg:.4f}", f"{m.precision:.4f}", f"{m.recall:.4f}", f"{m.map:.4f}",
                          f"{m.hit_rate:.3f}", f"{m.coverage:.3f}", f"{m.cold_reach:.3f} (hits {m.cold_hit_rate:.3f})")
    Console(soft_wrap=True).print(table)
    if result.sweep:
        pairs = ", ".join(f"{w:g}: {v:.4f}" for w, v in zip(result.sweep.behaviour_weight, result.sweep.value))
        typer.echo(f"nDCG@{result.sweep.k} by blend.behaviour_weight: {pairs}")
    typer.echo("written: " + ", ".join(result.written))

