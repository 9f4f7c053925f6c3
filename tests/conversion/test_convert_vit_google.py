"""ViT from the original JAX .npz layout (google-research/vision_transformer), in both Flax sub-module numberings.

No JAX here: the .npz is written from a timm model by inverting the layout, and the released numbering is checked
against timm's own npz reader (``timm.models.vision_transformer._load_weights``), which reproduces the model exactly.
The reference runs the original numerics: tanh GELU (timm ``act_layer="gelu_tanh"``) and LayerNorm eps 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import transformers
from conversion_helpers import assert_parity, pixel_values, random_model
from timm.models.vision_transformer import _load_weights
from torch import nn

import hf_vl  # noqa: F401  (registers the Auto classes)
from hf_vl.conversion import ConversionError
from hf_vl.conversion.api import convert_checkpoint

TINY_TIMM = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
# sub-module indices (attention, second LayerNorm, MLP) per Flax version; the first LayerNorm is _0 in both
NUMBERINGS = {"released": (1, 2, 3), "flax-current": (0, 1, 0)}


def _jax_vit(std: float = 0.02, **kwargs):
    """A timm ViT with the original's numerics (LayerNorm eps is 1e-6 in timm already)."""
    return random_model(
        lambda: timm.create_model("vit_base_patch16_224", pretrained=False, act_layer="gelu_tanh", **kwargs), std
    )


def _flax_dense(out: dict, name: str, linear: nn.Linear) -> None:
    out[f"{name}/kernel"] = linear.weight.T  # (out, in) -> (in, out)
    out[f"{name}/bias"] = linear.bias


def _flax_layer_norm(out: dict, name: str, norm: nn.LayerNorm) -> None:
    out[f"{name}/scale"], out[f"{name}/bias"] = norm.weight, norm.bias


def _block_to_flax(out: dict, prefix: str, block, numbering: str) -> None:
    mha, ln2, mlp = NUMBERINGS[numbering]
    width, heads = block.attn.qkv.in_features, block.attn.num_heads
    _flax_layer_norm(out, prefix + "LayerNorm_0", block.norm1)
    attention = f"{prefix}MultiHeadDotProductAttention_{mha}/"
    weights, biases = block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3)
    for name, weight, bias in zip(("query", "key", "value"), weights, biases):
        out[f"{attention}{name}/kernel"] = weight.T.reshape(width, heads, -1)  # (in, heads, head_dim)
        out[f"{attention}{name}/bias"] = bias.reshape(heads, -1)
    out[f"{attention}out/kernel"] = block.attn.proj.weight.T.reshape(heads, -1, width)  # (heads, head_dim, out)
    out[f"{attention}out/bias"] = block.attn.proj.bias
    _flax_layer_norm(out, f"{prefix}LayerNorm_{ln2}", block.norm2)
    _flax_dense(out, f"{prefix}MlpBlock_{mlp}/Dense_0", block.mlp.fc1)
    _flax_dense(out, f"{prefix}MlpBlock_{mlp}/Dense_1", block.mlp.fc2)


