"""SAM's decoder on factored image states (``modeling_hf_vl_sam_factored``): the maps of the two-way layers' output
unrolled through their LayerNorms, checked in float64 against the states computed directly, and the decoder taking
that path against its reference (training mode: no cache, no folding, no factoring)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from common import sam_decoder
from common.sam_decoder import DIM, GRID, MASK, assert_outputs_close, decode, prompts, random_embeddings, reference

from hf_vl.modeling import modeling_hf_vl_sam_decoder as decoder_module
from hf_vl.modeling import modeling_hf_vl_sam_factored as factored_module
from hf_vl.modeling.modeling_hf_vl_sam_factored import (
    FactoredImage,
    FactoredStates,
    ImageFactors,
    factorable,
    layer_rstd,
    mixed_values,
)

F64 = dict(atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------------------------------ the algebra
def random_chain(groups: int, per: int, depth: int, length: int = 30, hidden: int = 12, heads: int = 2,
                 tokens: int = 3):  # fmt: skip
    """E (groups, length, hidden), a grid encoding, ``depth`` random LayerNorms and factors (token values through a
    random ``out_proj``, as the decoder makes them), and the states computed directly, float64: (image side,
    factors, states (rows, length, hidden), grid encoding)."""
    generator = torch.Generator().manual_seed(groups * 10 + per + depth)
    rows, f64 = groups * per, torch.float64
    keys = torch.randn(groups, length, hidden, generator=generator, dtype=f64)
    key_pe = torch.randn(1, length, hidden, generator=generator, dtype=f64)
    norms = [nn.LayerNorm(hidden, eps=1e-5).double() for _ in range(depth)]
    states, factors = keys.repeat_interleave(per, 0), []
    with torch.no_grad():
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5, generator=generator)
            norm.bias.normal_(0.0, 0.5, generator=generator)
            out_proj = nn.Linear(heads * 3, hidden).double()
            out_proj.weight.normal_(generator=generator)
            out_proj.bias.normal_(generator=generator)
            values = torch.randn(rows, heads, tokens, 3, generator=generator, dtype=f64)
            # probabilities as the decoder has them: a transposed view of (rows, heads * tokens, length)
            probs = torch.rand(rows, heads * tokens, length, generator=generator, dtype=f64).softmax(1).transpose(1, 2)
            mixed = mixed_values(values, out_proj)
            states, _, rstd = torch.native_layer_norm(states + probs @ mixed, (hidden,), norm.weight, norm.bias,
                                                      norm.eps)  # fmt: skip
            factors.append(ImageFactors(probs, mixed, rstd, values, out_proj))
    image = FactoredImage(SimpleNamespace(keys=keys, key_pe=key_pe), norms, {})
    return image, factors, states, key_pe


@pytest.mark.parametrize("groups, per", [(1, 1), (1, 3), (2, 1), (2, 3)])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_layer_norm_statistics_from_the_factors(groups, per, depth):
    """Each layer's reciprocal standard deviations from the factors alone equal those of the states formed."""
    image, factors, _, _ = random_chain(groups, per, depth)
    with torch.no_grad():
        for layer, factor in enumerate(factors):
            states = FactoredStates(factors[:layer], image) if layer else None
            ours = layer_rstd(image, states, factor._replace(rstd=None), image.norms[layer])
            torch.testing.assert_close(ours, factor.rstd, **F64)
    with pytest.raises(ValueError, match="values and out_proj"):
        layer_rstd(image, None, factors[0]._replace(values=None), image.norms[0])


