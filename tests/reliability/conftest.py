"""Session fixtures of the reliability tests: a tiny synthetic dataset, a trained run, diagnosis models."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from tests.reliability.reliability_helpers import run, training_args


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Commands called in-process point the root logger at this test's captured stderr; undo that."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def luna_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic LUNA16 folder (6 series of 64 x 64 x 30-40), written once per session."""
    from p2ch_luna.synth.generator import generate_dataset

    root = tmp_path_factory.mktemp("reliability_luna")
    generate_dataset(root, series=6, seed=0, shape=(64, 64), slices=(30, 40), progress=False)
    return root


@pytest.fixture()
def luna_copy(luna_root: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset that a test may damage."""
    return Path(shutil.copytree(luna_root, tmp_path / "luna"))


@pytest.fixture(scope="session")
def trained_run(luna_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch nodule training run (work folder with cache/, models/, runs/)."""
    work = tmp_path_factory.mktemp("trained_run")
    result = run("p2ch_luna.training", *training_args(luna_root, work, "--epochs", "1", "--epoch-size", "8"))
    assert result.returncode == 0, result.stderr[-3000:]
    return work


@pytest.fixture(scope="session")
def diagnosis_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained segmentation, nodule and malignancy checkpoints (enough to run diagnose end to end)."""
    import torch

    from p2ch_luna.models import build_model
    from p2ch_luna.models.checkpoint import BOOK_SEGMENTATION_KWARGS, save_checkpoint

    folder = tmp_path_factory.mktemp("diagnosis_models")
    torch.manual_seed(0)
    specs = {
        "segmentation": ("unet", dict(BOOK_SEGMENTATION_KWARGS)),
        "nodule": ("luna", {}),
        "malignancy": ("luna", {}),
    }
    paths = {}
    for task, (name, kwargs) in specs.items():
        paths[task] = save_checkpoint(folder / f"{task}_test.best.state", build_model(name, **kwargs),
                                      model_name=name, model_kwargs=kwargs, task=task, epoch=1, samples_seen=1,
                                      config={}, metrics={})
    return paths