def write_jax_npz(model, path, numbering: str = "released", pre_logits: nn.Linear | None = None) -> None:
    """``np.savez`` of a timm ViT's weights under the original Flax names; ``pre_logits`` adds the in21k layer."""
    out = {
        "embedding/kernel": model.patch_embed.proj.weight.permute(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": model.patch_embed.proj.bias,
        "cls": model.cls_token,
        "Transformer/posembed_input/pos_embedding": model.pos_embed,
    }
    for index, block in enumerate(model.blocks):
        _block_to_flax(out, f"Transformer/encoderblock_{index}/", block, numbering)
    _flax_layer_norm(out, "Transformer/encoder_norm", model.norm)
    if pre_logits is not None:
        _flax_dense(out, "pre_logits", pre_logits)
    if isinstance(model.head, nn.Linear):
        _flax_dense(out, "head", model.head)
    np.savez(path, **{key: value.detach().numpy() for key, value in out.items()})


def _logits(output_dir, photo):
    processor = transformers.AutoImageProcessor.from_pretrained(output_dir)
    model = transformers.AutoModelForImageClassification.from_pretrained(output_dir)
    pixels = pixel_values(processor, photo)
    with torch.no_grad():
        return model(pixels).logits, pixels


def test_npz_writer_matches_timms_reader(tmp_path):
    """The test's released layout is the one timm reads from the real files: a round trip reproduces the model."""
    model = _jax_vit(**TINY_TIMM, num_classes=10)
    write_jax_npz(model, tmp_path / "vit.npz")
    reloaded = timm.create_model("vit_base_patch16_224", pretrained=False, **TINY_TIMM, num_classes=10)
    _load_weights(reloaded, str(tmp_path / "vit.npz"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("numbering", sorted(NUMBERINGS))
def test_tiny_google_parity(tmp_path, photo, add_vit_variant, numbering):
    # weights of std 0.05 and atol 1e-5 make the comparison sensitive to the numerics (checked below)
    reference = _jax_vit(std=0.05, **TINY_TIMM, num_classes=10)
    write_jax_npz(reference, tmp_path / "vit.npz", numbering)
    variant = add_vit_variant("vit-test-tiny")
    model = convert_checkpoint("vit", "google", tmp_path / "vit.npz", variant, tmp_path / "out", progress=False)
    # the original numerics, whatever the variant table says
    assert model.config.hidden_act == "gelu_pytorch_tanh" and model.config.layer_norm_eps == 1e-6
    ours, pixels = _logits(tmp_path / "out", photo)
    assert ours.shape == (1, 10)
    with torch.no_grad():
        expected = reference(pixels)
    assert_parity(f"google tiny ({numbering} numbering)", ours, expected, atol=1e-5)
    # negative controls: HF's numerics (exact GELU, eps 1e-12) would fail this comparison
    for wrong in ({"hidden_act": "gelu"}, {"layer_norm_eps": 1e-12}):
        other = convert_checkpoint("vit", "google", tmp_path / "vit.npz", variant, None, config_overrides=wrong)
        with torch.no_grad():
            assert (other(pixels).logits - expected).abs().max() > 1e-5, wrong


@pytest.mark.parametrize("numbering", sorted(NUMBERINGS))
def test_tiny_google_in21k_pre_logits_parity(tmp_path, photo, add_vit_variant, numbering):
    """ImageNet-21k files: ``pre_logits`` (dense + tanh, representation_size = width) before a 21k-style head."""
    backbone = _jax_vit(**TINY_TIMM, num_classes=0)  # timm 1.x has no pre_logits layer: it is added here
    pre_logits, head = random_model(lambda: nn.Linear(64, 64)), random_model(lambda: nn.Linear(64, 21))
    backbone.head = head
    write_jax_npz(backbone, tmp_path / "vit.npz", numbering, pre_logits=pre_logits)
    variant = add_vit_variant("vit-test-tiny-in21k", representation_size=64, num_labels=21)
    model = convert_checkpoint("vit", "google", tmp_path / "vit.npz", variant, tmp_path / "out", progress=False)
    assert model.config.representation_size == 64 and model.config.pooler_act == "tanh"
    ours, pixels = _logits(tmp_path / "out", photo)
    with torch.no_grad():
        features = backbone.forward_head(backbone.forward_features(pixels), pre_logits=True)
        reference = head(torch.tanh(pre_logits(features)))
    assert_parity(f"google tiny in21k pre_logits ({numbering} numbering)", ours, reference)


def test_mixed_numbering_is_an_error(tmp_path, add_vit_variant):
    write_jax_npz(_jax_vit(**TINY_TIMM, num_classes=10), tmp_path / "vit.npz", "released")
    arrays = dict(np.load(tmp_path / "vit.npz"))
    # a block holding both LayerNorm_1 and LayerNorm_2: neither numbering, two sources for one target
    arrays["Transformer/encoderblock_0/LayerNorm_1/scale"] = arrays["Transformer/encoderblock_0/LayerNorm_2/scale"]
    np.savez(tmp_path / "mixed.npz", **arrays)
    variant = add_vit_variant("vit-test-tiny")
    with pytest.raises(ConversionError, match="encoderblock_0/LayerNorm_1/scale") as error:
        convert_checkpoint("vit", "google", tmp_path / "mixed.npz", variant, tmp_path / "out")
    assert list(error.value.problems) == ["target keys produced more than once"]


@pytest.mark.slow
def test_base_google_parity(tmp_path, photo):
    reference = _jax_vit(num_classes=1000)
    write_jax_npz(reference, tmp_path / "ViT-B_16.npz", "released")
    convert_checkpoint("vit", "google", tmp_path / "ViT-B_16.npz", "vit-base-patch16-224", tmp_path / "out")
    ours, pixels = _logits(tmp_path / "out", photo)
    with torch.no_grad():
        assert_parity("google ViT-B/16 (released numbering)", ours, reference(pixels))
