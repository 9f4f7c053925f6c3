"""OpenAI's ModifiedResNet image tower of CLIP (Radford et al. 2021, section 2.4; openai/CLIP ``clip/model.py``).

Three changes to the torchvision ResNet-50 (He et al. 2016):
- a stem of three 3x3 convolutions (the first strided) followed by a 2x2 average pool instead of one 7x7 conv and a
  max pool;
- anti-aliased strided blocks (Zhang 2019): every convolution has stride 1 and a ``stride``-sized average pool
  runs before the last 1x1 conv (and before the 1x1 conv of the shortcut);
- attention pooling instead of global average pooling: the mean of the final feature map is prepended to its
  positions, a learned position embedding is added, and one multi-head attention whose query is that mean token
  (keys/values: mean + all positions) gives the image embedding; its output projection maps to the joint space.

Named submodules replace the original's ``nn.Sequential`` indices (``downsample.0/1`` -> ``downsample.conv/bn``);
the pooling's projections are HfVlAttention's ``q_proj``/``k_proj``/``v_proj``/``out_proj`` (original ``c_proj``).

CPU inference fast path (eval mode, no gradients, eager CPU fp32/bf16, see :func:`.hf_vl_resnet.can_fuse_conv`):
the tower runs channels-last (oneDNN's native layout: no reorder around each convolution, and the average pools
vectorise over channels), every BatchNorm is folded into its convolution and the ReLU and residual addition run as
the convolution's oneDNN post-ops (:func:`.hf_vl_resnet.conv_norm`, shared with DETR's trunk). The folded weights are
cached on the convolutions outside the state dict; training, autograd, ``torch.compile`` and CUDA take the plain
modules.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_hf_vl_clip import HfVlClipVisionConfig
from .hf_vl_attention import HfVlAttention
from .hf_vl_embeddings import interpolate_learned_position_embeddings
from .hf_vl_resnet import can_fuse_conv, conv_norm

EXPANSION = 4  # Bottleneck output channels = planes * 4


def _fast_path(module: nn.Module, hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``module`` runs folded, fused and channels-last (eval-mode CPU inference, see the module docstring)."""
    return not module.training and can_fuse_conv(hidden_states, weight)


