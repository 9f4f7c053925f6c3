"""Helpers of the SAM decoder tests (``tests/modeling/test_sam_decoder_cache.py``, ``test_sam_factored.py``): a tiny
SAM re-initialised at unit scale, prompts, and the decoder's reference (training mode: no cache, no folding, no
factoring)."""

from __future__ import annotations

import torch
from torch import nn

from common.tiny import TINY_SAM_IMAGE_SIZE, TINY_TRANSFORMER
from hf_vl.modeling.configuration_hf_vl_sam import HfVlSamConfig
from hf_vl.modeling.modeling_hf_vl_sam import HfVlSamModel

GRID, DIM = TINY_SAM_IMAGE_SIZE // 8, 24
MASK = 4 * GRID
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_config() -> HfVlSamConfig:
    vision = dict(**TINY_TRANSFORMER, image_size=TINY_SAM_IMAGE_SIZE, patch_size=8, window_size=3,
                  global_attn_indexes=[1], output_channels=DIM)  # fmt: skip
    decoder = dict(hidden_size=DIM, num_attention_heads=2, mlp_dim=37, iou_head_hidden_dim=20)
    return HfVlSamConfig(vision_config=vision, prompt_encoder_config=dict(hidden_size=DIM, mask_input_channels=8),
                         mask_decoder_config=decoder)  # fmt: skip


def prompts(batch: int, per: int, seed: int = 0) -> dict:
    """``per`` prompts of two points each (a foreground and a background click) on each of ``batch`` images."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(batch, per, 2, 2, generator=generator) * TINY_SAM_IMAGE_SIZE
    return {"input_points": points, "input_labels": torch.tensor([1, 0]).expand(batch, per, 2)}


def random_embeddings(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, DIM, GRID, GRID, generator=torch.Generator().manual_seed(seed))


def unit_scale_sam(norms: bool = False) -> HfVlSamModel:
    """A tiny SAM in eval mode, prompt encoder and decoder re-initialised at unit scale: the default init (std 0.02)
    gives masks of ~1e-5, too small for the comparisons to mean anything. ``norms``: the LayerNorms' scales and
    shifts random too (by default 1 and 0)."""
    torch.manual_seed(0)
    model = HfVlSamModel(tiny_config()).eval()
    with torch.no_grad():
        for module in [*model.prompt_encoder.modules(), *model.mask_decoder.modules()]:
            if isinstance(module, (nn.Linear, nn.ConvTranspose2d, nn.Conv2d)):
                fan_in = module.weight[0].numel() if isinstance(module, nn.Linear) else module.weight.shape[0]
                module.weight.normal_(0.0, fan_in**-0.5)
                module.bias.normal_(0.0, 0.1)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0)
            elif norms and isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    return model


def copy_of(model: HfVlSamModel) -> HfVlSamModel:
    other = HfVlSamModel(tiny_config()).eval()
    other.load_state_dict(model.state_dict())
    return other.to(model.dtype)


def decode(model, embeddings, **inputs):
    with torch.inference_mode():
        return model(image_embeddings=embeddings, **inputs)


def reference(model, embeddings, **inputs):
    """No cache, attention kernel and full out_proj: the decoder in training mode."""
    model.mask_decoder.train()
    try:
        with torch.no_grad():
            return model(image_embeddings=embeddings, **inputs)
    finally:
        model.mask_decoder.eval()


def assert_outputs_close(ours, expected, **tolerance):
    torch.testing.assert_close(ours.pred_masks, expected.pred_masks, **(tolerance or TOL))
    torch.testing.assert_close(ours.iou_scores, expected.iou_scores, **(tolerance or TOL))


def assert_weight_change_invalidates(model, name: str, how: str = "in_place") -> None:
    """Changing parameter ``name`` (``how``: ``in_place`` or ``load_state_dict``) between two decodes of the same
    embedding changes the masks, to what a fresh copy of the changed model and the reference give."""
    embeddings, inputs = random_embeddings(2), prompts(2, 2)
    before = decode(model, embeddings, **inputs)
    if how == "load_state_dict":
        state = model.state_dict()
        model.load_state_dict({**state, name: state[name] * 1.5 + 0.1})
    else:
        with torch.no_grad():
            model.state_dict(keep_vars=True)[name].mul_(1.5).add_(0.1)
    after = decode(model, embeddings, **inputs)
    assert not torch.allclose(after.pred_masks, before.pred_masks), "the decoder kept stale work"
    assert_outputs_close(after, decode(copy_of(model), embeddings, **inputs), atol=1e-6, rtol=1e-6)
    assert_outputs_close(after, reference(model, embeddings, **inputs))
