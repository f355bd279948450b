"""Diagnosis faults and bad model files end to end: Ctrl-C, a full disk, wrong, foreign and malicious checkpoints."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch

from p2ch_luna.diagnose import cli as diagnose_cli
from p2ch_luna.io.ct import list_series_on_disk
from p2ch_luna.models import build_model
from p2ch_luna.models.checkpoint import save_checkpoint
from p2ch_luna.training import cli as training
from tests.reliability.reliability_helpers import (
    assert_one_line_error,
    diagnose_model_args,
    file_size_limit,
    run,
    start,
    training_args,
)

pytestmark = pytest.mark.reliability

DIAGNOSE = "p2ch_luna.diagnose"
REPORT_FILES = ("report.json", "findings.csv")


def first_uid(data_root: Path) -> str:
    return sorted(list_series_on_disk(data_root))[0]


@pytest.mark.parametrize("prefetch", ["0", "1"], ids=["here", "worker-process"])
def test_ctrl_c_during_diagnosis_exits_130_and_writes_nothing(luna_root: Path, diagnosis_models: dict[str, Path],
                                                              tmp_path: Path, prefetch: str) -> None:
    output = tmp_path / "report"
    child = start(DIAGNOSE, "--data-root", str(luna_root), "--validation", "--include-train", "--prefetch", prefetch,
                  "--output", str(output), *diagnose_model_args(diagnosis_models))
    child.wait_for(lambda: " candidates, " in child.stderr(), "the first diagnosed CT")
    child.send_signal(signal.SIGINT)
    code, _, err = child.finish()
    assert code == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].endswith(": interrupted")
    assert not output.exists() or not any(output.iterdir()), "a half-finished report was written"
    assert [p.name for p in tmp_path.iterdir()] in ([], ["report"]), "staging files were left behind"


@pytest.mark.parametrize("save_mask", [False, True], ids=["report", "report-and-mask"])
def test_file_size_limit_while_writing_the_report_keeps_the_previous_one(
        luna_root: Path, diagnosis_models: dict[str, Path], tmp_path: Path, save_mask: bool) -> None:
    output = tmp_path / "report"
    args = ["--data-root", str(luna_root), "--series-uid", first_uid(luna_root), "--output", str(output),
            *diagnose_model_args(diagnosis_models), *(["--save-mask"] if save_mask else [])]
    assert diagnose_cli.main(args) == 0
    before = {name: (output / name).read_bytes() for name in REPORT_FILES}
    sizes = {path.name: path.stat().st_size for path in output.iterdir()}
    mask_bytes = max((size for name, size in sizes.items() if "_mask." in name), default=0)
    # Without the mask, the report's own files fail; with it, the (compressed, small) mask fails too.
    limit = (min(mask_bytes, *(sizes[name] for name in REPORT_FILES)) - 1 if save_mask
             else min(sizes[name] for name in REPORT_FILES) // 2)
    assert not save_mask or mask_bytes > limit

    result = run(DIAGNOSE, *args, preexec_fn=file_size_limit(limit))
    assert_one_line_error(result.returncode, result.stderr, str(output), "File too large", expected_code=1)
    assert {name: (output / name).read_bytes() for name in REPORT_FILES} == before
    assert [p.name for p in tmp_path.iterdir()] == ["report"], "staging files were left behind"


# ---------------------------------------------------------------------------
# Bad model files given to diagnose (and to training --resume)


class WritesMarker:
    """Unpickling this would create ``marker``: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def malicious_checkpoint(folder: Path, source: Path) -> tuple[Path, Path]:
    """A copy of a real checkpoint with a code-running object added; returns (file, marker)."""
    marker = folder / "code-ran"
    state = torch.load(source, weights_only=True)
    state["metrics"] = {"payload": WritesMarker(marker)}
    path = folder / "nodule_evil.best.state"
    torch.save(state, path)
    return path, marker


