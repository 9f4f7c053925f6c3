"""Configuration and released variants of CLIP (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision", https://arxiv.org/abs/2103.00020; original code openai/CLIP ``clip/model.py``).

A composite config as transformers' own ``CLIPConfig``: ``text_config`` (:class:`HfVlClipTextConfig`) and
``vision_config`` (:class:`HfVlClipVisionConfig`) are sub-configs declared in ``sub_configs_defaults``. The vision
sub-config chooses the image tower with ``vision_type``: ``"vit"`` (the ViT-B/L towers) or ``"resnet"`` (OpenAI's
ModifiedResNet: RN50, RN101, RN50x4, RN50x16, RN50x64). Defaults reproduce OpenAI's ViT-B/32.

Numerics: OpenAI's weights were trained with QuickGELU (``x * sigmoid(1.702 x)``, ``hidden_act="quick_gelu"``);
open_clip models without the ``-quickgelu`` suffix use exact GELU (``hidden_act="gelu"``). LayerNorm eps is 1e-5.
"""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

_POOLINGS = ("argmax", "eos")
_VISION_TYPES = ("vit", "resnet")


class HfVlClipTextConfig(PreTrainedConfig):
    r"""The causal text transformer of CLIP.

    Args:
        vocab_size: BPE vocabulary (49408 for OpenAI's tokenizer: SOT 49406, EOT 49407).
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: transformer sizes (heads = width/64).
        max_position_embeddings: the context length (77); longer ``input_ids`` are rejected.
        hidden_act: MLP activation (``"quick_gelu"`` for OpenAI weights, ``"gelu"`` for open_clip GELU models).
        layer_norm_eps: LayerNorm epsilon.
        attention_dropout: dropout on attention probabilities (0 in the original).
        initializer_range, initializer_factor: init scales (OpenAI's ``initialize_parameters`` times the factor).
        projection_dim: width of the joint embedding space (``text_projection`` output).
        pooling: which token's state is the sentence embedding. ``"argmax"``: the position of the largest token id,
            OpenAI's rule (its EOT token has the highest id); ``"eos"``: the first ``eos_token_id``, for tokenizers
            whose end token is not the largest id.
        eos_token_id: the end-of-text id used by ``pooling="eos"``.
    """

    model_type = "hf_vl_clip_text"
    base_config_key = "text_config"

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    projection_dim: int = 512
    pooling: str = "argmax"
    eos_token_id: int | None = 49407

    def __post_init__(self, **kwargs):
        _check_heads(self.hidden_size, self.num_attention_heads, "text_config")
        if self.pooling not in _POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not supported; expected one of {_POOLINGS}")
        if self.pooling == "eos" and self.eos_token_id is None:
            raise ValueError("pooling='eos' needs eos_token_id")
        super().__post_init__(**kwargs)


class HfVlClipVisionConfig(PreTrainedConfig):
    r"""The image tower of CLIP: a ViT or OpenAI's ModifiedResNet.

    Args:
        vision_type: ``"vit"`` or ``"resnet"``.
        hidden_size: ViT width. For ``"resnet"`` it is the width of the last feature map, ``resnet_width * 32``,
            and is set from ``resnet_width`` (a given value is replaced).
        intermediate_size, num_hidden_layers, patch_size: ViT only.
        num_attention_heads: ViT heads, or the heads of the ResNet's attention pooling (OpenAI: width * 32 / 64).
        image_size, num_channels: input geometry (the position grids are built for ``image_size``).
        hidden_act, layer_norm_eps, attention_dropout: as in the text tower (ViT only; the ResNet uses ReLU).
        initializer_range, initializer_factor: init scales.
        projection_dim: joint embedding width: the ViT's ``visual_projection`` output, or the ResNet attention
            pool's output (that pool's ``out_proj`` is the projection, as in the original).
        resnet_depths: Bottleneck blocks per stage (RN50: ``[3, 4, 6, 3]``); required for ``"resnet"``.
        resnet_width: stem width (64 for RN50/RN101, 80, 96, 128 for RN50x4/x16/x64).
        batch_norm_eps: BatchNorm epsilon of the ResNet.
    """

    model_type = "hf_vl_clip_vision"
    base_config_key = "vision_config"

    vision_type: str = "vit"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    projection_dim: int = 512
    resnet_depths: list[int] | None = None
    resnet_width: int = 64
    batch_norm_eps: float = 1e-5

    def __post_init__(self, **kwargs):
        if self.vision_type not in _VISION_TYPES:
            raise ValueError(f"vision_type={self.vision_type!r} is not supported; expected one of {_VISION_TYPES}")
        if self.vision_type == "resnet":
            _check_resnet(self)
        elif self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        _check_heads(self.hidden_size, self.num_attention_heads, "vision_config")
        super().__post_init__(**kwargs)


