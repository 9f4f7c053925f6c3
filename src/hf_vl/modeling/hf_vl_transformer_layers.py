"""Transformer encoder layers shared by hf_vl's architectures.

:class:`HfVlPreNormLayer` is the pre-LayerNorm block of ViT (Dosovitskiy et al. 2020, eq. 2-3) and of CLIP's towers
(Radford et al. 2021): ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``. The post-norm block of DETR and of the
original Transformer lives beside it when those architectures land.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .hf_vl_attention import HfVlAttention
from .hf_vl_mlp import HfVlMlp


class HfVlPreNormLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: self-attention then MLP, each behind a LayerNorm.

    Args:
        config: the architecture config (read for the attention implementation only).
        hidden_size, num_heads, intermediate_size, hidden_act, layer_norm_eps: block sizes.
        qkv_bias: bias on q/k/v projections.
        attention_dropout: dropout on attention probabilities; hidden_dropout: dropout on each residual branch.
        is_causal: causal self-attention (CLIP's text tower).
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        hidden_act: str,
        layer_norm_eps: float,
        qkv_bias: bool = True,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        is_causal: bool = False,
    ):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.self_attn = HfVlAttention(
            config, hidden_size, num_heads, dropout=attention_dropout, bias=qkv_bias, is_causal=is_causal
        )
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp = HfVlMlp(hidden_size, intermediate_size, hidden_act)
        self.dropout = nn.Dropout(hidden_dropout)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """hidden_states: (batch, length, hidden). Returns the same shape."""
        if self.training and self.dropout.p > 0:
            attn_output, _ = self.self_attn(self.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs)
            hidden_states = hidden_states + self.dropout(attn_output)
            return hidden_states + self.dropout(self.mlp(self.layer_norm2(hidden_states)))
        # no residual dropout: the sublayers add the residual themselves (in the GEMM epilogue on CPU inference)
        hidden_states, _ = self.self_attn(
            self.layer_norm1(hidden_states), attention_mask=attention_mask, residual=hidden_states, **kwargs
        )
        return self.mlp(self.layer_norm2(hidden_states), residual=hidden_states)
