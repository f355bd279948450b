"""The findings' figures: windows around a finding, and one figure redrawn per finding with nothing left over."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from p2ch_luna.diagnose import figures
from p2ch_luna.geometry import Geometry
from p2ch_luna.io.ct import HU_MIN, Ct


def _ct(seed: int = 0) -> Ct:
    """A small CT: air, a body of soft tissue, and two dense balls, 1.5 mm slices of 0.8 mm pixels."""
    rng = np.random.default_rng(seed)
    shape = (40, 96, 110)
    index, row, col = np.indices(shape)
    hu = np.where((row - 48) ** 2 / 40**2 + (col - 55) ** 2 / 48**2 < 1, 40, -1000)
    hu[((row - 40) ** 2 + (col - 35) ** 2 < 18**2)] = -850
    for center in ((20, 40, 35), (12, 60, 80)):
        hu[(index - center[0]) ** 2 * 1.5**2 + ((row - center[1]) ** 2 + (col - center[2]) ** 2) * 0.8**2 < 16] = 60
    hu = hu + rng.normal(0, 5, shape)
    geometry = Geometry(np.zeros(3), np.array([0.8, 0.8, 1.5]), np.eye(3), shape)
    return Ct(hu=hu.astype(np.int16), geometry=geometry, series_uid="1.2.3")


def _findings(centers: list[tuple[int, int, int]], diameters: list[float]) -> pd.DataFrame:
    centers_array = np.asarray(centers, dtype=float)
    return pd.DataFrame({
        "index": centers_array[:, 0], "row": centers_array[:, 1], "col": centers_array[:, 2],
        "diameter_mm": diameters, "nodule_probability": np.linspace(0.95, 0.6, len(centers)),
        "malignancy_probability": [0.7] + [np.nan] * (len(centers) - 1),
        "center_x": 1.0, "center_y": 2.0, "center_z": 3.0,
    })


def test_view_window_centres_and_pads() -> None:
    plane = np.arange(20).reshape(4, 5)
    inside = figures.view_window(plane, (2, 2), (1, 1), -1)
    assert np.array_equal(inside, plane[1:4, 1:4])
    corner = figures.view_window(plane, (0, 4), (1, 2), -1)
    assert np.array_equal(corner, [[-1, -1, -1, -1, -1], [2, 3, 4, -1, -1], [7, 8, 9, -1, -1]])
    wider = figures.view_window(plane, (1, 2), (3, 4), -1)
    assert wider.shape == (7, 9)
    assert np.array_equal(wider[2:6, 2:7], plane) and np.count_nonzero(wider == -1) == 7 * 9 - 20


def test_a_redrawn_figure_equals_a_fresh_one() -> None:
    ct = _ct()
    lungs = ct.hu < -500
    found = _findings([(20, 40, 35), (12, 60, 80), (0, 0, 0)], [8.0, 4.0, 20.0])
    drawn = figures.render_findings(ct, found, lungs)  # one figure, redrawn for each finding
    assert list(drawn) == [f"1.2.3_finding{n:03d}.png" for n in (1, 2, 3)]
    for number, (_, row) in enumerate(found.iterrows(), start=1):
        assert drawn[f"1.2.3_finding{number:03d}.png"] == figures.render_finding(ct, row, number, lungs)
    assert len(set(drawn.values())) == 3
    # Without lungs the contours are gone, not left over from the figure before.
    assert figures.render_findings(ct, found, None)["1.2.3_finding001.png"] != drawn["1.2.3_finding001.png"]


def test_figure_marks_the_finding_in_each_view() -> None:
    ct = _ct()
    found = _findings([(20, 40, 35)], [8.0])
    png = figures.render_finding(ct, found.iloc[0], 1, ct.hu < -500)
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert image.shape == (round(4.4 * figures.FIGURE_DPI), 12 * figures.FIGURE_DPI, 3)
    red = (image[:, :, 0] > 200) & (image[:, :, 1] < 80) & (image[:, :, 2] < 80)
    blue_lines = (image[:, :, 2] > image[:, :, 0] + 60)  # the lung contour
    for third in np.array_split(np.arange(image.shape[1]), 3):
        assert red[:, third].sum() > 20  # the circle
        assert blue_lines[:, third].sum() > 20
    # Each circle is centred on its panel's image, where the finding is.
    rows, cols = np.nonzero(red)
    for third in np.array_split(np.arange(image.shape[1]), 3):
        in_third = (cols >= third[0]) & (cols <= third[-1])
        assert abs(cols[in_third].mean() - (third[0] + third[-1]) / 2) < 0.05 * len(third)


@pytest.mark.parametrize("center", [(0, 48, 8), (39, 48, 100)])
def test_views_beyond_the_ct_show_air(center: tuple[int, int, int]) -> None:
    ct = _ct()
    figure = figures.FindingFigure(ct.geometry.spacing_irc)
    figure.render(ct, _findings([center], [6.0]).iloc[0], 1)
    for image in figure.images:
        data = np.asarray(image.get_array())
        assert (data == HU_MIN).any() and (data > -200).any()  # padding and part of the body


def _red_width(png: bytes) -> int:
    """Width in pixels of the red circle in the axial (first) panel."""
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    axial = image[:, : image.shape[1] // 3]
    cols = np.nonzero((axial[:, :, 0] > 200) & (axial[:, :, 1] < 80) & (axial[:, :, 2] < 80))[1]
    return int(cols.max() - cols.min())


def test_the_circle_grows_with_the_finding() -> None:
    ct = _ct()
    small, large = _findings([(20, 40, 35), (20, 40, 35)], [4.0, 24.0]).iterrows()
    small_width = _red_width(figures.render_finding(ct, small[1], 1))
    large_width = _red_width(figures.render_finding(ct, large[1], 1))
    # Radius: half the diameter (at least 3 mm) plus 2 mm: 3.5 mm against 14 mm.
    assert large_width / small_width == pytest.approx(14.0 / 3.5, rel=0.15)
