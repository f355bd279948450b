"""Write the example notebooks (without outputs) from the cell sources below.

    python notebooks/build_notebooks.py

Edit the cells here, not in the ``.ipynb`` files, so the committed notebooks
stay clean (no outputs, no execution counts). ``tests/test_notebooks.py`` runs
each notebook top to bottom.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK_DIR = Path(__file__).resolve().parent

SETUP = '''\
import importlib.util
import sys
from pathlib import Path

# The repository root: the nearest folder above the working directory that holds p2ch_luna/
# (Jupyter runs a notebook in its own folder, notebooks/).
REPO = next((folder for folder in [Path.cwd(), *Path.cwd().parents] if (folder / "p2ch_luna").is_dir()),
            Path.cwd().parent)
if importlib.util.find_spec("p2ch_luna") is None:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data"  # optional real data and the book's checkpoints'''

EXPLORE = [
    new_markdown_cell("""\
# 1. Explore the data

A LUNA16-format dataset: CT series (`subset*/<uid>.mhd/.raw`) plus `candidates.csv`, `annotations.csv` and
`annotations_with_malignancy.csv`. This notebook uses the real LUNA16 data when the resolved data root
(`--data-root`, `$P2CH_DATA_ROOT`, or `data-unversioned/part2/luna`) holds series, and otherwise generates a
small synthetic dataset with `p2ch_luna.synth` into a temporary folder."""),
    new_code_cell(SETUP),
    new_code_cell('''\
import tempfile

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Ellipse

from p2ch_luna.synth import generator as synth
from p2ch_luna.io.ct import HU_MAX, HU_MIN, list_series_on_disk, load_ct
from p2ch_luna.data.luna import ANNOTATIONS_FILE, read_annotations, read_candidate_table
from p2ch_luna.paths import resolve_paths

data_root = resolve_paths().data_root
series_paths = list_series_on_disk(data_root) if data_root.is_dir() else {}
if series_paths:
    print(f"real data: {len(series_paths)} series under {data_root}")
else:
    data_root = Path(tempfile.mkdtemp(prefix="p2ch_luna_explore_")) / "luna"
    synth.generate_dataset(data_root, series=4, seed=0, shape=(128, 128), slices=(48, 56), progress=False)
    series_paths = list_series_on_disk(data_root)
    print(f"synthetic data: {len(series_paths)} series under {data_root}")'''),
    new_markdown_cell("""\
## Candidates

