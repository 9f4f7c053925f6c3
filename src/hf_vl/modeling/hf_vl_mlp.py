"""The one transformer feed-forward block of hf_vl: ``fc2(dropout(act(fc1(x))))``, and the fused CPU linear.

Used by ViT, CLIP (QuickGELU), SAM, DETR and the original Transformer; the activation is a transformers
``ACT2FN`` name so configs stay plain data (``gelu``, ``gelu_pytorch_tanh``, ``quick_gelu``, ``relu``).

:func:`fused_linear` is the CPU inference fast path shared with :mod:`.hf_vl_attention`: one oneDNN call
(``torch.ops.mkldnn._linear_pointwise``, the kernel inductor emits for CPU linears) computes ``x W^T + b`` with the
activation or the residual add applied in the GEMM epilogue, on weights kept pre-packed by
:class:`HfVlFastLinearModule`. Against ``F.linear`` (``addmm``, which first copies the bias into the output, then
separate GELU and add passes) it saves those memory passes and the per-call weight reorder. It runs only where
nothing needs autograd (the op has no derivative), outside ``torch.compile``/tracing (inductor fuses on its own),
and on CPU fp32/bf16 tensors; everywhere else the plain ops run, with the same result to float rounding (fp32
ViT-B/16 logits within 3e-6). ``benchmarks/bench_vit.py`` measures the gain.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

# transformers activation name -> oneDNN eltwise post-op (attr, algorithm) with the same formula
_FUSED_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_pytorch_tanh": ("gelu", "tanh"), "relu": ("relu", "")}
# their ACT2FN module types: a swapped-in ``activation_fn`` of another type is applied unfused
_FUSED_ACTIVATION_TYPES = {name: type(ACT2FN[name]) for name in _FUSED_ACTIVATIONS}
_FUSED_DTYPES = (torch.float32, torch.bfloat16)
# dtypes whose weights HfVlFastLinearModule pre-packs (ViT-B/16 on 2 AMX cores: bf16 +10%, fp32 +5-10% end to end)
_PACKED_DTYPES = (torch.bfloat16, torch.float32)


def _has_mkldnn_op(name: str) -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, name)
    except (AttributeError, RuntimeError):  # older or stripped torch builds
        return False


_HAS_LINEAR_POINTWISE = _has_mkldnn_op("_linear_pointwise")
_HAS_REORDER_WEIGHT = _has_mkldnn_op("_reorder_linear_weight")
# oneDNN bf16 needs AVX512-BF16/AMX (or a slow emulation it refuses); asked once
_BF16_SUPPORTED = _HAS_LINEAR_POINTWISE and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def can_fuse_linear(hidden_states: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether :func:`fused_linear` may run: eager CPU inference on plain fp32/bf16 tensors of one dtype."""
    if not _HAS_LINEAR_POINTWISE or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if type(hidden_states) is not torch.Tensor or hidden_states.device.type != "cpu":
        return False
    dtype = hidden_states.dtype
    if dtype not in _FUSED_DTYPES or not torch.backends.mkldnn.enabled:
        return False
    if dtype == torch.bfloat16 and not _BF16_SUPPORTED:
        return False
    grad = torch.is_grad_enabled()
    if grad and hidden_states.requires_grad:
        return False
    for param in params:
        if param is not None and (param.dtype != dtype or param.device.type != "cpu" or (grad and param.requires_grad)):
            return False
    return True


def can_fuse_residual(residual: torch.Tensor | None, output_like: torch.Tensor, out_features: int) -> bool:
    """Whether ``residual`` can be added in the epilogue: oneDNN wants the exact output shape and dtype."""
    return (
        residual is not None
        and type(residual) is torch.Tensor
        and residual.dtype == output_like.dtype
        and residual.shape == (*output_like.shape[:-1], out_features)
        and not (residual.requires_grad and torch.is_grad_enabled())
    )


