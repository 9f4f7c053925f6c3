"""The ResNet trunk shared by hf_vl's CNN-based architectures (DETR; MoCo, SwAV and ViLD reuse it).

He et al. 2016, "Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385, as implemented by
torchvision (``torchvision.models.resnet``, "v1.5": stride on the 3x3 convolution), which is what DETR, MoCo and SwAV
trained with. The modules are torchvision's own, built without weights, so parameter names and numerics are
torchvision's: ``conv1``, ``bn1``, ``layer{1..4}.{block}.{conv,bn}{1..3}``.

Options:
- ``frozen_batch_norm=True`` uses :class:`HfVlFrozenBatchNorm2d` (fixed statistics and affine parameters, no
  ``num_batches_tracked``), as DETR does; ``False`` keeps trainable ``nn.BatchNorm2d`` (MoCo, SwAV pre-training).
- ``dilation=True`` replaces the stride of ``layer4`` with dilation (DETR's DC5 models), same keys.
- ``out_features`` picks the feature maps returned (``"layer4"`` for DETR detection; ``layer1``..``layer4`` for the
  panoptic head or an FPN).

Known deviation from the house key rule (style.md section 5.7): block indices sit directly under the stage
(``layer1.0.conv1``), not under a plural ``ModuleList`` name. These are torchvision's, DETR's, MoCo's and SwAV's
checkpoint names, kept so that converters of those checkpoints stay renames; the stages are ``nn.ModuleList`` here.

Deviations from torchvision (both cheap and numerically neutral up to float rounding):
- The shortcut ``downsample`` of each stage's first block is torchvision's ``nn.Sequential(conv, bn)``, keys
  ``downsample.0`` / ``downsample.1``; here it is :class:`HfVlResNetDownsample` with named ``conv`` / ``norm`` (house
  rule: no ``nn.Sequential`` indices in keys). Converters map ``downsample.{0,1}`` <-> ``downsample.{conv,norm}``.
- With frozen batch norm, each ``conv -> frozen BN`` pair runs as one convolution with the BN folded into its weight
  and bias (computed from the stored tensors, so state dicts, gradients and ``load_state_dict`` are unchanged).
  Without gradients the folded weights are cached on each conv (one extra copy of the trunk's conv weights in
  memory, refreshed when a source tensor changes; on CPU pre-packed in oneDNN's blocked layout), and on CPU the
  bias, ReLU and residual addition run as oneDNN post-ops of the convolution
  (``torch.ops.mkldnn._convolution_pointwise``, what ``torch.compile`` emits on CPU): one pass over each activation
  map instead of up to four. With gradients the plain ``F.conv2d`` path runs.

:func:`conv_norm` also folds an eval-mode ``nn.BatchNorm2d`` when no gradients are recorded (inference), which is how
CLIP's ModifiedResNet (``hf_vl_clip_resnet.py``) shares this fast path.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

RESNET_DEPTHS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
    152: torchvision.models.resnet152,
}
STAGES = ("layer1", "layer2", "layer3", "layer4")
# output channels of each stage: basic-block ResNets (18, 34) and bottleneck ResNets (50, 101, 152)
BASIC_STAGE_CHANNELS = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
STAGE_CHANNELS = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}


class HfVlFrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers), eps 1e-5.

    As DETR's ``FrozenBatchNorm2d`` (torchvision's, with the epsilon added before ``rsqrt``); a
    ``num_batches_tracked`` entry in a loaded state dict (from an ``nn.BatchNorm2d`` checkpoint) is ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(channels,) scale and shift such that ``forward(x) = x * scale + shift`` per channel."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_and_shift()
        # (channels,) -> (1, channels, 1, 1) to broadcast over (batch, channels, height, width)
        return hidden_states * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class HfVlResNetDownsample(nn.Module):
    """The shortcut projection of a stage's first block: 1x1 strided conv + norm (torchvision's ``downsample``)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module):
        super().__init__()
        self.conv = conv
        self.norm = norm

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return conv_norm(self.conv, self.norm, hidden_states)


def foldable(norm: nn.Module) -> bool:
    """Whether ``norm`` is a fixed per-channel affine map that :func:`conv_norm` folds into the convolution: a
    frozen batch norm always; an ``nn.BatchNorm2d`` only in eval mode with running statistics and without gradients
    (inference: in training it normalises with batch statistics, and its gradients must stay its own)."""
    if isinstance(norm, HfVlFrozenBatchNorm2d):
        return True
    return (
        isinstance(norm, nn.BatchNorm2d)
        and not norm.training
        and norm.running_mean is not None
        and not torch.is_grad_enabled()
    )