`read_candidate_table` joins the candidates with the annotations (diameter) and the malignancy labels: one row
per candidate, `is_nodule` for the positives, `has_annotation` for nodules with a radiologist's diameter."""),
    new_code_cell('''\
candidates = read_candidate_table(data_root)
nodules = candidates[candidates["is_nodule"]]
positives, negatives = len(nodules), len(candidates) - len(nodules)
print(f"{len(candidates)} candidates in {candidates['series_uid'].nunique()} series: {positives} nodules, "
      f"{negatives} non-nodules (about 1 : {negatives / max(positives, 1):.0f})")
candidates.head()'''),
    new_code_cell('''\
malignancy = nodules["is_malignant"].map({True: "malignant", False: "benign"}).fillna("unknown")
figure, axes = plt.subplots(1, 3, figsize=(13, 3.5))
axes[0].bar(["non-nodule", "nodule"], [negatives, positives], color=["tab:gray", "tab:red"], log=True)
axes[0].set_title("candidates (log scale)")
axes[1].hist(nodules.loc[nodules["has_annotation"], "diameter_mm"], bins=20, color="tab:red")
axes[1].set_xlabel("diameter (mm)")
axes[1].set_title("annotated nodule diameters")
counts = malignancy.value_counts().reindex(["benign", "malignant", "unknown"], fill_value=0)
axes[2].bar(counts.index, counts.to_numpy(), color=["tab:green", "tab:red", "tab:gray"])
axes[2].set_title("nodule malignancy")
figure.tight_layout()
plt.show()
candidates.groupby("series_uid").agg(candidates=("is_nodule", "size"), nodules=("is_nodule", "sum"),
                                     largest_mm=("diameter_mm", "max"))'''),
    new_markdown_cell("""\
## One CT through its largest annotated nodule

Arrays are indexed (index, row, col) = (z, y, x); each view is drawn with the aspect of its voxel spacing, so
millimetres are square. Red circles: annotated nodules whose sphere the slice cuts (circle = diameter + 4 mm)."""),
    new_code_cell('''\
annotations = read_annotations(data_root / ANNOTATIONS_FILE)  # one row per nodule (candidates may repeat one)
annotations = annotations[annotations["series_uid"].isin(series_paths)].sort_values("diameter_mm", ascending=False)
target = annotations.iloc[0]
ct = load_ct(series_paths[target["series_uid"]])
spacing = np.asarray(ct.geometry.spacing_irc)
print(f"{ct.series_uid}: shape {ct.shape} (index, row, col), spacing {spacing.round(2)} mm")

marks = [(ct.center_irc(row[["center_x", "center_y", "center_z"]].to_numpy(float)), row["diameter_mm"])
         for _, row in annotations[annotations["series_uid"] == ct.series_uid].iterrows()]
center = marks[0][0]
views = [  # name, image, vertical axis, horizontal axis, axis the slice is taken along
    ("axial", ct.hu[center[0]], 1, 2, 0),
    ("coronal", ct.hu[:, center[1], :], 0, 2, 1),
    ("sagittal", ct.hu[:, :, center[2]], 0, 1, 2),
]
figure, axes = plt.subplots(1, 3, figsize=(14, 5))
for axis, (name, image, vertical, horizontal, through) in zip(axes, views):
    axis.imshow(np.clip(image, HU_MIN, HU_MAX), cmap="gray", vmin=-1000, vmax=400, interpolation="nearest",
                aspect=spacing[vertical] / spacing[horizontal], origin="lower" if vertical == 0 else "upper")
    for irc, diameter in marks:
        if abs(irc[through] - center[through]) * spacing[through] <= diameter / 2:
            axis.add_patch(Ellipse((irc[horizontal], irc[vertical]), (diameter + 4) / spacing[horizontal],
                                   (diameter + 4) / spacing[vertical], fill=False, color="red", linewidth=1.5))
    axis.set_title(f"{name} ({'IRC'[through]} = {center[through]})")
    axis.set_xticks([])
    axis.set_yticks([])
figure.tight_layout()
plt.show()'''),
    new_markdown_cell("""\
## Hounsfield units

Air is -1000 HU, lung parenchyma around -850, fat around -100, water 0, soft tissue and nodules 0 to +100,
bone several hundred. The models see HU clipped to [HU_MIN, HU_MAX] = [-1000, 1000]."""),
    new_code_cell('''\
figure, axis = plt.subplots(figsize=(8, 3.5))
axis.hist(ct.hu.ravel(), bins=200, range=(-1200, 1600), log=True, color="tab:blue")
for hu, label in ((HU_MIN, "HU_MIN"), (HU_MAX, "HU_MAX")):
    axis.axvline(hu, color="tab:red", linestyle="--", linewidth=1)
    axis.text(hu, axis.get_ylim()[1], label, color="tab:red", ha="center", va="bottom")
axis.set_xlabel("HU")
axis.set_ylabel("voxels")
figure.tight_layout()
plt.show()'''),
]

