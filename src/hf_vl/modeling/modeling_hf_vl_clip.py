"""CLIP: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
https://arxiv.org/abs/2103.00020. Original: openai/CLIP ``clip/model.py``; open_clip (mlfoundations/open_clip).

A text tower (causal pre-LN transformer, pooled at the end-of-text token) and an image tower (a pre-LN ViT with an
extra ``pre_layernorm``, or OpenAI's ModifiedResNet in ``hf_vl_clip_resnet.py``) are linearly projected into one
space; cosine similarities times a learned temperature are the logits of both contrastive directions.

Deviations from the original:
- Separate q/k/v projections (the original's fused ``in_proj_weight`` is split on conversion); ``text_projection``
  and ``visual_projection`` are bias-free ``nn.Linear`` (the original's ``x @ proj`` matrices, transposed).
- ``exp(logit_scale)`` is clamped at 100 in the forward pass (paper section 2.5 clips the temperature there; the
  original clamps the parameter in its training loop). OpenAI's trained fp16 value exp(4.6055) = 100.03 becomes 100.
- ``attention_mask`` (padding) is combined with the causal mask, so left padding works; the original has no mask.
- Text pooling can use the first ``eos_token_id`` (``pooling="eos"``) instead of the position of the largest id.
- With ``attention_mask``, the text tower stops after the batch's last real token and last pooled position
  (:func:`needed_text_length`): causal attention makes every state before it independent of the trailing padding
  columns, so pooled outputs are the same (CLIP's tokenizer pads to 77; typical prompts are under 20 tokens). With
  ``attention_mask``, ``last_hidden_state`` is zero at every padding position (the original computes states there
  that nothing uses), so it does not depend on how far the batch's longest text made the tower run. Not trimmed
  while hidden states or attentions are captured.
- ``interpolate_pos_encoding=True`` resamples the ViT's and the attention pool's position grids for other sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_hf_vl_clip import HfVlClipConfig, HfVlClipTextConfig, HfVlClipVisionConfig
from .hf_vl_attention import HfVlAttention
from .hf_vl_clip_resnet import (
    HfVlClipAttentionPool2d,
    HfVlClipBottleneck,
    HfVlClipResNetStage,
    HfVlClipResNetStem,
    build_resnet_stages,
)
from .hf_vl_contrastive_loss import clip_contrastive_loss
from .hf_vl_embeddings import interpolate_learned_position_embeddings
from .hf_vl_mlp import HfVlFastLinearModule, HfVlMlp, can_fuse_linear, fused_linear
from .hf_vl_pretrained import HfVlPreTrainedModel
from .hf_vl_transformer_layers import HfVlPreNormLayer
from .modeling_hf_vl_vit import check_pixel_values

LOGIT_SCALE_MAX = 100.0  # paper section 2.5: "clipped to prevent scaling the logits by more than 100"


@dataclass
class HfVlClipOutput(ModelOutput):
    """loss: symmetric contrastive loss (with ``return_loss=True``); logits_per_image (n_images, n_texts) and
    logits_per_text (its transpose): scaled cosine similarities; text_embeds / image_embeds: the L2-normalised
    projected embeddings; text_model_output / vision_model_output: the towers' outputs."""

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


@dataclass
class HfVlClipTextModelOutput(ModelOutput):
    """text_embeds: (batch, projection_dim), projected and not normalised; the rest as the text tower's output."""

    text_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class HfVlClipVisionModelOutput(ModelOutput):
    """image_embeds: (batch, projection_dim), projected and not normalised; the rest as the image tower's output."""

    image_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def check_text_inputs(input_ids, attention_mask, config: HfVlClipTextConfig) -> None:
    """Clear errors instead of an index error in the embedding or silently wrong pooling."""
    if input_ids is None:
        raise ValueError("input_ids is required (token ids from the CLIP tokenizer)")
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer torch.Tensor, got {getattr(input_ids, 'dtype', input_ids)!r}")
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, sequence_length), got {tuple(input_ids.shape)}")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} tokens, more than the context of "
            f"{config.max_position_embeddings}; truncate in the tokenizer (truncation=True, "
            f"max_length={config.max_position_embeddings})"
        )
    # value checks read tensors (a host sync, a graph break under torch.compile): skipped while compiling
    if not torch.compiler.is_compiling() and (input_ids.min() < 0 or input_ids.max() >= config.vocab_size):
        raise ValueError(f"input_ids must lie in [0, {config.vocab_size}), got values outside that range")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(input_ids.shape)} (as input_ids)"
        )


