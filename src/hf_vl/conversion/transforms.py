"""Pure tensor transforms for conversion rules (:mod:`hf_vl.conversion.rules`).

Each function takes and returns tensors, checks the input rank (a wrong rule fails with the shape, not later inside
``load_state_dict``) and never reads a config: the sizes it needs are in the tensor shapes. Add a transform here when
a second converter can use it; one-off transforms stay in their ``convert_hf_vl_<arch>.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def _check_ndim(tensor: Tensor, ndim: int, what: str) -> None:
    if tensor.ndim != ndim:
        raise ValueError(f"{what} expects a {ndim}-D tensor, got shape {tuple(tensor.shape)}")


def transpose(tensor: Tensor) -> Tensor:
    """TF/JAX dense kernel (in, out) -> ``nn.Linear`` weight (out, in); also OpenAI CLIP's ``x @ P`` projections."""
    _check_ndim(tensor, 2, "transpose")
    return tensor.T


def split_qkv(tensor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fused q, k, v rows (timm ``attn.qkv``, ``in_proj_weight``): (3 * d, ...) -> three (d, ...) in q, k, v order."""
    if tensor.ndim not in (1, 2) or tensor.shape[0] % 3 != 0:
        raise ValueError(f"split_qkv expects a (3*d,) or (3*d, in) tensor, got shape {tuple(tensor.shape)}")
    query, key, value = tensor.chunk(3, dim=0)
    return query, key, value


def concat_rows(tensors: Sequence[Tensor]) -> Tensor:
    """Stack tensors along rows (dim 0): the inverse of :func:`split_qkv`, for :class:`~.rules.Merge`."""
    return torch.cat(list(tensors), dim=0)


def conv_hwio_to_oihw(tensor: Tensor) -> Tensor:
    """TF/JAX conv kernel (kh, kw, in, out) -> ``nn.Conv2d`` weight (out, in, kh, kw)."""
    _check_ndim(tensor, 4, "conv_hwio_to_oihw")
    return tensor.permute(3, 2, 0, 1)


def dense_general_in_to_linear(tensor: Tensor) -> Tensor:
    """Flax ``DenseGeneral`` q/k/v kernel (in, heads, head_dim) -> ``nn.Linear`` weight (heads * head_dim, in)."""
    _check_ndim(tensor, 3, "dense_general_in_to_linear")
    # (in, heads, head_dim) -> (in, heads * head_dim) -> (heads * head_dim, in)
    return tensor.reshape(tensor.shape[0], -1).T


def dense_general_out_to_linear(tensor: Tensor) -> Tensor:
    """Flax ``DenseGeneral`` output kernel (heads, head_dim, out) -> ``nn.Linear`` weight (out, heads * head_dim)."""
    _check_ndim(tensor, 3, "dense_general_out_to_linear")
    # (heads, head_dim, out) -> (heads * head_dim, out) -> (out, heads * head_dim)
    return tensor.reshape(-1, tensor.shape[-1]).T


def flatten_heads(tensor: Tensor) -> Tensor:
    """Flax ``DenseGeneral`` q/k/v bias (heads, head_dim) -> ``nn.Linear`` bias (heads * head_dim,)."""
    _check_ndim(tensor, 2, "flatten_heads")
    return tensor.reshape(-1)


__all__ = [
    "concat_rows",
    "conv_hwio_to_oihw",
    "dense_general_in_to_linear",
    "dense_general_out_to_linear",
    "flatten_heads",
    "split_qkv",
    "transpose",
]