TRAINING = [
    new_markdown_cell("""\
# 2. Train a tiny nodule classifier and read its TensorBoard logs

The same entry point as `python -m p2ch_luna.training nodule ...`, called in-process with tiny settings on a
synthetic dataset in a temporary folder: a few seconds on a CPU. Every folder is given explicitly, so nothing is
written into the repository."""),
    new_code_cell(SETUP),
    new_code_cell('''\
import io
import tempfile

import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from p2ch_luna.synth import generator as synth
from p2ch_luna.training import cli as training

work = Path(tempfile.mkdtemp(prefix="p2ch_luna_training_"))
data_root = work / "luna"
synth.generate_dataset(data_root, series=8, seed=0, shape=(96, 96), slices=(40, 50), progress=False)
folders = ["--data-root", str(data_root), "--cache-dir", str(work / "cache"),
           "--models-dir", str(work / "models"), "--runs-dir", str(work / "runs")]'''),
    new_code_cell('''\
exit_code = training.main([
    "nodule", *folders, "--device", "cpu", "--epochs", "4", "--batch-size", "8", "--epoch-size", "48",
    "--val-size", "64", "--val-stride", "4", "--balanced", "--augmented",
    "--model-kwargs", '{"conv_channels": 4, "depth": 2}', "--chunk-shape", "16", "24", "24",
    "--comment", "notebook", "--log-level", "INFO",
])
assert exit_code == 0, exit_code'''),
    new_markdown_cell("""\
## Metrics read back from the event files

Each run writes `runs/<prefix>/<time>-trn-<task>-<comment>` and `...-val-...`; the x axis is the number of
training samples seen. `tensorboard --logdir <runs-dir>` shows the same (and the PR curves, histograms and
HParams)."""),
    new_code_cell('''\
def load_run(mode: str) -> EventAccumulator:
    run_dir = next((work / "runs").rglob(f"*-{mode}-nodule-notebook"))
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


runs = {mode: load_run(mode) for mode in ("trn", "val")}
print({kind: tags for kind, tags in runs["val"].Tags().items() if tags and kind != "scalars"})
print("scalars:", runs["val"].Tags()["scalars"])'''),
    new_code_cell('''\
panels = [("loss/all", "loss"), ("correct/all", "accuracy"), ("pr/f1", "F1"), ("auc/roc", "ROC AUC")]
figure, axes = plt.subplots(1, len(panels), figsize=(15, 3.3))
for axis, (tag, title) in zip(axes, panels):
    for mode, accumulator in runs.items():
        if tag in accumulator.Tags()["scalars"]:
            events = accumulator.Scalars(tag)
            axis.plot([e.step for e in events], [e.value for e in events], marker="o", label=mode)
    axis.set_title(title)
    axis.set_xlabel("samples seen")
    axis.legend()
figure.tight_layout()
plt.show()'''),
    new_code_cell('''\
roc = runs["val"].Images("roc")[-1]
figure, axis = plt.subplots(figsize=(4, 4))
axis.imshow(plt.imread(io.BytesIO(roc.encoded_image_string)))
axis.set_title(f"validation ROC after {roc.step} samples")
axis.axis("off")
plt.show()
print("checkpoints:", sorted(path.name for path in (work / "models").iterdir()))'''),
]

