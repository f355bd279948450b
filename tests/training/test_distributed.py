"""DDP through real torchrun processes (gloo on the CPU): training and diagnosis match one process.

- nodule training, ``--standalone`` with 2 ranks (each loading through a batch ring), equals one
  process with the same global batch;
- segmentation training over a 2-node c10d rendezvous (two torchrun launchers, as on two
  machines), stopped after epoch 1 and continued with ``--resume``, equals one process;
- ``diagnose --validation`` split over 2 ranks writes the same findings and report as one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
import pytest
import torch

from p2ch_luna.diagnose import cli as diagnose_cli
from p2ch_luna.diagnose.report import FINDINGS_FILE, REPORT_FILE
from p2ch_luna.distributed import DistributedInfo, distributed_info_from_env, resolve_device
from p2ch_luna.models import load_checkpoint
from p2ch_luna.training import cli as training
from tests.locations import REPO

TORCHRUN_TIMEOUT_S = 240


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1"}


def _torchrun(launcher: Sequence[str], module: str, args: Sequence[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", module, *args]
    completed = subprocess.run(command, cwd=REPO, env=_environment(), capture_output=True, encoding="utf-8",
                               errors="replace", timeout=TORCHRUN_TIMEOUT_S)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def _two_node_torchrun(module: str, args: Sequence[str], logs: Path) -> list[str]:
    """Two torchrun launchers of one process each meeting at a c10d rendezvous; their stdouts.

    Their output goes to files under ``logs`` (pipes read one after the other could fill up and
    stall the other launcher, and with it the rendezvous).
    """
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logs.mkdir(parents=True, exist_ok=True)
    launchers = []
    with contextlib.ExitStack() as files:
        for node in range(2):
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                       "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                       "--rdzv-id", "p2ch-luna-test", "-m", module, *args]
            stdout = files.enter_context(open(logs / f"node{node}.out", "w", encoding="utf-8"))
            stderr = files.enter_context(open(logs / f"node{node}.err", "w", encoding="utf-8"))
            launchers.append(subprocess.Popen(command, cwd=REPO, env=_environment(), stdout=stdout, stderr=stderr))
        try:
            codes = [launcher.wait(timeout=TORCHRUN_TIMEOUT_S) for launcher in launchers]
        finally:
            for launcher in launchers:
                launcher.kill()

    def read(name: str) -> str:
        return (logs / name).read_text(encoding="utf-8", errors="replace")

    for node, code in enumerate(codes):
        assert code == 0, read(f"node{node}.err")[-3000:]
    return [read(f"node{node}.out") for node in range(2)]


def _assert_same_parameters(single_folder: Path, ddp_folder: Path, samples_seen: int) -> None:
    one = load_checkpoint(next(single_folder.glob("*.last.state")))
    two = load_checkpoint(next(ddp_folder.glob("*.last.state")))
    assert one.samples_seen == two.samples_seen == samples_seen
    single_parameters = dict(one.model.named_parameters())
    for name, value in two.model.named_parameters():
        assert torch.allclose(value, single_parameters[name], atol=1e-5, rtol=1e-4), name


def _nodule_args(data_root: Path, out: Path, cache: Path, batch_size: int, *extra: str) -> list[str]:
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
    assert training.main(_nodule_args(tiny_dataset, single, cache, 8, "--grad-accumulation", "2")) == 0

    ddp = tmp_path / "ddp"  # each rank's loader worker writes its shard's batches into the rank's batch ring
    completed = _torchrun(["--standalone", "--nproc-per-node", "2"], "p2ch_luna.training",
                          _nodule_args(tiny_dataset, ddp, cache, 4, "--num-workers", "1", "--batch-ring"))
    assert completed.stdout.count("last checkpoint:") == 1  # only rank 0 reports
    _assert_same_parameters(single / "models", ddp / "models", samples_seen=48)
    assert len(list((ddp / "runs").rglob("events.out.tfevents.*"))) >= 2  # rank 0 wrote TensorBoard


def _segmentation_args(data_root: Path, out: Path, cache: Path, batch_size: int, *extra: str) -> list[str]:
    return [
        "segmentation", "--data-root", str(data_root), "--cache-dir", str(cache),
        "--models-dir", str(out / "models"), "--runs-dir", str(out / "runs"), "--device", "cpu",
        "--batch-size", str(batch_size), "--epoch-size", "16", "--ratio", "1", "--val-stride", "3",
        "--val-negative-fraction", "0.05", "--seed", "5", "--optimizer", "sgd", "--lr", "0.01",
        "--model-kwargs", '{"depth": 2, "wf": 2}', "--log-level", "WARNING", *extra,
    ]


@pytest.mark.slow
def test_two_node_rendezvous_and_resume_match_one_process(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    single = tmp_path / "single"
    assert training.main(_segmentation_args(tiny_dataset, single, cache, 8, "--epochs", "2",
                                            "--grad-accumulation", "2")) == 0

    ddp = tmp_path / "ddp"
    first = _two_node_torchrun("p2ch_luna.training", _segmentation_args(tiny_dataset, ddp, cache, 4, "--epochs", "1"),
                               tmp_path / "first")
    assert sum(stdout.count("last checkpoint:") for stdout in first) == 1  # one rank 0 over both nodes
    (last,) = (ddp / "models").glob("*.last.state")
    _two_node_torchrun("p2ch_luna.training",
                       _segmentation_args(tiny_dataset, ddp, cache, 4, "--epochs", "2", "--resume", str(last)),
                       tmp_path / "resumed")
    assert len(list((ddp / "models").glob("*.last.state"))) == 1  # the resumed run wrote into the same run
    _assert_same_parameters(single / "models", ddp / "models", samples_seen=32)


@pytest.mark.slow
def test_diagnosis_split_over_two_ranks_matches_one_process(tiny_dataset: Path, untrained_models: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def args(out: Path) -> list[str]:
        return ["--validation", "--include-train", "--data-root", str(tiny_dataset), "--models-dir",
                str(untrained_models), "--output", str(out), "--segmentation-threshold", "0.9", "--device", "cpu",
                "--log-level", "WARNING"]

    assert diagnose_cli.main(args(tmp_path / "one")) == 0
    one_printed = capsys.readouterr().out
    completed = _torchrun(["--standalone", "--nproc-per-node", "2"], "p2ch_luna.diagnose", args(tmp_path / "two"))
    assert "on cpu x 2" in completed.stdout  # one report, from rank 0, over both ranks
    assert "| 3/3 [" in completed.stderr and "| 2/2 [" not in completed.stderr  # rank 0's progress bar only

    one = json.loads((tmp_path / "one" / REPORT_FILE).read_text())
    two = json.loads((tmp_path / "two" / REPORT_FILE).read_text())
    assert len(two["series"]) == 5 and [s["series_uid"] for s in two["series"]] == [
        s["series_uid"] for s in one["series"]]
    assert [s["candidates"] for s in two["series"]] == [s["candidates"] for s in one["series"]]
    assert two["confusion_table"] == one["confusion_table"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "two" / FINDINGS_FILE),
                                  pd.read_csv(tmp_path / "one" / FINDINGS_FILE))
    assert _summary_counts(completed.stdout) == _summary_counts(one_printed)


def _summary_counts(printed: str) -> str:
    """The report's summary line without its timing: "Summary: 5 CT(s), 28 candidate(s), ..."."""
    (line,) = [line for line in printed.splitlines() if line.startswith("Summary:")]
    return line.split(";")[0]


def test_environment_without_torchrun_is_one_process() -> None:
    info = distributed_info_from_env({})
    assert info == DistributedInfo(0, 1, 0) and not info.is_distributed and info.is_main
    assert distributed_info_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}).world_size == 4
    assert distributed_info_from_env({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}).local_world_size == 2
    assert resolve_device("cpu", info) == torch.device("cpu")
