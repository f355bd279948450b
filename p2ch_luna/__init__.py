"""p2ch_luna: an end-to-end lung-nodule pipeline for chest CT.

Part II of *Deep Learning with PyTorch* (chapters 9-14) as a package: LUNA16 data
layer, chunk cache, nodule/malignancy classifiers, a 2D U-Net segmenter, and a
diagnosis pipeline with LUNA16 scoring. See README.md for the commands.
"""

__version__ = "0.1.0"

RESEARCH_NOTICE = "Research software, not a medical device: do not use its findings for clinical decisions."
"""Said by the README, ``diagnose --help``, every printed report and every report.json."""
