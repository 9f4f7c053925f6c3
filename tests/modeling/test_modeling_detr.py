"""DETR: the common model tests on a tiny config (ResNet-18 trunk, 2+2 layers of width 32), plus DETR-specific
behaviour: the ResNet trunk (frozen batch norm folding, DC5 stride, frozen stages), padding masks, auxiliary
outputs, losses, input validation, config and variants."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from common.model_tester import ModelTester, ModelTesterMixin, sequential_style_keys
from common.tiny import BATCH_SIZE, NUM_LABELS, TINY_TRANSFORMER

from hf_vl import (
    DETR_VARIANTS,
    HfVlDetrConfig,
    HfVlDetrForObjectDetection,
    HfVlDetrForSegmentation,
    HfVlDetrModel,
    detr_variant_config,
)
from hf_vl.modeling.hf_vl_embeddings import sine_position_embedding_2d
from hf_vl.modeling.hf_vl_resnet import HfVlFrozenBatchNorm2d, HfVlResNetBody, conv_norm

HIDDEN = TINY_TRANSFORMER["hidden_size"]
NUM_QUERIES = 7
HEIGHT, WIDTH = 64, 96  # stride 32 -> a 2x3 feature map
FEATURES = (HEIGHT // 32) * (WIDTH // 32)


def tiny_detr_config(**overrides) -> HfVlDetrConfig:
    sizes = dict(
        backbone_depth=18,
        hidden_size=HIDDEN,
        num_attention_heads=TINY_TRANSFORMER["num_attention_heads"],
        intermediate_size=TINY_TRANSFORMER["intermediate_size"],
        encoder_layers=2,
        decoder_layers=2,
        num_queries=NUM_QUERIES,
        # dropout off by default so that training-mode tests compare deterministic runs
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    labels = {} if "id2label" in overrides else {"num_labels": NUM_LABELS}
    return HfVlDetrConfig(**{**sizes, **labels, **overrides})


def tiny_pixels(batch_size: int = BATCH_SIZE) -> dict:
    """Random pixels; the second image is padded (right half of its mask is 0), as the processor pads a batch."""
    mask = torch.ones(batch_size, HEIGHT, WIDTH, dtype=torch.long)
    if batch_size > 1:
        mask[1, :, WIDTH // 2 :] = 0
    return {"pixel_values": torch.randn(batch_size, 3, HEIGHT, WIDTH), "pixel_mask": mask}


def tiny_labels(batch_size: int = BATCH_SIZE) -> list[dict]:
    """Random targets; image 0 has no object (empty targets must work)."""
    generator = torch.Generator().manual_seed(7)
    labels = []
    for image in range(batch_size):
        count = 0 if image == 0 else image + 1
        centers = torch.rand(count, 2, generator=generator) * 0.5 + 0.25
        sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        labels.append({
            "class_labels": torch.randint(0, NUM_LABELS, (count,), generator=generator),
            "boxes": torch.cat([centers, sizes], dim=1),
        })  # fmt: skip
    return labels


@dataclasses.dataclass(frozen=True)
class DetrTester(ModelTester):
    model_classes = (HfVlDetrModel, HfVlDetrForObjectDetection)
    base_model_class = HfVlDetrModel
    supports_fullgraph_compile = "skips the key padding mask when nothing is padded (a data-dependent branch), " \
        "and the Hungarian matching of the loss runs in scipy"  # fmt: skip
    dropout_overrides = {"dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1}
    # DETR's decoder starts from zero queries (the original's ``tgt = torch.zeros_like(query_embed)``): the first
    # layer's self-attention sees one constant value (its bias terms, zero at init), so q/k cannot matter and the
    # value/output weights and layer_norm1 multiply zeros. Later layers train them all.
    parameters_without_gradient = {
        r"decoder\.layers\.0\.(self_attn\.(q_proj|k_proj|v_proj\.weight|out_proj\.weight)|layer_norm1\.weight)":
            "first decoder layer: self-attention over all-zero queries",
    }  # fmt: skip

    def get_config(self, **overrides):
        return tiny_detr_config(**overrides)

    def prepare_inputs(self, batch_size):
        return tiny_pixels(batch_size)

    def prepare_labels(self, model_class, batch_size):
        return {"labels": tiny_labels(batch_size)} if model_class is HfVlDetrForObjectDetection else {}

    def expected_shapes(self, model_class, batch_size):
        if model_class is HfVlDetrForObjectDetection:
            return {"logits": (batch_size, NUM_QUERIES, NUM_LABELS + 1), "pred_boxes": (batch_size, NUM_QUERIES, 4)}
        return {
            "last_hidden_state": (batch_size, NUM_QUERIES, HIDDEN),
            "encoder_last_hidden_state": (batch_size, FEATURES, HIDDEN),
        }

    def attention_outputs(self, model_class, config):
        return {
            "encoder_attentions": config.encoder_layers,
            "decoder_attentions": config.decoder_layers,
            "cross_attentions": config.decoder_layers,
        }

    def hidden_state_outputs(self, model_class, config):
        return {"encoder_hidden_states": config.encoder_layers + 1, "decoder_hidden_states": config.decoder_layers + 1}


class TestDetrCommon(ModelTesterMixin):
    tester = DetrTester()

    def test_state_dict_keys_have_no_sequential_indices(self, model_class):
        """The common check, except for the ResNet's torchvision block indices (``layer1.0.conv1``): the documented
        deviation of ``hf_vl_resnet`` (checkpoint names of DETR, MoCo and SwAV)."""
        model = self.build(model_class)
        sequentials = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Sequential) and len(m) > 0]
        assert not sequentials, f"nn.Sequential modules (their keys are bare indices): {sequentials}"
        torchvision_blocks = re.compile(r"(detr\.)?backbone\.body\.layer[1-4]\.\d+\.")
        bad = [key for key in sequential_style_keys(model) if not torchvision_blocks.match(key)]
        assert not bad, bad


def tiny_labels_with_masks(batch_size: int = BATCH_SIZE) -> list[dict]:
    """``tiny_labels`` plus a binary mask per box at the input size (what the processor returns for panoptic data)."""
    generator = torch.Generator().manual_seed(8)
    labels = tiny_labels(batch_size)
    for target in labels:
        target["masks"] = torch.rand(len(target["boxes"]), HEIGHT, WIDTH, generator=generator) > 0.5
    return labels


@dataclasses.dataclass(frozen=True)
class DetrSegmentationTester(DetrTester):
    model_classes = (HfVlDetrForSegmentation,)

    def get_config(self, **overrides):
        # 8 heads: the mask head's first GroupNorm(8) needs hidden_size + heads divisible by 8 (32 + 8)
        return tiny_detr_config(**{"num_attention_heads": 8, **overrides})

    def prepare_labels(self, model_class, batch_size):
        return {"labels": tiny_labels_with_masks(batch_size)}

    def expected_shapes(self, model_class, batch_size):
        return {
            "logits": (batch_size, NUM_QUERIES, NUM_LABELS + 1),
            "pred_boxes": (batch_size, NUM_QUERIES, 4),
            "pred_masks": (batch_size, NUM_QUERIES, HEIGHT // 4, WIDTH // 4),
        }


class TestDetrSegmentationCommon(TestDetrCommon):
    tester = DetrSegmentationTester()


def _model(cls=HfVlDetrForObjectDetection, **overrides):
    torch.manual_seed(0)
    return cls(tiny_detr_config(**overrides)).eval()


# ------------------------------------------------------------------------------------------------- layout
def test_key_layout():
    keys = set(_model().state_dict())
    for key in (
        "detr.backbone.body.conv1.weight",
        "detr.backbone.body.bn1.running_var",
        "detr.backbone.body.layer2.0.downsample.conv.weight",
        "detr.backbone.body.layer2.0.downsample.norm.running_mean",
        "detr.input_projection.weight",
        "detr.query_position_embeddings.weight",
        "detr.encoder.layers.1.self_attn.q_proj.weight",
        "detr.encoder.layers.1.mlp.fc2.bias",
        "detr.encoder.layers.1.layer_norm2.weight",
        "detr.decoder.layers.1.cross_attn.out_proj.weight",
        "detr.decoder.layers.1.layer_norm3.bias",
        "detr.decoder.final_layer_norm.weight",
        "classifier.weight",
        "bbox_head.layers.2.bias",
    ):
        assert key in keys, key
    assert not [k for k in keys if "num_batches_tracked" in k]
    assert not [k for k in keys if k.startswith("detr.backbone.body.fc") or "avgpool" in k]


def test_full_size_parameter_count_matches_the_original():
    """41,631,008 elements incl. frozen-BN buffers: the original R50 DETR's state dict (checkpoints.md section 6)."""
    with torch.device("meta"):
        model = HfVlDetrForObjectDetection(HfVlDetrConfig())
    assert sum(t.numel() for t in model.state_dict().values()) == 41_631_008


