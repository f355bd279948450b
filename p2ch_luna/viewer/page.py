"""``index.html`` of a diagnosis: one static page over the slices of :mod:`p2ch_luna.viewer.slices`.

The page needs no server and no network: its script, style and data are inline
and the slice PNGs lie beside it in ``viewer/`` (one folder per series), so it
opens from the output folder, a copy or an unpacked zip. With truth, the
annotated nodules are drawn and listed, found (a finding hits them) or missed (no
candidate does, or only one below the nodule threshold), and ``froc.png`` (which
:func:`p2ch_luna.diagnose.report.write_outputs` writes beside it) is shown with the CPM.
What the page shows of a diagnosis is gathered by :mod:`p2ch_luna.diagnose.viewer_page`.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from p2ch_luna.viewer.slices import ViewerSlices

log = logging.getLogger(__name__)

PAGE_FILE = "index.html"
SLICES_FOLDER = "viewer"
"""Folder beside the page that holds one folder of PNGs per series."""


def series_folder(number: int) -> str:
    """The slices' folder of the ``number``-th series, relative to the page (uids may hold any character)."""
    return f"{SLICES_FOLDER}/series{number:03d}"


def slice_file(kind: str, index: int) -> str:
    """File name of one slice's PNG: ``kind`` is ``ct``, ``lung`` or ``nodule``."""
    return f"{kind}{index:04d}.png"


def render_page(data: dict[str, Any]) -> str:
    """The page's HTML with its style, script and ``data`` inline."""
    assets = resources.files("p2ch_luna.viewer")
    template = assets.joinpath("template.html").read_text(encoding="utf-8")
    # "</" would end the inline <script> early; JSON allows "<\/" for it.
    payload = json.dumps(data, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")
    return (template.replace("/*STYLE*/", assets.joinpath("viewer.css").read_text(encoding="utf-8"))
            .replace("/*SCRIPT*/", assets.joinpath("viewer.js").read_text(encoding="utf-8"))
            .replace("/*DATA*/", payload))


def write_slices(folder: Path, slices: ViewerSlices) -> int:
    """Write one series' slice and mask PNGs into ``folder``; returns their bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(slices.slices):
        (folder / slice_file("ct", index)).write_bytes(data)
    for kind, masks in (("lung", slices.lung_masks), ("nodule", slices.nodule_masks)):
        for index, data in masks.items():
            (folder / slice_file(kind, index)).write_bytes(data)
    return slices.n_bytes