def _check_heads(hidden_size: int, num_heads: int, where: str) -> None:
    if hidden_size % num_heads != 0:
        raise ValueError(f"{where}: hidden_size={hidden_size} must be divisible by num_attention_heads={num_heads}")


def _check_resnet(config: HfVlClipVisionConfig) -> None:
    if config.resnet_depths is None or len(config.resnet_depths) != 4:
        raise ValueError(
            f"vision_type='resnet' needs resnet_depths with 4 stage depths (RN50: [3, 4, 6, 3]), got "
            f"{config.resnet_depths}"
        )
    config.resnet_depths = [int(depth) for depth in config.resnet_depths]
    if min(config.resnet_depths) < 1:
        raise ValueError(f"resnet_depths must be positive, got {config.resnet_depths}")
    # the stem halves the resolution twice and stages 2-4 once each: total stride 32
    if config.image_size % 32 != 0:
        raise ValueError(f"image_size={config.image_size} must be a multiple of 32 for a ResNet tower")
    config.hidden_size = config.resnet_width * 32


class HfVlClipConfig(PreTrainedConfig):
    r"""CLIP: a text tower and an image tower projected into one embedding space.

    Args:
        text_config: :class:`HfVlClipTextConfig` or its kwargs.
        vision_config: :class:`HfVlClipVisionConfig` or its kwargs.
        projection_dim: width of the joint embedding space. Written into sub-configs given as dicts (or left
            out); a sub-config object with another ``projection_dim`` is an error.
        logit_scale_init_value: initial log temperature, ln(1 / 0.07) (paper section 2.5).
    """

    model_type = "hf_vl_clip"
    sub_configs_defaults = {"text_config": HfVlClipTextConfig, "vision_config": HfVlClipVisionConfig}

    text_config: dict | HfVlClipTextConfig | None = None
    vision_config: dict | HfVlClipVisionConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = math.log(1 / 0.07)

    def __post_init__(self, **kwargs):
        for key in ("text_config", "vision_config"):
            sub = getattr(self, key)
            if sub is None or isinstance(sub, dict):
                setattr(self, key, {"projection_dim": self.projection_dim, **(sub or {})})
            elif sub.projection_dim != self.projection_dim:
                raise ValueError(
                    f"{key}.projection_dim={sub.projection_dim} differs from projection_dim={self.projection_dim}"
                )
        super().__post_init__(**kwargs)
        for key in ("text_config", "vision_config"):
            if getattr(self, key).projection_dim != self.projection_dim:
                raise ValueError(
                    f"{key}.projection_dim={getattr(self, key).projection_dim} differs from "
                    f"projection_dim={self.projection_dim}"
                )


# OpenAI's preprocessing (clip/clip.py ``_transform``): bicubic resize of the short side, center crop, these stats.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_OPENAI = "OpenAI CLIP release (openai/CLIP clip/clip.py _MODELS), MIT licence, TorchScript archive, fp16 weights"


def _text(width: int) -> dict:
    return dict(hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 64, num_hidden_layers=12)


def _vit(embed: int, width: int, layers: int, patch: int, image: int, text_width: int) -> dict:
    vision = dict(
        vision_type="vit", hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=width // 64, patch_size=patch, image_size=image,
    )
    return {"projection_dim": embed, "text_config": _text(text_width), "vision_config": vision}


def _resnet(embed: int, depths: list[int], width: int, image: int, text_width: int) -> dict:
    vision = dict(
        vision_type="resnet", resnet_depths=depths, resnet_width=width, num_attention_heads=width * 32 // 64,
        image_size=image,
    )
    return {"projection_dim": embed, "text_config": _text(text_width), "vision_config": vision}


