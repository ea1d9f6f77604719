"""The run folder's layout, named here and nowhere else: `<workdir>/runs/<run_id>/`, one per refresh.

    report.json, report.md          the run's report (recommend/run/report.py), a failed run's too
    manifest-<stage>.json           what each stage wrote, with digests (`recs check` verifies them)
    items.parquet                   the accepted items
    quarantine.parquet              every rejected row, with its reason
    events-raw/                     ingest's first round (removed once the blocks are written)
    events.parquet/, users.parquet/ the accepted events and the users, one file per user block
    embeddings.parquet              the items' vectors
    item-side/                      the item side's arrays, ids and layout
    index.faiss                     the index the lists were searched with
    lists.parquet/, parts/          the lists, one part per block, and each part's arrays for the publish
    tune.json, eval-<split>.json    what `recs eval` wrote

A `RunFolder` is what stages and worker tasks are given (it pickles as its path): each asks it for the
file it reads or writes. Digests in the manifests are keyed by `relative(path)`.

Example:
    run = RunFolder("/srv/recs/runs/20261203T010000-ab12")
    run.embeddings, run.event_block(3), run.relative(run.list_part("user", 3))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def __str__(self) -> str:
        return str(self.root)

    @property
    def run_id(self) -> str:
        return self.root.name

    def relative(self, path: Path) -> str:
        """A file's name in the manifests: its path under the run folder."""
        return Path(path).relative_to(self.root).as_posix()

    # the run's own account
    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    def manifest(self, stage: str) -> Path:
        return self.root / f"manifest-{stage}.json"

    def manifests(self) -> list[Path]:
        return sorted(self.root.glob("manifest-*.json"))

    # ingest
    @property
    def items(self) -> Path:
        return self.root / "items.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.parquet"

    @property
    def events_raw(self) -> Path:
        return self.root / "events-raw"

    def raw_part(self, partition: int) -> Path:
        return self.events_raw / f"part-{partition:05d}.parquet"

    @property
    def events(self) -> Path:
        return self.root / "events.parquet"

    @property
    def users(self) -> Path:
        return self.root / "users.parquet"

    def event_block(self, block: int) -> Path:
        return self.events / _block(block)

    def user_block(self, block: int) -> Path:
        return self.users / _block(block)

    # embed
    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings.parquet"

    # index and lists
    @property
    def item_side(self) -> Path:
        return self.root / "item-side"

    def item_array(self, name: str) -> Path:
        return self.item_side / f"{name}.npy"

    @property
    def item_ids(self) -> Path:
        return self.item_side / "item_ids.parquet"

    @property
    def layout(self) -> Path:
        return self.item_side / "layout.json"

    @property
    def index(self) -> Path:
        return self.root / "index.faiss"

    @property
    def lists(self) -> Path:
        return self.root / "lists.parquet"

    @property
    def parts(self) -> Path:
        return self.root / "parts"

    def list_part(self, kind: str, block: int) -> Path:
        """A block's lists (Parquet: pandas and pyarrow read the folder as one table)."""
        return self.lists / f"{kind}-{block:06d}.parquet"

    def part_arrays(self, kind: str, block: int) -> Path:
        """A block's ids, scores and vectors, as the publish reads them."""
        return self.parts / f"{kind}-{block:06d}.npz"

    # recs eval
    @property
    def tune(self) -> Path:
        return self.root / "tune.json"

    def evaluation(self, split: str) -> Path:
        return self.root / f"eval-{split}.json"


def _block(block: int) -> str:
    return f"block-{block:05d}.parquet"
