"""Step 4 of diagnosis: a classifier's probability for a chunk around each candidate."""

from __future__ import annotations

import numpy as np
import torch

from p2ch_luna.diagnose.inference import autocast, host_to_device, progress_bar
from p2ch_luna.io.ct import extract_chunk
from p2ch_luna.models.classifier import CHUNK_SHAPE_IRC
from p2ch_luna.models.layout import to_memory_format

CPU_CLASSIFICATION_BATCH = 16
"""Candidates per classifier batch on the CPU (x4 mirror views: 64 chunks), the fastest batch in
channels-last there (``python -m bench.bench_diagnose``)."""
CUDA_CLASSIFICATION_BATCH = 64


def classify_chunks(hu: np.ndarray, centers_irc: np.ndarray, model: torch.nn.Module, batch_size: int,
                    device: torch.device, amp: bool = False, flips: bool = False,
                    progress: bool = False, description: str = "classification",
                    temperature: float = 1.0, bias: float = 0.0) -> np.ndarray:
    """Probability of class 1, ``sigmoid((logit_1 - logit_0) / temperature + bias)`` (the checkpoint's
    calibration; the softmax when they are 1 and 0), for a chunk around each voxel centre.

    With ``flips`` the probability is the mean over the chunk and its three
    in-plane mirror images (test-time augmentation with the training flips).
    The next batch is cut on the host while the device computes this one:
    the scores are read back after the last batch. ``progress`` shows a bar of
    the candidates on a terminal.
    """
    shape = tuple(getattr(model, "input_shape", CHUNK_SHAPE_IRC))
    scores = []
    with torch.inference_mode(), autocast(device, amp), progress_bar(len(centers_irc), description, "candidate",
                                                            progress) as bar:
        for start in range(0, len(centers_irc), batch_size):
            batch = centers_irc[start : start + batch_size]
            bar.update(len(batch))
            chunks = np.stack([extract_chunk(hu, center, shape) for center in batch])
            inputs = host_to_device(chunks, device).unsqueeze(1).float()
            views = [inputs, inputs.flip(3), inputs.flip(4), inputs.flip((3, 4))] if flips else [inputs]
            logits = model(to_memory_format(torch.cat(views), channels_last=True)).float()
            probabilities = torch.sigmoid((logits[:, 1] - logits[:, 0]) / temperature + bias)
            scores.append(probabilities.reshape(len(views), len(batch)).mean(dim=0))
    if not scores:
        return np.zeros(0, dtype=np.float64)
    return torch.cat(scores).cpu().numpy().astype(np.float64)  # the one wait for the device
