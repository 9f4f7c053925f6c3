"""SAM's mask decoder against a cached image embedding: the first two-way layer's image-side work kept across calls
(``HfVlSamMaskDecoder._image_projections``), the low-rank image->token attention (``_low_rank_attention``) and the
cross-attentions with the image-side projections folded into the tokens (``modeling_hf_vl_sam_two_way.FOLD_BELOW``).

The reference is the same model with its decoder in training mode (SAM's decoder has no dropout, so it computes the
same function): no cache, the attention kernel and a full ``out_proj``. Invalidation is checked against a fresh copy
of the changed model and against the output before the change, so a stale entry cannot pass."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from common.sam_decoder import (
    DIM,
    GRID,
    MASK,
    assert_outputs_close,
    assert_weight_change_invalidates,
    copy_of,
    decode,
    prompts,
    random_embeddings,
    reference,
    unit_scale_sam,
)

from hf_vl.modeling import modeling_hf_vl_sam_decoder as decoder_module
from hf_vl.modeling import modeling_hf_vl_sam_two_way as two_way
from hf_vl.modeling.modeling_hf_vl_sam import HfVlSamModel


@pytest.fixture
def model() -> HfVlSamModel:
    return unit_scale_sam()


def count_projections(model, monkeypatch) -> list:
    """Calls of the first layer's image-side projections (what the cache saves), as a list that grows."""
    calls, transformer = [], model.mask_decoder.transformer
    original = transformer.project_image
    monkeypatch.setattr(transformer, "project_image", lambda *args: calls.append(1) or original(*args))
    return calls


def entry(model):
    return model.mask_decoder._image_cache.get("first_layer")


# ------------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch, per", [(1, 1), (1, 3), (2, 1), (2, 3)])
def test_cached_decode_equals_the_plain_decode(model, attn, batch, per):
    model.set_attn_implementation(attn)
    embeddings, inputs = random_embeddings(batch), prompts(batch, per)
    expected = reference(model, embeddings, **inputs)
    first = decode(model, embeddings, **inputs)
    assert entry(model) is not None, "inference did not fill the cache"
    second = decode(model, embeddings, **inputs)  # from the cache
    assert_outputs_close(first, expected)
    assert_outputs_close(second, expected)
    # other prompts on the cached embedding
    assert_outputs_close(decode(model, embeddings, **prompts(batch, per, seed=5)),
                         reference(model, embeddings, **prompts(batch, per, seed=5)))  # fmt: skip


def test_second_call_reuses_the_cache(model, monkeypatch):
    calls = count_projections(model, monkeypatch)
    embeddings = random_embeddings(2)
    decode(model, embeddings, **prompts(2, 1))
    cached = entry(model)["projections"]
    decode(model, embeddings, **prompts(2, 1, seed=3))
    decode(model, embeddings, **prompts(2, 1, seed=4))
    assert len(calls) == 1 and entry(model)["projections"] is cached
    # and the entry is what the decoder uses: spoiling it changes the masks
    expected = decode(model, embeddings, **prompts(2, 1, seed=4))
    with torch.no_grad():
        cached.key.mul_(0.5)
    assert not torch.allclose(decode(model, embeddings, **prompts(2, 1, seed=4)).pred_masks, expected.pred_masks)


def test_one_image_repeated_shares_one_entry(model, monkeypatch):
    """A view of the same embedding (``embedding[None]``, ``expand``: how the pipelines pass it) hits the entry."""
    calls = count_projections(model, monkeypatch)
    embeddings = random_embeddings(2)
    decode(model, embeddings[1:2], **prompts(1, 3))
    expanded = embeddings[1].expand(3, -1, -1, -1)  # 3 images, all the same memory: one image state
    ours = decode(model, expanded, **prompts(3, 1))
    assert len(calls) == 1
    assert_outputs_close(ours, reference(model, expanded.contiguous(), **prompts(3, 1)))


# -------------------------------------------------------------------------------------------- invalidation
def test_in_place_change_of_the_embedding_invalidates(model, monkeypatch):
    calls = count_projections(model, monkeypatch)
    embeddings, inputs = random_embeddings(2), prompts(2, 2)
    before = decode(model, embeddings, **inputs)
    embeddings.add_(1)
    after = decode(model, embeddings, **inputs)
    assert len(calls) == 2
    assert not torch.allclose(after.pred_masks, before.pred_masks)
    assert_outputs_close(after, decode(copy_of(model), embeddings, **inputs), atol=1e-6, rtol=1e-6)
    view = embeddings[:1]
    view.mul_(2)  # through a view: the version counter is shared
    assert_outputs_close(decode(model, embeddings, **inputs), reference(model, embeddings, **inputs))


