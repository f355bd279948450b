"""GPU paths: training with mixed precision and diagnosis on CUDA match their CPU counterparts.

Skipped without a CUDA device (CI has none); run on a GPU machine with
``python -m pytest tests/test_gpu.py``. The logic these paths share with the
CPU (autocast settings, device selection, sharding) is tested elsewhere on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from p2ch_luna import diagnose, training
from p2ch_luna.models import build_model, load_checkpoint
from p2ch_luna.models.checkpoint import BOOK_SEGMENTATION_KWARGS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def _cli_args(task: str, data_root: Path, out: Path, *extra: str) -> list[str]:
    return [
        task, "--data-root", str(data_root), "--cache-dir", str(out / "cache"), "--models-dir", str(out / "models"),
        "--runs-dir", str(out / "runs"), "--device", "cuda", "--amp", "--epochs", "2", "--batch-size", "8",
        "--epoch-size", "32", "--val-stride", "3", "--log-level", "WARNING", *extra,
    ]


@pytest.mark.parametrize("task", ["nodule", "segmentation"])
def test_cuda_amp_training_saves_finite_checkpoints(task: str, tiny_dataset: Path, tmp_path: Path) -> None:
    extra = ["--balanced", "--chunk-shape", "16", "24", "24"] if task == "nodule" else []
    assert training.main(_cli_args(task, tiny_dataset, tmp_path, *extra)) == 0
    last = next((tmp_path / "models").glob(f"{task}_*.last.state"))
    loaded = load_checkpoint(last, expected_task=task)
    assert loaded.epoch == 2 and loaded.samples_seen == 64
    assert all(torch.isfinite(value).all() for value in loaded.model.state_dict().values() if value.is_floating_point())
    assert np.isfinite(loaded.metrics["loss"])
    config = json.loads(next((tmp_path / "models").glob(f"{task}_*.config.json")).read_text())
    assert config["amp"] is True


def test_cuda_segmentation_matches_cpu() -> None:
    torch.manual_seed(0)
    model = build_model("unet", **BOOK_SEGMENTATION_KWARGS).eval()
    rng = np.random.default_rng(0)
    hu = rng.normal(-700, 300, size=(12, 96, 96)).astype(np.int16)
    region = np.zeros(hu.shape, dtype=bool)
    region[2:10, 10:80, 12:90] = True
    on_cpu = diagnose.segment_ct(hu, region, model, 0.5, 4, CPU)
    on_cuda = diagnose.segment_ct(hu, region, model.to(CUDA), 0.5, 4, CUDA)
    assert np.mean(on_cpu != on_cuda) < 1e-3  # TF32 convolutions may flip voxels at the threshold


def test_cuda_classification_matches_cpu_and_bf16_stays_close() -> None:
    torch.manual_seed(0)
    model = build_model("luna", input_shape=[16, 24, 24]).eval()
    rng = np.random.default_rng(1)
    hu = rng.normal(-500, 400, size=(40, 64, 64)).astype(np.int16)
    centers = rng.integers([8, 12, 12], [32, 52, 52], size=(40, 3))
    on_cpu = diagnose.classify_chunks(hu, centers, model, 16, CPU, flips=True)
    model.to(CUDA)
    on_cuda = diagnose.classify_chunks(hu, centers, model, 16, CUDA, flips=True)
    bf16 = diagnose.classify_chunks(hu, centers, model, 16, CUDA, amp=True, flips=True)
    np.testing.assert_allclose(on_cuda, on_cpu, atol=2e-3)
    np.testing.assert_allclose(bf16, on_cpu, atol=3e-2)
