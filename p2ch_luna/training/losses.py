"""Segmentation losses: the book's soft Dice loss with false-negative weighting (chapter 13)."""

from __future__ import annotations

import torch

DICE_EPSILON = 1.0
"""Added to the Dice numerator and denominator, so an empty label and empty prediction score 1."""
BOOK_FN_LOSS_WEIGHT = 8.0
"""Weight of the false-negative Dice term in the book's segmentation training."""


def dice_loss(prediction: torch.Tensor, label: torch.Tensor, epsilon: float = DICE_EPSILON) -> torch.Tensor:
    """Per-sample soft Dice loss ``1 - (2|P·L| + eps) / (|P| + |L| + eps)`` of (B, ...) tensors."""
    label = label.to(prediction.dtype)
    dims = tuple(range(1, prediction.dim()))
    correct = (prediction * label).sum(dim=dims)
    ratio = (2 * correct + epsilon) / (prediction.sum(dim=dims) + label.sum(dim=dims) + epsilon)
    return 1 - ratio


def segmentation_loss(probabilities: torch.Tensor, label: torch.Tensor,
                      fn_weight: float = BOOK_FN_LOSS_WEIGHT, epsilon: float = DICE_EPSILON) -> torch.Tensor:
    """Per-sample book loss: Dice loss plus ``fn_weight`` times the Dice loss of the prediction inside the label.

    The second term only sees predicted probability on label pixels, so it
    penalises missed nodule pixels (false negatives) and never false positives:
    recall is worth more than precision for a detector's first stage.
    """
    label = label.to(probabilities.dtype)
    return dice_loss(probabilities, label, epsilon) + fn_weight * dice_loss(probabilities * label, label, epsilon)
