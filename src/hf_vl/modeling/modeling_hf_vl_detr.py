"""DETR: Carion et al. 2020, "End-to-End Object Detection with Transformers", https://arxiv.org/abs/2005.12872.
Original: facebookresearch/detr at 29901c5 (``models/detr.py``, ``transformer.py``, ``backbone.py``).

A ResNet's last feature map is projected to ``hidden_size``, flattened and given a fixed sine position encoding;
a post-norm transformer encoder refines it; a decoder turns ``num_queries`` learned query positions into object
slots, and shared heads predict per slot a class (or "no object") and a normalised cxcywh box.

Deviations from the original:
- Attention is hf_vl's q/k/v/out layout (the original's fused ``in_proj_weight`` is split on conversion) and runs
  through transformers' attention dispatch (SDPA by default, ``eager`` for attention maps). As in the original,
  positions are added to queries and keys but not to values.
- ``pixel_mask`` is 1 on valid pixels (transformers' convention); the original's ``NestedTensor`` mask is True on
  padding. Without padding the attention runs unmasked (the same result, a faster kernel).
- Frozen batch norm is folded into the backbone's convolutions at run time (``hf_vl_resnet``), and the key padding
  mask is skipped when nothing is padded: both only change float rounding.
- The encoder has no input dropout (the original has none; transformers' DETR adds one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_hf_vl_detr import HfVlDetrConfig
from .hf_vl_attention import HfVlAttention
from .hf_vl_detection_loss import HfVlDetrSetCriterion
from .hf_vl_embeddings import sine_position_embedding_2d
from .hf_vl_matcher import HfVlHungarianMatcher
from .hf_vl_mlp import HfVlMlp, HfVlMlpStack
from .hf_vl_pretrained import HfVlPreTrainedModel
from .hf_vl_resnet import HfVlFrozenBatchNorm2d, HfVlResNetBody


@dataclass
class HfVlDetrModelOutput(ModelOutput):
    """Outputs of ``HfVlDetrModel``.

    last_hidden_state: (batch, num_queries, hidden) decoder output after its final LayerNorm.
    intermediate_hidden_states: (decoder_layers, batch, num_queries, hidden) every decoder layer's output through the
        final LayerNorm (the last equals ``last_hidden_state``); only with ``config.auxiliary_loss``.
    encoder_last_hidden_state: (batch, h * w, hidden) encoder output ("memory").
    encoder_hidden_states / decoder_hidden_states: input + every layer's output, with ``output_hidden_states``.
    encoder_attentions / decoder_attentions / cross_attentions: per layer, with ``output_attentions`` (eager).
    """

    last_hidden_state: torch.Tensor | None = None
    intermediate_hidden_states: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class HfVlDetrObjectDetectionOutput(ModelOutput):
    """Outputs of ``HfVlDetrForObjectDetection``.

    loss: weighted set loss (with ``labels``); loss_dict: its unweighted terms (``loss_ce``, ``loss_bbox``, ...).
    logits: (batch, num_queries, num_labels + 1), the last column "no object".
    pred_boxes: (batch, num_queries, 4) normalised (cx, cy, w, h) relative to each image's unpadded size.
    auxiliary_outputs: ``{"logits", "pred_boxes"}`` of decoder layers 0 .. L-2 (with ``config.auxiliary_loss`` and
    ``labels``, as transformers' DETR: a list per layer, which pipelines could not split into per-image outputs).
    Other fields as ``HfVlDetrModelOutput``.
    """

    loss: torch.Tensor | None = None
    loss_dict: dict | None = None
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    auxiliary_outputs: list[dict] | None = None
    last_hidden_state: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


def _attention(config: HfVlDetrConfig) -> HfVlAttention:
    """DETR's self- and cross-attention: the shared attention; positions go to queries and keys only, through
    ``key_states`` (models/transformer.py in facebookresearch/detr)."""
    return HfVlAttention(config, config.hidden_size, config.num_attention_heads, dropout=config.attention_dropout)


class HfVlDetrEncoderLayer(GradientCheckpointingLayer):
    """Post-norm encoder layer: ``ln1(x + attn(q=k=x+pos, v=x))`` then ``ln2(x + mlp(x))``."""

    def __init__(self, config: HfVlDetrConfig):
        super().__init__()
        self.self_attn = _attention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = HfVlMlp(config.hidden_size, config.intermediate_size, config.hidden_act, config.activation_dropout)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        """hidden_states, position_embeddings: (batch, h * w, hidden). Returns (hidden_states, attention weights)."""
        query_key = hidden_states + position_embeddings
        attn_output, weights = self.self_attn(
            query_key, key_value_states=hidden_states, key_states=query_key, attention_mask=attention_mask, **kwargs
        )
        hidden_states = self.layer_norm1(hidden_states + self.dropout(attn_output))
        hidden_states = self.layer_norm2(hidden_states + self.dropout(self.mlp(hidden_states)))
        return hidden_states, weights


class HfVlDetrDecoderLayer(GradientCheckpointingLayer):
    """Post-norm decoder layer: self-attention among queries, cross-attention to the encoder memory, MLP."""

    def __init__(self, config: HfVlDetrConfig):
        super().__init__()
        self.self_attn = _attention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cross_attn = _attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = HfVlMlp(config.hidden_size, config.intermediate_size, config.hidden_act, config.activation_dropout)
        self.layer_norm3 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states, query_position, memory, memory_keys, memory_mask=None, **kwargs):
        """hidden_states, query_position: (batch, num_queries, hidden); memory: (batch, h * w, hidden) encoder output
        (values); memory_keys: memory + its position encoding (keys). Returns (hidden_states, self, cross weights)."""
        query_key = hidden_states + query_position
        attn_output, self_weights = self.self_attn(
            query_key, key_value_states=hidden_states, key_states=query_key, **kwargs
        )
        hidden_states = self.layer_norm1(hidden_states + self.dropout(attn_output))
        attn_output, cross_weights = self.cross_attn(
            hidden_states + query_position,
            key_value_states=memory,
            key_states=memory_keys,
            attention_mask=memory_mask,
            **kwargs,
        )
        hidden_states = self.layer_norm2(hidden_states + self.dropout(attn_output))
        hidden_states = self.layer_norm3(hidden_states + self.dropout(self.mlp(hidden_states)))
        return hidden_states, self_weights, cross_weights


class HfVlDetrEncoder(nn.Module):
    """The encoder's layers (no final LayerNorm: post-norm layers end normalised; run by ``HfVlDetrModel.encode``)."""

    def __init__(self, config: HfVlDetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(HfVlDetrEncoderLayer(config) for _ in range(config.encoder_layers))


class HfVlDetrDecoder(nn.Module):
    """The decoder's layers and the LayerNorm shared by every layer's output (run by ``HfVlDetrModel.decode``)."""

    def __init__(self, config: HfVlDetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(HfVlDetrDecoderLayer(config) for _ in range(config.decoder_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class HfVlDetrBackbone(nn.Module):
    """ResNet ``body`` plus the padding mask and sine position encoding of its feature maps."""

    def __init__(self, config: HfVlDetrConfig, out_features: tuple[str, ...] = ("layer4",)):
        super().__init__()
        self.body = HfVlResNetBody(config.backbone_depth, config.backbone_dilation, True, out_features)
        # as the original: the stem and layer1 are never trained, layer2..4 are
        self.body.freeze()
        self.num_pos_feats = config.hidden_size // 2
        self.temperature = config.position_embedding_temperature

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor):
        """pixel_values: (batch, 3, H, W); pixel_mask: (batch, H, W), 1 on valid pixels.

        Returns the feature maps {stage: (batch, C, h, w)}, the last map's mask (batch, h, w) bool and its position
        encoding (batch, hidden, h, w) in the features' dtype.
        """
        features = self.body(pixel_values)
        return (features, *self.mask_and_position(features[self.body.out_features[-1]], pixel_mask))

    def mask_and_position(self, last: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last map's (batch, C, h, w) valid mask (batch, h, w) bool and sine encoding (batch, hidden, h, w)."""
        # nearest downsampling of the mask, as the original (backbone.py ``BackboneBase.forward``)
        mask = nn.functional.interpolate(pixel_mask[None].float(), size=last.shape[-2:]).to(torch.bool)[0]
        position = sine_position_embedding_2d(mask, self.num_pos_feats, self.temperature).to(last.dtype)
        return mask, position


class HfVlDetrPreTrainedModel(HfVlPreTrainedModel):
    config_class = HfVlDetrConfig
    base_model_prefix = "detr"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["HfVlDetrBackbone", "HfVlDetrEncoderLayer", "HfVlDetrDecoderLayer"]
    _supports_sdpa = True
    # a mean loss: Trainer must keep dividing by gradient-accumulation steps (ecosystem.md section 4.3)
    accepts_loss_kwargs = False

    def _init_weights(self, module):
        super()._init_weights(module)
        # children are initialised before their parents, so these override the generic normal init above
        if isinstance(module, (HfVlAttention, HfVlMlp)):
            # the original's Transformer._reset_parameters: Xavier-uniform on every matrix
            for linear in module.children():
                if isinstance(linear, nn.Linear):
                    init.xavier_uniform_(linear.weight, gain=self.config.init_xavier_std)
                    init.zeros_(linear.bias)
        elif isinstance(module, HfVlResNetBody):
            for child in module.modules():  # torchvision's ResNet init
                if isinstance(child, nn.Conv2d):
                    init.kaiming_normal_(child.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, HfVlFrozenBatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
        elif isinstance(module, HfVlDetrModel):
            init.normal_(module.query_position_embeddings.weight, mean=0.0, std=1.0)  # nn.Embedding's default


def _padding_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch, h, w) bool valid mask -> additive (batch, 1, 1, h * w) key mask, or None when nothing is padded."""
    flat = mask.flatten(1)
    if bool(flat.all()):
        return None
    additive = torch.zeros(flat.shape, dtype=dtype, device=flat.device).masked_fill(~flat, torch.finfo(dtype).min)
    return additive[:, None, None, :]


class HfVlDetrModel(HfVlDetrPreTrainedModel):
    """Backbone + input projection + transformer encoder/decoder; ``last_hidden_state`` holds the object slots."""

    def __init__(self, config: HfVlDetrConfig, backbone_features: tuple[str, ...] = ("layer4",)):
        super().__init__(config)
        self.backbone = HfVlDetrBackbone(config, backbone_features)
        self.input_projection = nn.Conv2d(self.backbone.body.channels[-1], config.hidden_size, kernel_size=1)
        self.query_position_embeddings = nn.Embedding(config.num_queries, config.hidden_size)
        self.encoder = HfVlDetrEncoder(config)
        self.decoder = HfVlDetrDecoder(config)
        self.post_init()

    def get_backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ResNet's last feature map (batch, C, H / 32, W / 32) (H / 16 with DC5): the expensive part, which
        ``forward(backbone_features=...)`` takes instead of pixels, e.g. cached once while the trunk is frozen."""
        check_pixel_values(pixel_values, self.config.num_channels)
        pixel_values = pixel_values.to(self.input_projection.weight.dtype)
        return self.backbone.body(pixel_values)[self.backbone.body.out_features[-1]]

    def _check_backbone_features(self, backbone_features) -> None:
        channels = self.backbone.body.channels[-1]
        if not isinstance(backbone_features, torch.Tensor) or not backbone_features.is_floating_point():
            raise TypeError("backbone_features must be a floating-point torch.Tensor (get_backbone_features' output)")
        if backbone_features.ndim != 4 or backbone_features.shape[1] != channels:
            raise ValueError(f"backbone_features must have shape (batch, {channels}, height, width), got "
                             f"{tuple(backbone_features.shape)}")  # fmt: skip

    def _trunk_maps(self, pixel_values: torch.Tensor | None, pixel_mask: torch.Tensor | None,
                    backbone_features: torch.Tensor | None) -> tuple[dict, torch.Tensor, torch.Tensor]:  # fmt: skip
        """(features, mask, position): the backbone's from pixels, or around given ``backbone_features`` (its last
        map; features then holds only that). A missing ``pixel_mask`` is all ones at the input's resolution (pixel or
        feature): it is downsampled to the map either way."""
        if (pixel_values is None) == (backbone_features is None):
            raise ValueError("pass exactly one of pixel_values and backbone_features")
        if backbone_features is None:
            check_pixel_values(pixel_values, self.config.num_channels)
        else:
            self._check_backbone_features(backbone_features)
        given = pixel_values if backbone_features is None else backbone_features
        given = given.to(self.input_projection.weight.dtype)  # pipelines load with dtype="auto": follow the weights
        if pixel_mask is None:
            pixel_mask = torch.ones(given.shape[:1] + given.shape[2:], device=given.device)
        if backbone_features is None:
            return self.backbone(given, pixel_mask)
        mask, position = self.backbone.mask_and_position(given, pixel_mask)
        return {self.backbone.body.out_features[-1]: given}, mask, position

    def encode(self, pixel_values: torch.Tensor | None, pixel_mask: torch.Tensor | None, collect: dict,
               backbone_features: torch.Tensor | None = None, **kwargs):  # fmt: skip
        """Backbone (unless ``backbone_features`` are given) and encoder. Returns (features, mask, projected map,
        memory, position, key mask); features holds only the last map when ``backbone_features`` are given."""
        features, mask, position = self._trunk_maps(pixel_values, pixel_mask, backbone_features)
        projected = self.input_projection(features[self.backbone.body.out_features[-1]])
        # (batch, hidden, h, w) -> (batch, h * w, hidden)
        hidden_states = projected.flatten(2).transpose(1, 2)
        position = position.flatten(2).transpose(1, 2)
        key_mask = _padding_mask(mask, hidden_states.dtype)
        _record(collect, "encoder_hidden_states", hidden_states)
        for layer in self.encoder.layers:
            hidden_states, weights = layer(hidden_states, position, key_mask, **kwargs)
            _record(collect, "encoder_hidden_states", hidden_states)
            _record(collect, "encoder_attentions", weights)
        return features, mask, projected, hidden_states, position, key_mask

    def decode(self, memory, position, key_mask, collect: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoder. Returns (last_hidden_state, intermediate_hidden_states or None)."""
        batch = memory.shape[0]
        # (num_queries, hidden) -> (batch, num_queries, hidden)
        query_position = self.query_position_embeddings.weight[None].expand(batch, -1, -1)
        hidden_states = torch.zeros_like(query_position)
        memory_keys = memory + position  # the same for every layer: computed once
        final_norm = self.decoder.final_layer_norm
        intermediate = []
        _record(collect, "decoder_hidden_states", hidden_states)
        for layer in self.decoder.layers:
            hidden_states, self_weights, cross_weights = layer(
                hidden_states, query_position, memory, memory_keys, key_mask, **kwargs
            )
            _record(collect, "decoder_hidden_states", hidden_states)
            _record(collect, "decoder_attentions", self_weights)
            _record(collect, "cross_attentions", cross_weights)
            if self.config.auxiliary_loss:
                intermediate.append(final_norm(hidden_states))
        last = intermediate[-1] if intermediate else final_norm(hidden_states)
        return last, (torch.stack(intermediate) if intermediate else None)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        backbone_features: torch.Tensor | None = None,
        **kwargs,
    ) -> HfVlDetrModelOutput:
        r"""pixel_values: (batch, 3, H, W) from ``HfVlDetrImageProcessor``; pixel_mask: (batch, H, W), 1 on real
        pixels and 0 on padding (all ones when omitted). Attention maps need ``attn_implementation="eager"``.
        backbone_features: instead of pixel_values, ``get_backbone_features``' output (cached trunk features)."""
        collect = _collector(self.config, output_attentions, output_hidden_states)
        _, _, _, memory, position, key_mask = self.encode(
            pixel_values, pixel_mask, collect, backbone_features=backbone_features, **kwargs
        )
        last, intermediate = self.decode(memory, position, key_mask, collect, **kwargs)
        return HfVlDetrModelOutput(
            last_hidden_state=last,
            intermediate_hidden_states=intermediate,
            encoder_last_hidden_state=memory,
            **{key: tuple(values) for key, values in collect.items()},
        )


def _collector(config, output_attentions: bool | None, output_hidden_states: bool | None) -> dict[str, list]:
    """Empty lists for the requested optional outputs (config defaults when not given)."""
    attentions = config.output_attentions if output_attentions is None else output_attentions
    hidden = config.output_hidden_states if output_hidden_states is None else output_hidden_states
    keys = []
    if hidden:
        keys += ["encoder_hidden_states", "decoder_hidden_states"]
    if attentions:
        keys += ["encoder_attentions", "decoder_attentions", "cross_attentions"]
    return {key: [] for key in keys}


def _record(collect: dict, key: str, value) -> None:
    if key in collect:
        collect[key].append(value)


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


def auxiliary_predictions(model, intermediate: torch.Tensor | None) -> list[dict] | None:
    """``{"logits", "pred_boxes"}`` of decoder layers 0 .. L-2 from the stacked (L, batch, Q, hidden) outputs."""
    if intermediate is None:
        return None
    logits, boxes = model.predict(intermediate[:-1])
    return [{"logits": a, "pred_boxes": b} for a, b in zip(logits, boxes)]


def detr_set_loss(config: HfVlDetrConfig, logits, pred_boxes, labels, auxiliary_outputs, pred_masks=None):
    """The set criterion built from the config (cheap; it holds no state). Returns (loss, loss_dict)."""
    matcher = HfVlHungarianMatcher(config.class_cost, config.bbox_cost, config.giou_cost)
    criterion = HfVlDetrSetCriterion(
        config.num_labels,
        matcher,
        eos_coefficient=config.eos_coefficient,
        class_loss_coefficient=config.class_loss_coefficient,
        bbox_loss_coefficient=config.bbox_loss_coefficient,
        giou_loss_coefficient=config.giou_loss_coefficient,
        mask_loss_coefficient=config.mask_loss_coefficient,
        dice_loss_coefficient=config.dice_loss_coefficient,
    ).to(logits.device)
    return criterion(logits, pred_boxes, labels, auxiliary_outputs, pred_masks=pred_masks)


class HfVlDetrMlpHead(HfVlMlpStack):
    """The box head (the original's ``MLP``): the shared linear/ReLU stack."""


class HfVlDetrForObjectDetection(HfVlDetrPreTrainedModel):
    """DETR with its class (``classifier``) and box (``bbox_head``) heads and the set loss."""

    def __init__(self, config: HfVlDetrConfig):
        super().__init__(config)
        self.detr = HfVlDetrModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels + 1)  # + "no object"
        self.bbox_head = HfVlDetrMlpHead(config.hidden_size, config.hidden_size, 4, 3)
        self.post_init()

    def predict(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., hidden) slots -> logits (..., num_labels + 1) and sigmoid cxcywh boxes (..., 4)."""
        return self.classifier(hidden_states), self.bbox_head(hidden_states).sigmoid()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        backbone_features: torch.Tensor | None = None,
        **kwargs,
    ) -> HfVlDetrObjectDetectionOutput:
        r"""labels: one dict per image with ``class_labels`` (num_boxes,) int64 and ``boxes`` (num_boxes, 4)
        normalised cxcywh, as ``HfVlDetrImageProcessor`` produces from COCO annotations.
        backbone_features: instead of pixel_values, ``detr.get_backbone_features``' output (cached trunk features)."""
        # return_dict=True: the trunk's fields are read below even when config.return_dict is False
        outputs = self.detr(pixel_values, pixel_mask=pixel_mask, backbone_features=backbone_features,
                            **{**kwargs, "return_dict": True})  # fmt: skip
        logits, pred_boxes = self.predict(outputs.last_hidden_state)
        auxiliary_outputs = loss = loss_dict = None
        if labels is not None:
            auxiliary_outputs = auxiliary_predictions(self, outputs.intermediate_hidden_states)
            loss, loss_dict = detr_set_loss(self.config, logits, pred_boxes, labels, auxiliary_outputs)
        return HfVlDetrObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            auxiliary_outputs=auxiliary_outputs,
            last_hidden_state=outputs.last_hidden_state,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
        )


__all__ = ["HfVlDetrForObjectDetection", "HfVlDetrModel", "HfVlDetrPreTrainedModel"]
