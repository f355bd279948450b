"""GPU speed in one run on one device: classifier and segmenter training samples/s and
diagnosis seconds per CT, our path against a book-style path, with ratios and GPU utilisation.

    python -m bench.bench_gpu [--device cuda] [--seconds 8] [--workers N] [--book-workers N]
                              [--models-dir DIR] [--json FILE] [--skip-compile]

Every figure comes from this process, on the same synthetic data and device:

- classifier training (1x32x48x48 chunks): the book-style loop of
  ``bench_training.py`` (per-sample float32 augmentation with one
  ``grid_sample`` each in ``--book-workers`` DataLoader workers, batch 32,
  the book's float32 channels-first ``LunaModel`` (``nn.BatchNorm3d``, cuDNN convolutions), SGD) against our
  task and engine
  (int16 chunks batched in the workers, augmentation batched on the GPU,
  channels-last, cuDNN autotuning, no host wait per batch), at the book's
  batch 32 in float32 and bfloat16, and at ``--large-batch`` (256) in bfloat16, eager and
  ``torch.compile``-d; for the classifier also with the plain loader (``--no-batch-ring``), with
  every convolution on cuDNN (none on ``small_conv``'s Triton kernels), with the augmentation by
  torch's operators (not ``resample``'s fused kernel), with CUDA graphs
  and, with ``--worker-sweep``, with other worker counts, with and without the ring;
- segmenter training (7x64x64 crops): the book-style loop of
  ``book.py`` (pickled float32 chunks memoised in a diskcache
  ``FanoutCache``, batch 16, one augmentation transform per batch, float32
  U-Net ending in a sigmoid, Adam) against our task and engine, likewise, and at ``--large-batch``
  also with the plain loader (``--no-batch-ring``);
- the model step alone (random batch already on the GPU), the ceiling that
  the data path has to keep up with;
- diagnosis of one synthetic 512x512 CT: the book-style path of
  ``bench_diagnose.py`` (every slice, full 512x512, batch 4, DataLoaders with
  the book's 4 workers) against ``diagnose_ct`` in float32 and bfloat16.

Training rates are samples per second over a timed stretch of about
``--seconds`` after warm-up (data loading included; the clock stops only once
the GPU has finished). Utilisation is the mean of ``torch.cuda.utilization``
sampled every 0.1 s during the timed stretch. With ``--models-dir`` holding
trained ``nodule``/``segmentation`` checkpoints (e.g. the demo's), diagnosis
uses them; otherwise seeded untrained models.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from bench import book
from bench.common import Limited, load_or_build, route_convolutions, step_rate
from p2ch_luna.data.augment import AugmentConfig
from p2ch_luna.data.luna import ANNOTATIONS_FILE, read_annotations, split_by_series
from p2ch_luna.data.sampling import BalancedSampler, make_generator
from p2ch_luna.data.segmentation import TRAIN_CROP
from p2ch_luna.diagnose.model_set import DiagnosisModels
from p2ch_luna.diagnose.pipeline import DiagnoseConfig, diagnose_ct
from p2ch_luna.diagnose.segment import CPU_SEGMENTATION_BATCH, CUDA_SEGMENTATION_BATCH
from p2ch_luna.io.ct import list_series_on_disk, load_ct
from p2ch_luna.models import LunaModel
from p2ch_luna.models.checkpoint import load_checkpoint
from p2ch_luna.models.classifier import select_kernels
from p2ch_luna.paths import Paths, resolve_paths
from p2ch_luna.precision import amp_settings, tune_backends
from p2ch_luna.synth import generator as synth
from p2ch_luna.training.config import TrainConfig
from p2ch_luna.training.engine import EpochResult, train_one_epoch
from p2ch_luna.training.loop import build_optimizer, place_model
from p2ch_luna.training.tasks import RunContext
from p2ch_luna.training.tasks.base import Task
from p2ch_luna.training.tasks.classification import NoduleTask
from p2ch_luna.training.tasks.segmentation import SegmentationOptions, SegmentationTask

BOOK_DIAGNOSE_WORKERS = 4
"""p2ch14/diagnose.py's default ``--num-workers``."""
WARMUP_BATCHES = 6
PROBE_BATCHES = 6
UTILISATION_PERIOD_S = 0.1
Variant = tuple[str, Callable[["UtilisationMonitor"], float], str]
"""One timed loop: its name, the function that runs it (watching utilisation) and a note."""


