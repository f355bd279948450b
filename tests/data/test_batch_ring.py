"""The batch ring: the same batches as the plain loader, slots reused safely, clear errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import torch

from p2ch_luna.data.batch_ring import RingDataset, RingLoader, _page_unlock, check_shared_memory, ring_bytes, ring_slots
from p2ch_luna.data.cache import ChunkCache
from p2ch_luna.data.candidates import CandidateDataset, nodule_table
from p2ch_luna.data.luna import read_candidate_table
from p2ch_luna.data.sampling import BalancedSampler, set_sampler_epoch
from p2ch_luna.errors import LunaError
from p2ch_luna.paths import resolve_paths
from p2ch_luna.training.config import TrainConfig
from p2ch_luna.training.tasks import RunContext, build_loader
from tests.batch_checks import assert_same_batch

CHUNK = (8, 12, 12)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> CandidateDataset:
    cache = ChunkCache(tmp_path_factory.mktemp("cache"), tiny_dataset)
    return CandidateDataset(nodule_table(read_candidate_table(tiny_dataset)), cache, CHUNK)


def _context(tmp_path: Path, workers: int, batch_size: int) -> RunContext:
    paths = resolve_paths(tmp_path, tmp_path / "cache", tmp_path / "models", tmp_path / "runs")
    return RunContext(TrainConfig(task="nodule", paths=paths, batch_size=batch_size, num_workers=workers), CPU)


def _epochs(loader: Any, epochs: int) -> list[dict[str, Any]]:
    batches = []
    for epoch in range(1, epochs + 1):
        set_sampler_epoch(loader, epoch)
        batches.extend(loader)
    return batches


@pytest.mark.parametrize("workers", [1, 2])
def test_ring_gives_the_plain_loaders_batches_over_epochs(dataset: CandidateDataset, tmp_path: Path,
                                                          workers: int) -> None:
    # 30 samples in batches of 4: 8 batches an epoch, the last one short; more batches than slots,
    # so slots are reused, and every batch kept from earlier must still hold its own chunks.
    context = _context(tmp_path, workers, batch_size=4)

    def sampler() -> BalancedSampler:
        return BalancedSampler(dataset.labels, ratio=2, epoch_size=30, seed=4)

    plain = _epochs(build_loader(dataset, sampler(), context), 3)
    ring_loader = build_loader(dataset, sampler(), context, ring=True)
    assert isinstance(ring_loader, RingLoader) and len(ring_loader) == 8
    ringed = _epochs(ring_loader, 3)
    assert len(ringed) == len(plain) == 24 > ring_slots(workers)
    assert [len(batch["label"]) for batch in ringed[:8]] == [4] * 7 + [2]
    for expected, got in zip(plain, ringed):
        assert_same_batch(got, expected)
    assert not torch.equal(ringed[0]["index"], ringed[8]["index"])  # epochs are reshuffled


def test_abandoned_passes_give_their_slots_back(dataset: CandidateDataset, tmp_path: Path) -> None:
    # Each pass stopped after 2 batches leaves the batches in flight undelivered; their slots must
    # come back, or after a few passes no batch could be dispatched at all.
    context = _context(tmp_path, workers=2, batch_size=3)
    sampler = BalancedSampler(dataset.labels, ratio=1, epoch_size=60, seed=2)
    loader = build_loader(dataset, sampler, context, ring=True)
    for _ in range(2 * ring_slots(2)):
        for position, _batch in enumerate(loader):
            if position == 1:
                break
    plain = list(build_loader(dataset, sampler, context))
    ringed = list(loader)
    assert len(ringed) == len(plain) == 20
    assert all(torch.equal(got["image"], expected["image"]) for got, expected in zip(ringed, plain))


class FailingDataset(CandidateDataset):
    """Fails on one row, as a damaged CT would."""

    bad_index = 3

    def fill_batch(self, indices: Sequence[int], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.bad_index in indices:
            raise ValueError(f"row {self.bad_index} is damaged")
        return super().fill_batch(indices, arrays)


def test_a_worker_error_reaches_the_training_process(dataset: CandidateDataset, tmp_path: Path) -> None:
    failing = FailingDataset(dataset.table, dataset.cache, CHUNK)
    assert isinstance(failing, RingDataset)
    loader = RingLoader(failing, [0, 1, 2, 3, 4, 5], batch_size=2, workers=1, device=CPU)
    with pytest.raises(ValueError, match="row 3 is damaged"):
        list(loader)


def test_shared_memory_shortage_is_a_clear_error(dataset: CandidateDataset, tmp_path: Path) -> None:
    needed = ring_bytes(dataset, batch_size=256, workers=16)
    assert needed == ring_slots(16) * 256 * int(np.prod(CHUNK)) * 2  # int16 chunks
    check_shared_memory(1, str(tmp_path))  # fits
    with pytest.raises(LunaError, match=r"--batch-ring needs .* GiB of shared memory .* lower --batch-size"):
        check_shared_memory(2**62, str(tmp_path))
    check_shared_memory(2**62, str(tmp_path / "missing"))  # no such file system: nothing to check


def test_ring_needs_workers(dataset: CandidateDataset) -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        RingLoader(dataset, [0, 1], batch_size=2, workers=0, device=CPU)


def test_training_with_too_little_shared_memory_stops_with_one_line(tiny_dataset: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    from p2ch_luna.training import cli as training

    code = training.main(["nodule", "--data-root", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache"),
                          "--models-dir", str(tmp_path / "models"), "--runs-dir", str(tmp_path / "runs"),
                          "--device", "cpu", "--num-workers", "1", "--batch-ring", "--batch-size", "100000000",
                          "--epoch-size", "16", "--balanced", "--log-level", "WARNING"])
    error = capsys.readouterr().err.strip()
    assert code == 1 and "Traceback" not in error and len(error.splitlines()) == 1
    assert "--batch-ring needs" in error and "lower --batch-size" in error
    assert not list((tmp_path / "models").glob("*.state"))


class FakeCopyEvent:
    """Stands in for the CUDA event of a slot's copy to the device (this test has no GPU)."""

    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


