"""DETR checkpoints -> hf_vl ``HfVlDetrForObjectDetection`` (keys ``detr.*``, ``classifier.*``, ``bbox_head.*``).

Sources (``hf-vl convert detr --source <name>``):

- ``original``: a facebookresearch/detr release file (``detr-r50-e632da11.pth`` ...): ``{"model": state_dict}``
  with ``backbone.0.body.*`` (torchvision ResNet with frozen batch norm), ``transformer.*`` (``nn.MultiheadAttention``
  with fused ``in_proj_weight``/``in_proj_bias``, split here into q/k/v), ``query_embed``, ``input_proj``,
  ``class_embed`` and ``bbox_embed.layers.*``. The variant (``--variant detr-r50`` ...) gives the config. Panoptic
  files (``detr-r50-panoptic-00ce5173.pth`` ...) prefix all of that with ``detr.`` and add ``bbox_attention.*`` and
  ``mask_head.*``; their variants build ``HfVlDetrForSegmentation``.
- ``transformers``: a ``DetrForObjectDetection`` ``save_pretrained`` directory. transformers 5.24 writes the Hub
  (legacy) names (``model.backbone.conv_encoder.model.*``, ``out_proj``, ``fc1``); its in-memory names
  (``model.backbone.model.*``, ``o_proj``, ``mlp.fc1``) are accepted too. Both backbones are accepted: timm's
  (torchvision key names) and transformers' own ResNet (``use_timm_backbone=False``:
  ``embedder.embedder.convolution``, ``encoder.stages.S.layers.L.layer.I``, ``shortcut``), whose stage and layer
  numbers are shifted by one here (``stages.0`` -> ``layer1``, ``layer.0`` -> ``conv1``). The config is read from
  ``config.json``. ``DetrForSegmentation`` directories (``detr.model.*``, ``bbox_attention``, ``mask_head``; the
  mask head in its Hub names ``lay1``.. or 5.24's in-memory ``conv1.conv``, ``fpn_stages.*``) convert to
  ``HfVlDetrForSegmentation``.

Both sources map torchvision's ``downsample.0`` / ``downsample.1`` to hf_vl's ``downsample.conv`` /
``downsample.norm`` (``hf_vl_resnet``) and ignore ``num_batches_tracked`` (frozen batch norm has none).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from ..modeling.configuration_hf_vl_detr import DETR_VARIANTS, HfVlDetrConfig
from ..modeling.modeling_hf_vl_detr import HfVlDetrForObjectDetection
from ..modeling.modeling_hf_vl_detr_panoptic import HfVlDetrForSegmentation
from .loaders import StateDict, as_state_dict, load_transformers_directory
from .rules import Drop, Rename, Split
from .spec import ConversionSpec, Source
from .transforms import split_qkv

_BODY = "detr.backbone.body."
_ENC = r"detr.encoder.layers.\1."
_DEC = r"detr.decoder.layers.\1."
_BN = r"(weight|bias|running_mean|running_var)"
_BATCHES = Drop(r".*\.num_batches_tracked", reason="frozen batch norm keeps no batch counter")
# panoptic checkpoints hold the detection model under "detr." (original: DETRsegm.detr; transformers:
# DetrForSegmentation.detr); the rules accept both, and the target model's keys decide which is valid
_OPTIONAL_DETR = r"(?:detr\.)?"


def _with_optional_detr_prefix(rules: tuple) -> tuple:
    return tuple(dataclasses.replace(rule, source=_OPTIONAL_DETR + rule.source) for rule in rules)


def _panoptic_head(in_memory: bool) -> tuple:
    """Mask head and attention map: the original's names (= transformers' Hub names), or 5.24's in-memory names."""
    rules = [
        Rename(r"bbox_attention\.(?:q_linear|q_proj)\.(weight|bias)", r"bbox_attention.q_proj.\1"),
        Rename(r"bbox_attention\.(?:k_linear|k_proj)\.(weight|bias)", r"bbox_attention.k_proj.\1"),
        Rename(r"mask_head\.out_lay\.(weight|bias)", r"mask_head.output.\1"),
        *(Rename(rf"mask_head\.lay{i}\.(weight|bias)", rf"mask_head.blocks.{i - 1}.conv.\1") for i in range(1, 6)),
        *(Rename(rf"mask_head\.gn{i}\.(weight|bias)", rf"mask_head.blocks.{i - 1}.norm.\1") for i in range(1, 6)),
        *(Rename(rf"mask_head\.adapter{i}\.(weight|bias)", rf"mask_head.adapters.{i - 1}.\1") for i in range(1, 4)),
    ]
    if in_memory:
        rules += [
            Rename(r"mask_head\.output_conv\.(weight|bias)", r"mask_head.output.\1"),
            Rename(r"mask_head\.conv1\.(conv|norm)\.(weight|bias)", r"mask_head.blocks.0.\1.\2"),
            Rename(r"mask_head\.conv2\.(conv|norm)\.(weight|bias)", r"mask_head.blocks.1.\1.\2"),
            Rename(r"mask_head\.fpn_stages\.(\d)\.fpn_adapter\.(weight|bias)", r"mask_head.adapters.\1.\2"),
            *(
                Rename(rf"mask_head\.fpn_stages\.{i}\.refine\.(conv|norm)\.(weight|bias)",
                       rf"mask_head.blocks.{i + 2}.\1.\2")
                for i in range(3)
            ),
        ]  # fmt: skip
    return tuple(rules)


