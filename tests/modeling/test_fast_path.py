"""The CPU inference fast path of the shared blocks (fused oneDNN linears, pre-packed weights, fused q/k/v).

It must give the plain path's numbers, follow weight changes, and never leak into training, copies or pickles.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import hf_vl.modeling.hf_vl_mlp as mlp_module
from common.tiny import tiny_vit_config
from hf_vl import HfVlVitForImageClassification

pytestmark = pytest.mark.skipif(
    not mlp_module._HAS_LINEAR_POINTWISE, reason="this torch build has no oneDNN fused linear: no fast path to test"
)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = HfVlVitForImageClassification(tiny_vit_config(**overrides)).eval()
    with torch.no_grad():  # non-trivial LayerNorm / bias values, so a wrong fused epilogue shows
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def _plain(model, pixel_values, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(mlp_module, "_HAS_LINEAR_POINTWISE", False)
        with torch.no_grad():
            return model(pixel_values).logits


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh", "quick_gelu"])
def test_fast_equals_plain_fp32(monkeypatch, hidden_act):
    model, pixel_values = _model(hidden_act=hidden_act), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fast = model(pixel_values).logits
    assert model.vit.encoder.layers[0].mlp._fast_weights, "the fast path did not run"
    torch.testing.assert_close(fast, _plain(model, pixel_values, monkeypatch), atol=1e-5, rtol=0)


def test_fast_path_follows_weight_changes(monkeypatch):
    model, other = _model(seed=0), _model(seed=1)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(pixel_values)
        model.load_state_dict(other.state_dict())
        after_load = model(pixel_values).logits
        model.vit.encoder.layers[1].self_attn.v_proj.weight.mul_(2.0)  # in-place edit: version counter moves
        after_edit = model(pixel_values).logits
    torch.testing.assert_close(after_load, _plain(other, pixel_values, monkeypatch), atol=1e-5, rtol=0)
    torch.testing.assert_close(after_edit, _plain(model, pixel_values, monkeypatch), atol=1e-5, rtol=0)
    assert (after_edit - after_load).abs().max() > 1e-3


def test_training_never_takes_the_fast_path():
    model = _model().train()
    loss = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not model.vit.encoder.layers[0].mlp._fast_weights


def test_copies_and_pickles_after_bf16_run():
    model = _model().to(torch.bfloat16)
    pixel_values = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = model(pixel_values).logits
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        assert not other.vit.encoder.layers[0].mlp._fast_weights
        with torch.inference_mode():
            torch.testing.assert_close(other(pixel_values).logits, expected, atol=0, rtol=0)


def test_dtype_change_drops_the_cache(monkeypatch):
    model, pixel_values = _model(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(pixel_values)
        model.to(torch.bfloat16)
        assert not model.vit.encoder.layers[0].mlp._fast_weights
        bf16 = model(pixel_values.bfloat16()).logits.float()
        model.float()
        fp32 = model(pixel_values).logits
    torch.testing.assert_close(fp32, _plain(model, pixel_values, monkeypatch), atol=1e-5, rtol=0)
    assert (bf16 - fp32).abs().max() < 0.1