@dataclasses.dataclass
class Figure:
    """One measured figure, as printed and as written to JSON."""

    section: str
    name: str
    value: float
    unit: str
    utilisation: float | None = None
    baseline: str | None = None
    note: str = ""
    input_wait: float | None = None
    """Fraction of the timed stretch our engine spent waiting for its loader (None for other loops)."""


class UtilisationMonitor:
    """Mean GPU utilisation (percent, from NVML through torch) while the context is open; a loop that knows
    its time waiting for input records it in ``input_wait``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples: list[float] = []
        self.input_wait: float | None = None
        self._stop = threading.Event()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        if self.device.type != "cuda" or not _utilisation_available(self.device):
            yield
            return
        self._stop.clear()
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()

    def _run(self) -> None:
        while not self._stop.wait(UTILISATION_PERIOD_S):
            self.samples.append(float(torch.cuda.utilization(self.device)))


def _utilisation_available(device: torch.device) -> bool:
    try:
        torch.cuda.utilization(device)
    except Exception:  # NVML missing: report no figure rather than fail the benchmark
        return False
    return True


def engine_rate(task: Task, model: nn.Module, config: TrainConfig, device: torch.device, seconds: float,
                monitor: UtilisationMonitor) -> float:
    """Samples/s of our ``train_one_epoch`` over about ``seconds`` after warm-up batches."""
    optimizer = build_optimizer(model, config)
    amp = amp_settings(config.amp, device)
    loader = task.train_loader()
    generator = make_generator(config.seed, 1, device)

    def run(count: int) -> EpochResult:
        return train_one_epoch(task, model, optimizer, Limited(loader, count), epoch=1,
                               device=device, generator=generator, amp=amp, show_progress=False)

    run(WARMUP_BATCHES)
    probe = run(PROBE_BATCHES)
    count = max(PROBE_BATCHES, int(seconds * probe.samples / probe.seconds / config.batch_size))
    with monitor.watch():
        timed = run(min(count, len(loader)))
    monitor.input_wait = timed.input_wait_fraction
    return timed.samples / timed.seconds


def our_training(task_class: type[Task], config: TrainConfig, compile_mode: str | None, device: torch.device,
                 seconds: float, adjust: Callable[[nn.Module], None] | None = None
                 ) -> Callable[[UtilisationMonitor], float]:
    """A variant running our task and engine as ``python -m p2ch_luna.training`` would (model placement,
    channels-last, cuDNN autotuning, optional ``torch.compile``); ``adjust`` changes the built model first."""
    def run(monitor: UtilisationMonitor) -> float:
        tune_backends(device)
        task = task_class(RunContext(config, device))
        torch.manual_seed(0)
        model = select_kernels(task.build_model().model, config.kernels)
        if adjust is not None:
            adjust(model)
        model = place_model(model, config, device)
        compiled = torch.compile(model, mode=compile_mode) if compile_mode else model
        return engine_rate(task, compiled, config, device, seconds, monitor)
    return run


def model_step_rate(model: nn.Module, inputs: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor],
                    amp: bool, seconds: float, device: torch.device, monitor: UtilisationMonitor) -> float:
    """Samples/s of forward + backward + SGD step on one batch already on the device."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    autocast = amp_settings(amp, device)

    def step() -> int:
        optimizer.zero_grad(set_to_none=True)
        with autocast.autocast(device):
            loss = loss_of(model(inputs))
        loss.float().backward()
        optimizer.step()
        return len(inputs)

    return step_rate(step, seconds, device, WARMUP_BATCHES, monitor.watch)


# --- classifier -----------------------------------------------------------------------------