def test_slots_come_back_when_their_device_copies_are_done(dataset: CandidateDataset) -> None:
    """The CUDA slot accounting, driven by hand: a slot is reused only after its copy has finished."""
    loader = RingLoader(dataset, list(range(8)), batch_size=2, workers=1, device=CPU)
    slots = [loader.take_slot() for _ in range(ring_slots(1))]
    assert sorted(slots) == list(range(ring_slots(1)))
    events = [FakeCopyEvent() for _ in range(3)]
    for slot, event in zip(slots, events):
        loader.copied(slot, event)
    assert not any(event.waited for event in events)  # copies still running, few in flight: nobody waits
    assert loader.take_slot() == slots[0] and events[0].waited  # no free slot: wait for the oldest copy
    events[1].done = True
    late_event = FakeCopyEvent()
    loader.copied(slots[3], late_event)  # a new arrival frees the finished copies...
    assert not events[2].waited and not late_event.waited
    assert loader.take_slot() == slots[1]  # ...so this slot comes back without waiting
    more = [FakeCopyEvent() for _ in range(3)]
    for slot, event in zip(slots[4:], more):
        loader.copied(slot, event)  # now more copies in flight than IN_FLIGHT_COPIES: the oldest are awaited
    assert events[2].waited and not late_event.waited and not more[0].waited
    # Slots 0 and 1 went out again but their batches never arrived (a pass abandoned part-way):
    # the next pass takes them back, along with slot 2, whose copy was awaited above.
    loader.reclaim_dispatched_slots()
    assert sorted(loader.take_slot() for _ in range(3)) == sorted(slots[:3])
    assert loader.take_slot() == slots[3] and late_event.waited


def test_a_forked_process_leaves_the_page_locked_ring_to_its_owner() -> None:
    """A DataLoader worker forked after a CUDA ring was made may collect it; undoing the page lock there would
    start CUDA in the fork and kill the worker (seen on an H200). Here CUDA cannot start at all in the child
    (no device in CI), so the child exits 0 only if it leaves the buffer alone."""
    buffer = torch.zeros(16)
    owner = os.getpid()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            _page_unlock(buffer, owner)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("asked", [None, True])
def test_too_little_shared_memory_drops_a_default_ring_but_not_an_asked_for_one(
        dataset: CandidateDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        asked: bool | None) -> None:
    import dataclasses

    context = _context(tmp_path, workers=1, batch_size=4)
    context = dataclasses.replace(context, config=dataclasses.replace(context.config, batch_ring=asked))
    monkeypatch.setattr("p2ch_luna.data.batch_ring.shared_memory_free", lambda folder=None: 1000)  # bytes: too few
    if asked is None:  # the default on CUDA: a warning, and the plain loader's batches
        loader = build_loader(dataset, list(range(8)), context, ring=True)
        assert not isinstance(loader, RingLoader)
        assert "no batch ring" in caplog.text and "--no-batch-ring" in caplog.text
        assert len(list(loader)) == 2
    else:  # --batch-ring: the clear error
        with pytest.raises(LunaError, match="--batch-ring needs"):
            build_loader(dataset, list(range(8)), context, ring=True)
