"""Diagnose CTs end to end: lungs, segmentation, candidates, nodule and malignancy scores.

    python -m p2ch_luna.diagnose --series-uid UID[,UID...]   # LUNA16 series under --data-root
    python -m p2ch_luna.diagnose --ct PATH                    # .mhd, NIfTI or a DICOM folder
    python -m p2ch_luna.diagnose --validation [--include-train] --output DIR   # the nodule checkpoint's split
    python -m p2ch_luna.diagnose --fold K --output DIR        # LUNA16's subsetK (held out by training --fold K)

Pipeline per CT (the book's chapter 14, kept inside the lungs; :mod:`p2ch_luna.diagnose.pipeline`):

1. lung mask from HU (:mod:`p2ch_luna.diagnose.lungs`); every later step stays inside it;
2. U-Net on every slice that holds lung (with the context slices it was trained with, clamped
   at the ends),
   cropped to the lungs' bounding box, batched, sigmoid > threshold;
3. restrict to the lungs and group the mask into candidates: by default one
   per distance-transform peak of the dense segmented tissue, with copies of
   large ones at the lungs' edge moved towards it (``--grouping peaks``), or
   the book's eroded connected components with their HU-weighted centre of
   mass (``--grouping components``);
4. nodule probability per candidate (the classifier's calibrated
   probability, :mod:`p2ch_luna.training.calibrate`, on a chunk of
   the size it was trained on, averaged over its in-plane mirror images unless
   ``--no-flips``), then, with peaks, one detection per blob (a
   candidate inside a more probable one is dropped); malignancy probability
   for those above the nodule threshold.

Truth, when annotations exist, scores the run: the book's confusion table per
series and in total, and the LUNA16 FROC/CPM. Under ``torchrun`` the series are
split across ranks and rank 0 merges the results and writes the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from p2ch_luna import RESEARCH_NOTICE
from p2ch_luna.cli import (
    add_device_argument,
    add_series_uid_argument,
    make_parser,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
    run_command,
)
from p2ch_luna.data.folds import fold_argument, fold_series
from p2ch_luna.diagnose import report
from p2ch_luna.diagnose.classify import DEFAULT_FLIP_BAND, parse_flip_band
from p2ch_luna.diagnose.grouping import GROUPINGS, MIN_CANDIDATE_DIAMETER_MM
from p2ch_luna.diagnose.lungs import DEFAULT_MARGIN_MM
from p2ch_luna.diagnose.model_set import RUNTIMES, load_models
from p2ch_luna.diagnose.pipeline import DiagnoseConfig, diagnose_series
from p2ch_luna.diagnose.segment import CPU_SEGMENTATION_BATCH, CUDA_SEGMENTATION_BATCH
from p2ch_luna.diagnose.selection import validation_selection, warn_of_training_overlap
from p2ch_luna.distributed import (
    distributed_info_from_env,
    gather_to_main,
    merge_shards,
    process_group,
    resolve_device,
    shard,
)
from p2ch_luna.errors import DataError, UsageError
from p2ch_luna.evaluation.truth import read_truth
from p2ch_luna.io.ct import find_series_path, list_series_on_disk
from p2ch_luna.io.dicom_seg import require_pydicom
from p2ch_luna.io.lock import folder_lock
from p2ch_luna.kernels.choice import add_kernels_argument, check_kernels
from p2ch_luna.paths import Paths, paths_from_args
from p2ch_luna.precision import BFLOAT16_PROBABILITY_TOLERANCE, PRECISIONS, resolve_precision, warn_if_emulated

log = logging.getLogger(__name__)


def select_series(args: argparse.Namespace, paths: Paths) -> list[tuple[str, Path]]:
    """``(series_uid, path)`` to diagnose from exactly one of --series-uid/--ct/--validation.

    With --validation these are every series on disk (or the ones --series-uid names), which
    :func:`p2ch_luna.diagnose.selection.validation_selection` narrows to the nodule checkpoint's split
    once the models are loaded.
    """
    # With --ct, --series-uid picks one series of a DICOM folder that holds several;
    # with --validation, it names validation series to diagnose (checked against the split).
    given = [name for name in ("series_uid", "ct", "validation", "fold")
             if (args.fold is not None if name == "fold" else getattr(args, name))
             and not (name == "series_uid" and (args.ct is not None or args.validation))]
    if len(given) != 1:
        raise UsageError("give exactly one of --series-uid, --ct, --validation or --fold"
                         + (f" (got {', '.join('--' + n.replace('_', '-') for n in given)})" if given else ""))
    if args.include_train and not args.validation:
        raise UsageError("--include-train only goes with --validation")
    if args.include_train and args.series_uid:
        raise UsageError("--include-train takes every series on disk; it does not go with --series-uid")
    if args.ct is not None:
        if args.series_uid is not None and len(args.series_uid) > 1:
            raise UsageError(f"with --ct, --series-uid names one series, got {len(args.series_uid)}")
        return [(args.series_uid[0] if args.series_uid else "", Path(args.ct))]
    data_root = paths.require_data_root()
    if args.series_uid:
        return [(uid, find_series_path(data_root, uid)) for uid in args.series_uid]
    on_disk = list_series_on_disk(data_root)
    if not on_disk:
        raise DataError(f"no series (subset*/*.mhd) under {data_root}")
    if args.fold is not None:
        held_out = fold_series(on_disk, data_root, args.fold)
        log.info("fold %d: the %d series under %s", args.fold, len(held_out), data_root / f"subset{args.fold}")
        return [(uid, on_disk[uid]) for uid in held_out]
    return [(uid, on_disk[uid]) for uid in sorted(on_disk)]


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m p2ch_luna.diagnose",
                         "Find lung nodules in CTs and estimate their malignancy (book chapter 14). "
                         + RESEARCH_NOTICE)
    source = parser.add_argument_group("what to diagnose (exactly one)")
    add_series_uid_argument(source, "LUNA16 series under --data-root (with --ct: the one series of a DICOM folder)")
    source.add_argument("--ct", type=Path, metavar="PATH", help="a .mhd/.mha, a NIfTI file or a DICOM series folder")
    source.add_argument("--validation", action="store_true",
                        help="the validation series of the nodule checkpoint's recorded split that are on disk "
                             "(a checkpoint without one: every 10th series on disk, or its --val-stride); "
                             "with --series-uid: those series, refused unless they are validation series")
    source.add_argument("--fold", type=fold_argument, default=None, metavar="K",
                        help="every series of LUNA16's fold K (0-9: <data-root>/subsetK/), the held-out series "
                             "of `training --fold K`; a warning names any a checkpoint trained on")
    source.add_argument("--include-train", action="store_true",
                        help="with --validation: every series on disk, training series included")
    models = parser.add_argument_group("models (default: the newest of each task in --models-dir, by contents)")
    models.add_argument("--segmentation-path", type=Path, metavar="FILE", help="the segmentation (U-Net) checkpoint")
    models.add_argument("--classification-path", type=Path, metavar="FILE", help="the nodule classifier checkpoint")
    models.add_argument("--malignancy-path", type=Path, metavar="FILE",
                        help="the malignancy classifier checkpoint (optional)")
    tuning = parser.add_argument_group("thresholds and post-processing")
    tuning.add_argument("--segmentation-threshold", type=probability, default=0.5,
                        help="U-Net probability above which a voxel is nodule tissue")
    tuning.add_argument("--erosion-iterations", type=non_negative_int, default=1,
                        help="binary erosions of the mask before --grouping components")
    tuning.add_argument("--grouping", choices=GROUPINGS, default="peaks",
                        help="candidates at distance-transform peaks of the dense segmented tissue (one per "
                             "blob, also when it touches a vessel; faint ground glass taken at -750 HU; large "
                             "ones at the lungs' edge also moved towards it), or the book's connected components")
    tuning.add_argument("--max-shell-fill", type=probability, default=None, metavar="FRACTION",
                        help="--grouping peaks: drop peaks whose sphere at 1.5 times their depth lies more than "
                             "this fraction in the segmented tissue (tubes: vessels; a nodule's is near 0, a "
                             "straight vessel's 0.25); default: keep all (docs/benchmarks.md, shell fill)")
    tuning.add_argument("--min-diameter-mm", type=non_negative_float, default=MIN_CANDIDATE_DIAMETER_MM,
                        metavar="MM",
                        help="drop candidates narrower than this before they are classified (a peak's diameter "
                             "is twice its depth in the segmented tissue; a component's, that of a sphere of its "
                             "volume). Default %(default)s: LUNA16's nodules are 3 mm or more, less a margin for "
                             "the estimate's voxel steps; fewer candidates to classify, the same nodules found "
                             "(docs/benchmarks.md, 'Narrow candidates'); 0 keeps all")
    tuning.add_argument("--flips", action=argparse.BooleanOptionalAction, default=True,
                        help="average the classifiers over the chunk and its in-plane mirror images")
    tuning.add_argument("--flip-band", default=",".join(f"{v:g}" for v in DEFAULT_FLIP_BAND), metavar="LOW,HIGH",
                        help="with --flips: score each candidate on its chunk first and add the mirror images "
                             "only where that nodule probability lies in [LOW, HIGH] (0,1: all views for all; "
                             "default %(default)s: the findings of 0,1 on a real CT, docs/benchmarks.md)")
    tuning.add_argument("--nodule-threshold", type=probability, default=0.5,
                        help="calibrated nodule probability from which a candidate is reported as a finding "
                             "(Platt scaling or the temperature training fitted on validation; "
                             "checkpoints without one, such as the book's, give the plain softmax)")
    tuning.add_argument("--malignancy-threshold", type=probability, default=0.5,
                        help="malignancy probability from which a finding is called malignant")
    tuning.add_argument("--lung-margin-mm", type=float, default=DEFAULT_MARGIN_MM,
                        help="dilation of the lung mask that findings must lie in")
    running = parser.add_argument_group("running")
    running.add_argument("--batch-size", type=positive_int, default=None,
                         help=f"slices per segmentation batch (default {CPU_SEGMENTATION_BATCH} on the CPU, "
                              f"{CUDA_SEGMENTATION_BATCH} on CUDA)")
    add_device_argument(running)
    add_kernels_argument(running)
    running.add_argument("--runtime", choices=RUNTIMES, default="torch",
                         help="run the models in PyTorch, or as ONNX in onnxruntime on the CPU (the [onnx] extra): "
                              "each checkpoint is exported on first use into --cache-dir/onnx, checked against "
                              "PyTorch, and reused while the checkpoint is unchanged (file name: its SHA-256); "
                              "same findings, probabilities within 1e-3 (docs/benchmarks.md)")
    running.add_argument("--prefetch", type=non_negative_int, default=0, metavar="N",
                         help="with several CTs: N worker processes load the next CTs and find their lungs "
                              "while the models run on the current one (default 0: one CT at a time, all in "
                              "this process: workers did not pay off in python -m bench.bench_diagnose)")
    running.add_argument("--precision", choices=PRECISIONS, default="auto",
                         help="mixed: bfloat16 autocast on the CPU and on GPUs that support it, else float16; "
                              "float32: full precision; auto (default): mixed on a CPU with AMX or AVX-512 BF16 "
                              "(faster there, nodule probabilities within "
                              f"{BFLOAT16_PROBABILITY_TOLERANCE} of float32's), float32 elsewhere (a CPU without "
                              "them emulates bfloat16 slowly; ONNX runs float32; on GPUs it was not faster). "
                              "Measured: python -m bench.bench_diagnose --amp, docs/benchmarks.md")
    running.add_argument("--amp", dest="precision", action="store_const", const="mixed",
                         help="the same as --precision mixed")
    output = parser.add_argument_group("outputs")
    output.add_argument("--output", type=Path, metavar="DIR",
                        help="write report.json, findings.csv (every scored candidate, LUNA16 submission format), "
                             "nodules.csv (the findings only), a PNG per finding (and froc.png), and the viewer "
                             "page index.html here")
    output.add_argument("--save-mask", action="store_true", help="with --output: the nodule segmentation mask per series, "
                        "SERIES_mask.nii.gz (gzip NIfTI with the CT's geometry)")
    output.add_argument("--viewer", action=argparse.BooleanOptionalAction, default=True,
                        help="with --output: index.html, a static page of each CT's slices (lung and mediastinum "
                             "windows, lung and nodule masks, findings, truth), its PNGs in viewer/ (tens of MB "
                             "for a large CT: docs/benchmarks.md); open it with python -m p2ch_luna.view "
                             "DIR. --no-viewer skips it (less memory and time on many CTs)")
    output.add_argument("--mask-format", choices=report.MASK_FORMATS, default=None,
                        help="with --output (implies --save-mask): nifti (SERIES_mask.nii.gz, the default), "
                             "dicom-seg (SERIES_mask.dcm, a binary DICOM Segmentation of the slices that hold "
                             "mask voxels, referencing the CT's study, series and slices when the CT is a DICOM "
                             "folder; needs pydicom, the [dicom] extra) or both")
    output.add_argument("--annotations-excluded", type=Path, metavar="FILE",
                        help="LUNA16 annotations_excluded.csv for the FROC (default: that file in the data "
                             "root, when it is there)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Diagnose, holding the lock on ``--output`` (a second run into the same folder is refused). Under
    torchrun only rank 0 takes it: rank 0 alone writes the outputs."""
    locked = args.output is not None and distributed_info_from_env().is_main
    with folder_lock(args.output, "--output") if locked else contextlib.nullcontext():
        return _diagnose(args)