def classifier_figures(paths: Paths, args: argparse.Namespace, device: torch.device) -> list[Figure]:
    section = "classifier training"
    base = TrainConfig(task="nodule", paths=paths, batch_size=book.BOOK_CLASSIFIER_BATCH_SIZE, ratio=1,
                       augment=AugmentConfig.book(), optimizer="sgd", lr=book.BOOK_LR,
                       momentum=book.BOOK_MOMENTUM, num_workers=args.workers,
                       epoch_size=args.epoch_size, channels_last=True, seed=0)
    dataset = NoduleTask(RunContext(base, device)).datasets()[0]
    for series_uid in sorted(set(dataset.series_uids)):  # fill the volume cache before timing
        dataset.cache.ensure_volume(series_uid)

    def book_loop(monitor: UtilisationMonitor) -> float:
        sampler = BalancedSampler(dataset.labels, ratio=1, epoch_size=args.epoch_size, seed=0)
        step = book.book_classifier_step(dataset, sampler, args.book_workers, device)
        return step_rate(step, args.seconds, device, max(WARMUP_BATCHES, args.book_workers), monitor.watch)

    def ours(batch_size: int, amp: bool, compile_mode: str | None = None) -> Callable[[UtilisationMonitor], float]:
        return our_training(NoduleTask, dataclasses.replace(base, batch_size=batch_size, amp=amp), compile_mode,
                            device, args.seconds)

    def model_step(batch_size: int, amp: bool, channels_last: bool) -> Callable[[UtilisationMonitor], float]:
        def run(monitor: UtilisationMonitor) -> float:
            tune_backends(device)
            torch.manual_seed(0)
            model = LunaModel(input_shape=dataset.chunk_shape_irc).to(device)
            inputs = torch.randn(batch_size, 1, *dataset.chunk_shape_irc, device=device) * 300 - 500
            if channels_last:
                model = model.to(memory_format=torch.channels_last_3d)
                inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
            labels = torch.randint(0, 2, (batch_size,), device=device)
            return model_step_rate(model, inputs, lambda logits: nn.functional.cross_entropy(logits.float(), labels),
                                   amp, args.seconds / 2, device, monitor)
        return run

    large = args.large_batch

    def cudnn_convolutions(model: nn.Module) -> None:
        route_convolutions(model, 0)

    def variant(workers: int, batch_ring: bool, compile_mode: str | None = None, cudnn: bool = False,
                fused_augment: bool = True) -> Variant:
        """Our loop at the large batch in bf16 with these workers, with or without the batch ring."""
        config = dataclasses.replace(base, batch_size=large, amp=True, num_workers=workers, batch_ring=batch_ring,
                                     kernels="triton", augment=dataclasses.replace(base.augment, fused=fused_augment))
        loader = ", batch ring" if batch_ring else ", plain loader"
        name = (f"ours, batch {large}, bf16{loader}, {workers} workers"
                + (", CUDA graphs" if compile_mode else "") + (", cuDNN convolutions" if cudnn else "")
                + ("" if fused_augment else ", unfused augmentation"))
        note = (f"--amp --kernels triton --batch-size {large} --num-workers {workers} --" + ("" if batch_ring else "no-") + "batch-ring"
                + (" (compile mode reduce-overhead)" if compile_mode else "")
                + (" (every convolution on cuDNN, none on the Triton kernels)" if cudnn else "")
                + ("" if fused_augment else " (augmentation by torch's operators, not resample's kernel)"))
        return name, our_training(NoduleTask, config, compile_mode, device, args.seconds,
                                  cudnn_convolutions if cudnn else None), note

    # These variants use the batch ring, small_conv's Triton kernels and resample's fused augmentation on CUDA
    # (--kernels triton; the default is torch's). The
    # plain loader, every convolution on cuDNN and the augmentation by torch's operators right after our
    # large-batch loop, so a cut-short run still compares them.
    early = [variant(args.workers, False), variant(args.workers, True, cudnn=True),
             variant(args.workers, True, fused_augment=False)]
    late = [] if args.skip_compile else [variant(args.workers, True, "reduce-overhead")]
    for workers in args.worker_sweep:  # is the main process starved of CPU by the workers?
        late += [variant(workers, False), variant(workers, True)]
    return training_figures(section, book_loop, ours, model_step, 32, "our defaults", args, device, early, late)


# --- segmenter ------------------------------------------------------------------------------


