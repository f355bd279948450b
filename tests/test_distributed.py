"""DDP: a real 2-process torchrun (gloo) run matches one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2ch_luna import training
from p2ch_luna.distributed import DistributedInfo, distributed_info_from_env, resolve_device
from p2ch_luna.models import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_TIMEOUT_S = 240


def _run_args(data_root: Path, out: Path, cache: Path, batch_size: int, *extra: str) -> list[str]:
    # No augmentation: each rank draws its own stream, so only the sampling must agree.
    return [
        "nodule", "--data-root", str(data_root), "--cache-dir", str(cache),
        "--models-dir", str(out / "models"), "--runs-dir", str(out / "runs"), "--device", "cpu",
        "--batch-size", str(batch_size), "--epoch-size", "24", "--val-size", "10", "--val-stride", "3",
        "--balanced", "--epochs", "2", "--seed", "3", "--optimizer", "sgd", "--lr", "0.01",
        "--model-kwargs", '{"conv_channels": 2, "depth": 2}', "--chunk-shape", "8", "16", "16",
        "--log-level", "WARNING", *extra,
    ]


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    single = tmp_path / "single"
    # One process, global batch 8 in two strided micro-batches of 4 = what each of 2 ranks sees.
    assert training.main(_run_args(tiny_dataset, single, cache, 8, "--grad-accumulation", "2")) == 0

    ddp = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "p2ch_luna.training", *_run_args(tiny_dataset, ddp, cache, 4)]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=TORCHRUN_TIMEOUT_S)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("last checkpoint:") == 1  # only rank 0 reports

    one = load_checkpoint(next((single / "models").glob("*.last.state")))
    two = load_checkpoint(next((ddp / "models").glob("*.last.state")))
    assert one.samples_seen == two.samples_seen == 48
    single_parameters = dict(one.model.named_parameters())
    for name, value in two.model.named_parameters():
        assert torch.allclose(value, single_parameters[name], atol=1e-5, rtol=1e-4), name
    assert len(list((ddp / "runs").rglob("events.out.tfevents.*"))) >= 2  # rank 0 wrote TensorBoard


def test_environment_without_torchrun_is_one_process() -> None:
    info = distributed_info_from_env({})
    assert info == DistributedInfo(0, 1, 0) and not info.is_distributed and info.is_main
    assert distributed_info_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}).world_size == 4
    assert resolve_device("cpu", info) == torch.device("cpu")
