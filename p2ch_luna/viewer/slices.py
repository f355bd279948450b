"""A CT's axial slices and masks as PNGs a static page can show at either window preset.

Each slice is one 8-bit grey PNG in a two-segment companding of HU: codes
0-127 span [-1350, -160) HU (the lung window's low end to the mediastinum
window's), 128-255 span [-160, 240) HU (the mediastinum window). Both presets
(lung -600/1500, mediastinum 40/400) clip outside [-1350, 240], so one image
serves both: the page maps codes to grey with a lookup table built from
:data:`CODE_SEGMENTS`; the lung window gets 9.3 HU steps, the mediastinum
window 3.1 HU steps. PNG is lossless: lossy WebP at half the size shifts the shown HU
by up to 100 (docs/benchmarks.md, "Viewer page size").

The masks are 1-bit palette PNGs with a transparent background, one per slice
that holds any of the mask; slices without are left out.
"""

from __future__ import annotations

import dataclasses
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from p2ch_luna.io.ct import Ct

CODE_SEGMENTS: tuple[tuple[int, int, float, float], ...] = ((0, 128, -1350.0, -160.0), (128, 256, -160.0, 240.0))
"""(first code, end code, HU at the first code's lower edge, HU at the end code's lower edge) per segment."""
WINDOW_PRESETS: dict[str, tuple[float, float]] = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0)}
"""Window name -> (centre, width) in HU."""
SLICE_PNG_LEVEL = 6
"""zlib level of the slice PNGs: level 1 is 5% larger for 20% less encoding time (docs/benchmarks.md)."""
LUNG_COLOUR = (64, 200, 120, 45)
NODULE_COLOUR = (255, 60, 60, 120)
"""RGBA of the mask overlays."""


@dataclasses.dataclass
class ViewerSlices:
    """One CT as the viewer stores it: a PNG per slice, and per mask the PNGs of the slices that hold it."""

    slices: list[bytes]
    lung_masks: dict[int, bytes]
    nodule_masks: dict[int, bytes]

    @property
    def n_bytes(self) -> int:
        return sum(map(len, self.slices)) + sum(map(len, self.lung_masks.values())) + sum(
            map(len, self.nodule_masks.values()))


def hu_to_codes(hu: np.ndarray) -> np.ndarray:
    """HU -> the 8-bit codes of :data:`CODE_SEGMENTS` (clipped at both ends)."""
    values = np.asarray(hu, dtype=np.float32)
    codes = np.zeros(values.shape, dtype=np.uint8)
    for first, end, low_hu, high_hu in CODE_SEGMENTS:
        step = (high_hu - low_hu) / (end - first)
        inside = values >= low_hu if first else np.ones(values.shape, dtype=bool)
        codes[inside] = np.clip(first + np.floor((values[inside] - low_hu) / step), first, end - 1).astype(np.uint8)
    return codes


def codes_to_hu(codes: np.ndarray) -> np.ndarray:
    """The HU at the centre of each code's interval (what the page shows for it)."""
    codes = np.asarray(codes, dtype=np.float64)
    hu = np.zeros(codes.shape)
    for first, end, low_hu, high_hu in CODE_SEGMENTS:
        step = (high_hu - low_hu) / (end - first)
        inside = (codes >= first) & (codes < end)
        hu[inside] = low_hu + (codes[inside] - first + 0.5) * step
    return hu


def encode_ct(ct: Ct, lung_mask: np.ndarray, nodule_mask: np.ndarray, workers: int | None = None) -> ViewerSlices:
    """Every axial slice of ``ct`` and of both masks as PNG bytes, encoded on ``workers`` threads (default: one
    per CPU; zlib releases the GIL, so threads give the same bytes sooner: python -m bench.bench_viewer)."""
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        slices = list(pool.map(_slice_png, ct.hu))
        lung_masks = _mask_pngs(lung_mask, LUNG_COLOUR, pool)
        nodule_masks = _mask_pngs(nodule_mask, NODULE_COLOUR, pool)
    return ViewerSlices(slices=slices, lung_masks=lung_masks, nodule_masks=nodule_masks)


def _slice_png(plane: np.ndarray) -> bytes:
    return _png(Image.fromarray(hu_to_codes(plane)), SLICE_PNG_LEVEL)


def _mask_pngs(mask: np.ndarray, colour: tuple[int, int, int, int], pool: ThreadPoolExecutor) -> dict[int, bytes]:
    palette = [0, 0, 0, *colour[:3]]

    def encode(index: int) -> bytes:
        plane = np.ascontiguousarray(mask[index], dtype=np.uint8)
        image = Image.frombytes("P", (plane.shape[1], plane.shape[0]), plane.tobytes())
        image.putpalette(palette, rawmode="RGB")
        return _png(image, 9, bits=1, transparency=bytes([0, colour[3]]))

    indices = [int(index) for index in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))]
    return dict(zip(indices, pool.map(encode, indices)))


def _png(image: Image.Image, level: int, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=level, **options)
    return buffer.getvalue()
