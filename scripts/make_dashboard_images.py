"""Regenerate the README's dashboard pictures from short trainings on synthetic CTs.

    python scripts/make_dashboard_images.py [--output docs/images] [--work-dir DIR] [--seed 0]

- ``training_curves.png``: loss, accuracy, F1 and ROC AUC of a short nodule-classifier
  run, read back from its TensorBoard event files;
- ``segmentation_overlay.png``: the validation overlays the segmentation task writes to
  TensorBoard (CT grey, true positives green, false negatives orange, false
  positives red), read back from the event files.

Everything is trained and written under a temporary folder (or ``--work-dir``);
a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2ch_luna.synth import generator as synth
from p2ch_luna.training import cli as training  # noqa: E402
from p2ch_luna.training.tasks.segmentation import OVERLAY_COLORS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CURVE_PANELS = (("loss/all", "loss"), ("correct/all", "accuracy"), ("pr/f1", "F1"), ("auc/roc", "ROC AUC"))
OVERLAY_COUNT = 4
FIGURE_DPI = 80
COMMENT = "docs"


def load_run(runs_dir: Path, mode: str, task: str) -> EventAccumulator:
    """The event files of one run (``*-<mode>-<task>-docs``), fully loaded."""
    run_dir = next(runs_dir.rglob(f"*-{mode}-{task}-{COMMENT}"))
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def training_curves(runs_dir: Path, path: Path) -> None:
    runs = {mode: load_run(runs_dir, mode, "nodule") for mode in ("trn", "val")}
    figure, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(12, 2.8))
    for axis, (tag, title) in zip(axes, CURVE_PANELS):
        for mode, accumulator in runs.items():
            events = accumulator.Scalars(tag)
            axis.plot([e.step for e in events], [e.value for e in events], marker="o", markersize=3, label=mode)
        axis.set_title(f"{title}  ({tag})", fontsize=9)
        axis.set_xlabel("samples seen", fontsize=8)
        axis.tick_params(labelsize=7)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)


def segmentation_overlay(runs_dir: Path, path: Path) -> None:
    run = load_run(runs_dir, "val", "segmentation")
    tags = sorted(run.Tags()["images"])[:OVERLAY_COUNT]
    figure, axes = plt.subplots(1, len(tags), figsize=(2.6 * len(tags), 2.9), squeeze=False)
    for axis, tag in zip(axes[0], tags):
        image = run.Images(tag)[-1]
        axis.imshow(plt.imread(io.BytesIO(image.encoded_image_string)), interpolation="nearest")
        axis.set_title(tag.removeprefix("val/"), fontsize=8)
        axis.axis("off")
    legend = [Patch(color=OVERLAY_COLORS[kind], label=label)
              for kind, label in (("tp", "true positive"), ("fn", "false negative"), ("fp", "false positive"))]
    figure.legend(handles=legend, loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.08, 1, 0.97))
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)


def make_images(output: Path, work: Path, seed: int) -> list[Path]:
    data_root = work / "luna"
    if not data_root.is_dir():
        synth.generate_dataset(data_root, series=6, seed=seed, shape=(96, 96), slices=(40, 50), progress=False)
    common = ["--data-root", str(data_root), "--cache-dir", str(work / "cache"), "--models-dir", str(work / "models"),
              "--runs-dir", str(work / "runs"), "--device", "cpu", "--val-stride", "3", "--seed", str(seed),
              "--comment", COMMENT, "--log-level", "WARNING"]
    if training.main(["nodule", *common, "--epochs", "8", "--batch-size", "16", "--epoch-size", "128",
                      "--ratio", "1", "--augmented", "--optimizer", "adam", "--lr", "0.001",
                      "--model-kwargs", '{"conv_channels": 8, "depth": 2}',
                      "--chunk-shape", "16", "24", "24"]) != 0:
        raise SystemExit("nodule training failed")
    if training.main(["segmentation", *common, "--epochs", "8", "--batch-size", "8", "--epoch-size", "64",
                      "--ratio", "0", "--val-negative-fraction", "0.05", "--tb-images", str(OVERLAY_COUNT)]) != 0:
        raise SystemExit("segmentation training failed")
    output.mkdir(parents=True, exist_ok=True)
    written = [output / "training_curves.png", output / "segmentation_overlay.png"]
    training_curves(work / "runs", written[0])
    segmentation_overlay(work / "runs", written[1])
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "images", help="folder of the PNGs")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data, models and runs here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="p2ch_luna_images_") as temporary:
        work = args.work_dir or Path(temporary)
        for path in make_images(args.output, work, args.seed):
            print(f"{path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
