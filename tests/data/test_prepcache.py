"""prepcache CLI: fills the cache once, reruns skip, bad input gives one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import p2ch_luna.data.cache as cache_module
from p2ch_luna.data.cache import ChunkCache
from p2ch_luna.data.luna import read_candidate_table
from p2ch_luna.io.ct import HU_MAX, HU_MIN, list_series_on_disk, load_ct
from p2ch_luna.prepcache import main


def _uids_with_candidates(data_root: Path) -> list[str]:
    return sorted(set(read_candidate_table(data_root)["series_uid"]))


def test_prepcache_fills_then_skips(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    uids = _uids_with_candidates(tiny_dataset)
    args = ["--data-root", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    assert f"({len(uids)} built, 0 already cached)" in capsys.readouterr().out
    assert main([*args, "--verify"]) == 0
    assert f"(0 built, {len(uids)} already cached)" in capsys.readouterr().out

    monkeypatch.setattr(cache_module, "load_ct", lambda *a, **k: pytest.fail("CT read despite the cache"))
    cache = ChunkCache(tmp_path / "cache", tiny_dataset)
    paths = list_series_on_disk(tiny_dataset)
    for uid in uids:
        expected = np.clip(load_ct(paths[uid]).hu, HU_MIN, HU_MAX)
        np.testing.assert_array_equal(cache.volume(uid), expected)


def test_prepcache_with_workers_and_series_selection(tiny_dataset: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    uids = _uids_with_candidates(tiny_dataset)
    args = ["--data-root", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--series-uid", uids[0]]) == 0
    assert "cached 1 of 1 series (1 built" in capsys.readouterr().out
    assert main([*args, "--num-workers", "2", "--cache-size-gb", "1"]) == 0
    assert f"({len(uids) - 1} built, 1 already cached)" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "volumes").glob("*.npy"))) == len(uids)


def test_bad_data_root_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere"
    assert main(["--data-root", str(missing), "--cache-dir", str(tmp_path / "cache")]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(missing) in error and "Traceback" not in error


def test_bad_arguments_exit_2(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--data-root", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--series-uid", "1.2.3.nope"]) == 2
    assert "1.2.3.nope" in capsys.readouterr().err
    assert main([*args, "--num-workers", "0"]) == 2


def test_unreadable_ct_fails_the_run_but_keeps_the_others(tiny_dataset: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    data_root = tmp_path / "data"
    shutil.copytree(tiny_dataset, data_root)
    uids = _uids_with_candidates(data_root)
    raw = list_series_on_disk(data_root)[uids[0]].with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:100])
    args = ["--data-root", str(data_root), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 1
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]  # after the progress bar and a warning per failed series
    assert error.startswith("python -m p2ch_luna.prepcache: error: ") and "Traceback" not in stderr
    assert f"1 of {len(uids)} series" in error and uids[0] in error
    assert len(list((tmp_path / "cache" / "volumes").glob("*.npy"))) == len(uids) - 1
