"""The rule engine (hf_vl.conversion.rules) and the pure transforms (hf_vl.conversion.transforms)."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_vl.conversion import (
    ConversionError,
    Drop,
    Merge,
    Rename,
    Split,
    convert_state_dict,
    plan_conversion,
)
from hf_vl.conversion import transforms
from hf_vl.conversion.rules import AMBIGUOUS, DUPLICATE, FAILED, INCOMPLETE, MISSING, SHAPE, UNEXPECTED, UNKNOWN


def _sd(*keys, shape=(2, 3)):
    return {key: torch.randn(shape) for key in keys}


def test_rename_with_backreferences_and_transform():
    state_dict = _sd("blocks.0.fc.weight", "blocks.11.fc.weight")
    rules = [Rename(r"blocks\.(\d+)\.fc\.(weight)", r"layers.\1.mlp.\2", transforms.transpose)]
    out = convert_state_dict(state_dict, rules)
    assert sorted(out) == ["layers.0.mlp.weight", "layers.11.mlp.weight"]
    torch.testing.assert_close(out["layers.11.mlp.weight"], state_dict["blocks.11.fc.weight"].T, rtol=0, atol=0)
    assert out["layers.0.mlp.weight"].is_contiguous()


def test_split_fused_qkv():
    qkv = torch.randn(12, 4)
    rules = [Split(r"attn\.qkv\.(weight)", ("q.\\1", "k.\\1", "v.\\1"), transforms.split_qkv)]
    out = convert_state_dict({"attn.qkv.weight": qkv}, rules)
    torch.testing.assert_close(out["q.weight"], qkv[:4], rtol=0, atol=0)
    torch.testing.assert_close(out["k.weight"], qkv[4:8], rtol=0, atol=0)
    torch.testing.assert_close(out["v.weight"], qkv[8:], rtol=0, atol=0)


def test_merge_groups_sources_by_backreferences():
    state_dict = _sd("l.0.q", "l.0.k", "l.1.q", "l.1.k")
    rules = [Merge((r"l\.(\d+)\.q", r"l\.(\d+)\.k"), r"layer.\1.qk", transforms.concat_rows)]
    out = convert_state_dict(state_dict, rules)
    assert sorted(out) == ["layer.0.qk", "layer.1.qk"]
    torch.testing.assert_close(out["layer.1.qk"], torch.cat([state_dict["l.1.q"], state_dict["l.1.k"]]))


def test_incomplete_merge_is_an_error():
    rules = [Merge((r"l\.(\d+)\.q", r"l\.(\d+)\.k"), r"layer.\1.qk", transforms.concat_rows)]
    with pytest.raises(ConversionError) as error:
        convert_state_dict(_sd("l.0.q", "l.0.k", "l.1.q"), rules)
    assert list(error.value.problems) == [INCOMPLETE]
    assert "l.1.q" in str(error.value)


def test_unknown_keys_are_all_listed():
    rules = [Rename(r"a\.(weight|bias)", r"b.\1")]
    with pytest.raises(ConversionError) as error:
        convert_state_dict(_sd("a.weight", "extra.one", "extra.two", "a.scale"), rules)
    assert isinstance(error.value, ValueError)
    assert error.value.problems[UNKNOWN] == ["extra.one", "extra.two", "a.scale"]
    for key in ("extra.one", "extra.two", "a.scale"):
        assert key in str(error.value)


def test_ambiguous_key_names_every_matching_rule():
    rules = [Rename(r"blocks\.(\d+)\.x", r"one.\1"), Rename(r"blocks\.0\.(x)", r"two.\1"), Rename(r"y", "y")]
    with pytest.raises(ConversionError) as error:
        convert_state_dict(_sd("blocks.0.x", "blocks.1.x", "y"), rules)
    assert list(error.value.problems) == [AMBIGUOUS]
    (entry,) = error.value.problems[AMBIGUOUS]
    assert entry.startswith("blocks.0.x:") and "one.\\1" in entry and "two.\\1" in entry


def test_matching_is_anchored():
    rules = [Rename(r"blocks.0.x", "target")]
    with pytest.raises(ConversionError) as error:
        convert_state_dict(_sd("xblocks.0.x", "blocks.0.xy", "blocks.0.x"), rules)
    assert error.value.problems[UNKNOWN] == ["xblocks.0.x", "blocks.0.xy"]
    assert list(convert_state_dict(_sd("blocks.0.x"), rules)) == ["target"]


def test_missing_and_unexpected_target_keys_are_all_listed():
    rules = [Rename(r"(a|b|c)", r"t.\1")]
    expected = ["t.a", "t.b", "t.z", "t.y"]
    with pytest.raises(ConversionError) as error:
        convert_state_dict(_sd("a", "b", "c"), rules, expected_keys=expected)
    assert error.value.problems == {MISSING: ["t.z", "t.y"], UNEXPECTED: ["t.c"]}


def test_problems_of_all_kinds_are_reported_together():
    rules = [Rename(r"(a|b)", r"t.\1")]
    with pytest.raises(ConversionError) as error:
        convert_state_dict(_sd("a", "b", "junk"), rules, expected_keys=["t.a", "t.missing"])
    assert error.value.problems == {UNKNOWN: ["junk"], MISSING: ["t.missing"], UNEXPECTED: ["t.b"]}


def test_expected_shapes_are_checked():
    rules = [Rename(r"(a|b)", r"t.\1")]
    expected = {"t.a": torch.empty(2, 3), "t.b": torch.Size([3, 2])}
    with pytest.raises(ConversionError) as error:
        convert_state_dict(_sd("a", "b"), rules, expected_keys=expected)
    assert error.value.problems == {SHAPE: ["t.b: (2, 3) vs (3, 2)"]}


def test_duplicate_targets_are_an_error():
    rules = [Rename(r"(?:old|new)\.weight", "weight")]
    with pytest.raises(ConversionError) as error:
        convert_state_dict(_sd("old.weight", "new.weight"), rules)
    assert error.value.problems[DUPLICATE] == ["weight: from old.weight and new.weight"]


def test_failed_transforms_name_their_keys():
    rules = [Rename(r"conv_(\d)", r"c\1", transforms.conv_hwio_to_oihw)]
    with pytest.raises(ConversionError) as error:
        convert_state_dict(_sd("conv_1", "conv_2"), rules)
    failures = error.value.problems[FAILED]
    assert len(failures) == 2 and failures[0].startswith("conv_1") and "expects a 4-D tensor" in failures[0]


def test_drop_reason_is_recorded(caplog):
    rules = [Rename("keep", "kept"), Drop(r"pixel_(mean|std)", reason="lives in the image processor")]
    state_dict = _sd("keep", "pixel_mean", "pixel_std")
    plan = plan_conversion(state_dict, rules)
    assert plan.dropped == {"pixel_mean": "lives in the image processor", "pixel_std": "lives in the image processor"}
    assert plan.target_keys == ["kept"]
    with caplog.at_level(logging.INFO, logger="hf_vl.conversion.rules"):
        out = convert_state_dict(state_dict, rules, expected_keys=["kept"])
    assert list(out) == ["kept"]
    assert "dropped pixel_mean: lives in the image processor" in caplog.text


def test_rule_order_does_not_matter():
    state_dict = _sd("a.weight", "b.weight", "c.weight")
    rules = [Rename(r"a\.weight", "x"), Rename(r"(b|c)\.weight", r"y.\1"), Drop(r"c\..*", "unused")]
    with pytest.raises(ConversionError):
        convert_state_dict(state_dict, rules)  # c.weight matches two rules, in either order
    rules = rules[:1] + [Rename(r"b\.weight", "y")] + rules[2:]
    forward = convert_state_dict(state_dict, rules)
    backward = convert_state_dict(state_dict, rules[::-1])
    assert forward.keys() == backward.keys() == {"x", "y"}


def test_progress_bar_runs():
    out = convert_state_dict(_sd("a"), [Rename("a", "b")], expected_keys=["b"], progress=True)
    assert list(out) == ["b"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Rename("(", "x"), "not a valid regular expression"),
        (lambda: Drop("x", reason=" "), "non-empty reason"),
        (lambda: Split("x", ("only",), transforms.split_qkv), "at least two"),
        (lambda: Merge((r"(a)", r"b"), "t", transforms.concat_rows), "same number of groups"),
    ],
)
def test_invalid_rules_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_arguments_raise_type_errors():
    with pytest.raises(TypeError, match="state_dict"):
        convert_state_dict([("a", torch.zeros(1))], [Rename("a", "b")])
    with pytest.raises(TypeError, match="rules"):
        convert_state_dict({"a": torch.zeros(1)}, [("a", "b")])


# ---------------------------------------------------------------------------------------------------- transforms


def test_split_qkv_and_concat_rows_are_inverse():
    fused = torch.randn(3 * 5, 7)
    torch.testing.assert_close(transforms.concat_rows(transforms.split_qkv(fused)), fused, rtol=0, atol=0)
    with pytest.raises(ValueError, match="split_qkv"):
        transforms.split_qkv(torch.randn(8, 7))


def test_conv_hwio_to_oihw_matches_a_tf_style_convolution():
    kernel = torch.randn(3, 2, 4, 5)  # (kh, kw, in, out)
    image = torch.randn(1, 4, 6, 7)
    out = torch.nn.functional.conv2d(image, transforms.conv_hwio_to_oihw(kernel))
    # the TF definition: out[o, y, x] = sum_{h, w, i} image[i, y + h, x + w] * kernel[h, w, i, o]
    patches = image.unfold(2, 3, 1).unfold(3, 2, 1)  # (1, in, y, x, kh, kw)
    expected = torch.einsum("biyxhw,hwio->boyx", patches, kernel)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_dense_general_kernels_match_flax_einsums():
    heads, head_dim, width = 3, 4, 10
    x = torch.randn(2, width)
    kernel_in, bias_in = torch.randn(width, heads, head_dim), torch.randn(heads, head_dim)
    # Flax DenseGeneral(features=(heads, head_dim)): y[b, h, d] = sum_i x[b, i] kernel[i, h, d] + bias[h, d]
    flax_in = torch.einsum("bi,ihd->bhd", x, kernel_in) + bias_in
    linear_in = torch.nn.functional.linear(
        x, transforms.dense_general_in_to_linear(kernel_in), transforms.flatten_heads(bias_in)
    )
    torch.testing.assert_close(linear_in, flax_in.reshape(2, heads * head_dim))
    kernel_out = torch.randn(heads, head_dim, width)
    # the output projection contracts (heads, head_dim): y[b, o] = sum_{h, d} z[b, h, d] kernel[h, d, o]
    flax_out = torch.einsum("bhd,hdo->bo", flax_in, kernel_out)
    linear_out = torch.nn.functional.linear(flax_in.reshape(2, -1), transforms.dense_general_out_to_linear(kernel_out))
    torch.testing.assert_close(linear_out, flax_out, rtol=1e-5, atol=1e-5)
