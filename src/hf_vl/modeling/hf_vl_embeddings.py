"""Position embeddings shared by hf_vl's architectures.

- :func:`interpolate_learned_position_embeddings`: resample a learned 2-D grid of position embeddings (ViT, CLIP,
  MoCo v3) to another image size, bicubic as in DINO / timm (``resample_abs_pos_embed``).
- :func:`sine_position_embedding_2d`: the fixed sine encoding of DETR (Carion et al. 2020, ``PositionEmbeddingSine``
  in facebookresearch/detr ``models/position_encoding.py``), normalised coordinates scaled by 2*pi.
- :class:`HfVlRandomFourierPositionEmbedding`: SAM's random Fourier features (Tancik et al. 2020;
  ``PositionEmbeddingRandom`` in segment-anything ``modeling/prompt_encoder.py``).
- :func:`sinusoidal_position_embedding_1d`: the sinusoids of "Attention Is All You Need" section 3.5.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def interpolate_learned_position_embeddings(
    position_embeddings: torch.Tensor,
    grid_size: tuple[int, int],
    new_grid_size: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample learned position embeddings to a new patch grid.

    position_embeddings: (1, num_prefix_tokens + gh * gw, dim). Returns (1, num_prefix_tokens + nh * nw, dim).
    The prefix (class token) embeddings are kept as they are.
    """
    if tuple(grid_size) == tuple(new_grid_size):
        return position_embeddings
    prefix = position_embeddings[:, :num_prefix_tokens]
    grid = position_embeddings[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    # (1, gh*gw, dim) -> (1, dim, gh, gw) for image interpolation
    grid = grid.reshape(1, grid_size[0], grid_size[1], dim).permute(0, 3, 1, 2)
    # bicubic in fp32: interpolation of bf16 grids loses precision and is unsupported on some backends
    grid = nn.functional.interpolate(
        grid.float(), size=tuple(new_grid_size), mode="bicubic", align_corners=False, antialias=False
    ).to(position_embeddings.dtype)
    # (1, dim, nh, nw) -> (1, nh*nw, dim)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([prefix, grid], dim=1)


def sine_position_embedding_2d(
    mask: torch.Tensor,
    num_pos_feats: int = 128,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
) -> torch.Tensor:
    """DETR's sine encoding. mask: (batch, h, w), True where pixels are valid. Returns (batch, 2*num_pos_feats, h, w)."""
    not_pad = mask.to(torch.float32)
    y_embed = not_pad.cumsum(1)
    x_embed = not_pad.cumsum(2)
    if normalize:
        eps = 1e-6  # detr models/position_encoding.py: avoids 0/0 on fully padded rows
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t  # (batch, h, w, num_pos_feats)
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sinusoidal_position_embedding_1d(length: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al. 2017 section 3.5: sin on even, cos on odd channels. Returns (length, dim)."""
    if dim % 2 != 0:
        raise ValueError(f"dim must be even for sinusoidal position embeddings, got {dim}")
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(base) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


class HfVlRandomFourierPositionEmbedding(nn.Module):
    """SAM's positional encoding with random spatial frequencies.

    The Gaussian matrix is a buffer (saved, not trained), as in segment-anything, where it is
    ``positional_encoding_gaussian_matrix`` with scale 1.0.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float = 1.0):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords: (..., 2) normalised to [0, 1]. Returns (..., 2 * num_pos_feats)."""
        matrix = self.positional_encoding_gaussian_matrix
        # computed in the matrix dtype: segment-anything fails in bf16 when fp32 meets bf16 coordinates
        coords = (2 * coords.to(matrix.dtype) - 1) @ matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Dense encoding of an (h, w) grid of cell centres. Returns (2 * num_pos_feats, h, w)."""
        h, w = size
        matrix = self.positional_encoding_gaussian_matrix
        y = (torch.arange(h, device=matrix.device, dtype=matrix.dtype) + 0.5) / h
        x = (torch.arange(w, device=matrix.device, dtype=matrix.dtype) + 0.5) / w
        grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self.encode(grid).permute(2, 0, 1)
