"""ViT: the common model tests on a tiny config, plus ViT-specific behaviour (position-embedding interpolation,
pooling, the in21k ``pre_logits`` layer, losses for Trainer, input validation, config and variants)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from common.model_tester import ModelTester, ModelTesterMixin
from common.tiny import BATCH_SIZE, NUM_LABELS, TINY_IMAGE, TINY_TRANSFORMER, tiny_vit_config

from hf_vl import (
    VIT_VARIANTS,
    HfVlVitConfig,
    HfVlVitForImageClassification,
    HfVlVitImageProcessor,
    HfVlVitModel,
    vit_variant_config,
)
from hf_vl.modeling.hf_vl_embeddings import interpolate_learned_position_embeddings

HIDDEN = TINY_TRANSFORMER["hidden_size"]
GRID = TINY_IMAGE["image_size"] // TINY_IMAGE["patch_size"]  # 8
TOKENS = 1 + GRID * GRID  # 65


@dataclasses.dataclass(frozen=True)
class VitTester(ModelTester):
    model_classes = (HfVlVitModel, HfVlVitForImageClassification)
    base_model_class = HfVlVitModel
    compile_model_class = HfVlVitForImageClassification
    dropout_overrides = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}

    def get_config(self, **overrides):
        return tiny_vit_config(**overrides)

    def prepare_inputs(self, batch_size):
        size = TINY_IMAGE["image_size"]
        return {"pixel_values": torch.randn(batch_size, TINY_IMAGE["num_channels"], size, size)}

    def prepare_labels(self, model_class, batch_size):
        if model_class is HfVlVitForImageClassification:
            return {"labels": torch.randint(0, NUM_LABELS, (batch_size,))}
        return {}

    def expected_shapes(self, model_class, batch_size):
        if model_class is HfVlVitForImageClassification:
            return {"logits": (batch_size, NUM_LABELS)}
        return {"last_hidden_state": (batch_size, TOKENS, HIDDEN), "pooler_output": (batch_size, HIDDEN)}


class TestVitCommon(ModelTesterMixin):
    tester = VitTester()


def _model(cls=HfVlVitModel, **overrides):
    torch.manual_seed(0)
    return cls(tiny_vit_config(**overrides)).eval()


def _pixels(batch=BATCH_SIZE, height=32, width=32):
    return torch.randn(batch, 3, height, width)


# ------------------------------------------------------------------------------------------- outputs / layout
def test_attention_and_hidden_state_shapes():
    model = _model(attn_implementation="eager")
    with torch.no_grad():
        out = model(_pixels(), output_attentions=True, output_hidden_states=True)
    assert [tuple(a.shape) for a in out.attentions] == [(BATCH_SIZE, 4, TOKENS, TOKENS)] * 2
    assert [tuple(h.shape) for h in out.hidden_states] == [(BATCH_SIZE, TOKENS, HIDDEN)] * 3
    # last_hidden_state is the final LayerNorm of the last layer's output (hidden_states are pre-norm)
    torch.testing.assert_close(model.final_layer_norm(out.hidden_states[-1]), out.last_hidden_state)


def test_key_layout():
    head_keys = set(_model(HfVlVitForImageClassification).state_dict())
    expected = {
        "vit.embeddings.patch_embedding.weight",
        "vit.embeddings.class_embedding",
        "vit.embeddings.position_embedding",
        "vit.encoder.layers.1.self_attn.q_proj.weight",
        "vit.encoder.layers.1.self_attn.out_proj.bias",
        "vit.encoder.layers.0.mlp.fc1.weight",
        "vit.encoder.layers.0.layer_norm2.bias",
        "vit.final_layer_norm.weight",
        "classifier.weight",
    }
    assert expected <= head_keys, expected - head_keys
    assert not any(k.startswith("vit.pooler") for k in head_keys), "pooler keys without representation_size"
    base_keys = set(_model(HfVlVitModel).state_dict())
    assert base_keys == {k[len("vit.") :] for k in head_keys if k.startswith("vit.")}


# ------------------------------------------------------------------------------------ position interpolation
def test_interpolate_pos_encoding_48x40():
    model = _model(attn_implementation="eager")
    pixels = _pixels(height=48, width=40)
    with torch.no_grad():
        out = model(pixels, interpolate_pos_encoding=True, output_hidden_states=True)
    assert out.last_hidden_state.shape == (BATCH_SIZE, 1 + 12 * 10, HIDDEN)
    assert torch.isfinite(out.last_hidden_state).all()
    # oracle: timm's resampling with DINO's / transformers' plain bicubic (timm's default antialias=True switches
    # torch to a different cubic kernel, a=-0.5, and differs by ~6e-3 even when upsampling)
    from timm.layers import resample_abs_pos_embed

    emb = model.embeddings
    position = resample_abs_pos_embed(
        emb.position_embedding.detach(), (12, 10), (GRID, GRID), num_prefix_tokens=1, antialias=False
    )
    patches = F.conv2d(pixels, emb.patch_embedding.weight, emb.patch_embedding.bias, stride=4).flatten(2).mT
    tokens = torch.cat([emb.class_embedding.expand(BATCH_SIZE, -1, -1), patches], dim=1) + position
    torch.testing.assert_close(out.hidden_states[0], tokens, atol=1e-5, rtol=1e-5)


def test_interpolate_pos_encoding_is_identity_at_native_size():
    model, pixels = _model(), _pixels()
    with torch.no_grad():
        torch.testing.assert_close(model(pixels, interpolate_pos_encoding=True), model(pixels), atol=0, rtol=0)
    grid = torch.randn(1, TOKENS, HIDDEN)
    assert interpolate_learned_position_embeddings(grid, (GRID, GRID), (GRID, GRID)) is grid


def test_other_size_without_interpolation_is_a_clear_error():
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        _model()(_pixels(height=48, width=40))


def test_size_not_multiple_of_patch_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        _model()(_pixels(height=30, width=32), interpolate_pos_encoding=True)


def test_head_with_interpolation_and_smaller_image():
    model = _model(HfVlVitForImageClassification)
    with torch.no_grad():
        logits = model(_pixels(height=16, width=24), interpolate_pos_encoding=True).logits
    assert logits.shape == (BATCH_SIZE, NUM_LABELS) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("pooling", ["token", "mean"])
def test_pooling(pooling):
    model = _model(pooling=pooling)
    with torch.no_grad():
        out = model(_pixels())
    sequence = out.last_hidden_state
    expected = sequence[:, 0] if pooling == "token" else sequence[:, 1:].mean(dim=1)
    torch.testing.assert_close(out.pooler_output, expected, atol=0, rtol=0)


def test_mean_and_token_pooling_differ_and_head_reads_the_pool():
    pixels = _pixels()
    token, mean = _model(HfVlVitForImageClassification), _model(HfVlVitForImageClassification, pooling="mean")
    with torch.no_grad():
        assert not torch.allclose(token(pixels).logits, mean(pixels).logits)
        pooled = mean.vit(pixels).pooler_output
        torch.testing.assert_close(mean(pixels).logits, mean.classifier(pooled), atol=0, rtol=0)


def test_representation_size_pre_logits(tmp_path):
    model = _model(HfVlVitForImageClassification, representation_size=24)
    keys = set(model.state_dict())
    assert {"vit.pooler.dense.weight", "vit.pooler.dense.bias"} <= keys
    assert model.classifier.in_features == 24
    pixels = _pixels()
    with torch.no_grad():
        out = model.vit(pixels)
        dense = model.vit.pooler.dense
        expected = torch.tanh(out.last_hidden_state[:, 0] @ dense.weight.T + dense.bias)
        torch.testing.assert_close(out.pooler_output, expected, atol=1e-6, rtol=1e-5)
        logits = model(pixels).logits
    assert logits.shape == (BATCH_SIZE, NUM_LABELS)
    model.save_pretrained(tmp_path)
    loaded, info = HfVlVitForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, logits, atol=0, rtol=0)


def test_num_labels_zero_gives_features():
    model = _model(HfVlVitForImageClassification, num_labels=0)
    with torch.no_grad():
        assert model(_pixels()).logits.shape == (BATCH_SIZE, HIDDEN)


# ------------------------------------------------------------------------------------------------------ loss
def test_single_label_loss():
    model = _model(HfVlVitForImageClassification)
    labels = torch.tensor([0, 4, 2])
    out = model(_pixels(), labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert model.config.problem_type in (None, "single_label_classification")


def test_multi_label_loss():
    model = _model(HfVlVitForImageClassification, problem_type="multi_label_classification")
    labels = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.float32)
    out = model(_pixels(), labels=labels)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, labels))


def test_regression_loss_with_one_label():
    model = _model(HfVlVitForImageClassification, num_labels=1)
    labels = torch.tensor([0.5, -1.0, 2.0])
    out = model(_pixels(), labels=labels)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), labels))


@pytest.mark.parametrize("problem_type", ["single_label_classification", "multi_label_classification"])
def test_trainer_trains(problem_type, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _model(HfVlVitForImageClassification, problem_type=problem_type)
    assert model.accepts_loss_kwargs is False  # Trainer keeps dividing the mean loss by GA steps
    if problem_type == "single_label_classification":
        labels = torch.randint(0, NUM_LABELS, (6,))
    else:
        labels = (torch.rand(6, NUM_LABELS) > 0.5).float()
    data = [{"pixel_values": p, "labels": y} for p, y in zip(torch.randn(6, 3, 32, 32), labels)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, num_train_epochs=1, learning_rate=1e-2,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
    )
    before = model.classifier.weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert np.isfinite(result.training_loss) and result.training_loss > 0
    assert trainer.label_names == ["labels"] or "labels" in (trainer.label_names or ["labels"])
    assert not torch.equal(model.classifier.weight.detach(), before), "Trainer did not update the classifier"


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("pixel_values", "error", "match"),
    [
        (torch.randn(3, 32, 32), ValueError, "pixel_values"),  # no batch dim
        (torch.randn(1, 1, 3, 32, 32), ValueError, "pixel_values"),
        (torch.randn(2, 1, 32, 32), ValueError, "pixel_values"),  # grayscale into an RGB model
        (torch.randn(2, 4, 32, 32), ValueError, "pixel_values"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, "floating"),
        (torch.randint(0, 255, (2, 3, 32, 32)), TypeError, "floating"),
        (np.zeros((2, 3, 32, 32), dtype=np.float32), TypeError, "torch.Tensor"),
        ([[0.0]], TypeError, "torch.Tensor"),
        (None, ValueError, "pixel_values"),
    ],
    ids=["3d", "5d", "1-channel", "4-channel", "uint8", "int64", "numpy", "list", "none"],
)
@pytest.mark.parametrize("model_class", [HfVlVitModel, HfVlVitForImageClassification])
def test_bad_pixel_values(model_class, pixel_values, error, match):
    with pytest.raises(error, match=match):
        _model(model_class)(pixel_values)


def test_fp32_pixels_into_bf16_model():
    model = _model(HfVlVitForImageClassification).to(torch.bfloat16)
    with torch.no_grad():
        logits = model(_pixels()).logits  # pipelines load with dtype="auto" and feed fp32 pixels
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"hidden_size": 30}, "divisible by num_attention_heads"),
        ({"image_size": 30}, "multiple of patch_size"),
        ({"pooling": "max"}, "pooling"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_vit_config(**overrides)


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="hidden_act"):
        HfVlVitModel(tiny_vit_config(hidden_act="not_an_activation"))


def test_config_defaults_are_vit_base_patch16_224():
    config = HfVlVitConfig()
    expected = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-6, pooling="token",
                    representation_size=None, qkv_bias=True, model_type="hf_vl_vit")
    assert {k: getattr(config, k) for k in expected} == expected


def test_config_dict_round_trip_keeps_non_defaults():
    config = tiny_vit_config(pooling="mean", representation_size=24, hidden_act="gelu_pytorch_tanh",
                             id2label={0: "cat", 1: "dog"})
    again = HfVlVitConfig.from_dict(config.to_dict())
    assert (again.pooling, again.representation_size, again.hidden_act) == ("mean", 24, "gelu_pytorch_tanh")
    assert again.id2label == {0: "cat", 1: "dog"} and again.num_labels == 2
    assert again.to_dict() == config.to_dict()
    assert config.to_diff_dict()["pooling"] == "mean"


def _expected_num_parameters(config: HfVlVitConfig) -> int:
    """Parameter count from the paper's architecture, written out independently of the model code."""
    d, i, p, c = config.hidden_size, config.intermediate_size, config.patch_size, config.num_channels
    tokens = 1 + (config.image_size // p) ** 2
    layer = 2 * 2 * d + 4 * (d * d + d) + (d * i + i) + (i * d + d)
    trunk = (c * p * p * d + d) + d + tokens * d + config.num_hidden_layers * layer + 2 * d
    width = config.representation_size or d
    pre_logits = (d * width + width) if config.representation_size else 0
    return trunk + pre_logits + width * config.num_labels + config.num_labels


@pytest.mark.parametrize("name", sorted(VIT_VARIANTS))
def test_variants_build_valid_configs(name):
    entry = VIT_VARIANTS[name]
    config = vit_variant_config(name)
    assert isinstance(config, HfVlVitConfig)
    assert {k: getattr(config, k) for k in entry["config"]} == entry["config"]
    assert config.hidden_size % config.num_attention_heads == 0 and config.image_size % config.patch_size == 0
    assert ("in21k" in name) == (config.representation_size is not None) == (config.num_labels == 21843)
    assert entry["source"], "every variant records where its weights come from"
    processor = HfVlVitImageProcessor(**entry["processor"])
    assert processor.size.get("height", processor.size.get("shortest_edge")) == config.image_size
    with torch.device("meta"):  # full size, no memory: check the architecture adds up
        model = HfVlVitForImageClassification(config)
    assert sum(p.numel() for p in model.parameters()) == _expected_num_parameters(config)


def test_known_parameter_counts():
    """Published sizes (timm's ``vit_{tiny,base,large}_patch16_224``) pin down the formula above."""
    counts = {"vit-tiny-patch16-224": 5_717_416, "vit-base-patch16-224": 86_567_656,
              "vit-large-patch16-224": 304_326_632}
    for name, count in counts.items():
        assert _expected_num_parameters(vit_variant_config(name)) == count, name


def test_variant_overrides_and_unknown_name():
    config = vit_variant_config("vit-base-patch16-224", hidden_act="gelu_pytorch_tanh", num_labels=7)
    assert config.hidden_act == "gelu_pytorch_tanh" and config.num_labels == 7
    with pytest.raises(ValueError, match="unknown ViT variant"):
        vit_variant_config("vit-gigantic")


def test_gap_model_without_class_token():
    # the original's classifier="gap" models: no class token, mean of the patch tokens
    model = _model(HfVlVitForImageClassification, pooling="mean", class_token=False)
    assert model.vit.embeddings.class_embedding is None
    assert "vit.embeddings.class_embedding" not in model.state_dict()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = model.vit(pixel_values)
        logits = model(pixel_values).logits
    assert outputs.last_hidden_state.shape == (2, 8 * 8, 32)  # (batch, patches only, hidden)
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state.mean(dim=1))
    torch.testing.assert_close(logits, model.classifier(outputs.pooler_output))
    with torch.no_grad():  # interpolation with no prefix token
        assert model.vit(torch.randn(1, 3, 48, 40), interpolate_pos_encoding=True).last_hidden_state.shape[1] == 120


def test_token_pooling_needs_a_class_token():
    with pytest.raises(ValueError, match="class_token"):
        tiny_vit_config(pooling="token", class_token=False)