def linear(out: int, hidden: int = 12, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(hidden, out).double()
    nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("groups, per", [(1, 1), (1, 3), (2, 1), (2, 3)])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_factored_maps_equal_the_states_computed_directly(groups, per, depth):
    image, factors, states, key_pe = random_chain(groups, per, depth)
    rows, length = states.shape[:2]
    with torch.no_grad():
        states_f = FactoredStates(factors, image)
        # a linear map: states W^T + b
        projection = linear(8)
        ours = states_f.linear("map", (projection.weight,), lambda: projection.weight, projection.bias)
        torch.testing.assert_close(ours, projection(states), **F64)
        # scores of 4 vectors per row and head (2 heads of 4) against linear(states + grid encoding)
        heads, keys = 2, linear(8, seed=1)
        vectors = torch.randn(rows, heads, 4, 4, dtype=torch.float64)
        direct = torch.einsum("rhmd,rnhd->rhmn", vectors, keys(states + key_pe).view(rows, length, heads, 4))
        torch.testing.assert_close(states_f.scores(keys, heads, vectors, constant=True), direct, **F64)
        dropped = states_f.scores(keys, heads, vectors, constant=False) - direct  # the same at every position
        torch.testing.assert_close(dropped, dropped[..., :1].expand_as(dropped), **F64)
        # probabilities over the positions times linear(states)
        values = linear(8, seed=2)
        probs = torch.rand(rows, heads, 4, length, dtype=torch.float64).softmax(-1)
        direct = torch.einsum("rhmn,rnhd->rhmd", probs, values(states).view(rows, length, heads, 4))
        torch.testing.assert_close(states_f.mix(values, heads, probs), direct, **F64)
        # a subset of the rows, each against its own image
        subset = torch.tensor([rows - 1, 0])
        ours = states_f.select(subset).linear("map", (projection.weight,), lambda: projection.weight, None)
        torch.testing.assert_close(ours, states[subset] @ projection.weight.T, **F64)


def test_per_image_products_are_cached_until_a_source_changes():
    image, factors, states, _ = random_chain(1, 2, 2)
    projection = linear(8)
    make = lambda: projection.weight  # noqa: E731
    with torch.no_grad():
        first = FactoredStates(factors, image).linear("map", (projection.weight,), make, projection.bias)
        entry = image.cache[("map", 2, "rows")]
        FactoredStates(factors, image).linear("map", (projection.weight,), make, projection.bias)
        assert image.cache[("map", 2, "rows")] is entry
        for changed in (projection.weight, image.norms[0].weight, image.norms[1].bias):
            changed.mul_(1.25)
            ours = FactoredStates(factors, image).linear("map", (projection.weight,), make, projection.bias)
            assert image.cache[("map", 2, "rows")] is not entry
            entry = image.cache[("map", 2, "rows")]
    # the norms changed after the factors were made: compare with the map alone changed (states unchanged)
    assert not torch.allclose(ours, first)


def test_factorable():
    norms = [nn.LayerNorm(256), nn.LayerNorm(256)]
    assert factorable(norms, 8, 7, rows=2)  # vit_b, one point: 2 * 8 * 7 = 112 < 256
    assert not factorable(norms, 8, 7, rows=1)  # FACTOR_MIN_ROWS
    assert not factorable(norms, 8, 16, rows=2)  # 256 factor columns: no cheaper
    assert not factorable([], 8, 7, rows=2)
    assert not factorable([nn.LayerNorm(256, elementwise_affine=False)], 8, 7, rows=2)
    assert not factorable([nn.LayerNorm((4, 64))], 8, 7, rows=2)


# ------------------------------------------------------------------------------------------ in the decoder
@pytest.fixture
def model() -> nn.Module:
    return sam_decoder.unit_scale_sam(norms=True)


@pytest.fixture
def factored(monkeypatch) -> list:
    """Factoring whatever the sizes (the tiny model's 2 layers x 2 heads x 8 tokens exceed its width 24, so by
    default it never factors); returns the number of prompts of each factored call, as a list that grows."""
    monkeypatch.setattr(factored_module, "FACTOR_BELOW", float("inf"))
    calls, original = [], decoder_module.FactoredImage

    def counted(projections, norms, cache):
        calls.append(None)
        return original(projections, norms, cache)

    monkeypatch.setattr(decoder_module, "FactoredImage", counted)
    return calls


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch, per", [(1, 2), (2, 1), (2, 3)])
def test_factored_decode_equals_the_reference(model, factored, attn, batch, per):
    model.set_attn_implementation(attn)
    embeddings = random_embeddings(batch)
    for seed in (0, 5):  # the second call from the caches
        for multimask in (True, False):
            inputs = dict(prompts(batch, per, seed), multimask_output=multimask)
            assert_outputs_close(decode(model, embeddings, **inputs), reference(model, embeddings, **inputs))
    assert len(factored) == 4


@pytest.mark.parametrize("from_factors", [True, False])
def test_factored_decode_with_statistics_from_factors_or_formed_states(model, factored, monkeypatch, from_factors):
    """fp32 takes the LayerNorm statistics from the factors and never forms the states (the transformer returns
    None for them); with STATISTICS_FROM_FACTORS emptied (as for bf16) it forms them: the same outputs either way."""
    if not from_factors:
        monkeypatch.setattr(factored_module, "STATISTICS_FROM_FACTORS", ())
    returned, forward = [], type(model.mask_decoder.transformer).forward

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        returned.append(out[1])
        return out

    monkeypatch.setattr(type(model.mask_decoder.transformer), "forward", spy)
    embeddings, inputs = random_embeddings(2), prompts(2, 3)
    assert_outputs_close(decode(model, embeddings, **inputs), reference(model, embeddings, **inputs))
    assert len(factored) == 1
    assert (returned[0] is None) == from_factors


def test_factored_decode_with_boxes_and_one_image_repeated(model, factored):
    embeddings = random_embeddings(1)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 2.0, 60.0, 30.0], [0.0, 0.0, 63.0, 63.0]])
    inputs = dict(input_boxes=boxes[None])  # three box prompts
    assert_outputs_close(decode(model, embeddings, **inputs), reference(model, embeddings, **inputs))
    inputs.update(prompts(1, 3))  # a box and two points each
    assert_outputs_close(decode(model, embeddings, **inputs), reference(model, embeddings, **inputs))
    # one image repeated (an expanded view, as the pipelines pass it): one image state for the 3 x 2 prompts
    expanded, inputs = embeddings.expand(3, -1, -1, -1), prompts(3, 2)
    assert_outputs_close(decode(model, expanded, **inputs), reference(model, expanded.contiguous(), **inputs))
    assert len(factored) == 3