def segmenter_figures(paths: Paths, work: Path, args: argparse.Namespace, device: torch.device) -> list[Figure]:
    section = "segmenter training"
    base = TrainConfig(task="segmentation", paths=paths, batch_size=book.BOOK_SEGMENTATION_BATCH_SIZE,
                       num_workers=args.workers, augment=AugmentConfig.book_segmentation(),
                       epoch_size=args.epoch_size, seed=0, channels_last=True, task_options=SegmentationOptions())
    data_root = paths.require_data_root()
    annotations = read_annotations(data_root / ANNOTATIONS_FILE)
    train_uids, _ = split_by_series(sorted(list_series_on_disk(data_root)), base.val_stride)
    rows = annotations[annotations["series_uid"].isin(train_uids)]
    nodules = [(row.series_uid, (row.center_x, row.center_y, row.center_z)) for row in rows.itertuples()]
    get_raw_candidate = book.book_raw_candidate(data_root, work / "book_cache", annotations)
    for series_uid, center_xyz in nodules:  # the book's prepcache
        get_raw_candidate(series_uid, center_xyz, book.BOOK_CHUNK_WIDTH)

    def book_loop(monitor: UtilisationMonitor) -> float:
        torch.manual_seed(0)
        dataset = book.BookTrainingDataset(nodules, get_raw_candidate, args.epoch_size)
        loader = DataLoader(dataset, batch_size=book.BOOK_SEGMENTATION_BATCH_SIZE, shuffle=True,
                            num_workers=args.book_workers, pin_memory=device.type == "cuda")
        model = book.BookSegmentationModel().to(device)
        optimizer = torch.optim.Adam(model.parameters())
        augmentation = book.BookSegmentationAugmentation(base.augment)
        iterator = iter(loader)

        def step() -> int:
            return book.book_segmentation_step(model, augmentation, optimizer, next(iterator), device)

        return step_rate(step, args.seconds, device, max(WARMUP_BATCHES, args.book_workers), monitor.watch)

    def ours(batch_size: int, amp: bool, compile_mode: str | None = None) -> Callable[[UtilisationMonitor], float]:
        return our_training(SegmentationTask, dataclasses.replace(base, batch_size=batch_size, amp=amp), compile_mode,
                            device, args.seconds)

    def model_step(batch_size: int, amp: bool, channels_last: bool) -> Callable[[UtilisationMonitor], float]:
        def run(monitor: UtilisationMonitor) -> float:
            tune_backends(device)
            torch.manual_seed(0)
            model = book.BookSegmentationModel().to(device)
            inputs = torch.randn(batch_size, 7, TRAIN_CROP, TRAIN_CROP, device=device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            return model_step_rate(model, inputs, lambda output: output.float().mean(), amp, args.seconds / 2,
                                   device, monitor)
        return run

    large = args.large_batch
    plain_loader = dataclasses.replace(base, batch_size=large, amp=True, batch_ring=False)
    early = [(f"ours, batch {large}, bf16, plain loader", our_training(SegmentationTask, plain_loader, None, device,
                                                                       args.seconds),
              f"--amp --batch-size {large} --no-batch-ring")]
    return training_figures(section, book_loop, ours, model_step, 16, "book batch", args, device, early)


def training_figures(section: str, book: Callable[[UtilisationMonitor], float],
                     ours: Callable[..., Callable[[UtilisationMonitor], float]],
                     model_step: Callable[..., Callable[[UtilisationMonitor], float]], book_batch: int,
                     default_note: str, args: argparse.Namespace, device: torch.device,
                     early: Sequence[Variant] = (), late: Sequence[Variant] = ()) -> list[Figure]:
    """The book-style loop, then our loop and the model step alone at the book's batch and at ``--large-batch``;
    ``early`` variants run right after our large-batch loop, ``late`` ones at the end."""
    large = args.large_batch
    variants: list[Variant] = [
        (f"book-style, batch {book_batch}, fp32", book, f"{args.book_workers} workers"),
        (f"ours, batch {book_batch}, fp32", ours(book_batch, False), default_note),
        (f"ours, batch {book_batch}, bf16", ours(book_batch, True), "--amp"),
        (f"ours, batch {large}, bf16", ours(large, True), f"--amp --batch-size {large}"),
        *early,
        (f"model step only, batch {book_batch}, fp32, channels-first", model_step(book_batch, False, False),
         "no data"),
        (f"model step only, batch {large}, bf16, channels-last", model_step(large, True, True), "no data"),
    ]
    if not args.skip_compile:
        variants.append((f"ours, batch {large}, bf16, compiled", ours(large, True, "default"), "--amp --compile"))
        variants.append((f"ours, batch {large}, bf16, compiled, CUDA graphs", ours(large, True, "reduce-overhead"),
                         "torch.compile mode reduce-overhead (not a CLI option yet)"))
    variants += late
    return [_measure(section, name, run, "samples/s", note, variants[0][0], device) for name, run, note in variants]


# --- diagnosis ------------------------------------------------------------------------------


def diagnosis_figures(work: Path, args: argparse.Namespace, device: torch.device) -> list[Figure]:
    section = "diagnosis of one CT"
    infos = synth.generate_dataset(work / "diagnose", series=1, seed=args.seed + 1, subsets=1, shape=(512, 512),
                                   slices=(args.diagnose_slices, args.diagnose_slices), progress=False)
    ct = load_ct(infos[0].path)
    models = _diagnosis_models(args.models_dir)
    book_segmentation, book_classifier = book.book_copies(models, device)
    models.place(device)
    batch = CUDA_SEGMENTATION_BATCH if device.type == "cuda" else CPU_SEGMENTATION_BATCH
    note = f"CT {ct.shape}, models: {'trained' if args.models_dir else 'untrained'}"
    counts: dict[str, int] = {}
    stages: dict[str, float] = {}

    def book_loop(monitor: UtilisationMonitor) -> float:
        with monitor.watch():
            started = time.perf_counter()
            counts["book"] = book.book_diagnose(ct.hu, book_segmentation, book_classifier,
                                                       device, workers=BOOK_DIAGNOSE_WORKERS)
            return time.perf_counter() - started

    def ours(amp: bool) -> Callable[[UtilisationMonitor], float]:
        def run(monitor: UtilisationMonitor) -> float:
            config = DiagnoseConfig(batch_size=batch, amp=amp)
            with monitor.watch():
                started = time.perf_counter()
                result, _, _ = diagnose_ct(ct, models, config, device)
                counts["ours"] = len(result.candidates)
                stages.update(result.timings)
                return time.perf_counter() - started
        return run

    figures = []
    variants = [("book-style, fp32", book_loop), ("ours, fp32", ours(False)), ("ours, bf16", ours(True))]
    for name, run in variants:
        run(UtilisationMonitor(torch.device("cpu")))  # warm-up: cuDNN handles, first allocations
        figure = _measure(section, name, run, "s/CT", note, variants[0][0], device)
        figure.note += f", {counts.get('book' if name.startswith('book') else 'ours', 0)} candidates"
        if not name.startswith("book"):
            figure.note += " (" + ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in stages.items()) + ")"
        figures.append(figure)
    return figures