def test_inference_tensor_embedding_is_compared_by_value(model, monkeypatch):
    """Inference tensors have no version counter: the entry keeps a copy and compares values."""
    calls = count_projections(model, monkeypatch)
    with torch.inference_mode():
        embeddings = random_embeddings(1) * 1.0  # an inference tensor
    inputs = prompts(1, 2)
    before = decode(model, embeddings, **inputs)
    decode(model, embeddings[0][None], **inputs)
    assert len(calls) == 1
    with torch.inference_mode():
        embeddings.add_(1)
    after = decode(model, embeddings, **inputs)
    assert len(calls) == 2 and not torch.allclose(after.pred_masks, before.pred_masks)
    assert_outputs_close(after, reference(model, embeddings.clone(), **inputs))


@pytest.mark.parametrize(
    "name",
    [
        "mask_decoder.transformer.layers.0.cross_attn_token_to_image.k_proj.weight",
        "mask_decoder.transformer.layers.0.cross_attn_token_to_image.v_proj.bias",
        "mask_decoder.transformer.layers.0.cross_attn_image_to_token.q_proj.weight",
        "prompt_encoder.no_mask_embed.weight",
        "prompt_encoder.positional_embedding.positional_encoding_gaussian_matrix",
    ],
)
@pytest.mark.parametrize("how", ["load_state_dict", "in_place"])
def test_weight_changes_invalidate(model, name, how):
    assert_weight_change_invalidates(model, name, how)


def test_other_tensor_with_the_same_values(model, monkeypatch):
    calls = count_projections(model, monkeypatch)
    embeddings, inputs = random_embeddings(2), prompts(2, 2)
    first = decode(model, embeddings, **inputs)
    twin = embeddings.clone()
    assert_outputs_close(decode(model, twin, **inputs), first, atol=0, rtol=0)
    assert len(calls) == 2  # another tensor: recomputed, not trusted
    other = random_embeddings(2, seed=7)
    assert_outputs_close(decode(model, other, **inputs), reference(model, other, **inputs))


# ------------------------------------------------------------------------------------------ where it is off
def test_training_and_autograd_never_cache_and_gradients_match(model):
    embeddings, inputs = random_embeddings(2), prompts(2, 2)
    decode(model, embeddings, **inputs)  # a filled cache must not leak into training
    filled, fresh = entry(model), copy_of(model)

    def gradients(net, train: bool) -> dict:
        net.zero_grad()
        net.mask_decoder.train(train)
        with torch.enable_grad():
            out = net(image_embeddings=embeddings, **inputs)
            (out.pred_masks.square().sum() + out.iou_scores.sum()).backward()
        net.eval()
        return {n: p.grad.clone() for n, p in net.mask_decoder.named_parameters() if p.grad is not None}

    trained, trained_fresh = gradients(model, True), gradients(fresh, True)
    evaluated, evaluated_fresh = gradients(model, False), gradients(fresh, False)
    assert entry(fresh) is None and entry(model) is filled, "cached with autograd on"
    assert trained.keys() == trained_fresh.keys() == evaluated.keys() and len(trained) > 10
    scale = torch.stack([grad.norm() for grad in trained.values()]).norm()
    for name, grad in trained.items():
        torch.testing.assert_close(grad, trained_fresh[name], atol=0, rtol=0)
        torch.testing.assert_close(evaluated[name], evaluated_fresh[name], atol=0, rtol=0)
        # eval with autograd runs the low-rank image->token attention: its gradients are the kernel path's
        # (relative to all gradients: some are zero in exact arithmetic, e.g. self-attention key biases)
        assert (evaluated[name] - grad).norm() <= 1e-5 * scale, name
    fresh.mask_decoder.train()
    with torch.no_grad():
        fresh(image_embeddings=embeddings, **inputs)
    assert entry(fresh) is None, "cached in training mode"


@pytest.mark.parametrize("masks", [4, 2])  # one mask per prompt, one per image
def test_mask_prompts_bypass_the_cache(model, monkeypatch, masks):
    calls = count_projections(model, monkeypatch)
    embeddings, inputs = random_embeddings(2), prompts(2, 2)
    inputs["input_masks"] = torch.randn(masks, 1, MASK, MASK, generator=torch.Generator().manual_seed(2))
    ours = decode(model, embeddings, **inputs)
    assert not calls and entry(model) is None
    assert_outputs_close(ours, reference(model, embeddings, **inputs))