def test_init_follows_the_original():
    """The original's init (models/transformer.py ``_reset_parameters``, torchvision's ResNet, ``nn.Embedding``):
    Xavier-uniform matrices in the transformer, Kaiming-normal (fan_out) trunk convolutions, unit-variance query
    positions. With transformers' generic normal(0.02) instead, every query starts out nearly identical and the
    shapes recipe never learned classes (the bug HfVlPreTrainedModel fixes)."""
    model = _model(hidden_size=64, num_queries=64)
    queries = model.detr.query_position_embeddings.weight
    assert 0.9 < float(queries.std()) < 1.1
    for linear in (model.detr.encoder.layers[0].self_attn.q_proj, model.detr.decoder.layers[0].mlp.fc1):
        fan_out, fan_in = linear.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert float(linear.weight.abs().max()) <= bound
        assert float(linear.weight.std()) == pytest.approx(bound / 3**0.5, rel=0.1)
        assert not linear.bias.any()
    conv = model.detr.backbone.body.layer1[0].conv1
    fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
    assert float(conv.weight.std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)


def test_stem_and_layer1_are_frozen_as_in_the_original():
    model = _model()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(re.match(r"detr\.backbone\.body\.(conv1|layer1)\.", name) for name in frozen), frozen
    assert model.detr.backbone.body.layer2[0].conv1.weight.requires_grad


