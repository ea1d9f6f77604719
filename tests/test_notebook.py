"""The notebook runs top to bottom against a freshly published tiny version."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import write_config
from recommend.config import load_config
from recommend.run.pipeline import refresh

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


@pytest.mark.parametrize("name, expected", [("explore.ipynb", "list from version"), ("quality.ipynb", "new-item trade-off: boost 1: ")])
def test_notebook_executes(name, expected, tmp_path, sample_dir, tiny_model, dask_client, monkeypatch):
    path = write_config(tmp_path, sample_dir, tiny_model)
    refresh(load_config(path), quiet=True, client=dask_client)
    # the kernel is another process: it loads the live version beside anyone else (no lock is held)
    monkeypatch.setenv("RECS_CONFIG", str(path))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert expected in text
