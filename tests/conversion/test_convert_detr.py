"""DETR conversion: the original facebookresearch/detr layout (every key maps; numerics through PyTorch's own
``nn.MultiheadAttention``) and transformers' ``DetrForObjectDetection`` (parity on real photographs, full R50 size).

The original layout is rebuilt here from the original repository's module structure (``models/detr.py``,
``transformer.py``, ``backbone.py`` at 29901c5), using only torch/torchvision modules: ``backbone.0.body`` is a
torchvision ResNet-50 with frozen batch norm minus ``avgpool``/``fc`` (``IntermediateLayerGetter``), the
transformer layers are ``nn.MultiheadAttention`` + ``linear1/2`` + ``norm1..3``, plus ``query_embed``,
``input_proj``, ``class_embed`` and the ``bbox_embed`` MLP. Its key count and element count are those measured on
the original code (checkpoints.md section 6: 458 keys, 41,631,008 elements).
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torchvision
import transformers
from conversion_helpers import assert_parity
from PIL import Image
from torch import nn
from torch.nn import functional as F

import hf_vl  # noqa: F401  (registers the Auto classes)
from hf_vl import HfVlDetrForObjectDetection, HfVlDetrImageProcessor, detr_variant_config
from hf_vl.conversion import ConversionError, convert_state_dict
from hf_vl.conversion.api import CONVERSIONS, convert_checkpoint
from hf_vl.conversion.convert_hf_vl_detr import DETR_CONVERSION, ORIGINAL_RULES, TRANSFORMERS_RULES, load_original
from hf_vl.modeling.hf_vl_embeddings import sine_position_embedding_2d

HIDDEN, HEADS, QUERIES, CLASSES = 256, 8, 100, 91


@pytest.fixture(autouse=True)
def detr_conversion(monkeypatch):
    """``hf-vl convert detr``: registered here until ``hf_vl.conversion.api.CONVERSIONS`` lists DETR itself."""
    monkeypatch.setitem(CONVERSIONS, "detr", DETR_CONVERSION)


# ------------------------------------------------------------------------------------------ original layout
def _module(**children) -> nn.Module:
    module = nn.Module()
    for name, child in children.items():
        setattr(module, name, child)
    return module


def _ffn_and_norms(num_norms: int) -> dict:
    norms = {f"norm{i}": nn.LayerNorm(HIDDEN) for i in range(1, num_norms + 1)}
    return dict(linear1=nn.Linear(HIDDEN, 2048), linear2=nn.Linear(2048, HIDDEN), **norms)


def original_detr_layout(dilation: bool = False, num_classes: int = CLASSES) -> nn.Module:
    """The original DETR-R50 module tree (same names, shapes and parameter/buffer split)."""
    body = torchvision.models.resnet50(
        weights=None,
        replace_stride_with_dilation=[False, False, dilation],
        norm_layer=torchvision.ops.FrozenBatchNorm2d,
    )
    del body.avgpool, body.fc  # IntermediateLayerGetter stops after layer4
    encoder_layers = [_module(self_attn=nn.MultiheadAttention(HIDDEN, HEADS), **_ffn_and_norms(2)) for _ in range(6)]
    decoder_layers = [
        _module(self_attn=nn.MultiheadAttention(HIDDEN, HEADS), multihead_attn=nn.MultiheadAttention(HIDDEN, HEADS),
                **_ffn_and_norms(3))
        for _ in range(6)
    ]  # fmt: skip
    transformer = _module(
        encoder=_module(layers=nn.ModuleList(encoder_layers)),
        decoder=_module(layers=nn.ModuleList(decoder_layers), norm=nn.LayerNorm(HIDDEN)),
    )
    return _module(
        transformer=transformer,
        class_embed=nn.Linear(HIDDEN, num_classes + 1),
        bbox_embed=_module(layers=nn.ModuleList([nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN),
                                                 nn.Linear(HIDDEN, 4)])),  # fmt: skip
        query_embed=nn.Embedding(QUERIES, HIDDEN),
        input_proj=nn.Conv2d(2048, HIDDEN, kernel_size=1),
        # Joiner(backbone, position_embedding) is an nn.Sequential: the backbone is "backbone.0"
        backbone=nn.ModuleList([_module(body=body)]),
    )


def original_panoptic_layout() -> nn.Module:
    """``DETRsegm``: the detection model under ``detr``, ``MHAttentionMap`` and ``MaskHeadSmallConv(264, [1024, 512,
    256], 256)`` (models/segmentation.py), with the panoptic models' 250 classes."""
    # lay{i}: channels[i - 1] -> channels[i] (3x3), gn{i} on channels[i]; adapter{i}: FPN map -> channels[i + 1]
    channels = [HIDDEN + HEADS, HIDDEN + HEADS, HIDDEN // 2, HIDDEN // 4, HIDDEN // 8, HIDDEN // 16]
    head = {"out_lay": nn.Conv2d(channels[5], 1, 3, padding=1)}
    for i in range(1, 6):
        head[f"lay{i}"] = nn.Conv2d(channels[i - 1], channels[i], 3, padding=1)
        head[f"gn{i}"] = nn.GroupNorm(8, channels[i])
    for i, fpn in enumerate((1024, 512, 256), start=1):
        head[f"adapter{i}"] = nn.Conv2d(fpn, channels[i + 1], 1)
    return _module(
        detr=original_detr_layout(num_classes=250),
        bbox_attention=_module(q_linear=nn.Linear(HIDDEN, HIDDEN), k_linear=nn.Linear(HIDDEN, HIDDEN)),
        mask_head=_module(**head),
    )


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct random values of a scale that keeps a 50-layer ResNet's activations O(1): He-scaled conv
    weights, frozen-BN buffers around identity, LayerNorm weights 1 + N(0, 0.1), 1/sqrt(fan_in) matrices."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        elif tensor.ndim == 4:
            tensor.copy_(noise * (2.0 / tensor[0].numel()) ** 0.5)
        elif tensor.ndim == 2:
            tensor.copy_(noise * tensor.shape[-1] ** -0.5)
        elif name.endswith("weight") and "bbox" not in name and "class" not in name:
            tensor.copy_(1.0 + 0.1 * noise)  # LayerNorm and frozen-BN scales
        else:
            tensor.copy_(0.1 * noise)
    return model.eval()


def original_forward(model: nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor):
    """The original's forward (sequence-first ``nn.MultiheadAttention``, post-norm), written from its modules."""
    body = model.backbone[0].body
    x = body.maxpool(F.relu(body.bn1(body.conv1(pixel_values))))
    x = body.layer4(body.layer3(body.layer2(body.layer1(x))))
    padding = F.interpolate((pixel_mask == 0)[None].float(), size=x.shape[-2:]).bool()[0]  # True on padding
    position = sine_position_embedding_2d(~padding, HIDDEN // 2).flatten(2).permute(2, 0, 1)  # (hw, batch, hidden)
    src = model.input_proj(x).flatten(2).permute(2, 0, 1)
    key_padding = padding.flatten(1)
    for layer in model.transformer.encoder.layers:
        q = k = src + position
        src = layer.norm1(src + layer.self_attn(q, k, value=src, key_padding_mask=key_padding)[0])
        src = layer.norm2(src + layer.linear2(F.relu(layer.linear1(src))))
    query_position = model.query_embed.weight[:, None].repeat(1, pixel_values.shape[0], 1)
    tgt = torch.zeros_like(query_position)
    for layer in model.transformer.decoder.layers:
        q = k = tgt + query_position
        tgt = layer.norm1(tgt + layer.self_attn(q, k, value=tgt)[0])
        attended = layer.multihead_attn(tgt + query_position, src + position, value=src, key_padding_mask=key_padding)
        tgt = layer.norm2(tgt + attended[0])
        tgt = layer.norm3(tgt + layer.linear2(F.relu(layer.linear1(tgt))))
    hidden = model.transformer.decoder.norm(tgt).transpose(0, 1)  # (batch, queries, hidden)
    boxes = hidden
    for index, linear in enumerate(model.bbox_embed.layers):
        boxes = linear(boxes) if index == 2 else F.relu(linear(boxes))
    return model.class_embed(hidden), boxes.sigmoid()


@pytest.fixture(scope="module")
def original_r50():
    torch.manual_seed(0)
    return randomize_(original_detr_layout())


def test_original_layout_is_the_measured_one(original_r50):
    state = original_r50.state_dict()
    assert len(state) == 458 and sum(t.numel() for t in state.values()) == 41_631_008
    assert "backbone.0.body.layer1.0.downsample.1.running_var" in state
    assert "transformer.decoder.layers.5.multihead_attn.in_proj_weight" in state
    assert not [key for key in state if "num_batches_tracked" in key]


@pytest.mark.parametrize("dilation", [False, True], ids=["detr-r50", "detr-r50-dc5"])
def test_every_original_key_maps(dilation, original_r50):
    """Strict conversion into the variant's model: no unknown, missing, unexpected or mis-shaped key."""
    state = original_r50.state_dict() if not dilation else original_detr_layout(dilation=True).state_dict()
    with torch.device("meta"):
        model = HfVlDetrForObjectDetection(detr_variant_config("detr-r50-dc5" if dilation else "detr-r50"))
    converted = convert_state_dict(state, ORIGINAL_RULES, expected_keys=model.state_dict())
    assert len(converted) == len(model.state_dict()) == 458 + 18 * 4  # each fused in_proj pair -> 3 weights + 3 biases
    torch.testing.assert_close(
        converted["detr.encoder.layers.3.self_attn.k_proj.weight"],
        state["transformer.encoder.layers.3.self_attn.in_proj_weight"][HIDDEN : 2 * HIDDEN],
    )


def test_every_original_panoptic_key_maps():
    """detr-r50-panoptic: 490 keys, 43,005,528 elements (measured on the original code), into HfVlDetrForSegmentation."""
    from hf_vl.conversion.convert_hf_vl_detr import build_detr_model

    state = original_panoptic_layout().state_dict()
    assert len(state) == 490 and sum(t.numel() for t in state.values()) == 43_005_528
    with torch.device("meta"):
        model = build_detr_model(detr_variant_config("detr-r50-panoptic"))
    assert type(model).__name__ == "HfVlDetrForSegmentation"
    converted = convert_state_dict(state, ORIGINAL_RULES, expected_keys=model.state_dict())
    torch.testing.assert_close(converted["mask_head.blocks.4.norm.weight"], state["mask_head.gn5.weight"])
    torch.testing.assert_close(converted["mask_head.adapters.2.bias"], state["mask_head.adapter3.bias"])


def _two_photos(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch: coffee at (height, width) and an astronaut crop at 3/4 of that, normalised as the original."""
    from skimage import data

    processor = HfVlDetrImageProcessor(size={"height": height, "width": width})
    coffee = processor(Image.fromarray(data.coffee()), return_tensors="pt")["pixel_values"]
    astronaut = HfVlDetrImageProcessor(size={"height": height * 3 // 4, "width": width * 3 // 4})(
        Image.fromarray(data.astronaut()), return_tensors="pt"
    )["pixel_values"]
    pixels = torch.zeros(2, 3, height, width)
    mask = torch.zeros(2, height, width, dtype=torch.long)
    pixels[0], mask[0] = coffee[0], 1
    pixels[1, :, : height * 3 // 4, : width * 3 // 4], mask[1, : height * 3 // 4, : width * 3 // 4] = astronaut[0], 1
    return pixels, mask


def test_original_parity_on_photos(tmp_path, original_r50):
    """Convert a saved ``{"model": ..., "args": Namespace}`` file and compare with the original's forward."""
    checkpoint = tmp_path / "detr-r50-random.pth"
    torch.save({"model": original_r50.state_dict(), "args": argparse.Namespace(backbone="resnet50")}, checkpoint)
    model = convert_checkpoint("detr", "original", checkpoint, "detr-r50", tmp_path / "out", progress=False)
    pixels, mask = _two_photos(192, 256)
    with torch.no_grad():
        logits, boxes = original_forward(original_r50, pixels, mask)
        out = model(pixel_values=pixels, pixel_mask=mask)
    assert_parity("detr original logits (padded batch of 2 photos)", out.logits, logits)
    assert_parity("detr original boxes (padded batch of 2 photos)", out.pred_boxes, boxes)
    reloaded = transformers.AutoModelForObjectDetection.from_pretrained(tmp_path / "out")
    assert type(reloaded) is HfVlDetrForObjectDetection
    assert type(transformers.AutoImageProcessor.from_pretrained(tmp_path / "out")) is HfVlDetrImageProcessor


def test_load_original_rejects_other_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="facebookresearch/detr"):
        load_original(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        load_original(tmp_path / "absent.pth")


def test_unknown_original_key_is_named(original_r50):
    state = {**original_r50.state_dict(), "transformer.encoder.norm.weight": torch.ones(HIDDEN)}  # pre-norm model
    with torch.device("meta"):
        model = HfVlDetrForObjectDetection(detr_variant_config("detr-r50"))
    with pytest.raises(ConversionError, match=r"transformer\.encoder\.norm\.weight"):
        convert_state_dict(state, ORIGINAL_RULES, expected_keys=model.state_dict())


# ----------------------------------------------------------------------------------------------- transformers
def transformers_detr(use_timm_backbone: bool = False, **kwargs) -> transformers.DetrForObjectDetection:
    """A full-size random transformers DETR-R50 (its own ResNet by default)."""
    torch.manual_seed(0)
    config = transformers.DetrConfig(
        use_timm_backbone=use_timm_backbone, use_pretrained_backbone=False, num_labels=CLASSES, **kwargs
    )
    return randomize_(transformers.DetrForObjectDetection(config), seed=1)


@pytest.fixture(scope="module")
def hf_r50_dir(tmp_path_factory):
    """transformers DETR-R50 (use_timm_backbone=False) saved with save_pretrained (Hub legacy names)."""
    directory = tmp_path_factory.mktemp("hf_detr_r50")
    model = transformers_detr()
    model.save_pretrained(directory)
    transformers.DetrImageProcessor().save_pretrained(directory)
    return directory, model


def _compare(name, reference, ours, pixels, mask):
    with torch.no_grad():
        expected = reference(pixel_values=pixels, pixel_mask=mask)
        out = ours(pixel_values=pixels, pixel_mask=mask)
    assert_parity(f"{name} logits", out.logits, expected.logits)
    assert_parity(f"{name} boxes", out.pred_boxes, expected.pred_boxes)


def test_transformers_source_saved_directory(hf_r50_dir, tmp_path, photo):
    directory, reference = hf_r50_dir
    model = convert_checkpoint("detr", "transformers", directory, output=tmp_path / "out", progress=False)
    assert model.config.backbone_depth == 50 and model.config.auxiliary_loss is False
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out")
    assert type(processor) is HfVlDetrImageProcessor
    inputs = processor(photo, size={"shortest_edge": 320, "longest_edge": 512}, return_tensors="pt")
    _compare("detr transformers R50 astronaut 320px", reference, model, inputs["pixel_values"], inputs["pixel_mask"])
    pixels, mask = _two_photos(160, 224)
    _compare("detr transformers R50 padded batch", reference, model, pixels, mask)


def test_transformers_in_memory_names_and_timm_backbone():
    """5.24's in-memory names (``model.backbone.model.*``, ``o_proj``, ``mlp.fc1``) with a timm backbone."""
    pytest.importorskip("timm")
    reference = transformers_detr(use_timm_backbone=True)
    ours = HfVlDetrForObjectDetection(detr_variant_config("detr-r50", auxiliary_loss=False)).eval()
    state = reference.state_dict()
    assert any(".o_proj." in key for key in state)
    assert any(key.startswith("model.backbone.model.conv1") for key in state)
    ours.load_state_dict(convert_state_dict(state, TRANSFORMERS_RULES, expected_keys=ours.state_dict()))
    pixels, mask = _two_photos(128, 160)
    _compare("detr transformers timm-R50 in-memory names", reference, ours, pixels, mask)


@pytest.mark.slow  # the mask head runs on 2 x 100 queries: ~10-30 s on 2 shared cores
def test_transformers_segmentation_directory(tmp_path):
    """DetrForSegmentation (Hub names: ``lay1``, ``q_linear``) -> HfVlDetrForSegmentation: logits, boxes, masks."""
    resnet = transformers.ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.DetrConfig(backbone_config=resnet, use_pretrained_backbone=False, num_labels=250)
    torch.manual_seed(0)
    reference = randomize_(transformers.DetrForSegmentation(config), seed=3)
    reference.save_pretrained(tmp_path / "hf")
    model = convert_checkpoint("detr", "transformers", tmp_path / "hf", progress=False)
    assert type(model).__name__ == "HfVlDetrForSegmentation" and model.config.num_labels == 250
    pixels, mask = _two_photos(128, 160)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, pixel_mask=mask)
        out = model(pixel_values=pixels, pixel_mask=mask)
    for field in ("logits", "pred_boxes", "pred_masks"):
        assert_parity(f"detr transformers panoptic R50 {field}", getattr(out, field), getattr(expected, field))


@pytest.mark.slow
def test_transformers_parity_at_800px(hf_r50_dir, tmp_path):
    """The issue's proof: full R50, coffee (400x600) resized as DETR evaluates (shortest side 800 -> 800x1200)."""
    from skimage import data

    directory, reference = hf_r50_dir
    model = convert_checkpoint("detr", "transformers", directory, progress=False)
    inputs = HfVlDetrImageProcessor()(Image.fromarray(np.asarray(data.coffee())), return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[-2:]) == (800, 1200)
    _compare("detr transformers R50 coffee 800x1200", reference, model, inputs["pixel_values"], inputs["pixel_mask"])
