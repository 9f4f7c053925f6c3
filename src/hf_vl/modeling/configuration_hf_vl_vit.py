"""Configuration and released variants of ViT (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words",
https://arxiv.org/abs/2010.11929; original code google-research/vision_transformer).

Defaults reproduce ``vit-base-patch16-224`` as timm and transformers run it (exact GELU). Checkpoints converted from
the original JAX ``.npz`` files carry the original numerics instead: ``hidden_act="gelu_pytorch_tanh"`` (Flax's
``nn.gelu`` is the tanh approximation) and ``layer_norm_eps=1e-6`` (Flax default); see ``VIT_VARIANTS`` and
``hf_vl.conversion.convert_hf_vl_vit``.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

_POOLINGS = ("token", "mean")


class HfVlVitConfig(PreTrainedConfig):
    r"""
    Args:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: transformer sizes (paper table 1).
        hidden_act: MLP activation (``"gelu"`` exact, ``"gelu_pytorch_tanh"`` as in the JAX original).
        hidden_dropout_prob, attention_probs_dropout_prob: dropout rates (0 for inference).
        initializer_range: std of the truncated-normal init.
        layer_norm_eps: LayerNorm epsilon (1e-6 in the original and in timm).
        image_size, patch_size, num_channels: input geometry; the position grid is ``image_size // patch_size``.
        qkv_bias: bias on the q/k/v projections.
        pooling: ``"token"`` (class token, paper section 3.1) or ``"mean"`` (global average of patch tokens, the
            original's ``classifier="gap"``).
        class_token: whether a class token is prepended (False for the original's ``gap`` models; timm's
            ``global_pool="avg"`` models keep it).
        representation_size: width of the ``pre_logits`` layer (dense + ``pooler_act``) of the ImageNet-21k
            checkpoints; ``None`` when absent.
        pooler_act: activation of that layer (``tanh`` in the original).
    """

    model_type = "hf_vl_vit"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-6,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        qkv_bias: bool = True,
        pooling: str = "token",
        class_token: bool = True,
        representation_size: int | None = None,
        pooler_act: str = "tanh",
        **kwargs,
    ):
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={hidden_size} must be divisible by num_attention_heads={num_attention_heads}"
            )
        if image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not supported; expected one of {_POOLINGS}")
        if pooling == "token" and not class_token:
            raise ValueError('pooling="token" needs class_token=True; use pooling="mean" without a class token')
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.qkv_bias = qkv_bias
        self.pooling = pooling
        self.class_token = class_token
        self.representation_size = representation_size
        self.pooler_act = pooler_act
        super().__init__(**kwargs)


# Sizes of the paper's table 1 (google-research/vision_transformer ``configs/models.py``).
_SIZES = {
    "tiny": dict(hidden_size=192, intermediate_size=768, num_attention_heads=3, num_hidden_layers=12),
    "small": dict(hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_hidden_layers=12),
    "base": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
    "large": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24),
    "huge": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32),
}
# The original (and timm's augreg / HF google/vit-*) preprocessing: inputs scaled to [-1, 1].
_INCEPTION = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def _variant(size: str, patch: int, image: int, num_labels: int, representation: bool, source: str) -> dict:
    config = dict(_SIZES[size], patch_size=patch, image_size=image, num_labels=num_labels)
    if representation:
        config["representation_size"] = _SIZES[size]["hidden_size"]
    return {"config": config, "processor": dict(_INCEPTION, size=image), "source": source}


_IN21K = "ImageNet-21k pre-training (21,843 classes), pre_logits head, gs://vit_models/imagenet21k/"
_IN1K = "ImageNet-21k pre-training, ImageNet-1k fine-tuning, gs://vit_models/imagenet21k+imagenet2012/"
_AUGREG = "AugReg (Steiner et al. 2021) ImageNet-21k + ImageNet-1k, gs://vit_models/augreg/"

# Released variants: the one table used by conversion (``--variant``), model cards and training recipes.
# ``config`` holds HfVlVitConfig kwargs, ``processor`` HfVlVitImageProcessor kwargs.
VIT_VARIANTS: dict[str, dict] = {
    "vit-base-patch16-224": _variant("base", 16, 224, 1000, False, _AUGREG),
    "vit-base-patch32-224": _variant("base", 32, 224, 1000, False, _AUGREG),
    "vit-small-patch16-224": _variant("small", 16, 224, 1000, False, _AUGREG),
    "vit-tiny-patch16-224": _variant("tiny", 16, 224, 1000, False, _AUGREG),
    "vit-large-patch16-224": _variant("large", 16, 224, 1000, False, _AUGREG),
    "vit-base-patch16-384": _variant("base", 16, 384, 1000, False, _IN1K),
    "vit-base-patch32-384": _variant("base", 32, 384, 1000, False, _IN1K),
    "vit-large-patch16-384": _variant("large", 16, 384, 1000, False, _IN1K),
    "vit-base-patch16-224-in21k": _variant("base", 16, 224, 21843, True, _IN21K),
    "vit-base-patch32-224-in21k": _variant("base", 32, 224, 21843, True, _IN21K),
    "vit-large-patch16-224-in21k": _variant("large", 16, 224, 21843, True, _IN21K),
    "vit-huge-patch14-224-in21k": _variant("huge", 14, 224, 21843, True, _IN21K),
}


def vit_variant_config(name: str, **overrides) -> HfVlVitConfig:
    """Build the config of a released variant; ``overrides`` (e.g. the original's numerics) win."""
    if name not in VIT_VARIANTS:
        raise ValueError(f"unknown ViT variant {name!r}; expected one of {sorted(VIT_VARIANTS)}")
    return HfVlVitConfig(**{**VIT_VARIANTS[name]["config"], **overrides})