def _row(config: dict, source: str, hidden_act: str = "quick_gelu") -> dict:
    image = config["vision_config"]["image_size"]
    config = {
        **config,
        "text_config": {**config["text_config"], "hidden_act": hidden_act},
        "vision_config": {**config["vision_config"], "hidden_act": hidden_act},
    }
    processor = {
        "size": {"shortest_edge": image},
        "crop_size": {"height": image, "width": image},
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }
    return {"config": config, "processor": processor, "source": source}


# Sizes from openai/CLIP ``build_model`` (inferred there from the weights' shapes) and open_clip's model_configs.
_SIZES = {
    "RN50": _resnet(1024, [3, 4, 6, 3], 64, 224, 512),
    "RN101": _resnet(512, [3, 4, 23, 3], 64, 224, 512),
    "RN50x4": _resnet(640, [4, 6, 10, 6], 80, 288, 640),
    "RN50x16": _resnet(768, [6, 8, 18, 8], 96, 384, 768),
    "RN50x64": _resnet(1024, [3, 15, 36, 10], 128, 448, 1024),
    "ViT-B/32": _vit(512, 768, 12, 32, 224, 512),
    "ViT-B/16": _vit(512, 768, 12, 16, 224, 512),
    "ViT-L/14": _vit(768, 1024, 24, 14, 224, 768),
    "ViT-L/14@336px": _vit(768, 1024, 24, 14, 336, 768),
}
_OPEN_CLIP_NAMES = {
    "RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "RN50x16": "RN50x16", "RN50x64": "RN50x64",
    "ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-L/14@336px": "ViT-L-14-336",
}
_OPEN_CLIP = "open_clip model name (open_clip.create_model); weights from its pretrained tags or own training"


def _all_variants() -> dict[str, dict]:
    """The OpenAI release names (QuickGELU), then open_clip's names for the same networks: ``<name>-quickgelu``
    (QuickGELU) and, for the ViTs, ``<name>`` (exact GELU, e.g. LAION's ``ViT-B-32``). open_clip's plain
    ``RN50`` ... ``RN50x64`` coincide with the OpenAI names and keep QuickGELU: every released CLIP ResNet was
    trained with it (open_clip's pretrained configs force ``quick_gelu=True`` for them)."""
    variants = {name: _row(sizes, _OPENAI) for name, sizes in _SIZES.items()}
    for name, open_clip_name in _OPEN_CLIP_NAMES.items():
        variants[f"{open_clip_name}-quickgelu"] = _row(_SIZES[name], _OPEN_CLIP)
        if name.startswith("ViT"):
            variants[open_clip_name] = _row(_SIZES[name], _OPEN_CLIP, hidden_act="gelu")
    return variants


# Released variants: the one table used by conversion (``--variant``), model cards and training recipes. ``config``
# holds HfVlClipConfig kwargs, ``processor`` HfVlClipImageProcessor kwargs (short side resized to ``shortest_edge``,
# center crop), ``source`` the provenance. Keys: OpenAI release names (``RN50`` ... ``ViT-L/14@336px``) and open_clip
# model names (``ViT-B-32``, ``ViT-B-32-quickgelu``, ``RN50-quickgelu``, ...), which fix the activation.
CLIP_VARIANTS: dict[str, dict] = _all_variants()
OPENAI_RELEASES: tuple[str, ...] = tuple(_SIZES)


def clip_variant_config(name: str, **overrides) -> HfVlClipConfig:
    """Config of a released variant; ``overrides`` are HfVlClipConfig kwargs and win over the table (a
    ``text_config``/``vision_config`` dict given here is merged into the table's, key by key)."""
    if name not in CLIP_VARIANTS:
        raise ValueError(f"unknown CLIP variant {name!r}; expected one of {sorted(CLIP_VARIANTS)}")
    table = CLIP_VARIANTS[name]["config"]
    kwargs = {**table, **overrides}
    for key in ("text_config", "vision_config"):
        kwargs[key] = {**table[key], **overrides.get(key, {})}
    return HfVlClipConfig(**kwargs)