def norm_scale_and_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(channels,) scale and shift of a :func:`foldable` norm: ``norm(x) = x * scale + shift`` per channel."""
    if isinstance(norm, HfVlFrozenBatchNorm2d):
        return norm.scale_and_shift()
    # eval-mode nn.BatchNorm2d; in fp32 even for a bf16 model, as its kernel computes
    scale = (norm.running_var.float() + norm.eps).rsqrt()
    scale = scale if norm.weight is None else scale * norm.weight.float()
    shift = -norm.running_mean.float() * scale
    return scale, shift if norm.bias is None else shift + norm.bias.float()


def _fold(conv: nn.Conv2d, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """conv(x, W) * s + t == conv(x, W * s) + (b * s + t), with s broadcast over (out, in, kh, kw)."""
    scale, shift = norm_scale_and_shift(norm)
    if not isinstance(norm, HfVlFrozenBatchNorm2d) and conv.weight.dtype != scale.dtype:
        # reduced precision: fold in fp32 and round once
        weight = (conv.weight.float() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype)
        bias = shift if conv.bias is None else shift + conv.bias.float() * scale
        return weight, bias.to(conv.weight.dtype)
    scale, shift = scale.to(conv.weight.dtype), shift.to(conv.weight.dtype)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else shift + conv.bias * scale
    return weight, bias


class _FoldedConv:
    """A convolution's folded weight and bias, and the weight pre-packed into oneDNN's blocked layout (which saves
    the per-call reorder: 2-4x for the 1x1 convolutions of 7x7 and 14x14 maps). A plain attribute of the conv, so
    state dicts never see it; copies and pickles of the module drop it (packed tensors have no storage to copy)."""

    __slots__ = ("key", "weight", "bias", "packed")

    def __init__(self, key: tuple | None, weight: torch.Tensor, bias: torch.Tensor):
        self.key, self.weight, self.bias, self.packed = key, weight, bias, None

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return type(None), ()


def _folded(conv: nn.Conv2d, norm: nn.Module) -> _FoldedConv:
    """The folded weight and bias. Without gradients (inference) they are cached on the conv, keyed by the source
    tensors' storage, dtype and version counters, so in-place updates, ``load_state_dict`` and ``.to()`` refresh it."""
    if torch.is_grad_enabled():
        return _FoldedConv(None, *_fold(conv, norm))
    sources = (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
    try:
        key = tuple(None if t is None else (t.data_ptr(), t.dtype, t._version) for t in sources)
    except RuntimeError:  # tensors created under inference_mode keep no version counter: don't cache
        return _FoldedConv(None, *_fold(conv, norm))
    cached = conv.__dict__.get("_hf_vl_folded")
    if not isinstance(cached, _FoldedConv) or cached.key != key:
        # ordinary leaf tensors even under inference_mode, so the cache stays usable after leaving it
        with torch.inference_mode(False), torch.no_grad():
            weight, bias = _fold(conv, norm)
            # channels-last: the layout oneDNN computes in, so no reorder per call (see HfVlResNetBody.forward)
            cached = _FoldedConv(key, weight.contiguous(memory_format=torch.channels_last), bias)
        conv.__dict__["_hf_vl_folded"] = cached
    return cached


def _packed_weight(folded: _FoldedConv, conv: nn.Conv2d, hidden_states: torch.Tensor) -> torch.Tensor:
    """The folded weight for the fused oneDNN convolution: pre-packed once when cached (the input shape is only
    a hint: other shapes give the same results). The plain copy is then dropped (memory), see :func:`_plain_weight`."""
    if folded.key is None or _REORDER_WEIGHT is None:
        return folded.weight
    if folded.packed is None:
        with torch.inference_mode(False), torch.no_grad():
            geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
            folded.packed = _REORDER_WEIGHT(folded.weight, *geometry, list(hidden_states.shape))
        folded.weight = None
    return folded.packed


def _plain_weight(folded: _FoldedConv, conv: nn.Conv2d, norm: nn.Module) -> torch.Tensor:
    return folded.weight if folded.weight is not None else _fold(conv, norm)[0]


# oneDNN convolution with fused post-ops (what torch.compile's CPU backend emits); checked once at import
_POINTWISE = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
_REORDER_WEIGHT = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_convolution_weight", None)
_FUSED_DTYPES = (torch.float32, torch.bfloat16)
_MKLDNN_AVAILABLE = torch.backends.mkldnn.is_available()


def can_fuse_conv(hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`conv_norm` may use oneDNN's fused convolution: eager CPU inference (no gradients, not compiling
    or tracing: inductor fuses on its own) on plain fp32/bf16 tensors of one dtype."""
    return (
        _POINTWISE is not None
        and not torch.compiler.is_compiling()  # first: dynamo must not trace the checks below
        and not torch.jit.is_tracing()
        and not torch.is_grad_enabled()
        and type(hidden_states) is torch.Tensor
        and hidden_states.device.type == "cpu"
        and hidden_states.dtype in _FUSED_DTYPES
        and weight.dtype == hidden_states.dtype
        and _MKLDNN_AVAILABLE
        and torch.backends.mkldnn.enabled
    )


def conv_norm(
    conv: nn.Conv2d,
    norm: nn.Module,
    hidden_states: torch.Tensor,
    relu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(norm(conv(x)) + residual)``, act = ReLU or identity.

    A :func:`foldable` norm (frozen batch norm; eval-mode ``nn.BatchNorm2d`` without gradients) is folded into the
    convolution; on CPU without gradients the bias, residual addition and ReLU also run inside the oneDNN
    convolution (one pass over the output instead of up to four).
    """
    if not foldable(norm):
        out = norm(conv(hidden_states))
    else:
        folded = _folded(conv, norm)
        channels_last = hidden_states.is_contiguous(memory_format=torch.channels_last)
        # oneDNN's fused add + ReLU needs channels-last in bf16 (NCHW falls back to an fp32-only kernel)
        if can_fuse_conv(hidden_states, conv.weight) and (
            residual is None or channels_last or conv.weight.dtype == torch.float32
        ):
            weight = _packed_weight(folded, conv, hidden_states)
            args = (weight, folded.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
            if residual is None:
                return _POINTWISE(hidden_states, *args, "relu" if relu else "none", [], "")
            return _POINTWISE.binary(hidden_states, residual, *args, "add", None, "relu" if relu else None, [], "")
        weight = _plain_weight(folded, conv, norm)
        out = F.conv2d(hidden_states, weight, folded.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def block_forward(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """torchvision ``Bottleneck.forward`` / ``BasicBlock.forward`` with ``conv_norm`` (same modules, folded frozen
    batch norm, fused ReLU and residual addition)."""
    identity = hidden_states if block.downsample is None else block.downsample(hidden_states)
    out = conv_norm(block.conv1, block.bn1, hidden_states, relu=True)
    if hasattr(block, "conv3"):  # bottleneck: 1x1 -> 3x3 -> 1x1
        out = conv_norm(block.conv2, block.bn2, out, relu=True)
        return conv_norm(block.conv3, block.bn3, out, relu=True, residual=identity)
    return conv_norm(block.conv2, block.bn2, out, relu=True, residual=identity)


class HfVlResNetBody(nn.Module):
    """torchvision ResNet without ``avgpool``/``fc``, returning the requested stages' feature maps.

    Stages are ``nn.ModuleList`` (torchvision's are ``nn.Sequential``; same keys ``layerN.M.*``).

    Args:
        depth: 50, 101 or 152 (bottleneck blocks); 18 or 34 (basic blocks: small test models, DETR's R18/R34).
        dilation: dilate ``layer4`` instead of striding it (output stride 16: DETR's DC5).
        frozen_batch_norm: :class:`HfVlFrozenBatchNorm2d` instead of ``nn.BatchNorm2d``.
        out_features: stage names among ``layer1``..``layer4`` to return, in this order.
    """

    def __init__(
        self,
        depth: int = 50,
        dilation: bool = False,
        frozen_batch_norm: bool = True,
        out_features: tuple[str, ...] = ("layer4",),
    ):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"depth={depth} is not supported; expected one of {sorted(RESNET_DEPTHS)}")
        unknown = [name for name in out_features if name not in STAGES]
        if unknown or not out_features:
            raise ValueError(f"out_features={out_features!r} must be a non-empty subset of {STAGES}")
        norm_layer = HfVlFrozenBatchNorm2d if frozen_batch_norm else nn.BatchNorm2d
        resnet = RESNET_DEPTHS[depth](
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=norm_layer
        )
        self.out_features = tuple(out_features)
        channels = BASIC_STAGE_CHANNELS if depth < 50 else STAGE_CHANNELS
        self.channels = [channels[name] for name in self.out_features]
        self.conv1, self.bn1, self.maxpool = resnet.conv1, resnet.bn1, resnet.maxpool
        last = max(STAGES.index(name) for name in self.out_features)
        for name in STAGES[: last + 1]:  # stages after the last requested one would be dead weights
            layer = getattr(resnet, name)
            for block in layer:
                if block.downsample is not None:
                    block.downsample = HfVlResNetDownsample(block.downsample[0], block.downsample[1])
            setattr(self, name, nn.ModuleList(layer))
        self.stages = STAGES[: last + 1]

    def freeze(self, prefixes: tuple[str, ...] = ("conv1", "bn1", "layer1")) -> None:
        """Stop gradients for parameters under ``prefixes`` (DETR trains only ``layer2``..``layer4``)."""
        for name, parameter in self.named_parameters():
            if name.startswith(prefixes):
                parameter.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixel_values: (batch, 3, H, W). Returns {stage: (batch, channels, H / stride, W / stride)}."""
        if can_fuse_conv(pixel_values, self.conv1.weight) and isinstance(self.bn1, HfVlFrozenBatchNorm2d):
            # inference on CPU: run the trunk channels-last, oneDNN's native layout (no reorder around each conv)
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        hidden_states = self.maxpool(conv_norm(self.conv1, self.bn1, pixel_values, relu=True))
        features = {}
        for name in self.stages:
            for block in getattr(self, name):
                hidden_states = block_forward(block, hidden_states)
            if name in self.out_features:
                features[name] = hidden_states
        return features


__all__ = [
    "BASIC_STAGE_CHANNELS",
    "HfVlFrozenBatchNorm2d",
    "HfVlResNetBody",
    "HfVlResNetDownsample",
    "STAGE_CHANNELS",
    "block_forward",
    "can_fuse_conv",
    "conv_norm",
    "foldable",
    "norm_scale_and_shift",
]
