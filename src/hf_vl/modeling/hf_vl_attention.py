"""The one multi-head attention of hf_vl.

Every architecture's self- and cross-attention goes through :class:`HfVlAttention`, which dispatches to the
kernel named by ``config._attn_implementation`` via transformers' ``ALL_ATTENTION_FUNCTIONS`` (SDPA by default,
``eager`` as the reference fallback, flash/flex where installed).

Why separate ``q_proj``/``k_proj``/``v_proj`` rather than one fused ``qkv``: state-dict keys are public API and the
separate layout is what transformers' own vision models use; converters split fused originals (timm ``attn.qkv``,
CLIP ``in_proj_weight``). ``is_causal`` is always set explicitly because unmasked SDPA reads
``getattr(module, "is_causal", True)`` and would otherwise be silently causal (huggingface/transformers#48172).

CPU inference fast path (:func:`.hf_vl_mlp.can_fuse_linear`): self-attention runs q/k/v as one GEMM against a
concatenated weight cached outside the state dict (:class:`.hf_vl_mlp.HfVlFastLinearModule`), and ``out_proj``
adds the caller's residual in its epilogue.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .hf_vl_mlp import HfVlFastLinearModule, can_fuse_linear, can_fuse_residual, fused_linear


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: softmax(q k^T * scaling + mask) v.

    query/key/value: (batch, heads, length, head_dim); attention_mask: additive float, broadcastable to
    (batch, heads, q_len, k_len). Returns (batch, q_len, heads, head_dim) and the weights.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    elif getattr(module, "is_causal", False) and query.shape[2] > 1:
        q_len, k_len = query.shape[2], key.shape[2]
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        attn_weights = attn_weights.masked_fill(~causal, torch.finfo(attn_weights.dtype).min)
    # softmax in fp32 for bf16/fp16 stability, as transformers' reference implementation does
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class HfVlAttention(HfVlFastLinearModule):
    """Multi-head attention with separate q/k/v/out projections.

    Args:
        config: any hf_vl config; only ``_attn_implementation`` is read from it, so the switch
            ``attn_implementation=`` / ``set_attn_implementation`` works for every architecture.
        hidden_size: width of the queries (and of the output).
        num_heads: number of heads; ``hidden_size`` (or ``inner_dim``) must divide by it.
        dropout: attention-probability dropout, active only in training.
        bias: whether q/k/v projections carry a bias (ViT ``qkv_bias``).
        is_causal: True only for autoregressive decoder self-attention.
        kv_size: width of keys/values input when it differs (cross-attention).
        inner_dim: width of the attention itself when it differs from ``hidden_size`` (SAM's downsampled
            two-way attention).
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        is_causal: bool = False,
        kv_size: int | None = None,
        inner_dim: int | None = None,
    ):
        super().__init__()
        inner_dim = inner_dim or hidden_size
        if inner_dim % num_heads != 0:
            raise ValueError(f"attention width {inner_dim} is not divisible by num_heads={num_heads}")
        self.config = config
        self.num_heads = num_heads
        self.head_dim = inner_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = dropout
        self.is_causal = is_causal
        kv_size = kv_size or hidden_size
        self.q_proj = nn.Linear(hidden_size, inner_dim, bias=bias)
        self.k_proj = nn.Linear(kv_size, inner_dim, bias=bias)
        self.v_proj = nn.Linear(kv_size, inner_dim, bias=bias)
        self.out_proj = nn.Linear(inner_dim, hidden_size)

    def _qkv_params(self) -> tuple[torch.Tensor | None, ...]:
        return tuple(p for proj in (self.q_proj, self.k_proj, self.v_proj) for p in (proj.weight, proj.bias))

    def _project_qkv(
        self, hidden_states: torch.Tensor, kv: torch.Tensor, keys_in: torch.Tensor, fast: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """query, key, value as (batch, heads, len, head_dim); keys from ``keys_in``, values from ``kv``."""
        batch, q_len = hidden_states.shape[:2]
        if fast and kv is hidden_states and keys_in is hidden_states:
            qkv_weights = self.fast_weights("qkv", (self.q_proj, self.k_proj, self.v_proj), batch * q_len)
            qkv = fused_linear(hidden_states, *qkv_weights)
            # (batch, len, 3 * heads * head_dim) -> 3 x (batch, heads, len, head_dim), views of one GEMM output
            return qkv.view(batch, q_len, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        k_len = kv.shape[1]
        projected = [
            fused_linear(x, *self.fast_weights(name, (proj,), x.numel() // x.shape[-1])) if fast else proj(x)
            for name, x, proj in (
                ("q", hidden_states, self.q_proj),
                ("k", keys_in, self.k_proj),
                ("v", kv, self.v_proj),
            )
        ]
        # (batch, len, heads * head_dim) -> (batch, heads, len, head_dim)
        query = projected[0].view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        key = projected[1].view(batch, k_len, -1, self.head_dim).transpose(1, 2)
        value = projected[2].view(batch, k_len, -1, self.head_dim).transpose(1, 2)
        return query, key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        key_states: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states: (batch, q_len, hidden); key_value_states: (batch, k_len, kv_size) for cross-attention;
        residual: (batch, q_len, hidden), added to the output (fused into ``out_proj`` on the CPU fast path);
        key_states: (batch, k_len, kv_size) input of ``k_proj`` when it differs from the values' input (DETR adds
        positional encodings to queries and keys, never to values)."""
        kv = hidden_states if key_value_states is None else key_value_states
        keys_in = kv if key_states is None else key_states
        batch, q_len = hidden_states.shape[:2]
        fast = can_fuse_linear(hidden_states, *self._qkv_params(), self.out_proj.weight, self.out_proj.bias)
        fast = fast and all(x is hidden_states or can_fuse_linear(x) for x in (kv, keys_in))
        query, key, value = self._project_qkv(hidden_states, kv, keys_in, fast)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=self.is_causal,
            **kwargs,
        )
        # (batch, q_len, heads, head_dim) -> (batch, q_len, heads * head_dim)
        attn_output = attn_output.reshape(batch, q_len, -1)
        if fast:
            weight, bias = self.fast_weights("out", (self.out_proj,), batch * q_len)
            if can_fuse_residual(residual, attn_output, self.out_proj.out_features):
                return fused_linear(attn_output, weight, bias, residual=residual), attn_weights
            attn_output = fused_linear(attn_output, weight, bias)
        else:
            attn_output = self.out_proj(attn_output)
        return (attn_output if residual is None else attn_output + residual), attn_weights
