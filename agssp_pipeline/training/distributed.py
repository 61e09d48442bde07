"""torchrun / DDP plumbing for AGBP: the same entry point runs on one device or many.

``torchrun --nproc_per_node=4 -m agssp_pipeline.training.agbp --config agssp.yaml --backbone yolov8s``
sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init_distributed` reads them, joins the process
group (NCCL on CUDA, Gloo on CPU) and pins each rank to ``cuda:LOCAL_RANK``. Without those variables it
is a single process on the requested device. Only rank 0 writes checkpoints, lineage and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda``/``cuda:1``/``cpu``/``mps`` are taken as given."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{preference}' requested but CUDA is not available on this machine")
    return device


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; otherwise a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(rank=0, local_rank=0, world_size=1, device=resolve_device(device_preference))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    base = resolve_device(device_preference)
    if base.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = base
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.barrier()


def mean_across_ranks(value: float, ctx: DistContext) -> float:
    """Average a scalar over ranks (loss logging); identity for one process."""
    if not ctx.distributed:
        return float(value)
    tensor = torch.tensor([float(value)], device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / ctx.world_size


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's value on every rank (run id, resume decision), so all ranks agree."""
    if not ctx.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
