"""Training batches through a reused ring of shared-memory buffers that the loader workers write into.

A plain DataLoader worker builds each batch in a fresh shared-memory segment.
The main process then pays for every batch: it receives the segment, touches
each of its pages for the first time and, on CUDA, copies it into pinned
memory before the copy to the device. With large batches this hand-over, not
the workers, sets the pace (``bench/bench_batch_transfer.py``).

Here the main process allocates ``slots`` batch buffers once, in shared memory
that is also page-locked on CUDA. It owns the free slots: the batch sampler
hands each batch's sample indices to a worker together with a free slot, the
worker writes the batch's large arrays into that slot
(:meth:`RingDataset.fill_batch`) and sends back only the small values. The
main process starts the slot's copy to the device, on a CUDA stream of its own
so that it overlaps the model step already queued, and frees the slot once that
copy is done (a CUDA event); on the CPU it keeps a private copy and frees the
slot at once. The batches, and so the training, are the same as with the plain
loader.
"""

from __future__ import annotations

import collections
import logging
import os
import weakref
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from p2ch_luna.errors import LunaError

log = logging.getLogger(__name__)

PREFETCH_FACTOR = 2
"""Batches in flight per worker (the DataLoader's default)."""
IN_FLIGHT_COPIES = 4
"""Device copies the main process may have queued before it waits for the oldest one."""
SHARED_MEMORY_DIR = "/dev/shm"
CUDA_HOST_REGISTER_PORTABLE = 1
"""``cudaHostRegisterPortable``: page-locked for every CUDA context (as torch registers shared memory)."""
SLOT_KEY = "ring_slot"
SIZE_KEY = "ring_size"


@runtime_checkable
class RingDataset(Protocol):
    """A map-style dataset that can write a batch's large arrays into given buffers."""

    def __len__(self) -> int: ...

    def ring_arrays(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-sample shape and dtype of each large array of a batch, by batch key."""

    def fill_batch(self, indices: Sequence[int], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """Write the samples ``indices`` into the first ``len(indices)`` rows of each array; the other values."""


def ring_slots(workers: int) -> int:
    """Slots enough that a batch never waits for one: every batch the DataLoader has in flight, the
    batch it has just handed over, and the copies the main process may have queued."""
    return workers * PREFETCH_FACTOR + 1 + IN_FLIGHT_COPIES


def ring_bytes(dataset: RingDataset, batch_size: int, workers: int) -> int:
    """Shared memory that a ring for ``dataset`` takes."""
    per_sample = sum(int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
                     for shape, dtype in dataset.ring_arrays().values())
    return ring_slots(workers) * batch_size * per_sample


def shared_memory_free(folder: str = SHARED_MEMORY_DIR) -> int | None:
    """Bytes free in ``folder`` (the shared-memory file system), or None where there is no such file system."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


class SharedMemoryShortage(LunaError):
    """The batch ring would not fit in the shared-memory file system (raised before anything is allocated)."""

    def __init__(self, needed: int, free: int, folder: str) -> None:
        super().__init__(f"--batch-ring needs {needed / 2**30:.2f} GiB of shared memory but {folder} has "
                         f"{free / 2**30:.2f} GiB free: lower --batch-size or --num-workers, "
                         "or leave out --batch-ring")
        self.needed, self.free = needed, free


def check_shared_memory(needed: int, folder: str = SHARED_MEMORY_DIR) -> None:
    """Raise :class:`SharedMemoryShortage` when ``folder`` (the shared-memory file system) has less than
    ``needed`` bytes free.

    Running out later would kill a process with SIGBUS when it first writes to a page.
    """
    free = shared_memory_free(folder)
    if free is not None and needed > free:
        raise SharedMemoryShortage(needed, free, folder)


class _RingWriter(Dataset):
    """The dataset as the workers see it: each batch written into the slot it comes with."""

    def __init__(self, dataset: RingDataset, buffers: dict[str, torch.Tensor]) -> None:
        self.dataset, self.buffers = dataset, buffers

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, request: tuple[int, list[int]]) -> dict[str, Any]:
        slot, indices = request
        arrays = {key: buffer[slot, : len(indices)].numpy() for key, buffer in self.buffers.items()}
        return {**self.dataset.fill_batch(indices, arrays), SLOT_KEY: slot, SIZE_KEY: len(indices)}


class _SlotBatchSampler(Sampler[tuple[int, list[int]]]):
    """The batches of ``sampler``, each with a free slot of ``ring`` taken as the DataLoader dispatches it."""

    def __init__(self, ring: RingLoader, sampler: Sampler[int], batch_size: int, drop_last: bool) -> None:
        self.ring = ring
        self.batches = BatchSampler(sampler, batch_size, drop_last)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        # Runs up to the first yield only when the DataLoader dispatches an epoch's first batch: after
        # it has collected (and dropped) every batch of an abandoned earlier pass over the data.
        self.ring.reclaim_dispatched_slots()
        for indices in self.batches:
            yield self.ring.take_slot(), indices


