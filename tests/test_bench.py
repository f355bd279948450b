"""The benches are a package run as ``python -m bench.NAME``: each imports and explains its options."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import numpy as np
import pytest

import bench
from tests.locations import REPO

BENCHES = sorted(info.name for info in pkgutil.iter_modules(bench.__path__) if info.name.startswith("bench_"))



def test_every_bench_script_is_in_the_package() -> None:
    scripts = sorted(path.stem for path in (REPO / "bench").glob("bench_*.py"))
    assert scripts == BENCHES and len(BENCHES) >= 10


@pytest.mark.parametrize("name", BENCHES)
def test_bench_answers_help(name: str, capsys: pytest.CaptureFixture) -> None:
    module = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_benches_do_not_edit_sys_path() -> None:
    for path in (REPO / "bench").glob("*.py"):
        assert "sys.path" not in path.read_text(), path


def test_a_bench_runs_as_a_module_from_the_repository_root() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.bench_synth", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


def test_book_grouping_erodes_labels_and_weights_centres_by_hu() -> None:
    from bench.book import book_candidate_centers

    probabilities = np.zeros((9, 20, 20), dtype=np.float32)
    probabilities[2:7, 2:7, 2:7] = 0.9  # a 5-voxel cube: its 3-voxel core survives one erosion
    probabilities[1:8, 12:19, 12:19] = 0.9  # a 7-voxel cube, brighter on its high-column side
    probabilities[4, 15, 2:9] = 0.9  # a one-voxel-thick line: erosion removes it
    probabilities[0, 0, 0] = 0.5  # not above the threshold
    hu = np.full(probabilities.shape, -1000, dtype=np.int16)
    hu[1:8, 12:19, 12:16] = -1000 + 1  # weights 2 on the low-column side of the core ...
    hu[1:8, 12:19, 16:19] = -1000 + 7  # ... and 8 on the high side
    centers = book_candidate_centers(probabilities, hu)
    assert centers.tolist() == [[4, 15, 16], [4, 4, 4]]  # labelled in raster order (the 7-cube starts at index 1)
    assert centers.dtype == np.int64
    assert book_candidate_centers(np.zeros_like(probabilities), hu).shape == (0, 3)