def causal_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (batch, 1, length, length) mask: query i sees key j iff j <= i and key j is not padding.

    attention_mask: (batch, length), 1 for tokens, 0 for padding. With a mask the attention kernels ignore
    ``is_causal`` (SDPA drops the flag whenever a mask is given), so the causal part must be in the mask.
    """
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()  # (batch, 1, length, length)
    # finfo.min, not -inf: a fully masked row (left padding) stays finite instead of NaN
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def text_pool_positions(input_ids: torch.Tensor, config: HfVlClipTextConfig) -> torch.Tensor:
    """The position each row is pooled at, (batch,). ``argmax``: OpenAI's rule (EOT has the largest id; ties go to
    the first, so EOT used as padding still pools the real end); ``eos``: the first ``eos_token_id``."""
    if config.pooling == "argmax":
        return input_ids.argmax(dim=-1)
    is_eos = input_ids == config.eos_token_id
    if not torch.compiler.is_compiling() and not bool(is_eos.any(dim=-1).all()):
        raise ValueError(
            f"pooling='eos' needs eos_token_id={config.eos_token_id} in every row of input_ids; some rows have "
            "none (truncated without an end token?)"
        )
    return is_eos.int().argmax(dim=-1)


def needed_text_length(attention_mask: torch.Tensor, pool_positions: torch.Tensor) -> int:
    """How many leading positions decide every output a caller can use: up to the batch's last real token
    (``attention_mask``) and its last pooled position (:func:`text_pool_positions`). Causal attention never looks
    ahead, so the states there do not depend on the trailing columns, which are padding in every row (CLIP's
    tokenizer pads to 77)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last_token = int((positions * (attention_mask != 0)).max()) + 1
    return max(last_token, int(pool_positions.max()) + 1)