class HfVlClipDownsample(nn.Module):
    """Shortcut projection: average pool (anti-aliasing, identity for stride 1), then 1x1 conv + BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, eps: float):
        super().__init__()
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if _fast_path(self, hidden_states, self.conv.weight):
            return conv_norm(self.conv, self.bn, self.pool(hidden_states))
        return self.bn(self.conv(self.pool(hidden_states)))


class HfVlClipBottleneck(GradientCheckpointingLayer):
    """1x1 -> 3x3 -> [avgpool(stride)] -> 1x1 residual block; all convolutions have stride 1.

    A checkpointable layer; note that under activation checkpointing in training mode the recomputation updates the
    BatchNorm running statistics a second time (as for any checkpointed BatchNorm network).
    """

    def __init__(self, in_channels: int, planes: int, stride: int, eps: float):
        super().__init__()
        out_channels = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=eps)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=eps)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=eps)
        self.activation = nn.ReLU()
        needs_projection = stride > 1 or in_channels != out_channels
        self.downsample = HfVlClipDownsample(in_channels, out_channels, stride, eps) if needs_projection else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity = hidden_states if self.downsample is None else self.downsample(hidden_states)
        if _fast_path(self, hidden_states, self.conv1.weight):
            out = conv_norm(self.conv1, self.bn1, hidden_states, relu=True)
            out = conv_norm(self.conv2, self.bn2, out, relu=True)
            return conv_norm(self.conv3, self.bn3, self.pool(out), relu=True, residual=identity)
        out = self.activation(self.bn1(self.conv1(hidden_states)))
        out = self.activation(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.pool(out)))
        return self.activation(out + identity)


class HfVlClipResNetStem(nn.Module):
    """Three 3x3 convs (stride 2, 1, 1; widths w/2, w/2, w) with BatchNorm + ReLU, then a 2x2 average pool."""

    def __init__(self, config: HfVlClipVisionConfig):
        super().__init__()
        width, eps = config.resnet_width, config.batch_norm_eps
        self.conv1 = nn.Conv2d(config.num_channels, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2, eps=eps)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2, eps=eps)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width, eps=eps)
        self.activation = nn.ReLU()
        self.pool = nn.AvgPool2d(2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if _fast_path(self, pixel_values, self.conv1.weight):
            # the whole tower then stays channels-last: convolutions and pools keep the input's memory format
            hidden_states = pixel_values.contiguous(memory_format=torch.channels_last)
            for conv, norm in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
                hidden_states = conv_norm(conv, norm, hidden_states, relu=True)
            return self.pool(hidden_states)
        hidden_states = self.activation(self.bn1(self.conv1(pixel_values)))
        hidden_states = self.activation(self.bn2(self.conv2(hidden_states)))
        hidden_states = self.activation(self.bn3(self.conv3(hidden_states)))
        return self.pool(hidden_states)


class HfVlClipResNetStage(nn.Module):
    """``depth`` Bottlenecks; the first one changes width and (for stages 2-4) halves the resolution."""

    def __init__(self, in_channels: int, planes: int, depth: int, stride: int, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(
            HfVlClipBottleneck(in_channels if i == 0 else planes * EXPANSION, planes, stride if i == 0 else 1, eps)
            for i in range(depth)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


def build_resnet_stages(config: HfVlClipVisionConfig) -> nn.ModuleList:
    """The four stages: planes w, 2w, 4w, 8w (outputs 4x that), strides 1, 2, 2, 2."""
    width, eps = config.resnet_width, config.batch_norm_eps
    stages, in_channels = [], width
    for index, depth in enumerate(config.resnet_depths):
        planes = width * 2**index
        stages.append(HfVlClipResNetStage(in_channels, planes, depth, 1 if index == 0 else 2, eps))
        in_channels = planes * EXPANSION
    return nn.ModuleList(stages)


class HfVlClipAttentionPool2d(HfVlAttention):
    """Attention pooling of the final feature map: the mean token queries mean + spatial tokens.

    An :class:`HfVlAttention` (so the attention kernel follows ``attn_implementation``) whose ``out_proj`` maps the
    ``hidden_size`` features to ``projection_dim`` (the original's ``c_proj``), plus ``position_embedding``
    of shape (1, 1 + grid * grid, hidden_size), grid = image_size / 32.
    """

    def __init__(self, config: HfVlClipVisionConfig):
        super().__init__(config, config.hidden_size, config.num_attention_heads)
        self.out_proj = nn.Linear(config.hidden_size, config.projection_dim)
        self.grid_size = (config.image_size // 32,) * 2
        num_positions = self.grid_size[0] * self.grid_size[1] + 1
        self.position_embedding = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))

    def forward(
        self, feature_map: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """feature_map: (batch, hidden_size, h, w). Returns the pooled (batch, projection_dim) and the attention
        weights (batch, heads, 1, 1 + h*w) or None (a tuple like HfVlAttention's, for ``output_attentions``)."""
        grid = tuple(feature_map.shape[-2:])
        if grid != self.grid_size and not interpolate_pos_encoding:
            raise ValueError(
                f"input image size ({grid[0] * 32}x{grid[1] * 32}) doesn't match the model "
                f"({self.grid_size[0] * 32}x{self.grid_size[1] * 32}); pass interpolate_pos_encoding=True to "
                "resample the attention pool's position embeddings"
            )
        # (batch, hidden, h, w) -> (batch, h*w, hidden)
        tokens = feature_map.flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (batch, 1 + h*w, hidden)
        position = interpolate_learned_position_embeddings(self.position_embedding, self.grid_size, grid)
        tokens = tokens + position.to(tokens.dtype)
        # only the mean token's output is used, so it is the only query (the original computes all and keeps x[0])
        pooled, weights = super().forward(tokens[:, :1], key_value_states=tokens, **kwargs)
        return pooled[:, 0], weights


__all__ = [
    "HfVlClipAttentionPool2d",
    "HfVlClipBottleneck",
    "HfVlClipDownsample",
    "HfVlClipResNetStage",
    "HfVlClipResNetStem",
    "build_resnet_stages",
]
