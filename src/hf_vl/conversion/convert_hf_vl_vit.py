"""ViT checkpoints -> hf_vl ``HfVlVitForImageClassification`` (keys ``vit.*`` and ``classifier.*``).

Sources (``hf-vl convert vit --source <name>``):

- ``timm``: a ``state_dict()`` of a timm ``vit_*`` model (``.pth``/``.safetensors``). Unsupported timm options fail
  as unknown keys instead of converting to a different network: layer scale (``ls1``/``ls2``), register tokens,
  qk-norm, and ``fc_norm`` as a real LayerNorm (timm applies it after pooling; hf_vl normalises before). With
  ``fc_norm`` an ``nn.Identity`` (the default for class-token pooling) there is no key to drop.
- ``google``: the original JAX ``.npz`` of google-research/vision_transformer. Sub-modules are numbered by the Flax
  version that wrote the file: released files count all children of a block together (``LayerNorm_0``,
  ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``), newer Flax counts per type (``LayerNorm_0``,
  ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``); both are accepted. The original numerics
  are set in the config: ``hidden_act="gelu_pytorch_tanh"`` (Flax ``nn.gelu`` is the tanh approximation) and
  ``layer_norm_eps=1e-6``.
- ``transformers``: a ``ViTModel`` / ``ViTForImageClassification`` ``save_pretrained`` directory. Both the Hub
  (legacy) names that transformers 5.24 writes (``vit.encoder.layer.N.attention.attention.query``) and its in-memory
  names (``vit.layers.N.attention.q_proj``) are accepted. The config is read from ``config.json`` (HF defaults:
  exact GELU, ``layer_norm_eps=1e-12``), so ``--variant`` is optional; the pooler (``pre_logits``) and the number
  of labels are read from the weights that are present.

A checkpoint without a classification head converts with ``num_labels=0`` (``classifier`` is the identity); load
the result with ``AutoModel`` to get ``HfVlVitModel``.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers

from ..modeling.modeling_hf_vl_vit import HfVlVitForImageClassification
from .loaders import StateDict, load_npz, load_state_dict_file, load_transformers_directory
from .rules import Drop, Rename, Split
from .spec import ConversionSpec, Source
from .transforms import (
    conv_hwio_to_oihw,
    dense_general_in_to_linear,
    dense_general_out_to_linear,
    flatten_heads,
    split_qkv,
    transpose,
)

_EMB = "vit.embeddings."
_LAYER = r"vit.encoder.layers.\1."  # target block prefix; \1 = the source's block index

# ---------------------------------------------------------------------------------------------------------- timm
TIMM_RULES = (
    Rename(r"cls_token", _EMB + "class_embedding"),
    Rename(r"pos_embed", _EMB + "position_embedding"),
    Rename(r"patch_embed\.proj\.(weight|bias)", _EMB + r"patch_embedding.\1"),
    Rename(r"blocks\.(\d+)\.norm1\.(weight|bias)", _LAYER + r"layer_norm1.\2"),
    Split(
        r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)",
        tuple(_LAYER + rf"self_attn.{p}_proj.\2" for p in "qkv"),
        split_qkv,
    ),
    Rename(r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", _LAYER + r"self_attn.out_proj.\2"),
    Rename(r"blocks\.(\d+)\.norm2\.(weight|bias)", _LAYER + r"layer_norm2.\2"),
    Rename(r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", _LAYER + r"mlp.\2.\3"),
    Rename(r"norm\.(weight|bias)", r"vit.final_layer_norm.\1"),
    Rename(r"pre_logits\.fc\.(weight|bias)", r"vit.pooler.dense.\1"),  # timm < 0.6 in21k models
    Rename(r"head\.(weight|bias)", r"classifier.\1"),
)

# -------------------------------------------------------------------------------------------------------- google
_BLOCK = r"Transformer/encoderblock_(\d+)/"
_MHA = _BLOCK + r"MultiHeadDotProductAttention_[01]/"  # released numbering _1, current Flax _0


def _flax_layer_norm(source: str, target: str) -> tuple[Rename, ...]:
    return Rename(source + "/scale", target + ".weight"), Rename(source + "/bias", target + ".bias")


def _flax_dense(source: str, target: str) -> tuple[Rename, ...]:
    return Rename(source + "/kernel", target + ".weight", transpose), Rename(source + "/bias", target + ".bias")


GOOGLE_RULES = (
    Rename(r"embedding/kernel", _EMB + "patch_embedding.weight", conv_hwio_to_oihw),
    Rename(r"embedding/bias", _EMB + "patch_embedding.bias"),
    Rename(r"cls", _EMB + "class_embedding"),
    Rename(r"Transformer/posembed_input/pos_embedding", _EMB + "position_embedding"),
    *_flax_layer_norm(_BLOCK + "LayerNorm_0", _LAYER + "layer_norm1"),
    *(
        Rename(_MHA + f"{flax}/kernel", _LAYER + f"self_attn.{ours}_proj.weight", dense_general_in_to_linear)
        for flax, ours in (("query", "q"), ("key", "k"), ("value", "v"))
    ),
    *(
        Rename(_MHA + f"{flax}/bias", _LAYER + f"self_attn.{ours}_proj.bias", flatten_heads)
        for flax, ours in (("query", "q"), ("key", "k"), ("value", "v"))
    ),
    Rename(_MHA + "out/kernel", _LAYER + "self_attn.out_proj.weight", dense_general_out_to_linear),
    Rename(_MHA + "out/bias", _LAYER + "self_attn.out_proj.bias"),
    *_flax_layer_norm(_BLOCK + "LayerNorm_[21]", _LAYER + "layer_norm2"),  # released _2, current Flax _1
    *_flax_dense(_BLOCK + "MlpBlock_[30]/Dense_0", _LAYER + "mlp.fc1"),  # released _3, current Flax _0
    *_flax_dense(_BLOCK + "MlpBlock_[30]/Dense_1", _LAYER + "mlp.fc2"),
    *_flax_layer_norm("Transformer/encoder_norm", "vit.final_layer_norm"),
    *_flax_dense("pre_logits", "vit.pooler.dense"),
    *_flax_dense("head", "classifier"),
)

# -------------------------------------------------------------------------------------------------- transformers
_HF = r"(?:vit\.)?"  # ViTForImageClassification keys start with vit., ViTModel keys don't
_HF_LAYER = _HF + r"(?:encoder\.layer|layers)\.(\d+)\."  # Hub (legacy) | 5.24 in-memory

TRANSFORMERS_RULES = (
    Rename(_HF + r"embeddings\.cls_token", _EMB + "class_embedding"),
    Rename(_HF + r"embeddings\.position_embeddings", _EMB + "position_embedding"),
    Rename(_HF + r"embeddings\.patch_embeddings\.projection\.(weight|bias)", _EMB + r"patch_embedding.\1"),
    Drop(_HF + r"embeddings\.mask_token", reason="only replaces masked patches in masked-image-modeling training"),
    Rename(_HF_LAYER + r"layernorm_before\.(weight|bias)", _LAYER + r"layer_norm1.\2"),
    *(
        Rename(
            _HF_LAYER + rf"attention\.(?:attention\.{legacy}|{p}_proj)\.(weight|bias)",
            _LAYER + rf"self_attn.{p}_proj.\2",
        )
        for legacy, p in (("query", "q"), ("key", "k"), ("value", "v"))
    ),
    Rename(_HF_LAYER + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", _LAYER + r"self_attn.out_proj.\2"),
    Rename(_HF_LAYER + r"layernorm_after\.(weight|bias)", _LAYER + r"layer_norm2.\2"),
    Rename(_HF_LAYER + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", _LAYER + r"mlp.fc1.\2"),
    Rename(_HF_LAYER + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", _LAYER + r"mlp.fc2.\2"),
    Rename(_HF + r"layernorm\.(weight|bias)", r"vit.final_layer_norm.\1"),
    Rename(_HF + r"pooler\.dense\.(weight|bias)", r"vit.pooler.dense.\1"),
    Rename(r"classifier\.(weight|bias)", r"classifier.\1"),
)

# ViTConfig fields with the same name and meaning in HfVlVitConfig
_SHARED_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "pooler_act",
)


def _read_hf_config(directory: Path) -> transformers.ViTConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no config.json (expected a save_pretrained directory)")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != "vit":
        raise ValueError(f"{path} has model_type={raw.get('model_type')!r}; the transformers source reads 'vit'")
    return transformers.ViTConfig.from_dict(raw)  # fills the fields a diff-saved config.json leaves out


def _read_processor(directory: Path, image_size: int) -> dict:
    """Mean/std/size of the directory's ``preprocessor_config.json``; else transformers' ViT defaults."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], size=image_size)
    raw = json.loads(path.read_text())
    return {key: raw[key] for key in ("image_mean", "image_std", "size") if key in raw}


