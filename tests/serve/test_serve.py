"""``python -m p2ch_luna.serve``: the real server in a subprocess on a free loopback port, a real HTTP client.

One server for the module (its small limits let the too-large cases stay small), the untrained models of
tests/conftest.py and one small synthetic CT in each upload format.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import io
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Iterator

import pytest
import SimpleITK as sitk

httpx = pytest.importorskip("httpx", reason="the [serve] extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="the [serve] extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra (uvicorn) is not installed")

from p2ch_luna.synth.generator import generate_dataset  # noqa: E402
from tests.io.test_ct import write_dicom_series  # noqa: E402

MAX_UPLOAD_MIB = 2
MAX_UNPACKED_MIB = 2
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .mhd of a 17 x 64 x 64 synthetic CT (a .raw of 139 KB)."""
    root = tmp_path_factory.mktemp("serve_ct")
    generate_dataset(root, series=1, seed=0, shape=(64, 64), slices=(16, 17))
    return next(root.glob("subset*/*.mhd"))


@pytest.fixture(scope="module")
def server(untrained_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """(base URL, work folder, the server's TMPDIR) of a running server."""
    work = tmp_path_factory.mktemp("serve_work")
    temp = tmp_path_factory.mktemp("serve_tmp")
    environ = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(temp), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "p2ch_luna.serve", "--models-dir", str(untrained_models), "--port", "0",
         "--work-dir", str(work), "--max-upload-mib", str(MAX_UPLOAD_MIB), "--max-unpacked-mib",
         str(MAX_UNPACKED_MIB), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ, cwd=REPO)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            match = re.search(r"serving on (http://127\.0\.0\.1:\d+/)", line)
            if match:
                break
        else:
            pytest.fail("the server did not start:\n" + "".join(lines))
        url = match.group(1)
        for _ in range(100):
            try:
                if httpx.get(url + "health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, work, temp
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode == 0  # SIGTERM: a clean stop,
    assert not (work.parent / f".{work.name}.lock").exists()  # which removed the --work-dir lock


def _post(url: str, files: list[tuple[str, bytes]], timeout: float = 120) -> httpx.Response:
    return httpx.post(url + "diagnose", files=[("ct", (name, data)) for name, data in files], timeout=timeout)


def _mhd_files(mhd: Path) -> list[tuple[str, bytes]]:
    return [(mhd.name, mhd.read_bytes()), (mhd.with_suffix(".raw").name, mhd.with_suffix(".raw").read_bytes())]


def _left_in(work: Path, temp: Path) -> list[str]:
    """What a refused upload may have left: anything in uploads/ or in the server's TMPDIR."""
    return sorted(str(p) for p in [*(work / "uploads").iterdir(), *temp.iterdir()])


def test_health(server: tuple[str, Path, Path]) -> None:
    url, _, _ = server
    response = httpx.get(url + "health")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    assert {name: model["task"] for name, model in health["models"].items()} == {
        "segmentation": "segmentation", "nodule": "nodule", "malignancy": "malignancy"}


def test_mhd_and_raw_are_diagnosed_with_the_report_and_viewer_served(server: tuple[str, Path, Path],
                                                                      small_ct: Path) -> None:
    url, work, temp = server
    response = _post(url, _mhd_files(small_ct))
    assert response.status_code == 200, response.text
    answer = response.json()
    report = answer["report"]
    assert [series["series_uid"] for series in report["series"]] == [small_ct.stem]
    assert report["series"][0]["shape_irc"] == list(sitk.GetArrayViewFromImage(sitk.ReadImage(str(small_ct))).shape)
    assert httpx.get(answer["files"] + "report.json").json() == report  # the run's report.json, served
    assert answer["viewer"] == answer["files"] + "index.html"
    page = httpx.get(answer["viewer"])
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert (work / "runs" / answer["run_id"] / "findings.csv").is_file()
    assert _left_in(work, temp) == []


def test_nifti_and_dicom_zip_are_diagnosed(server: tuple[str, Path, Path], small_ct: Path,
                                           tmp_path: Path) -> None:
    url, work, temp = server
    nifti = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(small_ct)), str(nifti))
    response = _post(url, [(nifti.name, nifti.read_bytes())])
    assert response.status_code == 200, response.text
    assert response.json()["report"]["series"][0]["series_uid"] == "scan"

    dicom = tmp_path / "dicom"
    dicom.mkdir()
    write_dicom_series(dicom, "1.2.826.0.1.3680043.2.1125.7", slices=8, size=64)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(dicom.iterdir()):
            zipped.write(path, f"series/{path.name}")
    response = _post(url, [("series.zip", archive.getvalue())])
    assert response.status_code == 200, response.text
    series = response.json()["report"]["series"][0]
    assert series["series_uid"] == "1.2.826.0.1.3680043.2.1125.7" and series["shape_irc"] == [8, 64, 64]
    assert _left_in(work, temp) == []


