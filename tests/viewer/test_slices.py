"""The viewer's slice codes, mask PNGs and page: exact at both window presets, transparent masks, safe inline data."""

from __future__ import annotations

import io
import json
import re

import numpy as np
from PIL import Image

from p2ch_luna.geometry import Geometry
from p2ch_luna.io.ct import Ct
from p2ch_luna.viewer.page import render_page
from p2ch_luna.viewer.slices import CODE_SEGMENTS, WINDOW_PRESETS, codes_to_hu, encode_ct, hu_to_codes


def _window(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.clip((hu - (centre - width / 2)) / width, 0, 1)


def test_codes_keep_both_window_presets_within_half_a_step() -> None:
    hu = np.arange(-3024, 3072, 0.5)
    codes = hu_to_codes(hu)
    assert codes.dtype == np.uint8 and codes.min() == 0 and codes.max() == 255
    shown = codes_to_hu(codes)
    for first, end, low, high in CODE_SEGMENTS:
        step = (high - low) / (end - first)
        inside = (hu >= low) & (hu < high)
        assert np.abs(shown[inside] - hu[inside]).max() <= step / 2 + 1e-9
    for centre, width in WINDOW_PRESETS.values():  # outside [-1350, 240] both presets clip anyway
        error = np.abs(_window(shown, centre, width) - _window(hu, centre, width))
        assert error.max() <= (CODE_SEGMENTS[0][3] - CODE_SEGMENTS[0][2]) / 128 / 2 / width + 1e-9
    assert np.all(np.diff(codes.astype(int)) >= 0)  # monotonic: no HU shows brighter than a higher one


def test_encode_ct_writes_a_png_per_slice_and_masks_only_where_they_are() -> None:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1100, 400, size=(4, 20, 30)).astype(np.int16)
    ct = Ct(hu=hu, geometry=Geometry(np.zeros(3), np.ones(3), np.eye(3), hu.shape), series_uid="1.2")
    lungs = np.zeros(hu.shape, dtype=bool)
    lungs[1:3, 5:15, 5:25] = True
    nodules = np.zeros(hu.shape, dtype=bool)
    nodules[2, 8:10, 8:10] = True
    slices = encode_ct(ct, lungs, nodules)
    assert len(slices.slices) == 4 and sorted(slices.lung_masks) == [1, 2] and sorted(slices.nodule_masks) == [2]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(slices.slices[3]))), hu_to_codes(hu[3]))
    overlay = np.asarray(Image.open(io.BytesIO(slices.nodule_masks[2])).convert("RGBA"))
    assert np.array_equal(overlay[..., 3] > 0, nodules[2])  # transparent outside the mask


def test_inline_data_cannot_close_the_script() -> None:
    page = render_page({"series": [{"uid": "</script><script>alert(1)</script>"}]})
    data = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data)["series"][0]["uid"] == "</script><script>alert(1)</script>"
