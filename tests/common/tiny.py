"""Tiny sizes every architecture's tests use (style.md section 5.6).

Odd, mutually distinct sizes make transposed or mixed-up dimensions fail loudly: batch 3, sequence 7, 5 labels,
an FFN of 37, 4 heads of width 8, an 8x8 patch grid (65 tokens with the class token). A whole tiny model builds and
runs in milliseconds on CPU.
"""

from __future__ import annotations

BATCH_SIZE = 3
SEQ_LENGTH = 7
VOCAB_SIZE = 99
NUM_LABELS = 5

# transformer trunk shared by ViT, CLIP towers, SAM's encoder, DETR, the Transformer
TINY_TRANSFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
# image geometry (SAM uses TINY_SAM_IMAGE_SIZE: its neck and mask decoder need a larger grid)
TINY_IMAGE = dict(image_size=32, patch_size=4, num_channels=3)
TINY_SAM_IMAGE_SIZE = 64


def tiny_vit_config(**overrides):
    """An ``HfVlVitConfig`` with the tiny sizes; ``overrides`` win."""
    from hf_vl import HfVlVitConfig

    labels = {} if "id2label" in overrides else {"num_labels": NUM_LABELS}
    return HfVlVitConfig(**{**TINY_TRANSFORMER, **TINY_IMAGE, **labels, **overrides})
