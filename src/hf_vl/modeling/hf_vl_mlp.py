"""The one transformer feed-forward block of hf_vl: ``fc2(dropout(act(fc1(x))))``.

Used by ViT, CLIP (QuickGELU), SAM, DETR and the original Transformer; the activation is a transformers
``ACT2FN`` name so configs stay plain data (``gelu``, ``gelu_pytorch_tanh``, ``quick_gelu``, ``relu``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class HfVlMlp(nn.Module):
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

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.activation_fn(self.fc1(hidden_states))))
