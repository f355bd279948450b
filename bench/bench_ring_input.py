"""An experiment for the classifier's input path: workers writing into a reused shared ring of batch buffers.

    python bench/bench_ring_input.py [--device cuda] [--workers 4 8] [--batch-size 256] [--seconds 5]

Our DataLoader path: each worker stacks a batch into a fresh shared-memory
segment; the main process receives it, touches every page of it for the first
time (on CUDA its pinning thread copies it into pinned memory), and copies it
to the device. The ring path: the main process allocates ``slots`` batch
buffers once, in shared memory (registered as pinned memory on CUDA); a worker
takes a free slot, writes its batch there and returns only the slot number and
the small tensors; the main process copies the slot to the device and frees
the slot once that copy is done (a CUDA event). Same samples, in the same
order: the first batches of both are compared before timing. Printed: samples/s
of loader -> device -> float for both, and their ratio.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.multiprocessing as multiprocessing
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_input import input_arguments, nodule_data  # noqa: E402
from bench_training import step_rate  # noqa: E402
from p2ch_luna.config import TrainConfig  # noqa: E402
from p2ch_luna.datasets import CandidateDataset  # noqa: E402
from p2ch_luna.engine import move_to_device  # noqa: E402
from p2ch_luna.sampling import BalancedSampler  # noqa: E402
from p2ch_luna.tasks import RunContext  # noqa: E402
from p2ch_luna.tasks.base import build_loader, collate_batch  # noqa: E402
from p2ch_luna.tasks.classification import NoduleTask  # noqa: E402

PREFETCH_FACTOR = 2
"""DataLoader's default: batches in flight per worker."""
IN_FLIGHT_COPIES = 4
"""Device copies the main process may have queued before it waits for the oldest."""


class RingBatches(Dataset):
    """``dataset``'s batches, their images written into a free slot of ``ring`` (shared memory)."""

    def __init__(self, dataset: CandidateDataset, ring: torch.Tensor, free_slots: Any) -> None:
        self.dataset, self.ring, self.free_slots = dataset, ring, free_slots

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        slot = self.free_slots.get()
        images = self.ring[slot].numpy()
        labels, centers = [], []
        for position, index in enumerate(indices):
            chunk, center_irc = self.dataset.cache.chunk(self.dataset.series_uids[index],
                                                         self.dataset.centers_xyz[index], self.dataset.chunk_shape_irc)
            images[position, 0] = chunk
            labels.append(int(self.dataset.labels[index]))
            centers.append(center_irc)
        return {"slot": slot, "size": len(indices), "label": torch.tensor(labels, dtype=torch.long),
                "center_irc": torch.as_tensor(np.stack(centers), dtype=torch.long),
                "index": torch.as_tensor(list(indices), dtype=torch.long)}


class RingLoader:
    """Iterates ``(image on device, batch)``; frees each slot once its copy to the device is done."""

    def __init__(self, dataset: CandidateDataset, sampler: BalancedSampler, batch_size: int, workers: int,
                 device: torch.device) -> None:
        slots = workers * PREFETCH_FACTOR + IN_FLIGHT_COPIES + 1
        self.ring = torch.empty((slots, batch_size, 1, *dataset.chunk_shape_irc), dtype=torch.int16).share_memory_()
        self.device = device
        if device.type == "cuda":  # page-locked in place, so copies from a slot are asynchronous
            error = int(torch.cuda.cudart().cudaHostRegister(self.ring.data_ptr(),
                                                             self.ring.numel() * self.ring.element_size(), 1))
            if error:
                raise RuntimeError(f"cudaHostRegister of the ring failed with cudaError {error}")
            if not self.ring.is_pinned():
                raise RuntimeError("the registered ring does not count as pinned memory")
        context = multiprocessing.get_context("fork")
        self.free_slots = context.Queue()
        for slot in range(slots):
            self.free_slots.put(slot)
        self.loader = DataLoader(RingBatches(dataset, self.ring, self.free_slots), batch_size=batch_size,
                                 sampler=sampler, num_workers=workers, prefetch_factor=PREFETCH_FACTOR,
                                 persistent_workers=True, collate_fn=collate_batch, multiprocessing_context=context)
        self.copies: collections.deque[tuple[torch.cuda.Event | None, int]] = collections.deque()

    def __iter__(self):
        for batch in self.loader:
            slot, size = batch.pop("slot"), batch.pop("size")
            image = self.ring[slot, :size].to(self.device, non_blocking=True)
            event = None
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            else:
                image = image.clone()  # the slot is reused: keep a private copy on the CPU
            self.copies.append((event, slot))
            self._free_done_slots()
            yield image, batch

    def _free_done_slots(self) -> None:
        while self.copies:
            event, slot = self.copies[0]
            if event is not None and not event.query():
                if len(self.copies) <= IN_FLIGHT_COPIES:
                    return
                event.synchronize()
            self.copies.popleft()
            self.free_slots.put(slot)


def rates(config: TrainConfig, device: torch.device, seconds: float) -> tuple[float, float]:
    """Samples/s of (our DataLoader, the ring) from sampler to a float batch on the device."""
    task = NoduleTask(RunContext(config, device))
    dataset = task.datasets()[0]

    def sampler() -> BalancedSampler:
        return BalancedSampler(dataset.labels, ratio=config.ratio, epoch_size=config.epoch_size, seed=config.seed)

    ours = iter(build_loader(dataset, sampler(), task.context))
    ring = iter(RingLoader(dataset, sampler(), config.batch_size, config.num_workers, device))
    first_ours = move_to_device(next(ours), device)
    first_image, first_batch = next(ring)
    if not (torch.equal(first_ours["image"], first_image) and torch.equal(first_ours["index"].cpu(),
                                                                          first_batch["index"])):
        raise RuntimeError("the ring loader gave other samples than our loader")

    def ours_step() -> int:
        batch = move_to_device(next(ours), device)
        batch["image"].float()
        return len(batch["label"])

    def ring_step() -> int:
        image, _ = next(ring)
        image.float()
        return len(image)

    return step_rate(ours_step, seconds, device, 4), step_rate(ring_step, seconds, device, 4)


def main(argv: Sequence[str] | None = None) -> int:
    args = input_arguments(__doc__, [4, 8]).parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_ring_") as folder:
        base = nodule_data(Path(folder), args.series, args.batch_size, device)
        for workers in args.workers:
            ours, ring = rates(dataclasses.replace(base, num_workers=workers), device, args.seconds)
            print(f"{workers:3d} workers  our DataLoader {ours:8.0f} samples/s   ring {ring:8.0f} samples/s   "
                  f"ring / ours {ring / ours:5.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