def bad_checkpoint(kind: str, folder: Path, models: dict[str, Path]) -> tuple[Path, str]:
    """(a bad --classification-path file, text the error must contain)."""
    if kind == "wrong-task":
        return models["segmentation"], "is a segmentation checkpoint, expected nodule"
    if kind == "wrong-architecture":
        path = folder / "nodule_wide.best.state"
        save_checkpoint(path, build_model("luna", conv_channels=16), model_name="luna", model_kwargs={},
                        task="nodule", epoch=1, samples_seen=1, config={}, metrics={})
        return path, "does not fit model"
    if kind == "text-file":
        path = folder / "notes.state"
        path.write_text("this is not a checkpoint\n")
        return path, "is not a p2ch_luna or book checkpoint"
    if kind == "truncated":
        path = folder / "nodule_cut.best.state"
        path.write_bytes(models["nodule"].read_bytes()[:5000])
        return path, "is not a p2ch_luna or book checkpoint"
    if kind == "missing":
        return folder / "nowhere.state", "does not exist"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["wrong-task", "wrong-architecture", "text-file", "truncated", "missing"])
def test_bad_checkpoint_given_to_diagnose_is_a_one_line_error(kind: str, luna_root: Path,
                                                             diagnosis_models: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    path, expected = bad_checkpoint(kind, tmp_path, diagnosis_models)
    output = tmp_path / "report"
    code = diagnose_cli.main(["--data-root", str(luna_root), "--series-uid", first_uid(luna_root),
                          "--output", str(output), *diagnose_model_args(diagnosis_models),
                          "--classification-path", str(path)])
    assert_one_line_error(code, capsys.readouterr().err, str(path), expected, expected_code=1)
    assert not output.exists()


def test_checkpoint_with_code_is_refused_by_diagnose(luna_root: Path, diagnosis_models: dict[str, Path],
                                                    tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, marker = malicious_checkpoint(tmp_path, diagnosis_models["nodule"])
    code = diagnose_cli.main(["--data-root", str(luna_root), "--series-uid", first_uid(luna_root),
                          *diagnose_model_args(diagnosis_models), "--classification-path", str(path)])
    assert_one_line_error(code, capsys.readouterr().err, str(path), "refused", expected_code=1)
    assert not marker.exists(), "loading the checkpoint ran code"


def test_checkpoint_with_code_is_refused_by_training_resume(trained_run: Path, luna_root: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    work = Path(shutil.copytree(trained_run, tmp_path / "work"))
    last = next((work / "models").glob("*.last.state"))
    path, marker = malicious_checkpoint(tmp_path, last)
    path = path.rename(tmp_path / "nodule_evil.last.state")
    code = training.main(training_args(luna_root, work, "--epochs", "2", "--resume", str(path)))
    assert_one_line_error(code, capsys.readouterr().err, str(path), "refused", expected_code=1)
    assert not marker.exists(), "loading the checkpoint ran code"
    assert sorted(p.name for p in (work / "models").iterdir()) == sorted(
        p.name for p in (trained_run / "models").iterdir()), "the refused resume wrote files"


def test_a_truncated_ct_loaded_by_a_worker_process_is_a_one_line_error(luna_copy: Path,
                                                                       diagnosis_models: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """With --prefetch, the worker's error reaches the user as the same one line, naming the file."""
    on_disk = list_series_on_disk(luna_copy)
    broken = on_disk[sorted(on_disk)[2]].with_suffix(".raw")
    broken.write_bytes(broken.read_bytes()[:1000])
    output = tmp_path / "report"
    result = run(DIAGNOSE, "--data-root", str(luna_copy), "--validation", "--include-train", "--prefetch", "1",
                 "--output", str(output), *diagnose_model_args(diagnosis_models))
    assert_one_line_error(result.returncode, result.stderr, broken.name, expected_code=1)
    assert not output.exists(), "a report was written although a CT could not be read"