def test_factored_decode_in_chunks(model, factored, monkeypatch):
    # chunks of 3 prompts of 2 images (7 per image: the last chunk is short)
    monkeypatch.setattr(decoder_module, "DECODE_CHUNK_BYTES", 3 * 2 * DIM * GRID * GRID * 4)
    embeddings, inputs = random_embeddings(2), prompts(2, 7)
    assert_outputs_close(decode(model, embeddings, **inputs), reference(model, embeddings, **inputs))
    assert len(factored) == 3


def test_where_it_does_not_factor(model, factored):
    embeddings = random_embeddings(1)
    decode(model, embeddings, **prompts(1, 1))  # one prompt: FACTOR_MIN_ROWS
    inputs = prompts(1, 2)
    inputs["input_masks"] = torch.randn(2, 1, MASK, MASK, generator=torch.Generator().manual_seed(2))
    decode(model, embeddings, **inputs)  # mask prompts: no cached first layer
    with torch.enable_grad():
        model(image_embeddings=embeddings, **prompts(1, 2))  # autograd
    assert not factored


def test_tiny_model_does_not_factor_by_default(model, monkeypatch):
    calls = []
    monkeypatch.setattr(decoder_module, "FactoredImage", lambda *args: calls.append(1))
    decode(model, random_embeddings(1), **prompts(1, 3))
    assert not calls


def test_factored_float64_and_bf16(model, factored):
    embeddings, inputs = random_embeddings(2), prompts(2, 2)
    model.double()
    assert_outputs_close(decode(model, embeddings.double(), **inputs), reference(model, embeddings.double(), **inputs),
                         **F64)  # fmt: skip
    model.to(torch.bfloat16)
    embeddings = embeddings.bfloat16()
    expected = reference(model, embeddings, **inputs).pred_masks.float()
    out = decode(model, embeddings, **inputs).pred_masks.float()
    error = (out - expected).norm() / expected.norm()
    assert error < 2e-2, f"bf16 relative error {error:.3g}"
    assert len(factored) == 2


def test_factored_iou_gate(model, factored):
    embeddings, inputs = random_embeddings(2), prompts(2, 6)
    plain = decode(model, embeddings, **inputs)
    best = plain.iou_scores.amax(-1)
    threshold = float(best.flatten().median())
    gated = decode(model, embeddings, **inputs, mask_iou_threshold=threshold)
    kept = best > threshold
    assert 0 < int(kept.sum()) < 12 and bool(kept[0].any()) and bool(kept[1].any())  # rows of both images
    torch.testing.assert_close(gated.pred_masks[kept], plain.pred_masks[kept], atol=1e-5, rtol=1e-5)
    assert (gated.pred_masks[~kept] == torch.finfo(torch.float32).min).all()
    assert len(factored) == 2


@pytest.mark.parametrize(
    "name",
    [
        "mask_decoder.transformer.layers.0.layer_norm4.weight",
        "mask_decoder.transformer.layers.1.layer_norm4.bias",
        "mask_decoder.transformer.layers.1.cross_attn_token_to_image.k_proj.weight",
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.q_proj.bias",
        # the LayerNorm statistics' per-image products (layer_rstd)
        "mask_decoder.transformer.layers.0.cross_attn_image_to_token.out_proj.weight",
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.bias",
        "mask_decoder.transformer.final_attn_token_to_image.v_proj.weight",
        "mask_decoder.upscale_conv1.weight",
        "mask_decoder.upscale_conv1.bias",
    ],
)
def test_weight_changes_invalidate(model, factored, name):
    sam_decoder.assert_weight_change_invalidates(model, name)
    assert len(factored) == 3  # before, after, and the changed copy


def test_upscale_needs_states_or_their_first_map(model):
    with pytest.raises(TypeError, match="upscale needs image_states"):
        model.mask_decoder.upscale(None)
