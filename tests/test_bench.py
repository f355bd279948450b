"""The benches are a package run as ``python -m bench.NAME``: each imports and explains its options."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import bench
from tests.locations import REPO

BENCHES = sorted(info.name for info in pkgutil.iter_modules(bench.__path__) if info.name.startswith("bench_"))



def test_every_bench_script_is_in_the_package() -> None:
    scripts = sorted(path.stem for path in (REPO / "bench").glob("bench_*.py"))
    assert scripts == BENCHES and len(BENCHES) >= 10


@pytest.mark.parametrize("name", BENCHES)
def test_bench_answers_help(name: str, capsys: pytest.CaptureFixture) -> None:
    module = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_benches_do_not_edit_sys_path() -> None:
    for path in (REPO / "bench").glob("*.py"):
        assert "sys.path" not in path.read_text(), path


def test_a_bench_runs_as_a_module_from_the_repository_root() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.bench_synth", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