def _diagnosis_models(models_dir: Path | None) -> DiagnosisModels:
    if models_dir is None:
        torch.manual_seed(0)
        return DiagnosisModels(
            segmentation=load_or_build(None, "segmentation"),
            nodule=load_or_build(None, "nodule"))
    found = {}
    for task in ("segmentation", "nodule"):
        matches = sorted(models_dir.glob(f"{task}_*.best.state"))
        if not matches:
            raise SystemExit(f"--models-dir {models_dir}: no {task}_*.best.state checkpoint")
        found[task] = load_checkpoint(matches[-1], task)
    return DiagnosisModels(segmentation=found["segmentation"], nodule=found["nodule"])


# --- driver ---------------------------------------------------------------------------------


def _measure(section: str, name: str, run: Callable[[UtilisationMonitor], float], unit: str, note: str,
             baseline: str, device: torch.device) -> Figure:
    """Run one variant (which watches utilisation over its own timed part); a failure is printed, not raised."""
    monitor = UtilisationMonitor(device)
    gc.collect()  # the earlier variants' loaders go before this one forks its workers
    started = time.perf_counter()
    try:
        value = run(monitor)
    except Exception as error:  # one failing variant must not lose the others' figures
        print(f"  {section}: {name} FAILED: {type(error).__name__}: {error}", flush=True)
        return Figure(section, name, float("nan"), unit, None, baseline, f"failed: {type(error).__name__}")
    figure = Figure(section, name, value, unit, monitor.mean, baseline, note, monitor.input_wait)
    util = f", GPU {figure.utilisation:.0f}%" if figure.utilisation is not None else ""
    wait = f", waiting for input {100 * figure.input_wait:.0f}%" if figure.input_wait is not None else ""
    print(f"  {section}: {name}: {value:.2f} {unit}{util}{wait} ({time.perf_counter() - started:.0f}s)", flush=True)
    return figure