class HfVlClipTextEmbeddings(nn.Module):
    """Token embedding + learned position embedding (1, max_position_embeddings, hidden)."""

    def __init__(self, config: HfVlClipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.max_position_embeddings, config.hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding[:, : input_ids.shape[1]]


class HfVlClipVisionEmbeddings(HfVlFastLinearModule):
    """Bias-free patch convolution + class token + learned position embedding, as the hf_vl ViT's layout:
    ``class_embedding`` (1, 1, hidden), ``position_embedding`` (1, 1 + grid * grid, hidden).

    On the CPU inference fast path (:func:`.hf_vl_mlp.can_fuse_linear`) the convolution (kernel = stride = patch)
    runs as one pre-packed GEMM over the flattened patches: ViT-B/32 on one AVX-512 core, 1.4-1.7x faster than
    oneDNN's direct convolution at batch 8 and 3.5-4x at batch 1 (fp32 and bf16)."""

    def __init__(self, config: HfVlClipVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid_size = (config.image_size // config.patch_size,) * 2
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        num_positions = self.grid_size[0] * self.grid_size[1] + 1
        self.position_embedding = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        new_grid = (height // self.patch_size, width // self.patch_size)
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size ({height}x{width}) must be a multiple of the patch size {self.patch_size}")
        if new_grid != self.grid_size and not interpolate_pos_encoding:
            raise ValueError(
                f"input image size ({height}x{width}) doesn't match the model "
                f"({self.grid_size[0] * self.patch_size}x{self.grid_size[1] * self.patch_size}); "
                "pass interpolate_pos_encoding=True to resample the position embeddings"
            )
        patches = self._embed_patches(pixel_values, new_grid)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        position = interpolate_learned_position_embeddings(self.position_embedding, self.grid_size, new_grid)
        return torch.cat([cls, patches], dim=1) + position

    def _embed_patches(self, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(batch, gh * gw, hidden) patch embeddings of (batch, channels, gh * patch, gw * patch) pixels."""
        weight = self.patch_embedding.weight
        if not can_fuse_linear(pixel_values, weight):
            # (batch, hidden, gh, gw) -> (batch, gh*gw, hidden)
            return self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        batch, channels, patch = pixel_values.shape[0], pixel_values.shape[1], self.patch_size
        # (batch, c, gh, p, gw, p) -> (batch, gh, gw, c, p, p) -> (batch, gh*gw, c*p*p): the kernel's flattening
        patches = pixel_values.reshape(batch, channels, grid[0], patch, grid[1], patch).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, grid[0] * grid[1], channels * patch * patch)
        return fused_linear(patches, *self.fast_weights("patch", (self.patch_embedding,), patches.shape[1] * batch))


class HfVlClipEncoder(nn.Module):
    """``num_hidden_layers`` pre-LN blocks; causal for the text tower."""

    def __init__(self, config: HfVlClipTextConfig | HfVlClipVisionConfig, is_causal: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            HfVlPreNormLayer(
                config,
                config.hidden_size,
                config.num_attention_heads,
                config.intermediate_size,
                config.hidden_act,
                config.layer_norm_eps,
                attention_dropout=config.attention_dropout,
                is_causal=is_causal,
            )
            for _ in range(config.num_hidden_layers)
        )

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=attention_mask, **kwargs)
        return hidden_states


class HfVlClipPreTrainedModel(HfVlPreTrainedModel):
    config_class = HfVlClipConfig
    base_model_prefix = "clip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "HfVlClipTextEmbeddings",
        "HfVlClipVisionEmbeddings",
        "HfVlPreNormLayer",
        "HfVlClipResNetStem",
        "HfVlClipBottleneck",
        "HfVlClipAttentionPool2d",
    ]
    # eager and SDPA only: the text tower passes a 4-D additive mask, which flash/flex kernels do not take
    _supports_sdpa = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": [HfVlPreNormLayer, HfVlClipResNetStage], "attentions": HfVlAttention}
    # a mean loss: Trainer must keep dividing by gradient-accumulation steps (ecosystem.md section 4.3)
    accepts_loss_kwargs = False

    def _init_weights(self, module):
        """OpenAI's ``initialize_parameters`` (clip/model.py), scaled by ``initializer_factor``."""
        super()._init_weights(module)
        config = self.config
        factor = getattr(config, "initializer_factor", 1.0)
        if isinstance(module, HfVlClipTextEmbeddings):
            init.normal_(module.token_embedding.weight, std=0.02 * factor)
            init.normal_(module.position_embedding, std=0.01 * factor)
        elif isinstance(module, HfVlClipVisionEmbeddings):
            std = config.hidden_size**-0.5 * factor
            init.normal_(module.class_embedding, std=std)
            init.normal_(module.position_embedding, std=std)
        elif isinstance(module, HfVlClipAttentionPool2d):
            std = config.hidden_size**-0.5 * factor
            for param in (module.q_proj.weight, module.k_proj.weight, module.v_proj.weight, module.out_proj.weight):
                init.normal_(param, std=std)
            init.normal_(module.position_embedding, std=std)
        elif isinstance(module, (HfVlAttention, HfVlMlp)):
            _init_block(module, config.hidden_size, config.num_hidden_layers, factor)
        elif isinstance(module, HfVlClipBottleneck):
            # zero-init the last BatchNorm of each residual branch (OpenAI, Goyal et al. 2017)
            init.zeros_(module.bn3.weight)
        elif isinstance(module, (HfVlClipModel, HfVlClipTextModelWithProjection, HfVlClipVisionModelWithProjection)):
            _init_projections(module, factor)


def _init_block(module: nn.Module, width: int, num_layers: int, factor: float) -> None:
    proj_std = width**-0.5 * (2 * num_layers) ** -0.5 * factor
    if isinstance(module, HfVlAttention):
        for linear in (module.q_proj, module.k_proj, module.v_proj):
            init.normal_(linear.weight, std=width**-0.5 * factor)
        init.normal_(module.out_proj.weight, std=proj_std)
    else:
        init.normal_(module.fc1.weight, std=(2 * width) ** -0.5 * factor)
        init.normal_(module.fc2.weight, std=proj_std)


def _init_projections(module: nn.Module, factor: float) -> None:
    for name in ("text_projection", "visual_projection"):
        linear = getattr(module, name, None)
        if linear is not None:
            init.normal_(linear.weight, std=linear.in_features**-0.5 * factor)
    if isinstance(module, HfVlClipModel):
        init.constant_(module.logit_scale, module.config.logit_scale_init_value)


class HfVlClipTextModel(HfVlClipPreTrainedModel):
    """The text tower. ``last_hidden_state``: final-LayerNorm states (batch, length, hidden); ``pooler_output``:
    the end-of-text token's state (batch, hidden), before ``text_projection``."""

    config_class = HfVlClipTextConfig
    input_modalities = ("text",)

    def __init__(self, config: HfVlClipTextConfig):
        super().__init__(config)
        self.embeddings = HfVlClipTextEmbeddings(config)
        self.encoder = HfVlClipEncoder(config, is_causal=True)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.token_embedding = value

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        r"""input_ids: (batch, length <= max_position_embeddings) CLIP BPE ids; attention_mask: (batch, length),
        1 for tokens and 0 for padding (optional: without it, right padding after the end token is harmless,
        as causal attention never looks ahead). With it, ``last_hidden_state`` is zero at padding positions and the
        trailing padding columns are not computed (see the module docstring)."""
        check_text_inputs(input_ids, attention_mask, self.config)
        full = input_ids.shape[1]
        pool_positions = text_pool_positions(input_ids, self.config)  # (batch,)
        length = self._computed_length(attention_mask, pool_positions, full, kwargs)
        hidden_states = self.embeddings(input_ids[:, :length])
        mask = None if attention_mask is None else causal_padding_mask(attention_mask[:, :length], hidden_states.dtype)
        hidden_states = self.encoder(hidden_states, attention_mask=mask, **kwargs)
        last_hidden_state = self.final_layer_norm(hidden_states)  # (batch, length, hidden)
        # the end-of-text state of each row, (batch, hidden)
        pooled = last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), pool_positions]
        if attention_mask is not None:  # zeros at padding, wherever the batch's length stopped the computation
            last_hidden_state = last_hidden_state * attention_mask[:, :length, None].to(last_hidden_state.dtype)
        if length < full:  # (batch, length, hidden) -> (batch, full, hidden)
            last_hidden_state = F.pad(last_hidden_state, (0, 0, 0, full - length))
        return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=pooled)

    def _computed_length(
        self, attention_mask: torch.Tensor | None, pool_positions: torch.Tensor, full: int, kwargs: dict
    ) -> int:
        """All positions, or with ``attention_mask`` only up to :func:`needed_text_length` (never while per-layer
        hidden states or attentions are captured, whose trailing positions would then be missing, nor while
        compiling: the length is read from the tensors)."""
        capturing = any(kwargs.get(f"output_{name}", getattr(self.config, f"output_{name}", False))
                        for name in ("hidden_states", "attentions"))  # fmt: skip
        if attention_mask is None or capturing or torch.compiler.is_compiling():
            return full
        return needed_text_length(attention_mask, pool_positions)


class HfVlClipVisionModel(HfVlClipPreTrainedModel):
    """The image tower. ViT: ``last_hidden_state`` (batch, 1 + patches, hidden) before ``post_layernorm``,
    ``pooler_output`` = ``post_layernorm`` of the class token (batch, hidden). ResNet: ``last_hidden_state`` is the
    final feature map (batch, hidden, h, w), ``pooler_output`` the attention pool's (batch, projection_dim)."""

    config_class = HfVlClipVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: HfVlClipVisionConfig):
        super().__init__(config)
        if config.vision_type == "vit":
            self.embeddings = HfVlClipVisionEmbeddings(config)
            self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.encoder = HfVlClipEncoder(config, is_causal=False)
            self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        else:
            self.stem = HfVlClipResNetStem(config)
            self.stages = build_resnet_stages(config)
            self.attention_pool = HfVlClipAttentionPool2d(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding if self.config.vision_type == "vit" else self.stem.conv1

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool = False, **kwargs
    ) -> BaseModelOutputWithPooling:
        r"""pixel_values: (batch, num_channels, height, width) from the CLIP image processor."""
        if pixel_values is None:
            raise ValueError("pixel_values is required (images from the CLIP image processor)")
        check_pixel_values(pixel_values, self.config.num_channels)
        # pipelines load with dtype="auto": cast inputs to the weights' dtype
        pixel_values = pixel_values.to(self.get_input_embeddings().weight.dtype)
        if self.config.vision_type == "resnet":
            feature_map = self.stem(pixel_values)
            for stage in self.stages:
                feature_map = stage(feature_map)
            pooled, _ = self.attention_pool(feature_map, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
            return BaseModelOutputWithPooling(last_hidden_state=feature_map, pooler_output=pooled)
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.encoder(self.pre_layernorm(hidden_states), **kwargs)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden_states, pooler_output=self.post_layernorm(hidden_states[:, 0])
        )


def _visual_projection(config: HfVlClipVisionConfig) -> nn.Linear | None:
    """ViT towers get a bias-free projection; the ResNet's attention pool already projects (its ``out_proj``)."""
    if config.vision_type == "resnet":
        return None
    return nn.Linear(config.hidden_size, config.projection_dim, bias=False)


class HfVlClipModel(HfVlClipPreTrainedModel):
    """Both towers, their projections and the learned temperature ``logit_scale`` (log scale, a scalar)."""

    config_class = HfVlClipConfig

    def __init__(self, config: HfVlClipConfig):
        super().__init__(config)
        self.text_model = HfVlClipTextModel._from_config(config.text_config)
        self.vision_model = HfVlClipVisionModel._from_config(config.vision_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = _visual_projection(config.vision_config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.post_init()

    def _project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled if self.visual_projection is None else self.visual_projection(pooled)

    def get_text_features(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """Projected, unnormalised text embeddings (batch, projection_dim) (open_clip's ``encode_text``).
        transformers 5's CLIPModel returns an output object whose ``pooler_output`` is this tensor."""
        outputs = self.text_model(input_ids, attention_mask=attention_mask, **kwargs)
        return self.text_projection(outputs.pooler_output)

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool = False, **kwargs
    ) -> torch.Tensor:
        """Projected, unnormalised image embeddings (batch, projection_dim) (open_clip's ``encode_image``)."""
        outputs = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        return self._project_image(outputs.pooler_output)

    def get_logit_scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at 100: the multiplier of the cosine similarities."""
        return self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> HfVlClipOutput:
        r"""input_ids: (n_texts, length); pixel_values: (n_images, channels, height, width); attention_mask:
        (n_texts, length). return_loss: the symmetric contrastive loss, pairing row i of the texts with image i
        (n_texts == n_images), over the global batch when torch.distributed is initialised."""
        if input_ids is None or pixel_values is None:
            missing = "input_ids" if input_ids is None else "pixel_values"
            raise ValueError(
                f"{missing} is required: HfVlClipModel compares texts with images; use get_text_features or "
                "get_image_features (or the tower models) for one modality"
            )
        vision_outputs = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        text_outputs = self.text_model(input_ids, attention_mask=attention_mask, **kwargs)
        image_embeds = F.normalize(self._project_image(vision_outputs.pooler_output), dim=-1)
        text_embeds = F.normalize(self.text_projection(text_outputs.pooler_output), dim=-1)
        logit_scale = self.get_logit_scale()
        logits_per_text = logit_scale * text_embeds @ image_embeds.t()  # (n_texts, n_images)
        loss = clip_contrastive_loss(image_embeds, text_embeds, logit_scale) if return_loss else None
        return HfVlClipOutput(
            loss=loss,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )


class HfVlClipTextModelWithProjection(HfVlClipPreTrainedModel):
    """Text tower + ``text_projection``; keys as in HfVlClipModel (``text_model.*``, ``text_projection``)."""

    config_class = HfVlClipTextConfig
    base_model_prefix = "text_model"  # a saved HfVlClipTextModel loads into it (text_projection initialised)
    input_modalities = ("text",)

    def __init__(self, config: HfVlClipTextConfig):
        super().__init__(config)
        self.text_model = HfVlClipTextModel._from_config(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    @can_return_tuple
    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> HfVlClipTextModelOutput:
        outputs = self.text_model(input_ids, attention_mask=attention_mask, **kwargs)
        return HfVlClipTextModelOutput(
            text_embeds=self.text_projection(outputs.pooler_output),
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class HfVlClipVisionModelWithProjection(HfVlClipPreTrainedModel):
    """Image tower + ``visual_projection`` (ViT; the ResNet's attention pool projects itself)."""

    config_class = HfVlClipVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: HfVlClipVisionConfig):
        super().__init__(config)
        self.vision_model = HfVlClipVisionModel._from_config(config)
        self.visual_projection = _visual_projection(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.get_input_embeddings()

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool = False, **kwargs
    ) -> HfVlClipVisionModelOutput:
        outputs = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        pooled = outputs.pooler_output
        return HfVlClipVisionModelOutput(
            image_embeds=pooled if self.visual_projection is None else self.visual_projection(pooled),
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "HfVlClipModel",
    "HfVlClipOutput",
    "HfVlClipPreTrainedModel",
    "HfVlClipTextModel",
    "HfVlClipTextModelWithProjection",
    "HfVlClipVisionModel",
    "HfVlClipVisionModelWithProjection",
]
