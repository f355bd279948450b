"""Shared fixtures: the real data under /work/shared/data, a tiny synthetic LUNA16 set, untrained models."""

from __future__ import annotations

import locale
import logging
import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

if not torch.cuda.is_available():  # small_conv's Triton kernels run in Triton's CPU interpreter (before it loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from p2ch_luna.models import build_model
from p2ch_luna.models.checkpoint import BOOK_SEGMENTATION_KWARGS, checkpoint_path, save_checkpoint
from p2ch_luna.synth.generator import generate_dataset
from tests.locations import SHARED_DATA


@pytest.fixture(autouse=True)
def restore_locale() -> Iterator[None]:
    """Each test starts in the process's locale: SimpleITK's DICOM writer (GDCM), used to make test series,
    sets the C locale, which left later tests' text I/O ASCII-only (torch's inductor failed to read its
    templates)."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(autouse=True)
def drop_command_log_handlers() -> Iterator[None]:
    """Each test ends without the root handler a command's ``configure_logging`` left on ``sys.stderr``.

    That stream is the test's captured stderr, closed after it: the next test's fixtures logged into it
    ("--- Logging error --- ... I/O operation on closed file" on that test's stderr) before its command
    configured logging again.
    """
    yield
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if type(handler) is logging.StreamHandler:  # basicConfig's; pytest's own handlers are subclasses
            root.removeHandler(handler)




def _existing(path: Path, what: str) -> Path:
    if not path.is_dir():
        pytest.skip(f"{what} not available at {path}")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder (skips the test when it is absent)."""
    return _existing(SHARED_DATA, "shared data folder")


@pytest.fixture(scope="session")
def cptac_dir(shared_data: Path) -> Path:
    """A real chest CT as a DICOM folder (99 slices of 512 x 512)."""
    return _existing(shared_data / "cptac-chest-ct", "CPTAC chest CT")


@pytest.fixture(scope="session")
def luna16_dir(shared_data: Path) -> Path:
    """The LUNA16 CSVs (annotations.csv, annotations_with_malignancy.csv)."""
    return _existing(shared_data / "luna16", "LUNA16 CSVs")


@pytest.fixture(scope="session")
def book_checkpoints_dir(shared_data: Path) -> Path:
    """The book's trained classifier and segmentation checkpoints."""
    return _existing(shared_data / "book-checkpoints", "book checkpoints")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic LUNA16 dataset (5 series), written once per session."""
    root = tmp_path_factory.mktemp("tiny_luna")
    generate_dataset(root, series=5, seed=0, shape=(96, 96), slices=(40, 50))
    return root


@pytest.fixture(scope="session")
def untrained_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded untrained segmentation, nodule and malignancy checkpoints, named as training saves them."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    specs = [("segmentation", "unet", dict(BOOK_SEGMENTATION_KWARGS)), ("nodule", "luna", {}),
             ("malignancy", "luna", {})]
    for task, name, kwargs in specs:
        save_checkpoint(checkpoint_path(folder, task, "2026-01-01_00.00.00", "test", best=True),
                        build_model(name, **kwargs), model_name=name, model_kwargs=kwargs, task=task,
                        epoch=1, samples_seen=0, config={}, metrics={})
    return folder