def print_table(figures: Sequence[Figure]) -> None:
    by_name = {(figure.section, figure.name): figure for figure in figures}
    section = None
    for figure in figures:
        if figure.section != section:
            section = figure.section
            print(f"\n{section}")
        reference = by_name.get((figure.section, figure.baseline))
        ratio = ""
        if reference is not None and reference is not figure and reference.value > 0:
            speedup = (reference.value / figure.value if figure.unit == "s/CT" else figure.value / reference.value)
            ratio = f"{speedup:6.2f}x"
        util = f"{figure.utilisation:5.0f}%" if figure.utilisation is not None else "     -"
        wait = f"{100 * figure.input_wait:4.0f}%" if figure.input_wait is not None else "    -"
        print(f"  {figure.name:<60s} {figure.value:10.2f} {figure.unit:<10s} {ratio:>7s}  GPU {util}  "
              f"input wait {wait}  {figure.note}")


def describe_device(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "device": str(device), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where every loop runs (default: cuda when available)")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed stretch per training variant")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="DataLoader workers of our loops")
    parser.add_argument("--book-workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="DataLoader workers of the book-style loops")
    parser.add_argument("--large-batch", type=int, default=256, help="batch size of the large-batch variants")
    parser.add_argument("--worker-sweep", type=int, nargs="*", default=[], metavar="N",
                        help="also time our classifier loop at --large-batch, bf16, with each of these worker counts")
    parser.add_argument("--series", type=int, default=12, help="synthetic series for the training loops")
    parser.add_argument("--shape", type=int, nargs=2, default=(192, 192), metavar=("ROWS", "COLS"))
    parser.add_argument("--slices", type=int, nargs=2, default=(64, 96), metavar=("MIN", "MAX"))
    parser.add_argument("--epoch-size", type=int, default=400_000,
                        help="sampler length (an upper bound on the samples one timed stretch can use)")
    parser.add_argument("--diagnose-slices", type=int, default=130, help="slices of the 512x512 diagnosis CT")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="folder with trained segmentation_*/nodule_*.best.state for the diagnosis")
    parser.add_argument("--sections", default="classifier,segmenter,diagnosis",
                        help="comma-separated sections to run")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile variants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data and caches here (default: temp)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sections = {name.strip() for name in args.sections.split(",") if name.strip()}
    unknown = sections - {"classifier", "segmenter", "diagnosis"}
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")

    info = describe_device(device)
    print(" ".join(f"{key}={value}" for key, value in info.items()), flush=True)
    figures: list[Figure] = []
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_gpu_")))
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        data_root = work / "luna"
        if sections & {"classifier", "segmenter"}:
            if not (data_root / ANNOTATIONS_FILE).exists():
                synth.generate_dataset(data_root, series=args.series, seed=args.seed, shape=tuple(args.shape),
                                       slices=tuple(args.slices), progress=False)
            print(f"data: {args.series} series of {args.shape[0]}x{args.shape[1]} "
                  f"({time.perf_counter() - started:.0f}s)", flush=True)
        paths = resolve_paths(data_root, work / "cache", work / "models", work / "runs")
        if "classifier" in sections:
            figures += classifier_figures(paths, args, device)
        if "segmenter" in sections:
            figures += segmenter_figures(paths, work, args, device)
        if "diagnosis" in sections:
            figures += diagnosis_figures(work, args, device)
    print_table(figures)
    if args.json is not None:
        args.json.write_text(json.dumps({"info": info, "figures": [dataclasses.asdict(f) for f in figures]},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