def _torchvision_body(prefix: str) -> tuple:
    """torchvision ResNet keys under ``prefix`` (original DETR, timm backbone) -> hf_vl body keys."""
    return (
        Rename(prefix + r"((?:layer\d\.\d+\.)?(?:conv\d\.weight|bn\d\.(?:weight|bias|running_mean|running_var)))",
               _BODY + r"\1"),
        Rename(prefix + r"(layer\d\.\d+)\.downsample\.0\.weight", _BODY + r"\1.downsample.conv.weight"),
        Rename(prefix + r"(layer\d\.\d+)\.downsample\.1\." + _BN, _BODY + r"\1.downsample.norm.\2"),
    )


# --------------------------------------------------------------------------------------------------- original
_ORIGINAL_DETECTION_RULES = (
    *_torchvision_body(r"backbone\.0\.body\."),
    _BATCHES,
    *(
        Split(
            rf"transformer\.{part}\.layers\.(\d+)\.{attn}\.in_proj_(weight|bias)",
            tuple(rf"detr.{part}.layers.\1.{ours}.{p}_proj.\2" for p in "qkv"),
            split_qkv,
        )
        for part, attn, ours in (
            ("encoder", "self_attn", "self_attn"),
            ("decoder", "self_attn", "self_attn"),
            ("decoder", "multihead_attn", "cross_attn"),
        )
    ),
    Rename(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
           r"detr.\1.layers.\2.self_attn.out_proj.\3"),
    Rename(r"transformer\.decoder\.layers\.(\d+)\.multihead_attn\.out_proj\.(weight|bias)",
           _DEC + r"cross_attn.out_proj.\2"),
    Rename(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.linear([12])\.(weight|bias)",
           r"detr.\1.layers.\2.mlp.fc\3.\4"),
    Rename(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.norm([123])\.(weight|bias)",
           r"detr.\1.layers.\2.layer_norm\3.\4"),
    Rename(r"transformer\.decoder\.norm\.(weight|bias)", r"detr.decoder.final_layer_norm.\1"),
    Rename(r"query_embed\.weight", "detr.query_position_embeddings.weight"),
    Rename(r"input_proj\.(weight|bias)", r"detr.input_projection.\1"),
    Rename(r"class_embed\.(weight|bias)", r"classifier.\1"),
    Rename(r"bbox_embed\.layers\.(\d)\.(weight|bias)", r"bbox_head.layers.\1.\2"),
)  # fmt: skip
ORIGINAL_RULES = (*_with_optional_detr_prefix(_ORIGINAL_DETECTION_RULES), *_panoptic_head(in_memory=False))


def load_original(path) -> StateDict:
    """``{"model": state_dict, ...}`` of a facebookresearch/detr training or release file -> the state dict.

    Opened with ``weights_only=True``; ``argparse.Namespace`` (the ``args`` that ``main.py`` checkpoints hold) is the
    one class allowed besides tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "model" not in obj:
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} is not a facebookresearch/detr checkpoint ({{'model': state_dict}}); found {keys}")
    return as_state_dict(obj["model"], path)


# ------------------------------------------------------------------------------------------------ transformers
_HF_BODY = r"model\.backbone\.(?:conv_encoder\.)?model\."  # Hub (legacy) | 5.24 in-memory
_HF_STAGE = _HF_BODY + r"encoder\.stages\.{s}\.layers\.(\d+)\."


def _transformers_resnet_body() -> tuple:
    """transformers' own ResNet (``ResNetBackbone``) -> torchvision numbering: stage s -> layer{s+1}, i -> conv{i+1}."""
    embedder = _HF_BODY + r"embedder\.embedder\."
    rules = [
        Rename(embedder + r"convolution\.weight", _BODY + "conv1.weight"),
        Rename(embedder + r"normalization\." + _BN, _BODY + r"bn1.\1"),
    ]
    for s in range(4):
        stage = _HF_STAGE.format(s=s)
        rules += [
            Rename(stage + r"shortcut\.convolution\.weight", _BODY + rf"layer{s + 1}.\1.downsample.conv.weight"),
            Rename(stage + r"shortcut\.normalization\." + _BN, _BODY + rf"layer{s + 1}.\1.downsample.norm.\2"),
        ]
        for i in range(3):
            rules += [
                Rename(stage + rf"layer\.{i}\.convolution\.weight", _BODY + rf"layer{s + 1}.\1.conv{i + 1}.weight"),
                Rename(stage + rf"layer\.{i}\.normalization\." + _BN, _BODY + rf"layer{s + 1}.\1.bn{i + 1}.\2"),
            ]
    return tuple(rules)