def fused_linear(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x W^T + b)`` or ``x W^T + b + residual`` in one oneDNN call; check :func:`can_fuse_linear` first.

    activation: a key of ``_FUSED_ACTIVATIONS``; residual: same shape as the output. Not both.
    """
    if residual is not None:
        if activation is not None:
            raise ValueError("fused_linear takes an activation or a residual, not both")
        return torch.ops.mkldnn._linear_pointwise.binary(hidden_states, residual, weight, bias, "add")
    attr, algorithm = _FUSED_ACTIVATIONS[activation] if activation is not None else ("none", "")
    return torch.ops.mkldnn._linear_pointwise(hidden_states, weight, bias, attr, [], algorithm)


class HfVlFastLinearModule(nn.Module):
    """Base of modules whose linears take the :func:`fused_linear` path: keeps their weights in the form that path
    wants (q/k/v concatenated, pre-packed into oneDNN's blocked layout, which saves the per-call reorder: 20-40% per
    bf16 linear on AMX), outside the state dict.

    An entry is rebuilt whenever one of its source tensors changes storage or version (``load_state_dict``,
    optimiser steps, in-place edits); ``.to()``/``.float()`` etc. clear the cache, and copies/pickles of the module
    leave it out (packed tensors have no storage to copy). The price is one extra copy of the cached weights.
    """

    def __init__(self):
        super().__init__()
        self._fast_weights: dict[str, tuple] = {}

    def _apply(self, fn, recurse=True):
        # new parameters: drop the cache rather than keep the old storage alive
        self._fast_weights = {}
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "_fast_weights": {}}

    def fast_weights(
        self, name: str, linears: tuple[nn.Linear, ...], rows: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias of ``linears`` stacked along the outputs, ready for :func:`fused_linear`.

        linears: modules with ``weight`` (out_features, ...) and ``bias``: ``nn.Linear``, or a convolution whose
        kernel, flattened to (out_channels, in_channels * kernel elements), multiplies flattened patches.
        rows: the number of input rows of this call, oneDNN's hint for the packed layout.
        """
        sources = [p for linear in linears for p in (linear.weight, linear.bias) if p is not None]
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in sources)
        cached = self._fast_weights.get(name)
        if cached is None or cached[0] != key:
            # ordinary tensors even under inference_mode, so the cache stays usable after leaving it
            with torch.inference_mode(False), torch.no_grad():
                weights = [linear.weight.flatten(1) for linear in linears]
                weight = torch.cat(weights) if len(weights) > 1 else weights[0]
                biases = [linear.bias for linear in linears]
                bias = None if biases[0] is None else torch.cat(biases) if len(biases) > 1 else biases[0]
                if _HAS_REORDER_WEIGHT and weight.dtype in _PACKED_DTYPES:
                    weight = torch.ops.mkldnn._reorder_linear_weight(weight, max(rows, 1))
            cached = self._fast_weights[name] = (key, weight, bias)
        return cached[1], cached[2]


class HfVlMlp(HfVlFastLinearModule):
    """Two linear layers with an activation between them.

    Args:
        hidden_size: input and output width.
        intermediate_size: width of the hidden layer.
        hidden_act: transformers activation name.
        dropout: dropout after the activation (the original Transformer's "relu dropout"); 0 for vision models.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "gelu", dropout: float = 0.0):
        super().__init__()
        if hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act={hidden_act!r} is not a known activation; expected one of {sorted(ACT2FN)}")
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.activation_fn = ACT2FN[hidden_act]
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.fused_activation = hidden_act if hidden_act in _FUSED_ACTIVATIONS else None

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: (..., hidden). ``residual`` (same shape) is added to the output, fused into fc2 on CPU."""
        fc1, fc2 = self.fc1, self.fc2
        if self.training or not can_fuse_linear(hidden_states, fc1.weight, fc1.bias, fc2.weight, fc2.bias):
            output = fc2(self.dropout(self.activation_fn(fc1(hidden_states))))
            return output if residual is None else output + residual
        rows = hidden_states.numel() // hidden_states.shape[-1]
        activation = self.fused_activation
        if activation is not None and type(self.activation_fn) is _FUSED_ACTIVATION_TYPES[activation]:
            hidden_states = fused_linear(hidden_states, *self.fast_weights("fc1", (fc1,), rows), activation)
        else:
            hidden_states = self.activation_fn(fused_linear(hidden_states, *self.fast_weights("fc1", (fc1,), rows)))
        weight, bias = self.fast_weights("fc2", (fc2,), rows)
        if residual is not None and not can_fuse_residual(residual, hidden_states, fc2.out_features):
            return fused_linear(hidden_states, weight, bias) + residual
        return fused_linear(hidden_states, weight, bias, residual=residual)


class HfVlMlpStack(nn.Module):
    """``num_layers`` linear layers with ReLU between them (keys ``layers.{i}``): DETR's box head and SAM's
    hypernetwork / IoU heads (the ``MLP`` class of facebookresearch/detr and of segment-anything)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states)
            if index < len(self.layers) - 1:
                hidden_states = torch.relu(hidden_states)
        return hidden_states