# -------------------------------------------------------------------------------------------------- trunk
def test_folded_frozen_batch_norm_equals_conv_then_bn():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1, bias=True)
    norm = HfVlFrozenBatchNorm2d(7)
    norm.weight.uniform_(0.5, 1.5), norm.bias.normal_(), norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 5, 9, 11)
    torch.testing.assert_close(conv_norm(conv, norm, x), norm(conv(x)), atol=1e-5, rtol=1e-5)


def test_frozen_batch_norm_ignores_num_batches_tracked():
    norm = HfVlFrozenBatchNorm2d(4)
    state = {name: torch.rand(4) for name in ("weight", "bias", "running_mean", "running_var")}
    norm.load_state_dict({**state, "num_batches_tracked": torch.tensor(5)})
    torch.testing.assert_close(norm.running_var, state["running_var"])


@pytest.mark.parametrize("depth", [18, 50])
def test_trunk_matches_torchvision(depth):
    """Same weights in torchvision's own ResNet (BN in eval mode) and in HfVlResNetBody (frozen, folded)."""
    import torchvision

    torch.manual_seed(0)
    body = HfVlResNetBody(depth, out_features=("layer1", "layer4"))
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1), module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.0), module.bias.normal_(0, 0.1)
    state = {k.replace("downsample.0", "downsample.conv").replace("downsample.1", "downsample.norm"): v
             for k, v in reference.state_dict().items() if "num_batches_tracked" not in k and not k.startswith("fc.")}
    body.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = body(x)
        stem = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        layer1 = reference.layer1(stem)
        layer4 = reference.layer4(reference.layer3(reference.layer2(layer1)))
    torch.testing.assert_close(ours["layer1"], layer1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours["layer4"], layer4, atol=1e-4, rtol=1e-4)


