"""ViT: Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
https://arxiv.org/abs/2010.11929. Original: google-research/vision_transformer (``vit_jax/models_vit.py``).

Deviations from the original:
- PyTorch layout: q/k/v/out projections are ``nn.Linear`` (the Flax ``DenseGeneral`` kernels are reshaped on
  conversion); the patch embedding is an OIHW ``Conv2d``.
- GELU and LayerNorm epsilon are config fields: exact GELU by default (timm, transformers), the tanh approximation
  for checkpoints converted from JAX (``hidden_act="gelu_pytorch_tanh"``).
- ``interpolate_pos_encoding=True`` resamples the learned position grid bicubically (as timm / DINO do) so other image
  sizes work without re-saving the model; the original resizes only when loading a checkpoint.
- Hybrid (ResNet + ViT) models are not implemented.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_hf_vl_vit import HfVlVitConfig
from .hf_vl_attention import HfVlAttention
from .hf_vl_embeddings import interpolate_learned_position_embeddings
from .hf_vl_pretrained import HfVlPreTrainedModel
from .hf_vl_transformer_layers import HfVlPreNormLayer


def check_pixel_values(pixel_values, num_channels: int) -> None:
    """Clear errors for the usual mistakes instead of a shape error deep inside a convolution."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values must have shape (batch, {num_channels}, height, width), got {tuple(pixel_values.shape)}"
        )
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")


class HfVlVitEmbeddings(nn.Module):
    """Patch embedding + class token + learned position embedding (paper eq. 1)."""

    def __init__(self, config: HfVlVitConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid_size = (config.image_size // config.patch_size,) * 2
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        # the original's classifier="gap" models have no class token (vit_jax/models_vit.py)
        self.num_prefix_tokens = 1 if config.class_token else 0
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.class_token else None
        self.position_embedding = nn.Parameter(
            torch.zeros(1, num_patches + self.num_prefix_tokens, config.hidden_size)
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size ({height}x{width}) must be a multiple of the patch size {self.patch_size}"
            )
        new_grid = (height // self.patch_size, width // self.patch_size)
        if new_grid != self.grid_size and not interpolate_pos_encoding:
            raise ValueError(
                f"input image size ({height}x{width}) doesn't match the model "
                f"({self.grid_size[0] * self.patch_size}x{self.grid_size[1] * self.patch_size}); "
                "pass interpolate_pos_encoding=True to resample the position embeddings"
            )
        # (batch, hidden, gh, gw) -> (batch, gh*gw, hidden)
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        position = interpolate_learned_position_embeddings(
            self.position_embedding, self.grid_size, new_grid, num_prefix_tokens=self.num_prefix_tokens
        )
        if self.class_embedding is not None:
            patches = torch.cat([self.class_embedding.expand(patches.shape[0], -1, -1), patches], dim=1)
        return self.dropout(patches + position)


class HfVlVitPooler(nn.Module):
    """Pools the sequence (class token or mean of patches) and applies the optional ``pre_logits`` layer."""

    def __init__(self, config: HfVlVitConfig):
        super().__init__()
        self.pooling = config.pooling
        self.num_prefix_tokens = 1 if config.class_token else 0
        if config.representation_size is not None:
            self.dense = nn.Linear(config.hidden_size, config.representation_size)
            self.activation = ACT2FN[config.pooler_act]
        else:
            self.dense = None

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        if self.pooling == "token":
            pooled = sequence_output[:, 0]
        else:
            pooled = sequence_output[:, self.num_prefix_tokens :].mean(dim=1)
        if self.dense is not None:
            pooled = self.activation(self.dense(pooled))
        return pooled


class HfVlVitPreTrainedModel(HfVlPreTrainedModel):
    config_class = HfVlVitConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["HfVlVitEmbeddings", "HfVlPreNormLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": HfVlPreNormLayer, "attentions": HfVlAttention}
    # a mean cross-entropy: Trainer must keep dividing by gradient-accumulation steps (ecosystem.md section 4.3)
    accepts_loss_kwargs = False

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, HfVlVitEmbeddings):
            init.trunc_normal_(module.position_embedding, mean=0.0, std=self.config.initializer_range)
            if module.class_embedding is not None:
                init.trunc_normal_(module.class_embedding, mean=0.0, std=self.config.initializer_range)


class HfVlVitEncoder(nn.Module):
    def __init__(self, config: HfVlVitConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            HfVlPreNormLayer(
                config,
                config.hidden_size,
                config.num_attention_heads,
                config.intermediate_size,
                config.hidden_act,
                config.layer_norm_eps,
                qkv_bias=config.qkv_bias,
                attention_dropout=config.attention_probs_dropout_prob,
                hidden_dropout=config.hidden_dropout_prob,
            )
            for _ in range(config.num_hidden_layers)
        )

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        return hidden_states


class HfVlVitModel(HfVlVitPreTrainedModel):
    """The ViT encoder. ``last_hidden_state`` is the final-LayerNorm output (batch, 1 + patches, hidden);
    ``pooler_output`` is the pooled representation the classifier reads (batch, representation_size or hidden)."""

    def __init__(self, config: HfVlVitConfig):
        super().__init__(config)
        self.embeddings = HfVlVitEmbeddings(config)
        self.encoder = HfVlVitEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = HfVlVitPooler(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""pixel_values: (batch, num_channels, height, width) from ``HfVlVitImageProcessor``."""
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        check_pixel_values(pixel_values, self.config.num_channels)
        # pipelines load with dtype="auto": cast inputs to the weights' dtype
        pixel_values = pixel_values.to(self.embeddings.patch_embedding.weight.dtype)
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.encoder(hidden_states, **kwargs)
        sequence_output = self.final_layer_norm(hidden_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output, pooler_output=self.pooler(sequence_output)
        )


class HfVlVitForImageClassification(HfVlVitPreTrainedModel):
    """ViT with a linear ``classifier`` on the pooled representation (the original's ``head``)."""

    def __init__(self, config: HfVlVitConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = HfVlVitModel(config)
        width = config.representation_size or config.hidden_size
        self.classifier = nn.Linear(width, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> ImageClassifierOutput:
        r"""labels: (batch,) class indices (or (batch, num_labels) floats for multi-label / regression)."""
        # return_dict=True: the trunk's output is read by name even when config.return_dict is False
        outputs = self.vit(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = ["HfVlVitModel", "HfVlVitForImageClassification", "HfVlVitPreTrainedModel"]