def test_cache_is_not_state_and_follows_dtype(model):
    embeddings, inputs = random_embeddings(2), prompts(2, 2)
    keys = set(model.state_dict())
    decode(model, embeddings, **inputs)
    assert entry(model) is not None and set(model.state_dict()) == keys
    assert entry(copy.deepcopy(model)) is None and entry(pickle.loads(pickle.dumps(model))) is None
    model.double()  # _apply drops the float32 entry
    assert entry(model) is None
    out = decode(model, embeddings.double(), **inputs)
    assert out.pred_masks.dtype == torch.float64
    assert_outputs_close(out, reference(model, embeddings.double(), **inputs), atol=1e-10, rtol=1e-10)


def test_bf16_cached_decode(model):
    model.to(torch.bfloat16)
    embeddings, inputs = random_embeddings(2).bfloat16(), prompts(2, 2)
    expected = reference(model, embeddings, **inputs)
    for _ in range(2):
        out = decode(model, embeddings, **inputs)
        assert out.pred_masks.dtype == torch.bfloat16
        error = (out.pred_masks.float() - expected.pred_masks.float()).norm() / expected.pred_masks.float().norm()
        assert error < 2e-2, f"bf16 relative error {error:.3g}"


# ------------------------------------------------------------------------------------ folded cross-attentions
def count_image_side_projections(monkeypatch) -> list:
    """The lengths of the states ``_project`` projects (h*w: image positions), as a list that grows."""
    lengths, original = [], two_way._project

    def counted(attention, name, states, fast):
        lengths.append(states.shape[1])
        return original(attention, name, states, fast)

    monkeypatch.setattr(two_way, "_project", counted)
    return lengths


@pytest.fixture
def folds(monkeypatch) -> list:
    """Folded cross-attentions whatever the sizes (the tiny model's heads x tokens exceed its inner width, so by
    default it never folds); returns the lengths of the image-side projections made, as a list that grows."""
    monkeypatch.setattr(two_way, "FOLD_BELOW", float("inf"))
    return count_image_side_projections(monkeypatch)


def test_tiny_model_does_not_fold_by_default(model, monkeypatch):
    lengths = count_image_side_projections(monkeypatch)
    embeddings, inputs = random_embeddings(1), prompts(1, 1)
    decode(model, embeddings, **inputs)
    lengths.clear()
    decode(model, embeddings, **inputs)
    assert GRID * GRID in lengths


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch, per", [(1, 1), (2, 3)])
def test_folded_decode_equals_the_plain_decode(model, folds, attn, batch, per):
    model.set_attn_implementation(attn)
    embeddings = random_embeddings(batch)
    for seed in (0, 5):
        expected = reference(model, embeddings, **prompts(batch, per, seed))
        folds.clear()
        assert_outputs_close(decode(model, embeddings, **prompts(batch, per, seed)), expected)
    # from the cache, every image-side projection of the h*w positions is folded away
    assert folds and GRID * GRID not in folds, str(folds)


@pytest.mark.parametrize("masks", [4, 2])
def test_folded_decode_with_mask_prompts(model, folds, masks):
    embeddings, inputs = random_embeddings(2), prompts(2, 2)
    inputs["input_masks"] = torch.randn(masks, 1, MASK, MASK, generator=torch.Generator().manual_seed(2))
    expected = reference(model, embeddings, **inputs)
    folds.clear()
    assert_outputs_close(decode(model, embeddings, **inputs), expected)
    # no cache: the first layer folds too, no image-side projection of the h*w positions at all
    assert folds and GRID * GRID not in folds, str(folds)


def test_folds_only_in_inference(model, folds):
    embeddings, inputs = random_embeddings(2), prompts(2, 2)
    reference(model, embeddings, **inputs)  # training mode
    # each layer's image->token query (token->image projects inside HfVlAttention, not counted here)
    assert folds.count(GRID * GRID) == 2
    folds.clear()
    with torch.enable_grad():  # eval with autograd
        model(image_embeddings=embeddings, **inputs)
    assert folds.count(GRID * GRID) == 2
    assert entry(model) is None


