"""Every command's options: each visible one is explained, series UIDs are spelt one way, and one concept has
one name across commands."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Iterator

import pytest

from p2ch_luna.commands import COMMANDS

PARSER_MODULES = {"synth": "p2ch_luna.synth.generator", "implant": "p2ch_luna.synth.implant",
                  "mine": "p2ch_luna.mining.cli", "diagnose": "p2ch_luna.diagnose.cli",
                  "serve": "p2ch_luna.serve.cli"}
"""Command -> module holding its ``build_parser`` where that is not the command's own module."""

SINGLE_SERIES = {"implant"}
"""Commands whose --series-uid names the one series to read from a DICOM folder, not a list."""

CANONICAL = {"--data-root": "data_root", "--cache-dir": "cache_dir", "--models-dir": "models_dir",
             "--annotations": "annotations", "--annotations-excluded": "annotations_excluded", "--output": "output",
             "--batch-size": "batch_size", "--device": "device", "--debug": "debug", "--series-uid": "series_uid"}
FORMER_NAMES = {"--excluded": "--annotations-excluded", "--series-uids": "--series-uid"}
"""Spellings kept as hidden aliases: a visible option must use the canonical name instead."""


def _with_subcommands(label: str, parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    subcommands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not subcommands:
        yield label, parser
    for action in subcommands:
        for name, sub in action.choices.items():
            yield from _with_subcommands(f"{label} {name}", sub)


def command_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(command label, parser) for every command in COMMANDS, one per subcommand (train TASK, models ACTION)."""
    found: list[tuple[str, argparse.ArgumentParser]] = []
    for name, (module, _) in COMMANDS.items():
        if name == "train":
            from p2ch_luna.training.cli import build_parser
            from p2ch_luna.training.tasks import TASK_CLASSES

            for task in TASK_CLASSES:  # each task's own options are added only when it is selected
                found.extend(label_parser for label_parser in _with_subcommands(name, build_parser(task))
                             if label_parser[0] == f"{name} {task}")
        else:
            parser = importlib.import_module(PARSER_MODULES.get(name, module)).build_parser()
            found.extend(_with_subcommands(name, parser))
    return found


PARSERS = command_parsers()
UID_PARSERS = [(label, parser) for label, parser in PARSERS
               if "--series-uid" in parser._option_string_actions and label not in SINGLE_SERIES]


def _visible_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if action.option_strings and action.help != argparse.SUPPRESS]


def test_every_command_is_walked() -> None:
    labels = {label.split()[0] for label, _ in PARSERS}
    assert labels == set(COMMANDS)
    assert {"prepcache", "diagnose", "evaluate"} <= {label for label, _ in UID_PARSERS}


@pytest.mark.parametrize("label, parser", PARSERS, ids=[label for label, _ in PARSERS])
def test_every_visible_option_is_explained(label: str, parser: argparse.ArgumentParser) -> None:
    unexplained = [action.option_strings[0] for action in _visible_options(parser) if not (action.help or "").strip()]
    assert unexplained == [], f"{label}: options without help: {unexplained}"


@pytest.mark.parametrize("label, parser", PARSERS, ids=[label for label, _ in PARSERS])
def test_one_concept_has_one_name(label: str, parser: argparse.ArgumentParser) -> None:
    for action in _visible_options(parser):
        for option in action.option_strings:
            assert option not in FORMER_NAMES, f"{label}: {option} is shown; its name is {FORMER_NAMES[option]}"
            if option in CANONICAL:
                assert action.dest == CANONICAL[option], f"{label}: {option} stores into {action.dest}"


def _parse_uids(parser: argparse.ArgumentParser, label: str, uid_arguments: list[str]) -> list[str] | None:
    required = {"evaluate": ["findings.csv", "--annotations", "annotations.csv"]}.get(label, [])
    return parser.parse_args([*required, *uid_arguments]).series_uid


@pytest.mark.parametrize("label, parser", UID_PARSERS, ids=[label for label, _ in UID_PARSERS])
def test_series_uids_are_repeatable_and_comma_separated(label: str, parser: argparse.ArgumentParser) -> None:
    assert _parse_uids(parser, label, []) is None
    assert _parse_uids(parser, label, ["--series-uid", "A,B", "--series-uid", "C"]) == ["A", "B", "C"]
    assert _parse_uids(parser, label, ["--series-uid", "B,A", "--series-uid", "A,C"]) == ["B", "A", "C"]
    assert _parse_uids(parser, label, ["--series-uids", "A", "B"]) == ["A", "B"]  # evaluate's former spelling


@pytest.mark.parametrize("label, parser", UID_PARSERS, ids=[label for label, _ in UID_PARSERS])
@pytest.mark.parametrize("value", ["A,,B", "", "A,"])
def test_an_empty_series_uid_is_one_usage_error(label: str, parser: argparse.ArgumentParser, value: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse_uids(parser, label, ["--series-uid", value])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --series-uid" in message and "empty series UID" in message and repr(value) in message


def test_evaluate_keeps_its_former_excluded_spelling() -> None:
    from p2ch_luna.evaluate import build_parser

    base = ["findings.csv", "--annotations", "annotations.csv"]
    assert str(build_parser().parse_args([*base, "--excluded", "x.csv"]).annotations_excluded) == "x.csv"
    assert str(build_parser().parse_args([*base, "--annotations-excluded", "x.csv"]).annotations_excluded) == "x.csv"


def test_diagnose_ct_takes_at_most_one_series_uid(tmp_path) -> None:
    from p2ch_luna.diagnose.cli import build_parser, select_series
    from p2ch_luna.errors import UsageError
    from p2ch_luna.paths import paths_from_args

    def selected(arguments: list[str]) -> list[tuple[str, object]]:
        args = build_parser().parse_args(["--data-root", str(tmp_path), *arguments])
        return select_series(args, paths_from_args(args))

    assert selected(["--ct", "scan.mha"]) == [("", Path("scan.mha"))]
    assert selected(["--ct", "dicom", "--series-uid", "1.2"]) == [("1.2", Path("dicom"))]
    with pytest.raises(UsageError, match="with --ct, --series-uid names one series, got 2"):
        selected(["--ct", "dicom", "--series-uid", "1.2,1.3"])
