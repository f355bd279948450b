"""Training machinery end to end on the tiny synthetic set: outputs, resume, fine-tuning, failures."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from p2ch_luna.errors import LunaError
from p2ch_luna.metrics import calibration
from p2ch_luna.models import LunaModel, load_checkpoint, save_checkpoint
from p2ch_luna.paths import resolve_paths
from p2ch_luna.precision import AmpSettings, amp_settings
from p2ch_luna.training import cli as training
from p2ch_luna.training import engine, loop
from p2ch_luna.training.config import TrainConfig
from p2ch_luna.training.engine import split_batch, train_one_epoch
from p2ch_luna.training.tasks import RunContext
from p2ch_luna.training.tasks.base import ModelSpec, Task
from p2ch_luna.training.tasks.classification import ClassificationOptions, MalignancyTask, NoduleTask

TINY_MODEL = '{"conv_channels": 2, "depth": 2}'
TINY_CHUNK = ["--chunk-shape", "8", "16", "16"]


def tiny_args(data_root: Path, out: Path, *extra: str) -> list[str]:
    """Arguments of a seconds-long CPU run (shared cache folder next to the outputs)."""
    return [
        "nodule", "--data-root", str(data_root), "--cache-dir", str(out.parent / "cache"),
        "--models-dir", str(out / "models"), "--runs-dir", str(out / "runs"),
        "--device", "cpu", "--batch-size", "4", "--epoch-size", "16", "--val-size", "12", "--val-stride", "3",
        "--balanced", "--model-kwargs", TINY_MODEL, *TINY_CHUNK, "--log-level", "WARNING", *extra,
    ]


def only_file(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def event_tags(run_dir: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator.Tags()


def test_tiny_run_writes_checkpoints_config_and_tensorboard(tiny_dataset: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert training.main(tiny_args(tiny_dataset, out, "--epochs", "2", "--augmented", "--comment", "e2e")) == 0
    best = only_file(out / "models", "nodule_*_e2e.best.state")
    last = only_file(out / "models", "nodule_*_e2e.last.state")
    loaded = load_checkpoint(last, expected_task="nodule")
    assert isinstance(loaded.model, LunaModel) and loaded.epoch == 2 and loaded.samples_seen == 32
    assert "roc_auc" in loaded.metrics
    assert load_checkpoint(best).task == "nodule"
    config = json.loads(only_file(out / "models", "nodule_*_e2e.config.json").read_text())
    assert config["ratio"] == 1 and config["augment"]["flip"] is True
    assert config["num_workers"] == 0 and config["batch_ring"] is None  # the CPU defaults
    reported = capsys.readouterr().out
    assert str(best) in reported and str(last) in reported

    trn = only_file(out / "runs" / "p2ch_luna", "*-trn-nodule-e2e")
    val = only_file(out / "runs" / "p2ch_luna", "*-val-nodule-e2e")
    trn_tags = event_tags(trn)
    for tag in ("loss/all", "loss/pos", "loss/neg", "correct/all", "correct/pos", "correct/neg",
                "pr/precision", "pr/recall", "pr/f1"):
        assert tag in trn_tags["scalars"], tag
    assert "prob/pos" in trn_tags["histograms"] and "prob/neg" in trn_tags["histograms"]
    assert "roc" in trn_tags["images"]
    assert any(tag.startswith("pr/pr_curves") or tag.startswith("pr") for tag in trn_tags["tensors"])
    assert any(tag.startswith("config") for tag in trn_tags["tensors"])
    assert "loss/all" in event_tags(val)["scalars"]
    hparams_files = list(val.glob("events.out.tfevents.*"))
    assert len(hparams_files) >= 2  # metrics + the HParams summary


def test_resume_continues_to_the_same_weights(tiny_dataset: Path, tmp_path: Path) -> None:
    common = ["--augment-flip", "--augment-noise", "--optimizer", "adam"]
    assert training.main(tiny_args(tiny_dataset, tmp_path / "straight", "--epochs", "2", *common)) == 0
    assert training.main(tiny_args(tiny_dataset, tmp_path / "split", "--epochs", "1", *common)) == 0
    first = only_file(tmp_path / "split" / "models", "*.last.state")
    resume_args = tiny_args(tiny_dataset, tmp_path / "split", "--epochs", "2", "--resume", str(first))
    assert training.main(resume_args) == 0
    straight = load_checkpoint(only_file(tmp_path / "straight" / "models", "*.last.state"))
    resumed = load_checkpoint(only_file(tmp_path / "split" / "models", "*.last.state"))
    assert resumed.epoch == 2 and resumed.samples_seen == straight.samples_seen == 32
    for name, value in straight.model.state_dict().items():
        assert torch.allclose(value.float(), resumed.model.state_dict()[name].float(), atol=1e-6), name
    # The same run folder was continued, not a new one.
    assert len(list((tmp_path / "split" / "runs" / "p2ch_luna").glob("*-trn-*"))) == 1


def test_resume_refuses_when_the_datas_split_changed(tiny_dataset: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    assert training.main(tiny_args(data, tmp_path / "run", "--epochs", "1")) == 0
    first = only_file(tmp_path / "run" / "models", "*.last.state")
    removed = sorted(data.glob("subset*/*.mhd"))[0]
    removed.unlink()
    removed.with_suffix(".raw").unlink()
    capsys.readouterr()
    resume_args = tiny_args(data, tmp_path / "run", "--epochs", "2", "--resume", str(first))
    assert training.main(resume_args) != 0
    stderr = capsys.readouterr().err
    assert f"--resume {first}: the data's series split differs" in stderr and "1 missing" in stderr
    assert load_checkpoint(first).epoch == 1


def test_interrupt_keeps_the_last_completed_epoch(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    real = engine.train_one_epoch

    def interrupted(*args: Any, epoch: int, **kwargs: Any) -> Any:
        if epoch == 2:
            raise KeyboardInterrupt
        return real(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    out = tmp_path / "run"
    assert training.main(tiny_args(tiny_dataset, out, "--epochs", "3")) == 130
    last = only_file(out / "models", "*.last.state")
    assert load_checkpoint(last).epoch == 1
    assert f"checkpoint is kept: {last} (continue with --resume)" in capsys.readouterr().err


def test_interrupt_before_the_first_checkpoint_says_none_was_written(
        tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    out = tmp_path / "run"
    assert training.main(tiny_args(tiny_dataset, out, "--epochs", "2")) == 130
    stderr = capsys.readouterr().err
    assert "interrupted before the first checkpoint; none was written" in stderr and "is kept" not in stderr
    assert not list(out.glob("models/*.state"))


def test_batch_ring_trains_to_the_same_weights(tiny_dataset: Path, tmp_path: Path) -> None:
    common = ["--epochs", "2", "--augmented", "--num-workers", "1"]
    assert training.main(tiny_args(tiny_dataset, tmp_path / "plain", *common)) == 0
    assert training.main(tiny_args(tiny_dataset, tmp_path / "ring", *common, "--batch-ring")) == 0
    plain = load_checkpoint(only_file(tmp_path / "plain" / "models", "*.last.state"))
    ring = load_checkpoint(only_file(tmp_path / "ring" / "models", "*.last.state"))
    assert ring.samples_seen == plain.samples_seen == 32 and ring.config["batch_ring"] is True
    for name, value in plain.model.state_dict().items():
        assert torch.equal(value, ring.model.state_dict()[name]), name


@pytest.mark.parametrize("device, cuda_available, cpus, processes, expected", [
    ("cpu", True, 16, 1, 0), ("auto", False, 16, 1, 0), ("auto", True, 16, 1, training.CUDA_LOADER_WORKERS),
    ("cuda:1", True, 64, 1, training.CUDA_LOADER_WORKERS), ("cuda", True, 16, 4, 3), ("cuda", True, 8, 8, 0),
    ("cuda", True, 2, 1, 1)])
def test_default_num_workers(device: str, cuda_available: bool, cpus: int, processes: int, expected: int) -> None:
    assert training.default_num_workers(device, cuda_available, cpus, processes) == expected


@pytest.mark.parametrize("asked, device, workers, expected", [
    (None, "cuda", 2, True), (None, "cpu", 2, False), (None, "cuda", 0, False), (False, "cuda", 2, False),
    (True, "cpu", 1, True)])
def test_batch_ring_by_default_only_on_cuda_with_workers(asked: bool | None, device: str, workers: int,
                                                         expected: bool) -> None:
    from p2ch_luna.training.tasks.base import uses_batch_ring

    config = TrainConfig(task="nodule", paths=resolve_paths(), num_workers=workers, batch_ring=asked)
    assert uses_batch_ring(config, torch.device(device)) is expected


def test_no_batch_ring_is_recorded(tiny_dataset: Path, tmp_path: Path) -> None:
    assert training.main(tiny_args(tiny_dataset, tmp_path, "--num-workers", "1", "--no-batch-ring",
                                   "--epoch-size", "8")) == 0
    config = json.loads(only_file(tmp_path / "models", "nodule_*.config.json").read_text())
    assert config["batch_ring"] is False and config["num_workers"] == 1


@pytest.mark.parametrize("argument", [["--comment", "a b"], ["--batch-size", "0"], ["--model-kwargs", "[1]"],
                                      ["--batch-size", "6", "--grad-accumulation", "4"], ["--batch-ring"]])
def test_bad_arguments_are_usage_errors(tiny_dataset: Path, tmp_path: Path, argument: list[str]) -> None:
    assert training.main(tiny_args(tiny_dataset, tmp_path, *argument)) == 2


def test_finetune_freezes_all_but_the_last_blocks_and_reinitialises_the_head(tiny_dataset: Path,
                                                                           tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = LunaModel(conv_channels=2, depth=2, input_shape=(8, 16, 16))
    with torch.no_grad():
        source.head_linear.weight.fill_(0.5)
    path = save_checkpoint(tmp_path / "nodule.state", source, model_name="luna",
                           model_kwargs={"conv_channels": 2, "depth": 2, "input_shape": [8, 16, 16]},
                           task="nodule", epoch=1, samples_seen=1, config={}, metrics={})
    options = ClassificationOptions(chunk_shape=(8, 16, 16), finetune=path, finetune_depth=2)
    config = TrainConfig(task="malignancy", paths=resolve_paths(data_root=tiny_dataset), task_options=options)
    spec = MalignancyTask(RunContext(config, torch.device("cpu"))).build_model()
    trainable = {name.split(".")[0] for name, p in spec.model.named_parameters() if p.requires_grad}
    assert trainable == {"head_linear", "block2"}
    assert not torch.equal(spec.model.head_linear.weight, source.head_linear.weight)
    assert torch.equal(spec.model.block1.conv1.weight, source.block1.conv1.weight)
    optimizer = loop.build_optimizer(spec.model, dataclasses.replace(config, optimizer="sgd", lr=0.1))
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == sum(
        p.numel() for p in spec.model.parameters() if p.requires_grad)


class _ToyTask(Task):
    """A linear model on random features; the loss turns NaN at a chosen batch."""

    task_name = "nodule"
    score_name = "loss"
    default_model = "toy"

    def __init__(self, context: RunContext, nan_batch: int | None = None, batches: int = 4) -> None:
        super().__init__(context)
        self.nan_batch = nan_batch
        self.batches = batches
        self.batches_seen = 0

    def build_model(self) -> ModelSpec:
        return ModelSpec(nn.Linear(4, 2), "toy", {})

    def train_loader(self) -> list[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)
        return [{"image": torch.randn(8, 4, generator=generator), "label": torch.randint(0, 2, (8,),
                 generator=generator)} for _ in range(self.batches)]

    val_loader = train_loader

    def model_inputs(self, batch: dict, augment: bool,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["image"], batch["label"]

    def compute_loss(self, model: nn.Module, batch: dict, augment: bool,
                     generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        images, labels = self.model_inputs(batch, augment, generator)
        loss = nn.functional.cross_entropy(model(images), labels, reduction="none")
        if self.batches_seen == self.nan_batch:
            loss = loss * float("nan")
        self.batches_seen += 1
        return loss, {"label": batch["label"].cpu()}

    def epoch_metrics(self, outputs: dict) -> dict[str, float]:
        return {"loss": float(outputs["loss"].mean())}


def _toy(nan_batch: int | None = None, batches: int = 4) -> tuple[_ToyTask, nn.Module, torch.optim.Optimizer]:
    config = TrainConfig(task="nodule", paths=resolve_paths())
    task = _ToyTask(RunContext(config, torch.device("cpu")), nan_batch, batches)
    model = task.build_model().model
    return task, model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_nan_loss_raises_naming_epoch_and_batch() -> None:
    task, model, optimizer = _toy(nan_batch=2)
    with pytest.raises(LunaError, match=r"epoch 3, batch 2"):
        train_one_epoch(task, model, optimizer, task.train_loader(), epoch=3, device=torch.device("cpu"),
                        generator=torch.Generator(), show_progress=False)


@pytest.mark.parametrize("nan_batch", [engine.HOST_SYNC_EVERY - 1, engine.HOST_SYNC_EVERY + 3])
def test_nan_loss_between_host_syncs_names_the_first_bad_batch(nan_batch: int) -> None:
    """Losses are read back every HOST_SYNC_EVERY batches; the error still names the batch that went bad."""
    task, model, optimizer = _toy(nan_batch=nan_batch, batches=2 * engine.HOST_SYNC_EVERY + 1)
    with pytest.raises(LunaError, match=rf"epoch 1, batch {nan_batch} "):
        train_one_epoch(task, model, optimizer, task.train_loader(), epoch=1, device=torch.device("cpu"),
                        generator=torch.Generator(), show_progress=False)
    expected_stop = (nan_batch // engine.HOST_SYNC_EVERY + 1) * engine.HOST_SYNC_EVERY
    assert task.batches_seen == expected_stop


def test_bf16_autocast_on_cpu_trains_a_step() -> None:
    amp = amp_settings(True, torch.device("cpu"))
    assert amp.dtype == torch.bfloat16 and not amp.needs_scaler
    task, model, optimizer = _toy()
    before = model.weight.detach().clone()
    result = train_one_epoch(task, model, optimizer, task.train_loader(), epoch=1, device=torch.device("cpu"),
                             generator=torch.Generator(), amp=amp, show_progress=False)
    assert result.samples == 32 and torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert not torch.equal(before, model.weight)



def test_epoch_result_counts_the_time_spent_waiting_for_input() -> None:
    """Time blocked on a slow loader is reported as input wait, for training and validation alike; a loader
    that is ready at once leaves almost none."""
    task, model, optimizer = _toy()
    batches = task.train_loader()

    def slow_loader() -> Iterator[dict]:
        for batch in batches:
            time.sleep(0.05)
            yield batch
    cpu = torch.device("cpu")
    for run in (lambda loader: train_one_epoch(task, model, optimizer, loader, epoch=1, device=cpu,
                                               generator=torch.Generator(), show_progress=False),
                lambda loader: engine.evaluate(task, model, loader, epoch=1, device=cpu,
                                               generator=torch.Generator(), show_progress=False)):
        slow = run(slow_loader())
        assert slow.input_wait_seconds >= 4 * 0.05
        assert 0.5 < slow.input_wait_fraction <= 1.0
        quick = run(batches)
        assert quick.input_wait_seconds < slow.input_wait_seconds / 10

def test_gradient_accumulation_matches_one_full_batch() -> None:
    task, model, optimizer = _toy()
    twin = nn.Linear(4, 2)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    loader = task.train_loader()
    cpu = torch.device("cpu")
    train_one_epoch(task, model, optimizer, loader, epoch=1, device=cpu, generator=torch.Generator(),
                    show_progress=False)
    train_one_epoch(task, twin, twin_optimizer, loader, epoch=1, device=cpu, generator=torch.Generator(),
                    grad_accumulation=2, show_progress=False)
    assert torch.allclose(model.weight, twin.weight, atol=1e-6)


def test_split_batch_strides_like_ddp_ranks() -> None:
    batch = {"image": torch.arange(6), "series_uid": list("abcdef"), "meta": 1}
    first, second = split_batch(batch, 2)
    assert first["image"].tolist() == [0, 2, 4] and second["series_uid"] == ["b", "d", "f"]
    assert first["meta"] == 1
    assert AmpSettings().enabled is False


def test_a_run_with_few_validation_positives_says_so(tiny_dataset: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    paths = resolve_paths(tiny_dataset, tmp_path / "cache", tmp_path / "models", tmp_path / "runs")
    config = TrainConfig(task="nodule", paths=paths, batch_size=8, ratio=1, epoch_size=64, val_stride=5,
                         task_options=ClassificationOptions(chunk_shape=(16, 16, 16)))
    with caplog.at_level("INFO"):
        _, validation = NoduleTask(RunContext(config, torch.device("cpu"))).datasets()
    positives = int(validation.labels.sum())
    assert positives < 10
    assert f"validation has only {positives} positive sample(s)" in caplog.text


def test_a_finished_classifier_run_stores_its_temperature_in_the_best_checkpoint(
        tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny set's validation holds one nodule: lower the per-class minimum to it so that a fit is made.
    monkeypatch.setattr(calibration, "fit_temperature", functools.partial(calibration.fit_temperature,
                                                                          min_per_class=1))
    out = tmp_path / "run"
    assert training.main(tiny_args(tiny_dataset, out, "--epochs", "2", "--comment", "cal",
                                   "--calibration-method", "temperature")) == 0
    best = load_checkpoint(only_file(out / "models", "nodule_*_cal.best.state"), expected_task="nodule")
    stored = best.raw["calibration"]
    assert stored["method"] == "temperature" and stored["reason"] is None and stored["bias"] == 0.0
    assert math.isfinite(best.temperature) and best.temperature > 0 and best.temperature == stored["temperature"]
    assert stored["validation_samples"] == 12 and stored["epoch"] == best.epoch
    assert stored["ece_after"] <= stored["ece_before"] + 1e-9 and stored["nll_after"] <= stored["nll_before"]
    assert "calibration" not in load_checkpoint(only_file(out / "models", "nodule_*_cal.last.state")).raw
    val = only_file(out / "runs" / "p2ch_luna", "*-val-nodule-cal")
    assert {"calibration/temperature", "calibration/ece_before", "calibration/ece_after"} <= set(
        event_tags(val)["scalars"])


def test_no_calibrate_leaves_the_best_checkpoint_uncalibrated(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert training.main(tiny_args(tiny_dataset, out, "--no-calibrate", "--comment", "raw")) == 0
    best = load_checkpoint(only_file(out / "models", "nodule_*_raw.best.state"))
    assert "calibration" not in best.raw and best.temperature == 1.0
    assert best.config["task_options"]["calibrate"] is False
