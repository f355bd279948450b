"""``python -m p2ch_luna.view``: serves a diagnosis folder on the loopback address; a folder without a page is
one clear error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from p2ch_luna import view
from p2ch_luna.viewer.page import PAGE_FILE

REPO = Path(__file__).resolve().parents[2]


def test_serve_prints_a_loopback_url_that_serves_the_folder(tmp_path: Path) -> None:
    (tmp_path / PAGE_FILE).write_text("<!doctype html><title>page</title>")
    (tmp_path / "viewer").mkdir()
    (tmp_path / "viewer" / "ct0000.png").write_bytes(b"\x89PNG-ish")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "p2ch_luna.view", str(tmp_path), "--serve", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/index\.html", line)
        assert match, line + server.stderr.read() if server.poll() is not None else line
        with urllib.request.urlopen(match.group(0), timeout=10) as response:
            assert response.read() == (tmp_path / PAGE_FILE).read_bytes()
        with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/viewer/ct0000.png", timeout=10) as response:
            assert response.headers["Content-Type"] == "image/png" and response.read() == b"\x89PNG-ish"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_folder_without_a_page_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert view.main([str(tmp_path), "--serve"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{tmp_path / PAGE_FILE} does not exist" in error[0] and "--output" in error[0]
