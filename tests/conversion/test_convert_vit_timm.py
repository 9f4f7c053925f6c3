"""ViT from timm state dicts: logits parity on a real photo, the saved directory, the CLI and the error cases."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import transformers
from conversion_helpers import assert_parity, pixel_values, random_model
from safetensors.torch import save_file

import hf_vl  # noqa: F401  (registers the Auto classes)
from hf_vl.cli import main
from hf_vl.conversion import ConversionError
from hf_vl.conversion.api import convert_checkpoint

TINY_TIMM = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def _timm_vit(**kwargs):
    return random_model(lambda: timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs))


def _save(model, path):
    torch.save(model.state_dict(), path)
    return path


def _check_logits(name, reference, output_dir, photo):
    """Logits of the saved hf_vl directory (reloaded through the Auto classes) vs ``reference`` on ``photo``."""
    processor = transformers.AutoImageProcessor.from_pretrained(output_dir)
    model, info = transformers.AutoModelForImageClassification.from_pretrained(output_dir, output_loading_info=True)
    assert type(model).__name__ == "HfVlVitForImageClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    pixels = pixel_values(processor, photo)
    with torch.no_grad():
        return assert_parity(name, model(pixels).logits, reference(pixels))


def test_tiny_timm_parity_and_saved_directory(tmp_path, photo, tiny_vit_variant):
    reference = _timm_vit(**TINY_TIMM)
    checkpoint = _save(reference, tmp_path / "vit_tiny.pth")
    model = convert_checkpoint("vit", "timm", checkpoint, tiny_vit_variant, tmp_path / "out", progress=False)
    assert isinstance(model, hf_vl.HfVlVitForImageClassification) and not model.training
    files = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= files
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "hf_vl_vit" and config["hidden_act"] == "gelu" and config["layer_norm_eps"] == 1e-6
    preprocessor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "HfVlVitImageProcessor"
    assert preprocessor["size"] == {"height": 32, "width": 32}
    _check_logits("timm tiny (api)", reference, tmp_path / "out", photo)


def test_tiny_timm_parity_through_the_cli(tmp_path, photo, tiny_vit_variant):
    reference = _timm_vit(**TINY_TIMM)
    checkpoint = _save(reference, tmp_path / "vit_tiny.pth")
    argv = ["convert", "vit", "--source", "timm", "--checkpoint", str(checkpoint)]
    assert main([*argv, "--variant", tiny_vit_variant, "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    _check_logits("timm tiny (cli)", reference, tmp_path / "out", photo)


def test_timm_safetensors_file_and_config_overrides(tmp_path, photo, tiny_vit_variant):
    reference = _timm_vit(**{**TINY_TIMM, "num_classes": 7})  # a fine-tuned head: the variant says 10 labels
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    convert_checkpoint(
        "vit", "timm", tmp_path / "model.safetensors", tiny_vit_variant, tmp_path / "out",
        progress=False, config_overrides={"num_labels": 7},
    )  # fmt: skip
    _check_logits("timm tiny (safetensors, 7 labels)", reference, tmp_path / "out", photo)


def test_timm_mean_pooling(tmp_path, photo, add_vit_variant):
    # global average pooling over patch tokens with the final norm before pooling (timm fc_norm=False)
    reference = _timm_vit(**TINY_TIMM, global_pool="avg", fc_norm=False)
    variant = add_vit_variant("vit-test-tiny-gap", pooling="mean")
    convert_checkpoint("vit", "timm", _save(reference, tmp_path / "m.pth"), variant, tmp_path / "out", progress=False)
    _check_logits("timm tiny (mean pooling)", reference, tmp_path / "out", photo)


@pytest.mark.slow
def test_base_timm_parity(tmp_path, photo):
    reference = _timm_vit(num_classes=1000)
    checkpoint = _save(reference, tmp_path / "vit_base.pth")
    model = convert_checkpoint("vit", "timm", checkpoint, "vit-base-patch16-224", tmp_path / "out", progress=False)
    assert model.config.hidden_size == 768 and model.config.num_hidden_layers == 12
    _check_logits("timm vit-base-patch16-224", reference, tmp_path / "out", photo)


# ----------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def tiny_checkpoint(tmp_path):
    return _save(_timm_vit(**TINY_TIMM), tmp_path / "vit_tiny.pth")


def test_unknown_variant_lists_the_valid_names(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown vit variant 'vit-nope'.*vit-base-patch16-224"):
        convert_checkpoint("vit", "timm", tiny_checkpoint, "vit-nope", tmp_path / "out")


def test_missing_variant_is_an_error(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="needs a variant.*vit-large-patch16-224"):
        convert_checkpoint("vit", "timm", tiny_checkpoint, None, tmp_path / "out")


def test_unknown_source_and_architecture_list_the_valid_names(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"unknown source 'jax'.*\['timm', 'google', 'transformers'\]"):
        convert_checkpoint("vit", "jax", tiny_checkpoint, "vit-base-patch16-224", tmp_path / "out")
    with pytest.raises(ValueError, match=r"unknown architecture 'vitt'.*'vit'"):
        convert_checkpoint("vitt", "timm", tiny_checkpoint, "vit-base-patch16-224", tmp_path / "out")


def test_extra_key_is_named(tmp_path, tiny_vit_variant):
    state_dict = _timm_vit(**TINY_TIMM).state_dict()
    state_dict["blocks.0.ls1.gamma"] = torch.ones(64)  # layer scale: not part of this architecture
    torch.save(state_dict, tmp_path / "extra.pth")
    with pytest.raises(ConversionError, match=r"unknown source keys.*\n.*blocks\.0\.ls1\.gamma") as error:
        convert_checkpoint("vit", "timm", tmp_path / "extra.pth", tiny_vit_variant, tmp_path / "out")
    assert error.value.problems == {"unknown source keys (no rule matches)": ["blocks.0.ls1.gamma"]}
    assert not (tmp_path / "out").exists()


def test_wrong_variant_size_reports_missing_keys_and_shapes(tiny_checkpoint, add_vit_variant, tmp_path):
    variant = add_vit_variant("vit-test-deeper", num_hidden_layers=3)
    with pytest.raises(ConversionError, match=r"missing target keys.*\n.*vit\.encoder\.layers\.2\."):
        convert_checkpoint("vit", "timm", tiny_checkpoint, variant, tmp_path / "out")
    variant = add_vit_variant("vit-test-wider-mlp", intermediate_size=128)
    with pytest.raises(ConversionError, match=r"shape mismatches.*\n.*mlp\.fc1\.weight: \(256, 64\) vs \(128, 64\)"):
        convert_checkpoint("vit", "timm", tiny_checkpoint, variant, tmp_path / "out")


def test_fc_norm_layer_norm_is_not_silently_dropped(tmp_path, add_vit_variant):
    # timm's default for avg pooling normalises after pooling (fc_norm), which hf_vl does not implement
    reference = _timm_vit(**TINY_TIMM, global_pool="avg")
    variant = add_vit_variant("vit-test-tiny-gap", pooling="mean")
    with pytest.raises(ConversionError, match=r"fc_norm\.weight") as error:
        convert_checkpoint("vit", "timm", _save(reference, tmp_path / "m.pth"), variant, tmp_path / "out")
    assert error.value.problems["unknown source keys (no rule matches)"] == ["fc_norm.weight", "fc_norm.bias"]


def test_wrapped_or_missing_checkpoint_is_a_clear_error(tmp_path, tiny_vit_variant):
    torch.save({"model": {"cls_token": torch.zeros(1)}, "epoch": torch.tensor(3)}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match="not a flat state dict.*'model'"):
        convert_checkpoint("vit", "timm", tmp_path / "wrapped.pth", tiny_vit_variant, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint("vit", "timm", tmp_path / "absent.pth", tiny_vit_variant, tmp_path / "out")
    (tmp_path / "weights.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unsupported suffix '\.ckpt'"):
        convert_checkpoint("vit", "timm", tmp_path / "weights.ckpt", tiny_vit_variant, tmp_path / "out")


def test_cli_reports_errors_with_exit_code_2(tiny_checkpoint, tmp_path, capsys):
    argv = ["convert", "vit", "--source", "timm", "--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path)]
    assert main([*argv, "--variant", "vit-nope"]) == 2
    assert "unknown vit variant 'vit-nope'" in capsys.readouterr().err
