"""CLIP's CPU inference fast paths: the ModifiedResNet tower folded, fused and channels-last (BatchNorm folded into
pre-packed oneDNN convolutions, shared with DETR's trunk through ``hf_vl_resnet.conv_norm``) and the ViT patch
embedding as one pre-packed GEMM.

Each must give the plain modules' numbers, follow weight changes, and never leak into training, autograd, state
dicts, copies or pickles.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import hf_vl.modeling.hf_vl_mlp as mlp_module
import hf_vl.modeling.hf_vl_resnet as resnet_module
from common.tiny import TINY_IMAGE, TINY_TRANSFORMER
from hf_vl import HfVlClipVisionConfig, HfVlClipVisionModel
from hf_vl.modeling.hf_vl_resnet import conv_norm, foldable

pytestmark = pytest.mark.skipif(
    resnet_module._POINTWISE is None or not mlp_module._HAS_LINEAR_POINTWISE,
    reason="this torch build has no oneDNN fused convolution / linear: no fast path to test",
)
RESNET = dict(vision_type="resnet", resnet_depths=[1, 2, 1, 1], resnet_width=8, num_attention_heads=4, image_size=64)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (OpenAI's init zeroes bn3, which would hide a wrong
    fold of the residual branch) and perturbed weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(0.5 + torch.rand(size, generator=generator))
                module.bias.copy_(0.2 * torch.randn(size, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(size, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model


def _resnet_tower(seed: int = 0) -> HfVlClipVisionModel:
    torch.manual_seed(seed)
    config = HfVlClipVisionConfig(**RESNET, projection_dim=13)
    return _randomise(HfVlClipVisionModel(config), seed).eval()


def _vit_tower(seed: int = 0) -> HfVlClipVisionModel:
    torch.manual_seed(seed)
    config = HfVlClipVisionConfig(**TINY_TRANSFORMER, **TINY_IMAGE, hidden_act="quick_gelu")
    return _randomise(HfVlClipVisionModel(config), seed).eval()


def _pixels(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _plain(model, pixel_values, monkeypatch) -> torch.Tensor:
    """The plain modules' output: both fast paths switched off."""
    with monkeypatch.context() as patch:
        patch.setattr(resnet_module, "_POINTWISE", None)
        patch.setattr(mlp_module, "_HAS_LINEAR_POINTWISE", False)
        with torch.no_grad():
            return model(pixel_values).pooler_output


def _folded_convs(model: nn.Module) -> list:
    return [m.__dict__.get("_hf_vl_folded") for m in model.modules() if isinstance(m, nn.Conv2d)]


# --------------------------------------------------------------------------------------------- BatchNorm folding
@pytest.mark.parametrize("relu, with_residual", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_batch_norm_folds_exactly(relu, with_residual, channels_last):
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(6, 10, 3, padding=1, bias=False), _randomise(nn.BatchNorm2d(10), 0).eval()
    x, residual = torch.randn(2, 6, 9, 9), torch.randn(2, 10, 9, 9)
    if channels_last:
        x, residual = (t.contiguous(memory_format=torch.channels_last) for t in (x, residual))
    residual = residual if with_residual else None
    with torch.no_grad():
        expected = norm(conv(x)) + (0 if residual is None else residual)
        expected = expected.relu() if relu else expected
        folded = conv_norm(conv, norm, x, relu=relu, residual=residual)
    assert isinstance(conv.__dict__.get("_hf_vl_folded"), resnet_module._FoldedConv), "the fold did not run"
    torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5)


def test_batch_norm_folds_only_in_eval_without_gradients():
    norm = nn.BatchNorm2d(4)
    with torch.no_grad():
        assert foldable(norm.eval())
        assert not foldable(norm.train())  # batch statistics
        assert not foldable(nn.BatchNorm2d(4, track_running_stats=False).eval())
    assert not foldable(norm.eval())  # gradients: the BatchNorm keeps its own


