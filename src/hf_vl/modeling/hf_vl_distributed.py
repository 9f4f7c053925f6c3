"""The one torch.distributed user of hf_vl: rank queries and an all-gather that keeps gradients.

Losses that need the global batch (CLIP's contrastive loss, MoCo/SwAV statistics) take ``gather_distributed=`` and
call these helpers, so they stay pure, single-process testable functions (lightly's pattern, not SwAV's global
``args``). Without an initialised process group every helper degrades to the single-process answer.

``all_gather_with_grad`` is open_clip's ``gather_features(..., gather_with_grad=True)``
(``torch.distributed.nn.all_gather``, reimplemented as one small autograd function): the backward pass sums the
gradients every rank computed for a slice and hands each rank the sum for its own rows, so per-rank losses over
gathered features train like one big batch.
Unlike open_clip it also accepts ranks with different batch sizes (a short last batch), by padding to the largest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def gather_batch_sizes(local_size: int, device: torch.device) -> list[int]:
    """Batch size of every rank, in rank order (``[local_size]`` when not distributed)."""
    if not is_distributed():
        return [local_size]
    size = torch.tensor([local_size], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather (padded to the largest batch). Backward: sum every rank's gradient of the gathered
    tensor, keep this rank's rows. Same gradients as ``torch.distributed.nn.all_gather`` (deprecated in torch
    2.14, and emulated with scatters on gloo), with one all-reduce on every backend."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, batch_sizes: tuple[int, ...]) -> torch.Tensor:
        ctx.batch_sizes = batch_sizes
        largest = max(batch_sizes)
        if tensor.shape[0] < largest:
            # Collectives need equal shapes: pad with zeros, drop the padding after the gather.
            padding = tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))
            tensor = torch.cat([tensor, padding], dim=0)
        parts = [torch.empty_like(tensor) for _ in batch_sizes]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, batch_sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.contiguous().clone()  # (global_batch, ...), summed in place below
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.batch_sizes[: dist.get_rank()])
        return grad[start : start + ctx.batch_sizes[dist.get_rank()]], None


def all_gather_with_grad(tensor: torch.Tensor, batch_sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, gradients flowing back to every rank's local rows.

    Args:
        tensor: (local_batch, ...) on this rank.
        batch_sizes: every rank's local batch size if already known (see ``gather_batch_sizes``); gathered otherwise.

    Returns:
        (sum(batch_sizes), ...): rank 0's rows first. The input itself when not distributed.
    """
    if not is_distributed():
        return tensor
    if batch_sizes is None:
        batch_sizes = gather_batch_sizes(tensor.shape[0], tensor.device)
    if len(batch_sizes) != world_size() or batch_sizes[rank()] != tensor.shape[0]:
        raise ValueError(
            f"batch_sizes={batch_sizes} does not fit world size {world_size()} and this rank's {tensor.shape[0]} rows"
        )
    return _AllGatherWithGrad.apply(tensor, tuple(batch_sizes))


__all__ = ["all_gather_with_grad", "gather_batch_sizes", "is_distributed", "rank", "world_size"]
