"""The one place that resolves data, cache, model and run folders.

Each folder comes from, in order: the command-line flag, an environment
variable, or the documented default under ``data-unversioned/`` next to the
package's repository root (or the current directory's ``data-unversioned/``
when the package is installed elsewhere). Nothing else in the package builds
paths from the working directory.

==============  ===================  ====================================
flag            environment          default
==============  ===================  ====================================
--data-root     P2CH_DATA_ROOT       data-unversioned/part2/luna
--cache-dir     P2CH_CACHE_DIR       data-unversioned/cache
--models-dir    P2CH_MODELS_DIR      data-unversioned/models
--runs-dir      P2CH_RUNS_DIR        data-unversioned/runs
==============  ===================  ====================================

``P2CH_DATA_HOME`` moves the whole ``data-unversioned`` root at once.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from p2ch_luna.errors import DataError

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_HOME_ENV = "P2CH_DATA_HOME"


def default_data_home(environ: Mapping[str, str] | None = None) -> Path:
    """``data-unversioned/`` of the source checkout, or ``$P2CH_DATA_HOME``."""
    environ = os.environ if environ is None else environ
    if environ.get(DATA_HOME_ENV):
        return Path(environ[DATA_HOME_ENV]).expanduser().resolve()
    checkout = PACKAGE_DIR.parent
    if (checkout / "setup.cfg").exists():
        return checkout / "data-unversioned"
    return Path.cwd().resolve() / "data-unversioned"


@dataclass(frozen=True)
class _PathSpec:
    attribute: str
    flag: str
    env: str
    default_relative: str
    help: str


PATH_SPECS = (
    _PathSpec("data_root", "--data-root", "P2CH_DATA_ROOT", "part2/luna",
              "LUNA16 folder holding subset*/ and the CSVs"),
    _PathSpec("cache_dir", "--cache-dir", "P2CH_CACHE_DIR", "cache",
              "chunk cache folder"),
    _PathSpec("models_dir", "--models-dir", "P2CH_MODELS_DIR", "models",
              "folder for model checkpoints"),
    _PathSpec("runs_dir", "--runs-dir", "P2CH_RUNS_DIR", "runs",
              "folder for TensorBoard runs"),
)


@dataclass(frozen=True)
class Paths:
    """Resolved folders used by every command."""

    data_root: Path
    cache_dir: Path
    models_dir: Path
    runs_dir: Path

    def require_data_root(self) -> Path:
        """The data root, or a clear error saying how to point at one."""
        if not self.data_root.is_dir():
            raise DataError(
                f"data folder {self.data_root} does not exist; pass --data-root DIR "
                "or set P2CH_DATA_ROOT to a LUNA16 folder (subset*/ + CSVs), or make "
                "a synthetic one with `python -m p2ch_luna.synth DIR`"
            )
        return self.data_root


def resolve_paths(
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
    runs_dir: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
) -> Paths:
    """Resolve each folder: explicit value, then environment variable, then default."""
    environ = os.environ if environ is None else environ
    explicit = {"data_root": data_root, "cache_dir": cache_dir,
                "models_dir": models_dir, "runs_dir": runs_dir}
    home = default_data_home(environ)
    resolved = {}
    for spec in PATH_SPECS:
        value = explicit[spec.attribute] or environ.get(spec.env) or home / spec.default_relative
        resolved[spec.attribute] = Path(value).expanduser().resolve()
    return Paths(**resolved)


def add_path_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --data-root/--cache-dir/--models-dir/--runs-dir to a parser."""
    group = parser.add_argument_group("folders (flag, then environment variable, then default)")
    for spec in PATH_SPECS:
        group.add_argument(
            spec.flag,
            dest=spec.attribute,
            default=None,
            metavar="DIR",
            help=f"{spec.help} (env {spec.env}; default data-unversioned/{spec.default_relative})",
        )


def paths_from_args(args: argparse.Namespace) -> Paths:
    return resolve_paths(
        data_root=getattr(args, "data_root", None),
        cache_dir=getattr(args, "cache_dir", None),
        models_dir=getattr(args, "models_dir", None),
        runs_dir=getattr(args, "runs_dir", None),
    )
