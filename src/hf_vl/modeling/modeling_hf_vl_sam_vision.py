"""SAM's image encoder: a ViTDet backbone (Li et al. 2022, "Exploring Plain Vision Transformer Backbones for Object
Detection", https://arxiv.org/abs/2203.16527) as used by Segment Anything (Kirillov et al. 2023,
https://arxiv.org/abs/2304.02643). Original: facebookresearch/segment-anything @dca509f
``segment_anything/modeling/image_encoder.py`` (``ImageEncoderViT``, ``Block``, ``Attention``, ``window_partition``,
``add_decomposed_rel_pos``).

Deviations from the original:
- q/k/v are separate ``nn.Linear`` layers (the original's fused ``qkv`` is split on conversion), so attention goes
  through hf_vl's one attention (:class:`.hf_vl_attention.HfVlAttention`, its q/k/v/out projections and CPU fast
  path) and transformers' ``ALL_ATTENTION_FUNCTIONS`` (SDPA by default, eager selectable).
- The decomposed relative position bias (MViTv2) depends on the queries, so it cannot be precomputed: it is computed
  from the projected queries and passed to the attention kernel as an additive float mask, which SDPA accepts.
- Windows are folded into the head dimension, (batch, windows * heads, window_len, head_dim), not into the batch:
  the same arithmetic, and attention weights keep the image batch as their first dimension.
- The neck's ``nn.Sequential`` (``neck.0`` ... ``neck.3``) has named modules ``conv1``, ``layer_norm1``, ``conv2``,
  ``layer_norm2``; block norms are ``layer_norm1``/``layer_norm2``, the MLP ``fc1``/``fc2``.
- Input must be ``image_size`` square (the processor pads); other sizes raise instead of failing in the position add.
- At inference (autograd off, SDPA, oneDNN's fused linears) a windowed block projects q/k/v on the grid's cells and
  gives the windows' padding cells the projections' biases, which is what the original's zero padding projects to;
  the output is projected on the cells, the residual added in the same call (:meth:`HfVlSamVisionAttention.
  _attend_grid`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_hf_vl_sam import HfVlSamVisionConfig
from .hf_vl_attention import HfVlAttention, eager_attention_forward
from .hf_vl_mlp import HfVlMlp, can_fuse_linear, can_fuse_residual, fused_linear


class HfVlSamLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (batch, channels, height, width) map (detectron2/ConvNeXt ``LayerNorm2d``)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # (batch, C, h, w) -> (batch, h, w, C) -> normalise C -> back
        return super().forward(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def window_partition(hidden_states: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(batch, h, w, C) -> (batch, windows, window_size**2, C), zero-padding h and w up to multiples of the window.

    Returns the windows and the padded (h, w)."""
    batch, height, width, channels = hidden_states.shape
    pad_h = (window_size - height % window_size) % window_size
    pad_w = (window_size - width % window_size) % window_size
    if pad_h or pad_w:
        hidden_states = F.pad(hidden_states, (0, 0, 0, pad_w, 0, pad_h))
    padded = (height + pad_h, width + pad_w)
    rows, cols = padded[0] // window_size, padded[1] // window_size
    # (batch, rows, ws, cols, ws, C) -> (batch, rows, cols, ws, ws, C) -> (batch, rows * cols, ws * ws, C)
    windows = hidden_states.view(batch, rows, window_size, cols, window_size, channels).permute(0, 1, 3, 2, 4, 5)
    return windows.reshape(batch, rows * cols, window_size * window_size, channels), padded


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (batch, windows, window_size**2, C) -> (batch, h, w, C), padding removed."""
    batch, _, _, channels = windows.shape
    rows, cols = padded[0] // window_size, padded[1] // window_size
    # (batch, rows * cols, ws * ws, C) -> (batch, rows, ws, cols, ws, C) -> (batch, padded_h, padded_w, C)
    hidden_states = windows.view(batch, rows, cols, window_size, window_size, channels).permute(0, 1, 3, 2, 4, 5)
    hidden_states = hidden_states.reshape(batch, padded[0], padded[1], channels)
    return hidden_states[:, : size[0], : size[1]]


def _window_slabs(size: int, window_size: int) -> list[tuple[int, int, int]]:
    """One axis of a grid cut into windows: (first window, number of windows, cells per window) for the full windows
    and, when the side does not divide, the last, partial one."""
    full, rest = divmod(size, window_size)
    return ([(0, full, window_size)] if full else []) + ([(full, 1, rest)] if rest else [])


def _copy_grid_windows(grid: torch.Tensor, windows: torch.Tensor, to_windows: bool) -> None:
    """Copy between a (batch, h, w, ...) grid and its (batch, rows, cols, ws, ws, ...) windows (either may be a
    strided view), one rectangular slab of whole windows at a time; the windows' padding cells are not touched."""
    window_size = windows.shape[3]
    for row, rows, height in _window_slabs(grid.shape[1], window_size):
        for col, cols, width in _window_slabs(grid.shape[2], window_size):
            top, left = row * window_size, col * window_size
            slab = grid[:, top : top + rows * height, left : left + cols * width]
            # (batch, rows * height, cols * width, ...) -> (batch, rows, cols, height, width, ...)
            slab = slab.unflatten(2, (cols, width)).unflatten(1, (rows, height)).transpose(2, 3)
            cells = windows[:, row : row + rows, col : col + cols, :height, :width]
            (cells if to_windows else slab).copy_(slab if to_windows else cells)


