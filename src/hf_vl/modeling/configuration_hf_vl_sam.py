"""Configuration and released variants of Segment Anything (Kirillov et al. 2023, "Segment Anything",
https://arxiv.org/abs/2304.02643; original code facebookresearch/segment-anything @dca509f, ``build_sam.py``).

A composite config as transformers' ``SamConfig``: ``vision_config`` (:class:`HfVlSamVisionConfig`, the ViTDet image
encoder and its neck), ``prompt_encoder_config`` (:class:`HfVlSamPromptEncoderConfig`) and ``mask_decoder_config``
(:class:`HfVlSamMaskDecoderConfig`, the two-way transformer and the mask/IoU heads). Defaults reproduce ``vit_b``
(``sam_vit_b_01ec64.pth``); ``SAM_VARIANTS`` lists all three released encoders.

Unlike transformers' ``SamPromptEncoderConfig``, the prompt encoder does not repeat the image geometry: the input size
(points are normalised by it) and the embedding grid come from ``vision_config`` (``image_size``, ``patch_size``),
and its width must equal ``vision_config.output_channels`` and ``mask_decoder_config.hidden_size``.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class HfVlSamVisionConfig(PreTrainedConfig):
    r"""The ViTDet image encoder (Li et al. 2022) of SAM and its neck.

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: ViT sizes (``mlp_ratio`` 4).
        hidden_act: MLP activation (exact GELU in the original).
        layer_norm_eps: epsilon of the blocks' LayerNorms and of the neck's channel LayerNorms (1e-6).
        image_size, patch_size, num_channels: input geometry; the embedding grid is ``image_size // patch_size``.
        qkv_bias: bias on the q/k/v projections.
        window_size: side of the attention windows of the non-global blocks (the grid is zero-padded to a multiple).
        global_attn_indexes: indices of the blocks that attend over the whole grid.
        output_channels: channels of the neck's output, the image embedding.
        attention_dropout: dropout on attention probabilities (0 in the original).
        initializer_range: std of the normal init of linear and conv weights.
    """

    model_type = "hf_vl_sam_vision"
    base_config_key = "vision_config"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 1024
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    window_size: int = 14
    global_attn_indexes: list[int] | tuple[int, ...] = (2, 5, 8, 11)
    output_channels: int = 256
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"vision_config: hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"vision_config: image_size={self.image_size} must be a multiple of patch_size")
        if self.window_size < 0:
            raise ValueError(f"vision_config: window_size must be >= 0 (0: all global), got {self.window_size}")
        self.global_attn_indexes = [int(index) for index in self.global_attn_indexes]
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"vision_config: global_attn_indexes {bad} are outside 0..{self.num_hidden_layers - 1}")
        super().__post_init__(**kwargs)

    @property
    def grid_size(self) -> int:
        """Side of the patch grid = of the image embedding (64 for 1024 / 16)."""
        return self.image_size // self.patch_size


class HfVlSamPromptEncoderConfig(PreTrainedConfig):
    r"""SAM's prompt encoder: random-Fourier point/box encodings plus learned type embeddings, and a small conv net
    for mask prompts.

    Args:
        hidden_size: prompt embedding width (= the image embedding's channels).
        mask_input_channels: channels of the mask downscaling net (its first conv has a quarter of them).
        hidden_act: activation of the mask downscaling net (GELU).
        layer_norm_eps: epsilon of its channel LayerNorms (1e-6).
        positional_embedding_scale: std of the random Fourier matrix at init (1.0; the matrix is saved, not trained).
    """

    model_type = "hf_vl_sam_prompt_encoder"
    base_config_key = "prompt_encoder_config"

    hidden_size: int = 256
    mask_input_channels: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    positional_embedding_scale: float = 1.0

    def __post_init__(self, **kwargs):
        if self.hidden_size % 2 != 0:
            raise ValueError(f"prompt_encoder_config: hidden_size must be even (sin + cos), got {self.hidden_size}")
        if self.mask_input_channels % 4 != 0:
            raise ValueError(
                f"prompt_encoder_config: mask_input_channels must divide by 4, got {self.mask_input_channels}"
            )
        super().__post_init__(**kwargs)


class HfVlSamMaskDecoderConfig(PreTrainedConfig):
    r"""SAM's mask decoder: a two-way transformer between prompt tokens and the image embedding, then the mask
    (hypernetwork) and IoU heads.

    Args:
        hidden_size: transformer width (= the image embedding's channels).
        num_hidden_layers: two-way blocks (2).
        num_attention_heads: heads of every attention (8).
        mlp_dim: hidden width of the token MLP (2048).
        hidden_act: MLP activation (ReLU).
        attention_downsample_rate: the cross-attentions work at ``hidden_size // rate`` (2: 256 -> 128).
        num_multimask_outputs: masks returned with ``multimask_output=True`` (3); one more token predicts the single
            mask.
        iou_head_depth, iou_head_hidden_dim: the IoU prediction MLP.
        layer_norm_eps: epsilon of the transformer's LayerNorms (PyTorch's default 1e-5 in the original; transformers
            uses its config's 1e-6 for the blocks' four norms).
        upscaling_layer_norm_eps: epsilon of the channel LayerNorm between the two transposed convs (1e-6).
        upscaling_act: activation of the output upscaling (GELU).
    """

    model_type = "hf_vl_sam_mask_decoder"
    base_config_key = "mask_decoder_config"

    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    mlp_dim: int = 2048
    hidden_act: str = "relu"
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    layer_norm_eps: float = 1e-5
    upscaling_layer_norm_eps: float = 1e-6
    upscaling_act: str = "gelu"

    def __post_init__(self, **kwargs):
        inner = self.hidden_size // self.attention_downsample_rate
        if self.hidden_size % self.num_attention_heads or inner % self.num_attention_heads:
            raise ValueError(
                f"mask_decoder_config: hidden_size={self.hidden_size} and hidden_size // attention_downsample_rate="
                f"{inner} must be divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_size % 8 != 0:
            raise ValueError(f"mask_decoder_config: hidden_size must divide by 8 (upscaling), got {self.hidden_size}")
        if self.iou_head_depth < 1 or self.num_multimask_outputs < 1:
            raise ValueError("mask_decoder_config: iou_head_depth and num_multimask_outputs must be >= 1")
        super().__post_init__(**kwargs)


class HfVlSamConfig(PreTrainedConfig):
    r"""Segment Anything: image encoder, prompt encoder and mask decoder.

    Args:
        vision_config: :class:`HfVlSamVisionConfig` or its kwargs.
        prompt_encoder_config: :class:`HfVlSamPromptEncoderConfig` or its kwargs.
        mask_decoder_config: :class:`HfVlSamMaskDecoderConfig` or its kwargs.
        initializer_range: std of the normal init of linear, conv and embedding weights.
    """

    model_type = "hf_vl_sam"
    sub_configs_defaults = {
        "vision_config": HfVlSamVisionConfig,
        "prompt_encoder_config": HfVlSamPromptEncoderConfig,
        "mask_decoder_config": HfVlSamMaskDecoderConfig,
    }

    vision_config: dict | HfVlSamVisionConfig | None = None
    prompt_encoder_config: dict | HfVlSamPromptEncoderConfig | None = None
    mask_decoder_config: dict | HfVlSamMaskDecoderConfig | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        widths = {
            "vision_config.output_channels": self.vision_config.output_channels,
            "prompt_encoder_config.hidden_size": self.prompt_encoder_config.hidden_size,
            "mask_decoder_config.hidden_size": self.mask_decoder_config.hidden_size,
        }
        if len(set(widths.values())) != 1:
            raise ValueError(f"the image embedding and prompt widths must be equal, got {widths}")


# facebookresearch/segment-anything build_sam.py: the three released encoders; everything else is shared.
_ENCODERS = {
    "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]),
}
_FILES = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}
# SamPredictor / Sam.preprocess: longest side resized to 1024, pixel statistics on 0-255 values, zero padding
SAM_MEAN = [123.675, 116.28, 103.53]
SAM_STD = [58.395, 57.12, 57.375]
# the same statistics for pixels rescaled to [0, 1] (SamImageProcessor's do_rescale=True): ImageNet's, = SAM_* / 255
SAM_RESCALED_MEAN = [0.485, 0.456, 0.406]
SAM_RESCALED_STD = [0.229, 0.224, 0.225]


def _variant(name: str) -> dict:
    encoder = _ENCODERS[name]
    vision = dict(encoder, intermediate_size=4 * encoder["hidden_size"])
    processor = dict(
        size={"longest_edge": 1024}, pad_size={"height": 1024, "width": 1024}, image_mean=SAM_RESCALED_MEAN,
        image_std=SAM_RESCALED_STD,
    )
    source = f"facebookresearch/segment-anything release dl.fbaipublicfiles.com/segment_anything/{_FILES[name]}"
    return {"config": {"vision_config": vision}, "processor": processor, "source": source + ", Apache-2.0"}


# Released variants: the one table used by conversion (``--variant``), model cards and recipes. ``config`` holds
# HfVlSamConfig kwargs (sub-config dicts; unlisted fields keep the defaults, which are the released ones),
# ``processor`` the image processor kwargs (transformers SamImageProcessor names and conventions: pixels rescaled to
# [0, 1] before normalisation), ``source`` the provenance.
SAM_VARIANTS: dict[str, dict] = {name: _variant(name) for name in _ENCODERS}


def sam_variant_config(name: str, **overrides) -> HfVlSamConfig:
    """Config of a released variant; ``overrides`` are HfVlSamConfig kwargs and win (a sub-config dict given here is
    merged into the table's, key by key)."""
    if name not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant {name!r}; expected one of {sorted(SAM_VARIANTS)}")
    table = SAM_VARIANTS[name]["config"]
    kwargs = {**table, **overrides}
    for key in HfVlSamConfig.sub_configs_defaults:
        sub = overrides.get(key, {})
        if isinstance(sub, dict):
            kwargs[key] = {**table.get(key, {}), **sub}
    return HfVlSamConfig(**kwargs)
