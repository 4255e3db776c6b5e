"""The distributed side of python -m echo.train: process group, DDP or FSDP2 wrapping, and the gradient
norm and clipping that see FSDP2's sharded gradients (DTensor) and plain ones alike."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from .model import Echo


def dist_setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def wrap(model: Echo, world: int, device: torch.device, fsdp: bool):
    """(the module to train: the model, DDP of it, or the model made FSDP2 in place; replicated parameters).

    FSDP2 (`fully_shard`) shards the whole model as one unit: Echo builds every Givens matrix M once per
    forward at its root, so all parameters are gathered for the forward and resharded after it.
    fully_shard cannot shard 0-d parameters (each attention's scale s): those stay replicated, and their
    gradients are averaged across processes by `sync_replicated`.
    """
    if world == 1 and not fsdp:
        return model, []
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        replicated = [p for p in model.parameters() if p.dim() == 0]
        fully_shard(model, ignored_params=set(replicated))
        return model, replicated
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None), []


def sync_replicated(params: list, world: int) -> None:
    """Average the gradients of parameters that FSDP2 left replicated."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def _local_grads(params) -> list[Tensor]:
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    return [g.to_local() if isinstance(g, DTensor) else g for g in grads]


def gradient_norm(params, world: int) -> Tensor:
    """() float32: the 2-norm of all gradients, plain and FSDP2-sharded (DTensor) alike, on every process.

    Sharded gradients' squares are summed across processes; plain ones are whole and equal everywhere
    (DDP and sync_replicated averaged them).
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    device = grads[0].device if not sharded else sharded[0].device
    sq_sharded = sum((g.float().pow(2).sum() for g in sharded), torch.zeros((), device=device))
    if sharded and world > 1:
        dist.all_reduce(sq_sharded)
    sq_plain = sum((g.float().pow(2).sum() for g in plain), torch.zeros((), device=device))
    return (sq_sharded + sq_plain).sqrt()


def clip_gradients(params, max_norm: float, norm: Tensor) -> None:
    """clip_grad_norm_ given the total norm from gradient_norm()."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in _local_grads(params):
        g.mul_(coef.to(g.dtype))