def get_relative_positions(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Embeddings of the relative positions between ``q_size`` queries and ``k_size`` keys along one axis.

    rel_pos: (2 * max(q_size, k_size) - 1, head_dim), linearly resized if its length differs (as the original).
    Returns (q_size, k_size, head_dim)."""
    max_distance = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_distance:
        # (L, d) -> (1, d, L) -> resize L -> (max_distance, d)
        resized = F.interpolate(rel_pos.T.unsqueeze(0).float(), size=max_distance, mode="linear")
        rel_pos = resized.squeeze(0).T.to(rel_pos.dtype)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def decomposed_relative_position_bias(
    query: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int],
    workspace: dict | None = None,
) -> torch.Tensor:
    """MViTv2's decomposed relative position bias as an additive attention mask.

    query: (batch, heads, h * w, head_dim), unscaled. Returns (batch, heads, h * w, h * w):
    ``bias[q, k] = q . Rh[q_row, k_row] + q . Rw[q_col, k_col]``. ``workspace``: a dict holding one flat buffer
    per dtype and device that the mask is written into (autograd off only; :func:`workspace_buffer`): a global
    block's mask is hundreds of MB, and a fresh one is a fresh mapping whose page faults cost ~4x the sum itself
    here (bench_sam, bf16)."""
    batch, heads, length, head_dim = query.shape
    height, width = size
    r_h = get_relative_positions(height, height, rel_pos_h)  # (h, h, d)
    r_w = get_relative_positions(width, width, rel_pos_w)  # (w, w, d)
    grid_query = query.reshape(batch * heads, height, width, head_dim)
    # contiguous: einsum may return permuted views, and the broadcast sum below then inherits their layout, so the
    # final reshape copied the whole (heads, h*w, h*w) mask (2x slower in all, measured in bench_sam)
    bias_h = torch.einsum("bhwc,hkc->bhwk", grid_query, r_h).contiguous()  # (B*heads, h, w, k_h)
    bias_w = torch.einsum("bhwc,wkc->bhwk", grid_query, r_w).contiguous()  # (B*heads, h, w, k_w)
    # (B*heads, h, w, k_h, 1) + (B*heads, h, w, 1, k_w) -> (batch, heads, h*w, k_h*k_w)
    shape = (batch * heads, height, width, height, width)
    if workspace is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        bias = bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]
    else:
        out = workspace_buffer(workspace, shape, bias_h)
        bias = torch.add(bias_h[:, :, :, :, None], bias_w[:, :, :, None, :], out=out)
    return bias.reshape(batch, heads, length, length)


def workspace_buffer(workspace: dict, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``shape`` tensor of ``like``'s dtype and device, viewing the front of ``workspace``'s flat
    buffer for them, which is replaced by a larger one when too small. One buffer serves every block's mask, as
    each is consumed by its block's attention before the next block writes one; kept across calls (the automatic
    mask generator's workspace), it is mapped once rather than once per image."""
    key, numel = (like.dtype, like.device), math.prod(shape)
    flat = workspace.get(key)
    # an inference tensor (made under inference_mode) cannot be written outside it: then a new one
    if flat is None or flat.numel() < numel or (flat.is_inference() and not torch.is_inference_mode_enabled()):
        workspace[key] = flat = like.new_empty(numel)
    return flat[:numel].view(shape)


class HfVlSamVisionAttention(HfVlAttention):
    """Windowed or global self-attention with the decomposed relative position bias.

    Input (batch, windows, window_len, hidden): windows are attended independently (global blocks: one window of the
    whole grid). ``rel_pos_h``/``rel_pos_w``: (2 * side - 1, head_dim) per axis, ``side`` the window (or grid) side.
    """

    def __init__(self, config: HfVlSamVisionConfig, side: int):
        super().__init__(
            config,
            config.hidden_size,
            config.num_attention_heads,
            dropout=config.attention_dropout,
            bias=config.qkv_bias,
        )
        self.side = side
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * side - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * side - 1, self.head_dim))

    def can_attend_grid(self, grid: torch.Tensor, residual: torch.Tensor) -> bool:
        """Whether :meth:`forward` may take the (batch, h, w, hidden) grid itself (``grid_window``): CPU inference
        with SDPA and oneDNN's fused linears, autograd off."""
        return (
            self.config._attn_implementation == "sdpa"
            and not torch.is_grad_enabled()
            and (not self.training or self.dropout == 0.0)
            and can_fuse_linear(grid, *self._qkv_params(), self.out_proj.weight, self.out_proj.bias)
            and can_fuse_residual(residual, grid, self.out_proj.out_features)
        )

    def _attend_grid(self, grid: torch.Tensor, window_size: int, residual: torch.Tensor,
                     workspace: dict | None) -> torch.Tensor:  # fmt: skip
        """``residual`` + windowed attention over the (batch, h, w, hidden) ``grid``, without a padded grid: q/k/v
        are projected on the h*w cells only and copied into the windows, whose padding cells take the projections'
        biases (what the original's zero padding projects to, exactly); the output is copied back to the cells,
        projected there, and the residual added in the same oneDNN call. The window partition of the normalised
        input, its padding, the per-tensor head folds, two output transposes and the un-partition were each a copy
        (vit_b, one windowed block, paired rounds: bf16 227 -> 209 ms, fp32 382 -> 367 ms; see the SAM card)."""
        batch, height, width, hidden = grid.shape
        heads, head_dim = self.num_heads, self.head_dim
        rows, cols = -(-height // window_size), -(-width // window_size)
        weight, bias = self.fast_weights("qkv", (self.q_proj, self.k_proj, self.v_proj), batch * height * width)
        qkv = fused_linear(grid.reshape(batch, height * width, hidden), weight, bias)
        # (3, batch, rows, cols, heads, ws, ws, head_dim): SDPA's (batch, windows * heads, ws * ws, head_dim) x 3
        states = qkv.new_empty(3, batch, rows, cols, heads, window_size, window_size, head_dim)
        windows = states.permute(1, 2, 3, 5, 6, 0, 4, 7)  # (batch, rows, cols, ws, ws, 3, heads, head_dim)
        _copy_grid_windows(qkv.view(batch, height, width, 3, heads, head_dim), windows, to_windows=True)
        fill = qkv.new_zeros(3 * hidden) if bias is None else bias
        fill = fill.view(3, heads, head_dim)
        if rows * window_size > height:  # the last row of windows: cells below the grid
            windows[:, -1, :, height - (rows - 1) * window_size :] = fill
        if cols * window_size > width:  # the last column of windows: cells right of the grid
            windows[:, :, -1, :, width - (cols - 1) * window_size :] = fill
        query, key, value = states.view(3, batch, rows * cols * heads, window_size * window_size, head_dim).unbind(0)
        mask = decomposed_relative_position_bias(query, self.rel_pos_h, self.rel_pos_w, (window_size, window_size),
                                                 workspace)  # fmt: skip
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.dtype), scale=self.scaling)
        # (batch, rows * cols * heads, ws * ws, head_dim) -> windows (batch, rows, cols, ws, ws, heads, head_dim)
        output = output.unflatten(2, (window_size, window_size)).unflatten(1, (rows, cols, heads))
        cells = output.new_empty(batch, height, width, heads, head_dim)
        _copy_grid_windows(cells, output.permute(0, 1, 2, 4, 5, 3, 6), to_windows=False)
        weight, bias = self.fast_weights("out", (self.out_proj,), batch * height * width)
        return fused_linear(cells.view(batch, height, width, hidden), weight, bias, residual=residual)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, workspace: dict | None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Attention of the folded (batch, windows * heads, len, head_dim) q/k/v with the relative-position mask,
        through transformers' attention interface: (batch, len, windows * heads, head_dim) and the weights."""
        bias = decomposed_relative_position_bias(query, self.rel_pos_h, self.rel_pos_w, (self.side, self.side),
                                                 workspace)  # fmt: skip
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return attention_interface(
            self,
            query,
            key,
            value,
            bias.to(query.dtype),
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )

    def forward(
        self, hidden_states: torch.Tensor, rel_pos_workspace: dict | None = None, grid_window: int = 0,
        residual: torch.Tensor | None = None, **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``rel_pos_workspace``: buffers for the bias mask shared by the blocks of one encoder call (see
        :func:`decomposed_relative_position_bias`). ``grid_window`` (only where :meth:`can_attend_grid`):
        ``hidden_states`` is the (batch, h, w, hidden) grid, attended in windows of this size, and the output is
        ``residual`` plus the attention's, on the grid (weights: None, as with SDPA)."""
        if grid_window:
            return self._attend_grid(hidden_states, grid_window, residual, rel_pos_workspace), None
        batch, windows, length, hidden = hidden_states.shape
        flat = hidden_states.reshape(batch, windows * length, hidden)
        fast = can_fuse_linear(flat, *self._qkv_params(), self.out_proj.weight, self.out_proj.bias)
        query, key, value = self._project_qkv(flat, flat, flat, fast)

        def fold(states: torch.Tensor) -> torch.Tensor:
            # (batch, heads, windows * len, d) -> (batch, windows * heads, len, d): windows act as extra heads
            states = states.reshape(batch, self.num_heads, windows, length, self.head_dim).transpose(1, 2)
            return states.reshape(batch, windows * self.num_heads, length, self.head_dim)

        query, key, value = fold(query), fold(key), fold(value)
        if rel_pos_workspace is None or batch == 1:
            attn_output, attn_weights = self._attend(query, key, value, rel_pos_workspace, **kwargs)
        else:
            # one image at a time: the mask is (windows * heads) x len^2 per image (a global block's: 400 MB in bf16),
            # so a batch's peak memory and a kept workspace (the generator's) stay at one image's mask
            pairs = [self._attend(*(t[i : i + 1] for t in (query, key, value)), rel_pos_workspace, **kwargs)
                     for i in range(batch)]  # fmt: skip
            attn_output = torch.cat([output for output, _ in pairs])
            attn_weights = None if pairs[0][1] is None else torch.cat([weights for _, weights in pairs])
        # (batch, len, windows * heads, d) -> (batch, len, windows, heads * d) -> (batch, windows, len, hidden)
        attn_output = attn_output.reshape(batch, length, windows, hidden).transpose(1, 2)
        if fast:
            weight, out_bias = self.fast_weights("out", (self.out_proj,), batch * windows * length)
            return fused_linear(attn_output.contiguous(), weight, out_bias), attn_weights
        return self.out_proj(attn_output), attn_weights


class HfVlSamVisionLayer(GradientCheckpointingLayer):
    """Pre-norm ViT block; windowed (``window_size > 0``) or global attention."""

    def __init__(self, config: HfVlSamVisionConfig, window_size: int):
        super().__init__()
        self.window_size = window_size
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = HfVlSamVisionAttention(config, window_size if window_size > 0 else config.grid_size)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = HfVlMlp(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        """hidden_states: (batch, h, w, hidden). Returns the same shape."""
        batch, height, width, hidden = hidden_states.shape
        normed = self.layer_norm1(hidden_states)
        if self.window_size > 0 and self.self_attn.can_attend_grid(normed, hidden_states):
            hidden_states, _ = self.self_attn(normed, grid_window=self.window_size, residual=hidden_states, **kwargs)
            return self.mlp(self.layer_norm2(hidden_states), residual=hidden_states)
        if self.window_size > 0:
            windows, padded = window_partition(normed, self.window_size)
        else:
            windows = normed.reshape(batch, 1, height * width, hidden)  # one window: the whole grid
        attn_output, _ = self.self_attn(windows, **kwargs)
        if self.window_size > 0:
            attn_output = window_unpartition(attn_output, self.window_size, padded, (height, width))
        hidden_states = hidden_states + attn_output.reshape(batch, height, width, hidden)
        return self.mlp(self.layer_norm2(hidden_states), residual=hidden_states)


class HfVlSamVisionNeck(nn.Module):
    """conv 1x1 (no bias) -> LayerNorm2d -> conv 3x3 (no bias) -> LayerNorm2d: hidden -> ``output_channels``."""

    def __init__(self, config: HfVlSamVisionConfig):
        super().__init__()
        channels = config.output_channels
        self.conv1 = nn.Conv2d(config.hidden_size, channels, kernel_size=1, bias=False)
        self.layer_norm1 = HfVlSamLayerNorm2d(channels, eps=config.layer_norm_eps)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.layer_norm2 = HfVlSamLayerNorm2d(channels, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, hidden, h, w) -> (batch, output_channels, h, w)."""
        return self.layer_norm2(self.conv2(self.layer_norm1(self.conv1(hidden_states))))


class HfVlSamVisionEncoder(nn.Module):
    """Patch embedding + absolute position embedding, ViTDet blocks, neck. Pixels -> image embedding."""

    def __init__(self, config: HfVlSamVisionConfig):
        super().__init__()
        self.config = config
        grid = config.grid_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Parameter(torch.zeros(1, grid, grid, config.hidden_size))
        global_layers = set(config.global_attn_indexes)
        self.layers = nn.ModuleList(
            HfVlSamVisionLayer(config, 0 if index in global_layers else config.window_size)
            for index in range(config.num_hidden_layers)
        )
        self.neck = HfVlSamVisionNeck(config)

    def forward(self, pixel_values: torch.Tensor, rel_pos_workspace: dict | None = None, **kwargs) -> torch.Tensor:
        """pixel_values: (batch, channels, image_size, image_size). Returns (batch, output_channels, grid, grid).

        ``rel_pos_workspace``: a dict, owned by the caller, in which the blocks' bias-mask buffer stays between calls
        (autograd off only; :func:`workspace_buffer`). It then keeps the largest mask resident (vit_b's global
        blocks: 12 x 4096^2 elements, 400 MB in bf16; one image's whatever the batch, as the blocks then attend image
        by image), and spares every later call mapping it afresh (up to ~0.45 s of page faults per image, bf16, on
        this project's CPU, where the kernel must compact memory for huge pages: see the SAM card). Default: a new
        buffer per call, freed when it returns."""
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (batch, {expected[0]}, {expected[1]}, {expected[2]}) (resized and "
                f"padded by the image processor), got {tuple(pixel_values.shape)}"
            )
        if rel_pos_workspace is not None and not isinstance(rel_pos_workspace, dict):
            raise TypeError(f"rel_pos_workspace must be a dict or None, got {type(rel_pos_workspace).__name__}")
        # (batch, hidden, grid, grid) -> (batch, grid, grid, hidden): the blocks work channels-last on the grid
        hidden_states = self.patch_embedding(pixel_values).permute(0, 2, 3, 1) + self.position_embedding
        # one bias-mask buffer for this call's blocks (autograd off only), the caller's or freed when the call returns
        workspace = None if torch.is_grad_enabled() else {} if rel_pos_workspace is None else rel_pos_workspace
        for layer in self.layers:
            hidden_states = layer(hidden_states, rel_pos_workspace=workspace, **kwargs)
        return self.neck(hidden_states.permute(0, 3, 1, 2))


__all__ = ["HfVlSamLayerNorm2d", "HfVlSamVisionAttention", "HfVlSamVisionEncoder", "HfVlSamVisionLayer"]
