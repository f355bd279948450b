"""Pure metric functions over NumPy arrays and pandas tables (no plotting, no text formatting).

- :mod:`~p2ch_luna.metrics.classification`: accuracy per class, precision/recall/F1, exact ROC AUC, curves;
- :mod:`~p2ch_luna.metrics.segmentation`: pixel dice/precision/recall from counts (rates as the book reports them);
- :mod:`~p2ch_luna.metrics.froc`: LUNA16 detection scoring: FROC curve, CPM and a bootstrap confidence
  interval, following the challenge's official ``noduleCADEvaluationLUNA16.py``;
- :mod:`~p2ch_luna.metrics.calibration`: expected calibration error and temperature scaling of binary logits;
- :mod:`~p2ch_luna.metrics.confusion`: the book's chapter-14 confusion table (non-nodule/benign/malignant
  against miss/filtered/benign/malignant).

Undefined ratios (0/0, a class absent) are ``nan``, never a warning or an error.
"""