def _diagnose(args: argparse.Namespace) -> int:
    paths = paths_from_args(args)
    if args.mask_format is not None:
        args.save_mask = True
        if args.mask_format != "nifti":
            require_pydicom()
    if args.save_mask and args.output is None:
        raise UsageError("--save-mask needs --output DIR")
    if args.output is not None and args.output.exists() and not args.output.is_dir():
        raise UsageError(f"--output {args.output} exists and is not a folder")
    flip_band = parse_flip_band(args.flip_band)
    selection = select_series(args, paths)
    info = distributed_info_from_env()
    device = resolve_device("cpu" if args.runtime == "onnx" and args.device == "auto" else args.device, info)
    mixed = args.precision == "mixed"
    if args.runtime == "onnx" and (device.type != "cpu" or mixed):
        raise UsageError(f"--runtime onnx runs float32 on the CPU: it does not go with "
                         f"{'--precision mixed (--amp)' if mixed else '--device ' + args.device}")
    warn_if_emulated(mixed, device)
    check_kernels(args.kernels, device)
    amp = resolve_precision(args.precision, device, args.runtime)
    log.info("precision: %s%s", "mixed (bfloat16)" if amp and device.type == "cpu" else
             "mixed" if amp else "float32", " (--precision auto)" if args.precision == "auto" else "")
    default_batch = CUDA_SEGMENTATION_BATCH if device.type == "cuda" else CPU_SEGMENTATION_BATCH
    config = DiagnoseConfig(
        segmentation_threshold=args.segmentation_threshold, erosion_iterations=args.erosion_iterations,
        grouping=args.grouping, max_shell_fill=args.max_shell_fill,
        min_diameter_mm=args.min_diameter_mm, flips=args.flips, flip_band=flip_band,
        nodule_threshold=args.nodule_threshold, malignancy_threshold=args.malignancy_threshold,
        batch_size=args.batch_size or default_batch, amp=amp,
        lung_margin_mm=args.lung_margin_mm, kernels=args.kernels, runtime=args.runtime,
    )
    models = load_models(paths, args.segmentation_path, args.classification_path, args.malignancy_path,
                         device, args.runtime).select_kernels(config.kernels)
    if args.validation:
        selection = validation_selection(selection, list_series_on_disk(paths.require_data_root()),
                                         vars(models), include_train=args.include_train,
                                         requested=bool(args.series_uid))
    elif args.fold is not None:
        for checkpoint in (models.nodule, models.segmentation, models.malignancy):
            warn_of_training_overlap(selection, checkpoint)
    truth = read_truth(paths.data_root, args.annotations_excluded)
    started = time.perf_counter()
    with process_group(info):
        mine = shard(selection, info.rank, info.world_size)
        results = diagnose_series(mine, models, config, device, figures=args.output is not None,
                                  save_mask=args.save_mask, prefetch=args.prefetch, show_progress=info.is_main,
                                  viewer=args.output is not None and args.viewer)
        gathered = gather_to_main(results, info)
    if gathered is None:
        return 0
    results = merge_shards(gathered, [uid for uid, _ in selection], key=lambda result: result.series_uid)
    scored = [uid for uid, _ in selection if uid] or [
        r.series_uid for r in results if truth is not None and truth.has_series(r.series_uid)]
    scores = report.score(results, truth, scored, config)
    summary = report.Summary(config=config, models=models.describe(), device=str(device),
                             world_size=info.world_size, wall_s=time.perf_counter() - started)
    print(report.format_report(results, scores, config, summary))
    if args.output is not None:
        report.write_outputs(args.output, results, scores, config, summary, args.mask_format or "nifti")
        log.info("wrote the report to %s", args.output)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