_HF_ENC = r"model\.encoder\.layers\.(\d+)\."
_HF_DEC = r"model\.decoder\.layers\.(\d+)\."
_TRANSFORMERS_DETECTION_RULES = (
    *_torchvision_body(_HF_BODY),  # timm backbone: torchvision names
    *_transformers_resnet_body(),
    _BATCHES,
    Rename(_HF_ENC + r"self_attn\.([qkv])_proj\.(weight|bias)", _ENC + r"self_attn.\2_proj.\3"),
    Rename(_HF_ENC + r"self_attn\.(?:out|o)_proj\.(weight|bias)", _ENC + r"self_attn.out_proj.\2"),
    Rename(_HF_ENC + r"self_attn_layer_norm\.(weight|bias)", _ENC + r"layer_norm1.\2"),
    Rename(_HF_ENC + r"(?:mlp\.)?(fc[12])\.(weight|bias)", _ENC + r"mlp.\2.\3"),
    Rename(_HF_ENC + r"final_layer_norm\.(weight|bias)", _ENC + r"layer_norm2.\2"),
    Rename(_HF_DEC + r"self_attn\.([qkv])_proj\.(weight|bias)", _DEC + r"self_attn.\2_proj.\3"),
    Rename(_HF_DEC + r"self_attn\.(?:out|o)_proj\.(weight|bias)", _DEC + r"self_attn.out_proj.\2"),
    Rename(_HF_DEC + r"encoder_attn\.([qkv])_proj\.(weight|bias)", _DEC + r"cross_attn.\2_proj.\3"),
    Rename(_HF_DEC + r"encoder_attn\.(?:out|o)_proj\.(weight|bias)", _DEC + r"cross_attn.out_proj.\2"),
    Rename(_HF_DEC + r"self_attn_layer_norm\.(weight|bias)", _DEC + r"layer_norm1.\2"),
    Rename(_HF_DEC + r"encoder_attn_layer_norm\.(weight|bias)", _DEC + r"layer_norm2.\2"),
    Rename(_HF_DEC + r"(?:mlp\.)?(fc[12])\.(weight|bias)", _DEC + r"mlp.\2.\3"),
    Rename(_HF_DEC + r"final_layer_norm\.(weight|bias)", _DEC + r"layer_norm3.\2"),
    Rename(r"model\.decoder\.layernorm\.(weight|bias)", r"detr.decoder.final_layer_norm.\1"),
    Rename(r"model\.query_position_embeddings\.weight", "detr.query_position_embeddings.weight"),
    Rename(r"model\.input_projection\.(weight|bias)", r"detr.input_projection.\1"),
    Rename(r"class_labels_classifier\.(weight|bias)", r"classifier.\1"),
    Rename(r"bbox_predictor\.layers\.(\d)\.(weight|bias)", r"bbox_head.layers.\1.\2"),
)
TRANSFORMERS_RULES = (*_with_optional_detr_prefix(_TRANSFORMERS_DETECTION_RULES), *_panoptic_head(in_memory=True))

# (layer type, blocks per stage) of transformers' ResNetConfig -> torchvision depth
_RESNET_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}


def backbone_depth_of(raw: dict) -> int:
    """ResNet depth of a DetrConfig dict: a timm backbone name (``resnet50``) or a transformers ResNetConfig."""
    backbone = raw.get("backbone_config") or {}
    if backbone.get("model_type") == "resnet":
        key = (backbone.get("layer_type", "bottleneck"), tuple(backbone.get("depths", ())))
        depth = _RESNET_DEPTHS.get(key)
    else:
        name = backbone.get("backbone") or raw.get("backbone")
        depth = {f"resnet{d}": d for d in (18, 34, 50, 101, 152)}.get(name)
    if depth is None:
        raise ValueError(f"unsupported DETR backbone in config.json: {backbone or raw.get('backbone')!r}")
    return depth


