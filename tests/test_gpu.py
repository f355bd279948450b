"""GPU paths: training with mixed precision and diagnosis on CUDA match their CPU counterparts.

Skipped without a CUDA device (CI has none); run on a GPU machine with
``python -m pytest tests/test_gpu.py``. The logic these paths share with the
CPU (autocast settings, device selection, sharding) is tested elsewhere on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from p2ch_luna.diagnose import classify, segment
from p2ch_luna.models import build_model, load_checkpoint
from p2ch_luna.models.checkpoint import BOOK_SEGMENTATION_KWARGS
from p2ch_luna.training import cli as training
from p2ch_luna.training import loop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def _cli_args(task: str, data_root: Path, out: Path, *extra: str) -> list[str]:
    return [
        task, "--data-root", str(data_root), "--cache-dir", str(out / "cache"), "--models-dir", str(out / "models"),
        "--runs-dir", str(out / "runs"), "--device", "cuda", "--amp", "--epochs", "2", "--batch-size", "8",
        "--epoch-size", "32", "--val-stride", "3", "--log-level", "WARNING", *extra,
    ]


@pytest.mark.parametrize("task, loader", [("nodule", "in process"), ("nodule", "batch ring"), ("nodule", "default"),
                                          ("segmentation", "in process"), ("segmentation", "default")])
def test_cuda_amp_training_saves_finite_checkpoints(task: str, loader: str, tiny_dataset: Path,
                                                    tmp_path: Path) -> None:
    extra = ["--balanced", "--chunk-shape", "16", "24", "24"] if task == "nodule" else []
    extra += {"in process": ["--num-workers", "0"], "batch ring": ["--num-workers", "2", "--batch-ring"],
              "default": []}[loader]
    assert training.main(_cli_args(task, tiny_dataset, tmp_path, *extra)) == 0
    last = next((tmp_path / "models").glob(f"{task}_*.last.state"))
    loaded = load_checkpoint(last, expected_task=task)
    assert loaded.epoch == 2 and loaded.samples_seen == 64
    assert all(torch.isfinite(value).all() for value in loaded.model.state_dict().values() if value.is_floating_point())
    assert np.isfinite(loaded.metrics["loss"])
    config = json.loads(next((tmp_path / "models").glob(f"{task}_*.config.json")).read_text())
    assert config["amp"] is True
    if loader == "default":  # loader workers on CUDA (and the batch ring where the task has one)
        assert config["num_workers"] == training.default_num_workers("cuda", True, training.usable_cpu_count(), 1)


def test_cuda_segmentation_matches_cpu() -> None:
    torch.manual_seed(0)
    model = build_model("unet", **BOOK_SEGMENTATION_KWARGS).eval()
    rng = np.random.default_rng(0)
    hu = rng.normal(-700, 300, size=(12, 96, 96)).astype(np.int16)
    region = np.zeros(hu.shape, dtype=bool)
    region[2:10, 10:80, 12:90] = True
    on_cpu = segment.segment_ct(hu, region, model, 0.5, 4, CPU)
    on_cuda = segment.segment_ct(hu, region, model.to(CUDA), 0.5, 4, CUDA)
    assert np.mean(on_cpu != on_cuda) < 1e-3  # TF32 convolutions may flip voxels at the threshold


def test_cuda_classification_matches_cpu_and_bf16_stays_close() -> None:
    torch.manual_seed(0)
    model = build_model("luna", input_shape=[16, 24, 24]).eval()
    rng = np.random.default_rng(1)
    hu = rng.normal(-500, 400, size=(40, 64, 64)).astype(np.int16)
    centers = rng.integers([8, 12, 12], [32, 52, 52], size=(40, 3))
    on_cpu = classify.classify_chunks(hu, centers, model, 16, CPU, flips=True)
    model.to(CUDA)
    on_cuda = classify.classify_chunks(hu, centers, model, 16, CUDA, flips=True)
    bf16 = classify.classify_chunks(hu, centers, model, 16, CUDA, amp=True, flips=True)
    np.testing.assert_allclose(on_cuda, on_cpu, atol=2e-3)
    np.testing.assert_allclose(bf16, on_cpu, atol=3e-2)


def test_padded_and_folded_first_convolution_give_the_plain_outputs_and_gradients() -> None:
    """LunaConv3d's channel padding (8 channels, channels-last) and normalised_convolution on CUDA against
    batch norm then nn.Conv3d on the one input channel, in training mode (float64: cuDNN, no Triton kernels)."""
    torch.manual_seed(0)
    model = build_model("luna", input_shape=[16, 24, 24]).to(CUDA, torch.float64).train()
    inputs = torch.randn(4, 1, 16, 24, 24, device=CUDA, dtype=torch.float64) * 300 - 500
    results = []
    for multiple, memory_format, fold in [(1, torch.contiguous_format, False), (8, torch.contiguous_format, False),
                                          (8, torch.channels_last_3d, False), (1, torch.contiguous_format, True),
                                          (8, torch.channels_last_3d, True)]:
        model.block1.conv1.channel_multiple = multiple
        model.fold_input_normalisation = fold
        model.to(memory_format=memory_format)
        model.zero_grad(set_to_none=True)
        logits = model(inputs.contiguous(memory_format=memory_format))
        logits.pow(2).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    for logits, grads in results[1:]:
        torch.testing.assert_close(logits, results[0][0])
        torch.testing.assert_close(grads, results[0][1])


@pytest.mark.parametrize("batch_ring", [False, True])
def test_a_classifier_training_step_never_waits_for_the_gpu(tiny_dataset: Path, tmp_path: Path,
                                                            batch_ring: bool) -> None:
    """Loader batch -> device -> augmentation -> forward/backward -> SGD step with no host-device sync.

    Any sync (a blocking copy, ``.item()``, a data-dependent shape) makes the
    host wait for the step before it can fetch the next batch, so input and
    model step run one after the other instead of overlapping.
    """
    from p2ch_luna.data.augment import AugmentConfig
    from p2ch_luna.data.sampling import make_generator
    from p2ch_luna.paths import resolve_paths
    from p2ch_luna.precision import amp_settings
    from p2ch_luna.training.config import TrainConfig
    from p2ch_luna.training.engine import move_to_device
    from p2ch_luna.training.tasks import RunContext
    from p2ch_luna.training.tasks.classification import ClassificationOptions, NoduleTask

    paths = resolve_paths(tiny_dataset, tmp_path / "cache", tmp_path / "models", tmp_path / "runs")
    config = TrainConfig(task="nodule", paths=paths, batch_size=8, ratio=1, augment=AugmentConfig.book(), amp=True,
                         epoch_size=64, channels_last=True, seed=0, num_workers=int(batch_ring),
                         batch_ring=batch_ring, task_options=ClassificationOptions(chunk_shape=(16, 24, 24)))
    task = NoduleTask(RunContext(config, CUDA))
    model = loop.place_model(task.build_model().model, config, CUDA)
    optimizer = loop.build_optimizer(model, config)
    generator = make_generator(0, 1, CUDA)
    autocast = amp_settings(True, CUDA)
    batches = iter(task.train_loader())

    def step() -> None:
        batch = move_to_device(next(batches), CUDA)
        optimizer.zero_grad(set_to_none=True)
        with autocast.autocast(CUDA):
            loss, _ = task.compute_loss(model, batch, augment=True, generator=generator)
        loss.float().mean().backward()
        optimizer.step()

    step()  # first use: lazy initialisation, allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _ring_and_plain_loaders(data_root: Path, tmp_path: Path, batch_size: int, chunk_shape: tuple[int, int, int],
                            epoch_size: int, seed: int) -> tuple[Any, Any]:
    """A nodule training set's batch ring (one worker) and its plain loader, with the same balanced sampling."""
    from p2ch_luna.data.sampling import BalancedSampler
    from p2ch_luna.paths import resolve_paths
    from p2ch_luna.training.config import TrainConfig
    from p2ch_luna.training.tasks import RunContext, build_loader
    from p2ch_luna.training.tasks.classification import ClassificationOptions, NoduleTask

    paths = resolve_paths(data_root, tmp_path / "cache", tmp_path / "models", tmp_path / "runs")
    config = TrainConfig(task="nodule", paths=paths, batch_size=batch_size, num_workers=1,
                         task_options=ClassificationOptions(chunk_shape=chunk_shape))
    context = RunContext(config, CUDA)
    dataset = NoduleTask(context).datasets()[0]

    def sampler() -> BalancedSampler:
        return BalancedSampler(dataset.labels, ratio=2, epoch_size=epoch_size, seed=seed)

    return build_loader(dataset, sampler(), context, ring=True), build_loader(dataset, sampler(), context)


