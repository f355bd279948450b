"""Run each example notebook top to bottom so it cannot rot; check that they are committed clean."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.locations import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
"""Per cell; each notebook takes well under two minutes on 2 CPU cores."""



def test_notebooks_exist() -> None:
    assert [path.name for path in NOTEBOOKS] == ["01_explore_data.ipynb", "02_training.ipynb", "03_diagnosis.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_saved_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits this environment: the repository is importable, and the default
    # data folders point into tmp_path (no LUNA16 there: the notebooks generate synthetic data).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("P2CH_DATA_HOME", str(tmp_path / "data-unversioned"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temporary folders are removed with tmp_path
    for name in ("P2CH_DATA_ROOT", "P2CH_CACHE_DIR", "P2CH_MODELS_DIR", "P2CH_RUNS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert not errors
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if "image/png" in output.get("data", {})]
    assert images, f"{path.name} drew no figure"