def _zip(members: dict[str, bytes]) -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
    return archive.getvalue()


BAD_UPLOADS = {
    "not a CT": (lambda ct: [("scan.nii.gz", b"this is not a CT " * 100)], 422, "scan.nii.gz could not be read"),
    "unknown file type": (lambda ct: [("notes.txt", b"hello")], 415, "got notes.txt: expected one .nii"),
    "truncated raw": (lambda ct: [_mhd_files(ct)[0], (ct.with_suffix(".raw").name,
                                                      ct.with_suffix(".raw").read_bytes()[:1000])],
                      422, "(truncated)"),
    "mhd naming another data file": (lambda ct: [("a.mhd", ct.read_bytes()), ("a.raw", b"\0" * 10)],
                                     400, "names its data file"),
    "path in a file name": (lambda ct: [("../evil.nii.gz", b"x")], 400, "expected a plain name"),
    "zip with ..": (lambda ct: [("dicom.zip", _zip({"ok.dcm": b"x", "../../evil.dcm": b"x"}))], 400,
                    "member '../../evil.dcm' points outside"),
    "zip with an absolute name": (lambda ct: [("dicom.zip", _zip({"/tmp/evil.dcm": b"x"}))], 400,
                                  "member '/tmp/evil.dcm' points outside"),
    "zip bomb": (lambda ct: [("dicom.zip", _zip({"a.dcm": bytes(MAX_UNPACKED_MIB << 20), "b.dcm": b"x"}))], 413,
                 "unpacks to more than"),
    "not a zip": (lambda ct: [("dicom.zip", b"PK not really")], 422, "is not a readable zip"),
    "zip of no DICOM": (lambda ct: [("dicom.zip", _zip({"readme.txt": b"hello"}))], 422, "holds no DICOM series"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=list(BAD_UPLOADS))
def test_bad_uploads_get_one_clear_4xx_and_leave_nothing(server: tuple[str, Path, Path], small_ct: Path,
                                                         case: str) -> None:
    url, work, temp = server
    make_files, status, message = BAD_UPLOADS[case]
    runs_before = set((work / "runs").iterdir())
    response = _post(url, make_files(small_ct))
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert message in detail and "\n" not in detail and str(work) not in detail
    assert set((work / "runs").iterdir()) == runs_before
    assert _left_in(work, temp) == []
    assert not (work / "evil.dcm").exists() and not Path("/tmp/evil.dcm").exists()


def test_too_large_uploads_get_413(server: tuple[str, Path, Path]) -> None:
    url, work, temp = server
    big = bytes((MAX_UPLOAD_MIB << 20) + 1)
    response = _post(url, [("scan.nii.gz", big)])  # refused by its Content-Length
    assert response.status_code == 413 and "more than the limit" in response.json()["detail"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused while it streams in
        boundary = b"b0undary"
        yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="ct"; filename="scan.nii"\r\n\r\n'
        for _ in range(MAX_UPLOAD_MIB * 4 + 1):
            yield bytes(1 << 18)
        yield b"\r\n--" + boundary + b"--\r\n"

    response = httpx.post(url + "diagnose", content=chunked(),
                          headers={"content-type": "multipart/form-data; boundary=b0undary"}, timeout=60)
    assert response.status_code == 413 and "larger than the limit" in response.json()["detail"]
    assert _left_in(work, temp) == []


def test_concurrent_requests_are_diagnosed_one_after_the_other(server: tuple[str, Path, Path],
                                                               small_ct: Path) -> None:
    url, _, _ = server
    files = _mhd_files(small_ct)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda _: _post(url, files), range(2)))
    assert [response.status_code for response in responses] == [200, 200]
    spans = sorted((datetime.datetime.fromisoformat(r.json()["started"]),
                    datetime.datetime.fromisoformat(r.json()["finished"])) for r in responses)
    assert spans[0][1] <= spans[1][0], f"the diagnoses overlapped: {spans}"
    assert max(r.json()["queued_s"] for r in responses) > 0.5 * min(
        r.json()["report"]["wall_s"] for r in responses)  # the second waited for the first


def test_help_says_requests_are_queued() -> None:
    from p2ch_luna.serve.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "one at a time" in text and "--max-upload-mib" in text and "--work-dir" in text
