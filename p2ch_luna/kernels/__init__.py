"""Triton kernels for CUDA (the classifier's small convolutions, the augmentation's resampling) and their support."""
