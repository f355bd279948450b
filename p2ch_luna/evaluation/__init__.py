"""Scoring diagnoses against truth: annotated nodules, the book's confusion table, the LUNA16 FROC,
and the text and figures that show them. Pure metrics live in :mod:`p2ch_luna.metrics`."""
