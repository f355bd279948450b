"""A static browser page of a diagnosis (``DIR/index.html``): axial slices, overlays, findings, truth.

:mod:`p2ch_luna.viewer.slices` stores each CT's slices and masks as small PNGs,
:mod:`p2ch_luna.viewer.page` writes the page that shows them, and
``python -m p2ch_luna.view DIR`` opens it.
"""
