"""Process-group helpers for runs started with ``torchrun`` (one process otherwise).

``torchrun --nproc-per-node N -m p2ch_luna.training ...`` sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; multi-node runs use torchrun's own ``--nnodes``
and ``--rdzv-*`` flags, nothing here changes. Without those variables (or
with ``WORLD_SIZE=1``) no process group is created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from p2ch_luna.errors import UsageError

log = logging.getLogger(__name__)

PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)
Item = TypeVar("Item")


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """This process's place in the run: rank, world size, rank on its node and processes on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_info_from_env(environ: dict[str, str] | None = None) -> DistributedInfo:
    """Rank, world size, local rank and local world size from torchrun's environment variables."""
    environ = dict(os.environ) if environ is None else environ
    try:
        world_size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", "0"))
        local_world_size = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError as error:
        raise UsageError(f"WORLD_SIZE/RANK/LOCAL_RANK/LOCAL_WORLD_SIZE must be integers: {error}") from None
    return DistributedInfo(rank=rank, world_size=world_size, local_rank=local_rank,
                           local_world_size=local_world_size)


def resolve_device(request: str, info: DistributedInfo) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; or the device asked for."""
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(request)
    except RuntimeError:
        raise UsageError(f"--device {request!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {request}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info.is_distributed else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    return device


def init_distributed(info: DistributedInfo, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, Gloo on the CPU) when the run has several processes."""
    if not info.is_distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT, **kwargs)
    log.info("process group: rank %d of %d (%s, %s)", info.rank, info.world_size, backend, device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (just ``[value]`` in one process)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (so all ranks stop together on an error)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (e.g. the run's timestamp)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (batch-norm running statistics) to every rank before validation."""
    if not is_distributed():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=src)


# ---------------------------------------------------------------------------
# Work split across ranks and gathered on rank 0 (diagnosis: series as Python objects, over gloo)


def shard(items: Sequence[Item], rank: int, world_size: int) -> list[Item]:
    """This rank's share of the work: every ``world_size``-th item from ``rank``."""
    return list(items[rank::world_size])


def merge_shards(shards: Sequence[Sequence[Item]], order: Sequence[str], key: Callable[[Item], str]) -> list[Item]:
    """All ranks' results in the order their keys were asked for (unknown keys last)."""
    position = {name: i for i, name in enumerate(order)}
    merged = [item for part in shards for item in part]
    return sorted(merged, key=lambda item: position.get(key(item), len(position)))


def gather_to_main(value: Any, info: DistributedInfo) -> list[Any] | None:
    """Every rank's ``value`` in rank order on rank 0, None on the other ranks."""
    if not info.is_distributed:
        return [value]
    gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


@contextlib.contextmanager
def process_group(info: DistributedInfo) -> Iterator[None]:
    """A gloo process group (results are gathered as Python objects) for torchrun runs."""
    created = False
    if info.is_distributed and not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()