def read_transformers_variant(directory: Path, state_dict: StateDict) -> dict:
    """The variant row of a transformers ViT directory: sizes and numerics from ``config.json``; the pooler and the
    number of labels from the weights present (``add_pooling_layer`` is not saved in the config)."""
    hf = _read_hf_config(Path(directory))
    config = {name: getattr(hf, name) for name in _SHARED_FIELDS}
    has_pooler = any(key in state_dict for key in ("pooler.dense.weight", "vit.pooler.dense.weight"))
    config["representation_size"] = (hf.pooler_output_size or hf.hidden_size) if has_pooler else None
    classifier = state_dict.get("classifier.weight")
    config["num_labels"] = 0 if classifier is None else classifier.shape[0]
    if len(hf.id2label) == config["num_labels"] > 0:  # a ViTModel's config.json still lists 2 default labels
        config["id2label"] = {int(index): label for index, label in hf.id2label.items()}
    return {"config": config, "processor": _read_processor(Path(directory), hf.image_size), "source": str(directory)}


TIMM = Source(
    name="timm",
    description="state_dict() of a timm vit_* model (.pth/.pt/.bin or .safetensors)",
    load=load_state_dict_file,
    rules=TIMM_RULES,
)
GOOGLE = Source(
    name="google",
    description="original JAX .npz of google-research/vision_transformer (gs://vit_models/...)",
    load=load_npz,
    rules=GOOGLE_RULES,
    config_overrides={"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
)
TRANSFORMERS = Source(
    name="transformers",
    description="transformers ViTModel / ViTForImageClassification save_pretrained directory",
    load=load_transformers_directory,
    rules=TRANSFORMERS_RULES,
    read_variant=read_transformers_variant,
)

VIT_CONVERSION = ConversionSpec(
    arch="vit", sources=(TIMM, GOOGLE, TRANSFORMERS), model_class=HfVlVitForImageClassification
)

__all__ = ["GOOGLE_RULES", "TIMM_RULES", "TRANSFORMERS_RULES", "VIT_CONVERSION", "read_transformers_variant"]
