"""Every console script named in setup.cfg, and its ``python -m`` twin, resolves to a ``main`` that answers ``--help``."""

from __future__ import annotations

import configparser
import importlib
import runpy

import pytest

from tests.locations import REPO

SETUP_CFG = REPO / "setup.cfg"



def console_scripts() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG)
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines)


def test_the_scripts_include_one_per_command() -> None:
    assert set(console_scripts()) >= {"p2ch-luna-synth", "p2ch-luna-implant", "p2ch-luna-prepcache",
                                      "p2ch-luna-train", "p2ch-luna-diagnose", "p2ch-luna-evaluate", "p2ch-luna-demo",
                                      "p2ch-luna-mine", "p2ch-luna-models"}


@pytest.mark.parametrize("script, target", sorted(console_scripts().items()))
def test_a_script_answers_help(script: str, target: str, capsys: pytest.CaptureFixture[str]) -> None:
    module_name, _, function = target.partition(":")
    main = getattr(importlib.import_module(module_name), function)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
@pytest.mark.parametrize("module_name", sorted({target.partition(":")[0] for target in console_scripts().values()}))
def test_python_dash_m_runs_the_same_command(module_name: str, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.argv", [module_name, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module_name, run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_one_command_runs_every_other(capsys: pytest.CaptureFixture[str]) -> None:
    from p2ch_luna import __version__
    from p2ch_luna.commands import COMMANDS, main

    scripts = {target.partition(":")[0] for name, target in console_scripts().items() if name != "p2ch-luna"}
    assert scripts <= {module for module, _ in COMMANDS.values()}
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and __version__ in capsys.readouterr().out
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out, name
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