def test_dc5_halves_the_output_stride_with_the_same_keys():
    plain = _model(HfVlDetrModel, backbone_depth=50)
    dc5 = _model(HfVlDetrModel, backbone_depth=50, backbone_dilation=True)
    assert plain.state_dict().keys() == dc5.state_dict().keys()
    with torch.no_grad():
        out = dc5(**tiny_pixels(1))
    assert out.encoder_last_hidden_state.shape[1] == (HEIGHT // 16) * (WIDTH // 16)


# ------------------------------------------------------------------------------------------ masks, outputs
def test_sine_position_embedding_matches_transformers():
    from transformers.models.detr.modeling_detr import DetrSinePositionEmbedding

    mask = torch.ones(2, 5, 7, dtype=torch.bool)
    mask[1, 3:, :] = False
    mask[1, :, 4:] = False
    reference = DetrSinePositionEmbedding(HIDDEN // 2, normalize=True)(
        shape=torch.Size([2, HIDDEN, 5, 7]), device="cpu", dtype=torch.float32, mask=mask
    )
    torch.testing.assert_close(sine_position_embedding_2d(mask, HIDDEN // 2), reference)


def test_padded_keys_get_no_attention():
    model = _model(attn_implementation="eager")
    inputs = tiny_pixels(2)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    # nearest downsampling of the mask: feature column j reads pixel column j * WIDTH // (WIDTH // 32)
    columns = WIDTH // 32
    padded = (torch.arange(columns) * WIDTH // columns >= WIDTH // 2).expand(HEIGHT // 32, columns)
    assert 0 < padded.sum() < padded.numel()
    for weights in out.cross_attentions + out.encoder_attentions:
        assert weights[1][..., padded.flatten()].abs().max() == 0
        assert weights[0][..., padded.flatten()].abs().max() > 0


def test_no_pixel_mask_means_all_pixels_valid():
    model = _model()
    pixels = tiny_pixels(2)["pixel_values"]
    with torch.no_grad():
        implicit = model(pixel_values=pixels)
        explicit = model(pixel_values=pixels, pixel_mask=torch.ones(2, HEIGHT, WIDTH, dtype=torch.long))
    torch.testing.assert_close(implicit.logits, explicit.logits, atol=0, rtol=0)


@pytest.mark.parametrize("mask_resolution", ["pixels", "features"])
def test_cached_backbone_features_give_the_same_outputs(mask_resolution):
    """``get_backbone_features`` once, then ``forward(backbone_features=...)``: the same logits, boxes and loss as
    from pixels (the padding mask may be at pixel or feature resolution; it is downsampled either way)."""
    model = _model()
    inputs, labels = tiny_pixels(2), tiny_labels(2)
    mask = inputs["pixel_mask"]
    if mask_resolution == "features":  # nearest downsampling, as the backbone does
        mask = torch.nn.functional.interpolate(mask[None].float(), size=(HEIGHT // 32, WIDTH // 32))[0].long()
    with torch.no_grad():
        features = model.detr.get_backbone_features(inputs["pixel_values"])
        assert features.shape == (2, model.detr.backbone.body.channels[-1], HEIGHT // 32, WIDTH // 32)
        from_pixels = model(**inputs, labels=labels)
        from_features = model(backbone_features=features, pixel_mask=mask, labels=labels)
    for field in ("logits", "pred_boxes", "loss"):
        torch.testing.assert_close(getattr(from_features, field), getattr(from_pixels, field), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("inputs", "error", "match"),
    [
        ({}, ValueError, "exactly one of pixel_values and backbone_features"),
        ({"pixel_values": torch.randn(1, 3, 64, 64), "backbone_features": torch.randn(1, 512, 2, 2)}, ValueError,
         "exactly one"),
        ({"backbone_features": torch.randn(1, 256, 2, 2)}, ValueError, r"must have shape \(batch, 512"),
        ({"backbone_features": torch.ones(1, 512, 2, 2, dtype=torch.long)}, TypeError, "floating-point"),
    ],
)
def test_bad_backbone_features(inputs, error, match):
    with pytest.raises(error, match=match):
        _model()(**inputs)


def test_auxiliary_outputs_are_the_earlier_decoder_layers():
    model = _model(decoder_layers=3)
    inputs = tiny_pixels(2)
    with torch.no_grad():
        out = model(**inputs, labels=tiny_labels(2))
        base = model.detr(**inputs)
        # only with labels (they feed the loss), as transformers' DETR: a per-layer list breaks pipeline batching
        assert model(**inputs).auxiliary_outputs is None
    assert len(out.auxiliary_outputs) == 2
    assert base.intermediate_hidden_states.shape == (3, 2, NUM_QUERIES, HIDDEN)
    torch.testing.assert_close(base.intermediate_hidden_states[-1], base.last_hidden_state)
    logits, boxes = model.predict(base.intermediate_hidden_states[0])
    torch.testing.assert_close(out.auxiliary_outputs[0]["logits"], logits)
    torch.testing.assert_close(out.auxiliary_outputs[0]["pred_boxes"], boxes)
    assert _model(auxiliary_loss=False)(**tiny_pixels(1), labels=tiny_labels(1)).auxiliary_outputs is None


def test_boxes_are_normalised_cxcywh():
    with torch.no_grad():
        boxes = _model()(**tiny_pixels()).pred_boxes
    assert boxes.min() >= 0 and boxes.max() <= 1


# ------------------------------------------------------------------------------------------------- losses
def test_loss_and_loss_dict():
    model = _model().train()
    out = model(**tiny_pixels(), labels=tiny_labels())
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    config = model.config
    weights = {"loss_ce": 1.0, "loss_bbox": config.bbox_loss_coefficient, "loss_giou": config.giou_loss_coefficient}
    suffixes = [""] + [f"_{i}" for i in range(config.decoder_layers - 1)]
    expected = sum(weights[k] * out.loss_dict[k + s] for k in weights for s in suffixes)
    torch.testing.assert_close(out.loss.detach(), expected)
    assert {"class_error", "cardinality_error"} <= set(out.loss_dict)


def test_loss_without_auxiliary_losses():
    model = _model(auxiliary_loss=False).train()
    out = model(**tiny_pixels(), labels=tiny_labels())
    assert not [k for k in out.loss_dict if k[-1].isdigit()]


def test_segmentation_loss_has_mask_terms_and_detection_weights_load():
    detection = _model(num_attention_heads=8)
    segmentation, info = HfVlDetrForSegmentation.from_pretrained(
        _saved(detection), output_loading_info=True
    )
    # the original trains the mask head on a (frozen) detection model: only the head is new
    assert info["missing_keys"] and all(k.startswith(("bbox_attention.", "mask_head.")) for k in info["missing_keys"])
    assert not info["unexpected_keys"]
    out = segmentation.train()(**tiny_pixels(), labels=tiny_labels_with_masks())
    assert {"loss_mask", "loss_dice"} <= set(out.loss_dict) and "loss_mask_0" not in out.loss_dict
    out.loss.backward()
    assert segmentation.mask_head.output.weight.grad.abs().sum() > 0


def _saved(model) -> str:
    import tempfile

    directory = tempfile.mkdtemp(prefix="hf_vl_detr_")
    model.save_pretrained(directory)
    return directory


def test_mask_head_size_validation():
    with pytest.raises(ValueError, match="divisible by 8"):
        HfVlDetrForSegmentation(tiny_detr_config(num_attention_heads=4))


def test_trainer_knows_the_loss_is_a_mean():
    assert HfVlDetrForObjectDetection.accepts_loss_kwargs is False


@pytest.mark.parametrize(
    "labels, error, match",
    [
        ({"class_labels": torch.tensor([1]), "boxes": torch.rand(1, 4)}, TypeError, "list of dicts"),
        ([{"boxes": torch.rand(1, 4)}] * BATCH_SIZE, ValueError, "class_labels"),
        ([{"class_labels": torch.tensor([1]), "boxes": torch.rand(1, 3)}] * BATCH_SIZE, ValueError, "boxes"),
        ([{"class_labels": torch.tensor([1]), "boxes": torch.rand(1, 4)}], ValueError, "targets has 1"),
    ],
)
def test_bad_labels(labels, error, match):
    with pytest.raises(error, match=match):
        _model()(**tiny_pixels(), labels=labels)


# ------------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize(
    "pixel_values, error, match",
    [
        ([[0.0]], TypeError, "torch.Tensor"),
        (torch.zeros(1, 1, 64, 64), ValueError, r"\(batch, 3, height, width\)"),
        (torch.zeros(3, 64, 64), ValueError, "shape"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "floating-point"),
    ],
)
def test_bad_pixel_values(pixel_values, error, match):
    with pytest.raises(error, match=match):
        _model(HfVlDetrModel)(pixel_values=pixel_values)


def test_fp32_pixels_into_bf16_model():
    model = _model().to(torch.bfloat16)
    with torch.no_grad():
        out = model(**tiny_pixels(1))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"backbone_depth": 42}, "backbone_depth"),
        ({"backbone_depth": 18, "backbone_dilation": True}, "DC5"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "divisible"),
        ({"num_queries": 0}, "num_queries"),
        ({"class_cost": 0, "bbox_cost": 0, "giou_cost": 0}, "can't all be 0"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        HfVlDetrConfig(**overrides)


def test_config_defaults_are_detr_r50():
    config = HfVlDetrConfig()
    assert (config.backbone_depth, config.backbone_dilation) == (50, False)
    assert (config.hidden_size, config.num_queries) == (256, 100)
    assert (config.encoder_layers, config.decoder_layers, config.intermediate_size) == (6, 6, 2048)
    assert config.num_labels == 91 and config.id2label[1] == "person" and config.id2label[90] == "toothbrush"
    assert (config.class_cost, config.bbox_cost, config.giou_cost, config.eos_coefficient) == (1, 5, 2, 0.1)
    assert config.auxiliary_loss is True


@pytest.mark.parametrize("name", sorted(DETR_VARIANTS))
def test_variants_build_valid_configs(name):
    config = detr_variant_config(name)
    row = DETR_VARIANTS[name]
    assert config.backbone_depth == (101 if "r101" in name else 50)
    assert config.backbone_dilation == ("dc5" in name)
    assert config.num_labels == (250 if row["panoptic"] else 91)
    assert row["source"].startswith("https://dl.fbaipublicfiles.com/detr/") and row["source"].endswith(".pth")
    assert row["processor"]["size"] == {"shortest_edge": 800, "longest_edge": 1333}


def test_variant_overrides_and_unknown_name():
    assert detr_variant_config("detr-r50", num_queries=10).num_queries == 10
    with pytest.raises(ValueError, match="detr-r50"):
        detr_variant_config("detr-r18")