def test_folded_bf16_and_float64(model, folds):
    embeddings, inputs = random_embeddings(2), prompts(2, 2)
    model.double()
    out = decode(model, embeddings.double(), **inputs)
    assert_outputs_close(out, reference(model, embeddings.double(), **inputs), atol=1e-10, rtol=1e-10)
    model.to(torch.bfloat16)
    embeddings = embeddings.bfloat16()
    expected = reference(model, embeddings, **inputs)
    out = decode(model, embeddings, **inputs)
    error = (out.pred_masks.float() - expected.pred_masks.float()).norm() / expected.pred_masks.float().norm()
    assert error < 2e-2, f"bf16 relative error {error:.3g}"


# ------------------------------------------------------------------------------------ oneDNN products
two_way_fused = two_way.fused_linear


@pytest.mark.parametrize("left_groups, groups", [(1, 1), (1, 3), (3, 3)])
@pytest.mark.parametrize("transposed_right", [False, True])
def test_products_equal_bmm(left_groups, groups, transposed_right, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(left_groups, 5, 24, generator=generator)
    right = torch.randn(groups, 24, 37, generator=generator).transpose(1, 2) if transposed_right else \
        torch.randn(groups, 37, 24, generator=generator)
    expected = left @ right.transpose(1, 2)
    calls = []
    monkeypatch.setattr(two_way, "fused_linear", lambda *args: calls.append(1) or two_way_fused(*args))
    out = two_way._products(left, right)
    assert out.shape == (groups, 5, 37)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert len(calls) == (groups if two_way.can_fuse_linear(left) else 0)  # one oneDNN GEMM per group on the CPU
    calls.clear()
    with torch.enable_grad():  # autograd: the plain ops, differentiable
        left.requires_grad_(True)
        out = two_way._products(left, right)
        out.sum().backward()
    assert not calls and left.grad is not None
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out64 = two_way._products(left.detach().double(), right.double())
    torch.testing.assert_close(out64, expected.double(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ sub-pixel layout
def _reference_unshuffle(blocks: torch.Tensor) -> torch.Tensor:
    """mask[.., 4h + 2 r1 + r2, 4w + 2 c1 + c2] = blocks[.., h, w, r1, c1, r2, c2], element by element."""
    batch, prompts, masks, height, width = blocks.shape[:5]
    out = blocks.new_zeros(batch, prompts, masks, 4 * height, 4 * width)
    for r1, c1, r2, c2 in torch.cartesian_prod(*[torch.arange(2)] * 4).tolist():
        out[..., 2 * r1 + r2 :: 4, 2 * c1 + c2 :: 4] = blocks[..., r1, c1, r2, c2]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("into", ["new", "slice", "odd"])
def test_unshuffle_masks_lays_out_the_sub_pixels(dtype, into, monkeypatch):
    blocks = torch.randn(2, 3, 2, 5, 6, 2, 2, 2, 2, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = _reference_unshuffle(blocks)
    out = None
    if into == "slice":  # a chunk of a larger output, as the chunked decode writes it
        out = torch.full((2, 7, 2, 20, 24), -1.0, dtype=dtype)[:, 2:5]
    elif into == "odd":  # an odd storage offset: no pair view possible, the elementwise copy
        out = torch.empty(2 * 3 * 2 * 20 * 24 + 1, dtype=dtype)[1:].view(2, 3, 2, 20, 24)
    verdicts = []
    movable = decoder_module._pairs_movable
    monkeypatch.setattr(decoder_module, "_pairs_movable", lambda *t: verdicts.append(movable(*t)) or verdicts[-1])
    result = decoder_module._unshuffle_masks(blocks, out)
    assert torch.equal(result, expected)
    if out is not None:
        assert result is out
    if into == "slice":  # nothing outside the slice written
        assert (out._base[:, :2] == -1).all() and (out._base[:, 5:] == -1).all()
    paired = dtype != torch.float64 and into != "odd"  # 8-byte elements have no 16-byte integer to pair them
    assert all(verdicts) == paired


def test_unshuffle_masks_under_autograd_is_differentiable():
    blocks = torch.randn(1, 2, 3, 4, 4, 2, 2, 2, 2, requires_grad=True)
    weight = torch.randn(1, 2, 3, 16, 16)
    with torch.enable_grad():
        masks = decoder_module._unshuffle_masks(blocks)
        (masks * weight).sum().backward()
    assert torch.equal(masks.detach(), _reference_unshuffle(blocks.detach()))
    assert torch.equal(_reference_unshuffle(blocks.grad), weight)  # each element's gradient: its pixel's weight


# ------------------------------------------------------------------------------------ reduced-precision softmax
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape, dim", [((2, 56, 4096), -1), ((1, 8, 4, 7, 4096), -2), ((1, 8, 2, 7, 15), -2)])
def test_softmax_is_computed_in_fp32(dtype, shape, dim):
    """The decoder's softmax keeps fp32 accuracy for bf16/fp16 logits: as close to the float64 softmax as the
    explicit fp32 softmax rounded to the dtype (within one unit in the last place of 1)."""
    logits = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 8).to(dtype)
    probs = two_way._softmax(logits, dim)
    assert probs.dtype == dtype
    exact = logits.double().softmax(dim)
    rounded = logits.float().softmax(dim).to(dtype)
    ulp = torch.finfo(dtype).eps
    assert (probs.double() - exact).abs().max() <= (rounded.double() - exact).abs().max() + ulp / 2
    torch.testing.assert_close(probs, rounded, atol=ulp, rtol=0)


# ------------------------------------------------------------------------------------ predicted-IoU gate
def count_upscaled_rows(model, monkeypatch) -> list:
    """Rows (prompts) each upscaling call gets, as a list that grows."""
    rows, decoder = [], model.mask_decoder
    original = decoder.upscale

    def counted(states, first=None):
        assert (states is None) != (first is None), "the states or their first upscaling, one of them"
        rows.append((first if states is None else states).shape[0])
        return original(states, first)

    monkeypatch.setattr(decoder, "upscale", counted)
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("chunk_prompts", [None, 3])
def test_iou_gate_skips_only_the_prompts_that_fail(model, monkeypatch, dtype, multimask, chunk_prompts):
    model = model.to(dtype)
    embeddings, inputs = random_embeddings(2).to(dtype), dict(prompts(2, 8), multimask_output=multimask)
    if chunk_prompts is not None:  # chunks of 3 prompts (8 per image: the last chunk is short)
        monkeypatch.setattr(decoder_module, "DECODE_CHUNK_BYTES", 3 * 2 * DIM * GRID * GRID * embeddings.element_size())
    plain = decode(model, embeddings, **inputs)
    best = plain.iou_scores.float().amax(-1)  # (batch, P): a prompt is kept while one of its masks passes
    threshold = float(best.flatten().median())  # about half of the 16 prompts at or below it: they are skipped
    upscaled = count_upscaled_rows(model, monkeypatch)
    gated = decode(model, embeddings, **inputs, mask_iou_threshold=threshold)
    kept = best > threshold
    assert sum(upscaled) == int(kept.sum()) and 0 < int(kept.sum()) < 16
    assert torch.equal(gated.iou_scores, plain.iou_scores)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(gated.pred_masks[kept], plain.pred_masks[kept], **tolerance)
    assert (gated.pred_masks[~kept] == torch.finfo(dtype).min).all()


def test_iou_gate_extremes(model, monkeypatch):
    embeddings, inputs = random_embeddings(1), prompts(1, 5)
    plain = decode(model, embeddings, **inputs)
    upscaled = count_upscaled_rows(model, monkeypatch)
    below = decode(model, embeddings, **inputs, mask_iou_threshold=float(plain.iou_scores.min()) - 1.0)
    assert torch.equal(below.pred_masks, plain.pred_masks) and upscaled == [5]  # all pass: the ungated path
    above = decode(model, embeddings, **inputs, mask_iou_threshold=float(plain.iou_scores.max()))
    assert upscaled == [5] and (above.pred_masks == torch.finfo(torch.float32).min).all()  # none: nothing upscaled
    assert torch.equal(above.iou_scores, plain.iou_scores)


def test_iou_gate_bad_input(model):
    embeddings, inputs = random_embeddings(1), prompts(1, 2)
    for bad in ("0.5", True, torch.tensor(0.5)):
        with pytest.raises(TypeError, match="mask_iou_threshold must be a real number"):
            decode(model, embeddings, **inputs, mask_iou_threshold=bad)
    with pytest.raises(ValueError, match="mask_iou_threshold .* inference option"):
        model(image_embeddings=embeddings, **inputs, mask_iou_threshold=0.5)  # autograd on
    model.train()
    with torch.no_grad(), pytest.raises(ValueError, match="inference option"):
        model(image_embeddings=embeddings, **inputs, mask_iou_threshold=0.5)