def _check_supported(raw: dict) -> None:
    pairs = (("encoder_ffn_dim", "decoder_ffn_dim"), ("encoder_attention_heads", "decoder_attention_heads"))
    for first, second in pairs:
        if raw.get(first, 0) != raw.get(second, 0):
            raise ValueError(f"{first} != {second} is not supported by HfVlDetrConfig")
    if raw.get("position_embedding_type", "sine") != "sine":
        raise ValueError("only the sine position embedding is supported (position_embedding_type='sine')")


def read_transformers_variant(directory: Path, state_dict: StateDict) -> dict:
    """The variant row of a transformers DETR directory, from ``config.json`` (and ``preprocessor_config.json``)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no config.json (expected a save_pretrained directory)")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != "detr":
        raise ValueError(f"{path} has model_type={raw.get('model_type')!r}; the transformers source reads 'detr'")
    _check_supported(raw)
    defaults = dict(d_model=256, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                    activation_function="relu", dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
                    num_queries=100, auxiliary_loss=False, dilation=False)  # fmt: skip
    raw = {**defaults, **raw}
    config = dict(
        backbone_depth=backbone_depth_of(raw),
        backbone_dilation=bool(raw["dilation"]),
        hidden_size=raw["d_model"],
        num_attention_heads=raw["encoder_attention_heads"],
        encoder_layers=raw["encoder_layers"],
        decoder_layers=raw["decoder_layers"],
        intermediate_size=raw["encoder_ffn_dim"],
        hidden_act=raw["activation_function"],
        dropout=raw["dropout"],
        attention_dropout=raw["attention_dropout"],
        activation_dropout=raw["activation_dropout"],
        num_queries=raw["num_queries"],
        auxiliary_loss=raw["auxiliary_loss"],
    )
    for name in ("class_cost", "bbox_cost", "giou_cost", "eos_coefficient", "bbox_loss_coefficient",
                 "giou_loss_coefficient", "mask_loss_coefficient", "dice_loss_coefficient"):  # fmt: skip
        if name in raw:
            config[name] = raw[name]
    panoptic = "DetrForSegmentation" in (raw.get("architectures") or [])
    if panoptic:
        config["architectures"] = ["HfVlDetrForSegmentation"]
    classifier = state_dict.get("detr.class_labels_classifier.weight", state_dict.get("class_labels_classifier.weight"))
    if classifier is None:
        raise ValueError(f"{directory} has no class_labels_classifier: expected DetrForObjectDetection/Segmentation")
    num_classes = classifier.shape[0] - 1
    id2label = {int(index): label for index, label in (raw.get("id2label") or {}).items()}
    if len(id2label) == num_classes:
        config["id2label"] = id2label
    else:
        config["num_labels"] = num_classes
    return {"config": config, "processor": _read_processor(Path(directory)), "source": str(directory)}


def _read_processor(directory: Path) -> dict:
    path = directory / "preprocessor_config.json"
    processor = dict(DETR_VARIANTS["detr-r50"]["processor"])
    if path.is_file():
        raw = json.loads(path.read_text())
        processor.update({key: raw[key] for key in ("image_mean", "image_std", "size") if key in raw})
    return processor


def build_detr_model(config: HfVlDetrConfig):
    """The model a conversion fills: ``HfVlDetrForSegmentation`` when the config names it in ``architectures``
    (panoptic variants, transformers ``DetrForSegmentation`` directories), else ``HfVlDetrForObjectDetection``.

    Passed as ``ConversionSpec.model_class``, which ``convert_checkpoint`` only ever calls with the config.
    """
    if "HfVlDetrForSegmentation" in (config.architectures or []):
        return HfVlDetrForSegmentation(config)
    return HfVlDetrForObjectDetection(config)


ORIGINAL = Source(
    name="original",
    description="facebookresearch/detr checkpoint {'model': state_dict} (dl.fbaipublicfiles.com/detr/detr-*.pth)",
    load=load_original,
    rules=ORIGINAL_RULES,
)
TRANSFORMERS = Source(
    name="transformers",
    description="transformers DetrForObjectDetection save_pretrained directory (timm or transformers ResNet)",
    load=load_transformers_directory,
    rules=TRANSFORMERS_RULES,
    read_variant=read_transformers_variant,
)

DETR_CONVERSION = ConversionSpec(arch="detr", sources=(ORIGINAL, TRANSFORMERS), model_class=build_detr_model)

__all__ = [
    "DETR_CONVERSION",
    "ORIGINAL_RULES",
    "TRANSFORMERS_RULES",
    "backbone_depth_of",
    "build_detr_model",
    "load_original",
    "read_transformers_variant",
]