# --------------------------------------------------------------------------------------------- ResNet tower
def test_resnet_tower_fast_equals_plain_fp32(monkeypatch):
    model, pixel_values = _resnet_tower(), _pixels(64)
    with torch.no_grad():
        fast = model(pixel_values)
    folded = _folded_convs(model)
    assert all(f is not None and f.packed is not None for f in folded), "not every conv took the packed path"
    assert fast.last_hidden_state.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast.pooler_output, _plain(model, pixel_values, monkeypatch), atol=1e-5, rtol=1e-4)


def test_resnet_tower_fast_bf16_within_bf16_rounding(monkeypatch):
    model, pixel_values = _resnet_tower(), _pixels(64)
    reference = _plain(model, pixel_values, monkeypatch)  # fp32
    model.to(torch.bfloat16)
    with torch.inference_mode():
        fast = model(pixel_values.bfloat16()).pooler_output.float()
    plain = _plain(model, pixel_values.bfloat16(), monkeypatch).float()
    scale = reference.abs().max()
    # the fold rounds once more in bf16 (W * s): same order as the plain path's own bf16 error
    assert (fast - reference).abs().max() <= 2 * (plain - reference).abs().max() + 1e-2 * scale
    assert (fast - reference).abs().max() < 5e-2 * scale


def test_resnet_fast_path_follows_weight_changes(monkeypatch):
    model, other = _resnet_tower(seed=0), _resnet_tower(seed=1)
    pixel_values = _pixels(64)
    with torch.no_grad():
        model(pixel_values)
        model.load_state_dict(other.state_dict())
        after_load = model(pixel_values).pooler_output
        model.stages[1].layers[0].bn2.running_var.mul_(4.0)  # in-place edit: version counter moves
        after_edit = model(pixel_values).pooler_output
    torch.testing.assert_close(after_load, _plain(other, pixel_values, monkeypatch), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after_edit, _plain(model, pixel_values, monkeypatch), atol=1e-5, rtol=1e-4)
    assert (after_edit - after_load).abs().max() > 1e-4


def test_resnet_training_and_autograd_never_fold():
    model = _resnet_tower().train()
    running_mean = model.stem.bn1.running_mean.clone()
    model(_pixels(64)).pooler_output.sum().backward()
    assert not torch.equal(model.stem.bn1.running_mean, running_mean), "training must use batch statistics"
    assert model.stem.bn1.weight.grad is not None
    model.eval().zero_grad()
    model(_pixels(64)).pooler_output.sum().backward()  # eval with gradients: the BatchNorms stay modules
    assert model.stages[0].layers[0].bn3.weight.grad is not None
    assert all(f is None for f in _folded_convs(model))


def test_resnet_cache_stays_out_of_state_dict_copies_and_pickles():
    model, pixel_values = _resnet_tower(), _pixels(64)
    keys = set(model.state_dict())
    with torch.inference_mode():
        expected = model(pixel_values).pooler_output
    assert set(model.state_dict()) == keys
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        assert all(f is None for f in _folded_convs(other))
        with torch.inference_mode():
            torch.testing.assert_close(other(pixel_values).pooler_output, expected, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------- ViT patch GEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_embedding_gemm_equals_convolution(dtype):
    model, pixel_values = _vit_tower().to(dtype), _pixels(32).to(dtype)
    embeddings = model.embeddings
    grid = embeddings.grid_size
    with torch.no_grad():
        fast = embeddings._embed_patches(pixel_values, grid)
        assert "patch" in embeddings._fast_weights, "the GEMM path did not run"
        plain = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    atol = 1e-5 if dtype == torch.float32 else 2e-2 * plain.abs().max().item()
    torch.testing.assert_close(fast.float(), plain.float(), atol=atol, rtol=0)


def test_vit_tower_fast_equals_plain_and_keeps_state_dict(monkeypatch):
    model, pixel_values = _vit_tower(), _pixels(32)
    keys = set(model.state_dict())
    with torch.no_grad():
        fast = model(pixel_values).pooler_output
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(fast, _plain(model, pixel_values, monkeypatch), atol=1e-5, rtol=1e-4)
    model.train()
    model(pixel_values).pooler_output.sum().backward()
    assert model.embeddings.patch_embedding.weight.grad is not None