DIAGNOSIS = [
    new_markdown_cell("""\
# 3. Diagnose CTs

`p2ch_luna.diagnose` finds the lungs, segments nodule candidates with the U-Net, groups them and scores each
with the nodule classifier. Models: the book's checkpoints from `../shared/data/book-checkpoints` when present,
otherwise two tiny models trained here in seconds (they find little; the point is the pipeline)."""),
    new_code_cell(SETUP),
    new_code_cell('''\
import json
import tempfile

import numpy as np
import SimpleITK as sitk
from IPython.display import Image, display

from p2ch_luna import diagnose
from p2ch_luna.synth import generator as synth
from p2ch_luna.training import cli as training
from p2ch_luna.io.ct import list_series_on_disk
from p2ch_luna.evaluation.text import format_confusion_table
from p2ch_luna.models import find_latest_checkpoint

work = Path(tempfile.mkdtemp(prefix="p2ch_luna_diagnosis_"))
data_root = work / "luna"
synth.generate_dataset(data_root, series=3, seed=0, shape=(128, 128), slices=(48, 56), progress=False)
folders = ["--data-root", str(data_root), "--cache-dir", str(work / "cache"),
           "--models-dir", str(work / "models"), "--runs-dir", str(work / "runs")]'''),
    new_code_cell('''\
book = SHARED_DATA / "book-checkpoints"
book_segmentation = sorted(book.glob("seg_*.state"))
book_classifier = sorted(book.glob("cls_*.state"))
if book_segmentation and book_classifier:
    segmentation_path, classifier_path = book_segmentation[-1], book_classifier[-1]
else:
    tiny = ["--device", "cpu", "--epochs", "1", "--batch-size", "4", "--val-stride", "3", "--log-level", "WARNING"]
    assert training.main(["segmentation", *folders, *tiny, "--ratio", "0", "--epoch-size", "8",
                          "--val-negative-fraction", "0.05", "--model-kwargs", '{"depth": 2, "wf": 2}']) == 0
    assert training.main(["nodule", *folders, *tiny, "--balanced", "--epoch-size", "16", "--val-size", "16",
                          "--model-kwargs", '{"conv_channels": 2, "depth": 2}']) == 0
    segmentation_path = find_latest_checkpoint(work / "models", "segmentation")
    classifier_path = find_latest_checkpoint(work / "models", "nodule")
models = ["--segmentation-path", str(segmentation_path), "--classification-path", str(classifier_path)]
print("segmentation:", segmentation_path.name, "\\nnodule classifier:", classifier_path.name)'''),
    new_markdown_cell("""\
## Synthetic series, scored against their annotations

`--series-uid` picks series under `--data-root` (two here, to keep it quick on a CPU; `--validation` takes the
validation split). With annotations present the report holds the
book's confusion table (rows: truth; columns: missed by segmentation, filtered out by the classifier, predicted
benign, predicted malignant) and the LUNA16 FROC."""),
    new_code_cell('''\
synthetic_out = work / "diagnosis-synthetic"
series_uids = sorted(list_series_on_disk(data_root))[:2]
assert diagnose.main(["--series-uid", ",".join(series_uids), *folders, *models, "--device", "cpu",
                      "--output", str(synthetic_out), "--log-level", "WARNING"]) == 0
report = json.loads((synthetic_out / "report.json").read_text())
print(format_confusion_table(np.array(report["confusion_table"])))'''),
    new_code_cell('''\
if (synthetic_out / "froc.png").exists():
    print(f"CPM {report['froc']['cpm']:.3f}")
    display(Image(filename=str(synthetic_out / "froc.png")))
for figure_path in sorted(synthetic_out.glob("*_finding*.png"))[:3]:
    display(Image(filename=str(figure_path)))'''),
    new_markdown_cell("""\
## A real chest CT (DICOM)

The CPTAC CT in `../shared/data/cptac-chest-ct` has no annotations: the report lists findings only. To stay fast
on a CPU, a slab of it is written as a MetaImage (`.mhd`) and diagnosed; `--ct` takes the DICOM folder itself
just as well. This part is skipped when the folder is absent."""),
    new_code_cell('''\
real_ct = SHARED_DATA / "cptac-chest-ct"
if real_ct.is_dir():
    # A 40-slice (120 mm) slab keeps this cell to about half a minute on 2 CPU cores; the whole CT
    # (99 slices of 512 x 512) takes a minute or two: set REAL_CT_SLICES = None to diagnose all of it.
    REAL_CT_SLICES = slice(20, 60)
    source = real_ct
    if REAL_CT_SLICES is not None:
        image = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(real_ct)))  # sorted by position
        source = work / "real-ct-slab.mhd"
        sitk.WriteImage(image[:, :, REAL_CT_SLICES], str(source))
    real_out = work / "diagnosis-real"
    assert diagnose.main(["--ct", str(source), "--data-root", str(work / "no-annotations"), *models,
                          "--device", "cpu", "--output", str(real_out), "--log-level", "WARNING"]) == 0
    for figure_path in sorted(real_out.glob("*_finding*.png"))[:3]:
        display(Image(filename=str(figure_path)))
else:
    print(f"no real CT at {real_ct}: skipped")'''),
]


def build(cells: list, path: Path) -> None:
    for number, cell in enumerate(cells):
        cell["id"] = f"cell-{number:02d}"  # stable ids: rebuilding changes nothing that did not change
    notebook = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(notebook)
    path.write_text(nbformat.writes(notebook) + "\n")


def main() -> int:
    for name, cells in (("01_explore_data", EXPLORE), ("02_training", TRAINING), ("03_diagnosis", DIAGNOSIS)):
        build(cells, NOTEBOOK_DIR / f"{name}.ipynb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
