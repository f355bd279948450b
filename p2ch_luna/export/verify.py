"""An exported model checked against the PyTorch model it came from, on fixed inputs.

Inputs are seeded, in the HU range the models see, at batch 1 and 3 (the dynamic batch), the segmenter's
also at an odd slice size (its padding). Agreement is judged on what diagnosis uses, the probabilities
(calibrated ones for a classifier, the voxel sigmoid for the segmenter): at most
:data:`PROBABILITY_TOLERANCE` apart, and the logits within :data:`LOGIT_RTOL`/:data:`LOGIT_ATOL`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from p2ch_luna.export.exporters import example_input

PROBABILITY_TOLERANCE = 1e-3
"""Largest difference of a probability allowed between the exported model and PyTorch: float32 rounding of
other kernels, which grows with the activations' scale (the book's trained models: at most 2e-5; untrained
ones fed raw HU: up to 3e-4)."""
LOGIT_RTOL = 1e-3
LOGIT_ATOL = 1e-3
VERIFY_CASES = ((1, (64, 80)), (3, (53, 71)))
"""(batch, segmenter slice height and width) of the fixed inputs."""


@dataclasses.dataclass(frozen=True)
class Agreement:
    """Largest differences seen over the fixed inputs, and whether they are within the tolerance."""

    max_logit_difference: float
    max_probability_difference: float
    within_tolerance: bool
    batches: tuple[int, ...]


def probabilities(logits: torch.Tensor, task: str, temperature: float, bias: float) -> torch.Tensor:
    """What diagnosis makes of the logits: calibrated class-1 probability, or the segmenter's sigmoid."""
    if task == "segmentation":
        return torch.sigmoid(logits)
    return torch.sigmoid((logits[:, 1] - logits[:, 0]) / temperature + bias)


def compare(reference: torch.nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], task: str,
            temperature: float = 1.0, bias: float = 0.0) -> Agreement:
    """Run both on the fixed inputs and measure how far apart they are."""
    logit_difference = probability_difference = 0.0
    within = True
    for seed, (batch, slice_shape) in enumerate(VERIFY_CASES):
        inputs = example_input(reference, task, batch, slice_shape, seed=seed)
        with torch.inference_mode():
            expected = reference(inputs).float()
            got = torch.as_tensor(exported(inputs)).float()
        if got.shape != expected.shape:
            return Agreement(float("inf"), float("inf"), False, tuple(b for b, _ in VERIFY_CASES))
        logit_difference = max(logit_difference, float((got - expected).abs().max()))
        probability_difference = max(probability_difference, float(
            (probabilities(got, task, temperature, bias) - probabilities(expected, task, temperature, bias))
            .abs().max()))
        within = within and torch.allclose(got, expected, rtol=LOGIT_RTOL, atol=LOGIT_ATOL)
    within = within and probability_difference <= PROBABILITY_TOLERANCE
    return Agreement(logit_difference, probability_difference, within, tuple(b for b, _ in VERIFY_CASES))
