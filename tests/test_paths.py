"""Tests for p2ch_luna.paths: flag, then environment variable, then default."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from p2ch_luna.errors import DataError
from p2ch_luna.paths import PACKAGE_DIR, Paths, add_path_arguments, paths_from_args, resolve_paths

ENV_NAMES = ("P2CH_DATA_HOME", "P2CH_DATA_ROOT", "P2CH_CACHE_DIR", "P2CH_MODELS_DIR", "P2CH_RUNS_DIR")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_path_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_live_under_the_checkout_data_unversioned() -> None:
    paths = resolve_paths(environ={})
    home = PACKAGE_DIR.parent / "data-unversioned"
    assert paths == Paths(home / "part2" / "luna", home / "cache", home / "models", home / "runs")


def test_flag_beats_environment_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2CH_DATA_ROOT", str(tmp_path / "env-data"))
    monkeypatch.setenv("P2CH_CACHE_DIR", str(tmp_path / "env-cache"))
    paths = paths_from_args(parse(["--data-root", str(tmp_path / "flag-data")]))
    assert paths.data_root == tmp_path / "flag-data"
    assert paths.cache_dir == tmp_path / "env-cache"
    assert paths.models_dir == PACKAGE_DIR.parent / "data-unversioned" / "models"


def test_every_folder_has_its_flag_and_environment_variable(tmp_path: Path) -> None:
    environ = {"P2CH_DATA_ROOT": str(tmp_path / "d"), "P2CH_CACHE_DIR": str(tmp_path / "c"),
               "P2CH_MODELS_DIR": str(tmp_path / "m"), "P2CH_RUNS_DIR": str(tmp_path / "r")}
    assert resolve_paths(environ=environ) == Paths(*(tmp_path / name for name in "dcmr"))
    flags = parse(["--data-root", "D", "--cache-dir", "C", "--models-dir", "M", "--runs-dir", "R"])
    assert flags.data_root == "D" and flags.cache_dir == "C"
    assert flags.models_dir == "M" and flags.runs_dir == "R"


def test_data_home_moves_every_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2CH_DATA_HOME", str(tmp_path))
    monkeypatch.setenv("P2CH_RUNS_DIR", str(tmp_path / "elsewhere"))
    paths = resolve_paths()
    assert paths.data_root == tmp_path / "part2" / "luna"
    assert paths.cache_dir == tmp_path / "cache"
    assert paths.models_dir == tmp_path / "models"
    assert paths.runs_dir == tmp_path / "elsewhere"


def test_relative_values_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    paths = resolve_paths(data_root="relative/luna", environ={})
    assert paths.data_root.is_absolute()
    assert paths.data_root == tmp_path.resolve() / "relative" / "luna"


def test_defaults_do_not_depend_on_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = resolve_paths()
    monkeypatch.chdir(tmp_path)
    assert resolve_paths() == before
    assert not str(before.data_root).startswith(str(tmp_path.resolve()))


def test_require_data_root_explains_how_to_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    paths = resolve_paths(data_root=missing, environ={})
    with pytest.raises(DataError) as caught:
        paths.require_data_root()
    message = str(caught.value)
    assert str(missing) in message
    assert "--data-root" in message and "P2CH_DATA_ROOT" in message
    assert "\n" not in message
    missing.mkdir()
    assert paths.require_data_root() == missing