class RingLoader:
    """Iterates dict batches like :func:`p2ch_luna.training.tasks.base.build_loader`'s DataLoader, except that the
    ring arrays (the chunks) arrive already on ``device``; other tensors are pinned on CUDA.

    ``sampler`` and ``len()`` behave as the DataLoader's (the engine calls
    ``sampler.set_epoch``); the workers persist across epochs. A pass may be
    abandoned part-way: the next one takes back the slots of the dropped batches.
    """

    def __init__(self, dataset: RingDataset, sampler: Sampler[int], batch_size: int, workers: int,
                 device: torch.device, drop_last: bool = False) -> None:
        if workers < 1:
            raise ValueError("a batch ring needs at least one worker process")
        self.device = device
        self.sampler = sampler
        slots = ring_slots(workers)
        check_shared_memory(ring_bytes(dataset, batch_size, workers))
        self.buffers = {key: torch.empty((slots, batch_size, *shape), dtype=dtype).share_memory_()
                        for key, (shape, dtype) in dataset.ring_arrays().items()}
        self._copy_stream: torch.cuda.Stream | None = None
        if device.type == "cuda":
            for buffer in self.buffers.values():
                _page_lock(buffer)
                weakref.finalize(self, _page_unlock, buffer, os.getpid())
            self._copy_stream = torch.cuda.Stream(device)
        self._free: collections.deque[int] = collections.deque(range(slots))
        self._dispatched: set[int] = set()
        self._copies: collections.deque[tuple[Any, int]] = collections.deque()
        self.loader = DataLoader(_RingWriter(dataset, self.buffers),
                                 batch_sampler=_SlotBatchSampler(self, sampler, batch_size, drop_last),
                                 num_workers=workers, prefetch_factor=PREFETCH_FACTOR, persistent_workers=True,
                                 collate_fn=_pass_through, pin_memory=device.type == "cuda")
        log.info("batch ring: %d slots of %d samples, %.2f GiB of shared memory", slots, batch_size,
                 sum(buffer.numel() * buffer.element_size() for buffer in self.buffers.values()) / 2**30)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            slot, size = batch.pop(SLOT_KEY), batch.pop(SIZE_KEY)
            arrays, done = self._copy_out(slot, size)
            self.copied(slot, done)
            yield {**arrays, **batch}

    def _copy_out(self, slot: int, size: int) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """The slot's first ``size`` rows of each array, out of the slot, and the event that tells when the
        slot is free again (None: at once).

        On CUDA the copies run on a stream of their own, so that a batch's copy overlaps the model step
        queued before it instead of running between two steps; the current stream waits for them before
        it uses the arrays. On the CPU the rows are cloned.
        """
        if self._copy_stream is None:
            return {key: buffer[slot, :size].clone() for key, buffer in self.buffers.items()}, None
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            arrays = {key: buffer[slot, :size].to(self.device, non_blocking=True)
                      for key, buffer in self.buffers.items()}
        done = torch.cuda.Event()
        done.record(self._copy_stream)
        consumer.wait_event(done)
        for array in arrays.values():  # allocated on the copy stream, used and freed on the consumer's
            array.record_stream(consumer)
        return arrays, done

    def copied(self, slot: int, done: Any) -> None:
        """Record that ``slot``'s batch arrived and its copy out was queued; ``done`` (an event with
        ``query``/``synchronize``, or None when the copy is already done) tells when the slot is free."""
        self._dispatched.discard(slot)
        self._copies.append((done, slot))
        self._free_copied_slots()

    def take_slot(self) -> int:
        """A free slot for the batch being dispatched (waiting for the oldest device copy if none is free)."""
        self._free_copied_slots()
        if not self._free and self._copies:
            self._copies[0][0].synchronize()
            self._free_copied_slots()
        if not self._free:
            raise RuntimeError("the batch ring has no free slot: more batches in flight than slots")
        slot = self._free.popleft()
        self._dispatched.add(slot)
        return slot

    def reclaim_dispatched_slots(self) -> None:
        """Free the slots of batches dispatched but never received (dropped with an abandoned pass)."""
        self._free.extend(sorted(self._dispatched))
        self._dispatched.clear()

    def _free_copied_slots(self) -> None:
        """Free the slots whose device copies are done; wait for the oldest while too many are queued."""
        while self._copies:
            event, slot = self._copies[0]
            if event is not None and not event.query():
                if len(self._copies) <= IN_FLIGHT_COPIES:
                    return
                event.synchronize()
            self._copies.popleft()
            self._free.append(slot)


def _pass_through(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _page_lock(buffer: torch.Tensor) -> None:
    """Register ``buffer``'s memory with CUDA as page-locked, so copies from it run asynchronously."""
    size = buffer.numel() * buffer.element_size()
    error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), size, CUDA_HOST_REGISTER_PORTABLE))
    if error:
        raise LunaError(f"could not page-lock the batch ring (cudaHostRegister error {error}); "
                        "leave out --batch-ring")
    if not buffer.is_pinned():
        _page_unlock(buffer, os.getpid())
        raise LunaError("the page-locked batch ring does not count as pinned memory here; leave out --batch-ring")


def _page_unlock(buffer: torch.Tensor, owner_pid: int) -> None:
    """Undo ``_page_lock`` in the process that did it. A forked DataLoader worker inherits the ring and may
    collect it; there CUDA cannot start, and trying killed the worker ("initialization error")."""
    if os.getpid() == owner_pid:
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