def test_batch_ring_on_cuda_gives_the_plain_loaders_batches(tiny_dataset: Path, tmp_path: Path) -> None:
    """Slots page-locked with cudaHostRegister, copied asynchronously and reused: the same batches."""
    from p2ch_luna.data.batch_ring import RingLoader, ring_slots
    from p2ch_luna.training.engine import move_to_device

    ring, plain_loader = _ring_and_plain_loaders(tiny_dataset, tmp_path, 4, (8, 12, 12), epoch_size=40, seed=1)
    assert isinstance(ring, RingLoader) and all(buffer.is_pinned() for buffer in ring.buffers.values())
    plain = [move_to_device(batch, CUDA) for batch in plain_loader]
    ringed = [move_to_device(batch, CUDA) for batch in ring]
    assert len(ringed) == len(plain) == 10 > ring_slots(1)
    torch.cuda.synchronize()
    for expected, got in zip(plain, ringed):
        assert got["image"].device.type == "cuda"
        for key in ("image", "label", "center_irc", "index"):
            assert torch.equal(got[key], expected[key]), key


def test_batch_ring_copies_overlap_the_step_but_the_step_waits_for_them(tiny_dataset: Path, tmp_path: Path) -> None:
    """The ring copies on a stream of its own: work queued on the current stream right after a batch arrives
    sees that batch's values, even when its copy is held up behind a slow kernel on the copy stream."""
    ring, plain_loader = _ring_and_plain_loaders(tiny_dataset, tmp_path, 16, (16, 24, 24), epoch_size=96, seed=3)
    expected = [batch["image"].to(torch.float64).sum(dim=(1, 2, 3, 4)) for batch in plain_loader]
    sums = []
    for batch in ring:
        with torch.cuda.stream(ring._copy_stream):
            torch.cuda._sleep(20_000_000)  # holds up the next batch's copy by some milliseconds
        assert batch["image"].is_cuda
        sums.append(batch["image"].to(torch.float64).sum(dim=(1, 2, 3, 4)))  # queued on the current stream
    torch.cuda.synchronize()
    assert len(sums) == len(expected) == 6
    for got, want in zip(sums, expected):
        assert torch.equal(got.cpu(), want)
