"""DETR's panoptic segmentation head (Carion et al. 2020, section 4.4 and figure 8; facebookresearch/detr
``models/segmentation.py`` ``DETRsegm``, ``MHAttentionMap``, ``MaskHeadSmallConv``).

For every object slot, a multi-head attention map over the encoder memory (one softmax over heads and positions,
no values) is concatenated with the projected backbone map and upsampled by an FPN-style convolutional head that
adds the ResNet's ``layer3``, ``layer2`` and ``layer1`` maps: one mask logit map per query at stride 4. Masks are
merged into a panoptic map by pixel-wise argmax in ``HfVlDetrImageProcessor.post_process_panoptic_segmentation``.

Keys: the detection model's (``detr.*``, ``classifier``, ``bbox_head``) plus ``bbox_attention.{q,k}_proj`` and
``mask_head.{blocks.N.{conv,norm}, adapters.N, output}``; the original's ``lay1..5``/``gn1..5``/``adapter1..3``/
``out_lay`` and ``q_linear``/``k_linear`` are renamed on conversion. A detection checkpoint loads into this class
with only the head missing (the original trains the head on top of a frozen detection model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_hf_vl_detr import HfVlDetrConfig
from .modeling_hf_vl_detr import (
    HfVlDetrMlpHead,
    HfVlDetrModel,
    HfVlDetrPreTrainedModel,
    _collector,
    auxiliary_predictions,
    detr_set_loss,
)


@dataclass
class HfVlDetrSegmentationOutput(ModelOutput):
    """Outputs of ``HfVlDetrForSegmentation``: those of ``HfVlDetrObjectDetectionOutput`` plus ``pred_masks``
    (batch, num_queries, H / 4, W / 4) mask logits."""

    loss: torch.Tensor | None = None
    loss_dict: dict | None = None
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    pred_masks: torch.Tensor | None = None
    auxiliary_outputs: list[dict] | None = None
    last_hidden_state: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


class HfVlDetrQueryMaps(nn.Module):
    """Attention weights of each query over the memory map, per head; softmax jointly over heads and positions.

    The original's ``MHAttentionMap``. Not named ``*Attention*``: transformers takes any ``*Attention*(nn.Module)``
    class in a model file for a layer that must dispatch through ``ALL_ATTENTION_FUNCTIONS`` (this one has no values
    to attend to), and would then refuse ``set_attn_implementation`` for the whole model.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scaling = (hidden_size / num_heads) ** -0.5
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """queries: (batch, Q, hidden); memory: (batch, hidden, h, w); padding: (batch, h, w) True on padding.
        Returns (batch, Q, heads, h, w)."""
        batch, num_queries = queries.shape[:2]
        height, width = memory.shape[-2:]
        # (batch, Q, hidden) -> (batch, Q, heads, head_dim)
        q = self.q_proj(queries).view(batch, num_queries, self.num_heads, -1)
        # the key projection as a 1x1 convolution over the map: (batch, heads, head_dim, h, w)
        k = F.conv2d(memory, self.k_proj.weight[:, :, None, None], self.k_proj.bias)
        k = k.view(batch, self.num_heads, -1, height, width)
        weights = torch.einsum("bqnc,bnchw->bqnhw", q * self.scaling, k)
        weights = weights.masked_fill(padding[:, None, None], float("-inf"))
        # (batch, Q, heads * h * w): one softmax over heads and positions together, as the original
        return weights.flatten(2).softmax(-1).view(weights.shape)


class HfVlDetrConvBlock(nn.Module):
    """3x3 convolution, GroupNorm(8) (fewer groups only below 8 channels: tiny test models), ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(min(8, out_channels), out_channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(hidden_states)))


def _expand(tensor: torch.Tensor, num_queries: int) -> torch.Tensor:
    """(batch, C, h, w) -> (batch * num_queries, C, h, w), each image repeated for its queries."""
    return tensor[:, None].expand(-1, num_queries, -1, -1, -1).flatten(0, 1)


class HfVlDetrMaskHead(nn.Module):
    """The original's ``MaskHeadSmallConv``: two conv blocks, then three FPN fusions (adapter + nearest upsampling +
    conv block), then a 3x3 convolution to one logit map per query.

    Args:
        in_channels: hidden_size + num_heads (projected map and attention maps, concatenated).
        fpn_channels: channels of the ResNet's layer3, layer2, layer1 maps.
        hidden_size: the transformer width; the blocks narrow it to 1/2, 1/4, 1/8, 1/16.
    """

    def __init__(self, in_channels: int, fpn_channels: tuple[int, int, int], hidden_size: int):
        super().__init__()
        if in_channels % 8 != 0 or hidden_size % 16 != 0:
            raise ValueError(
                f"the mask head needs hidden_size + num_attention_heads ({in_channels}) divisible by 8 and "
                f"hidden_size ({hidden_size}) by 16"
            )
        widths = [in_channels, hidden_size // 2, hidden_size // 4, hidden_size // 8, hidden_size // 16]
        self.blocks = nn.ModuleList(
            [HfVlDetrConvBlock(in_channels, in_channels)]
            + [HfVlDetrConvBlock(widths[i], widths[i + 1]) for i in range(4)]
        )
        self.adapters = nn.ModuleList(nn.Conv2d(c, widths[i + 1], kernel_size=1) for i, c in enumerate(fpn_channels))
        self.output = nn.Conv2d(widths[-1], 1, kernel_size=3, padding=1)

    def forward(self, projected, attention_maps, fpn_features: list[torch.Tensor]) -> torch.Tensor:
        """projected: (batch, hidden, h, w); attention_maps: (batch, Q, heads, h, w); fpn_features: layer3, layer2,
        layer1 maps. Returns (batch * Q, 1, H / 4, W / 4)."""
        num_queries = attention_maps.shape[1]
        hidden_states = torch.cat([_expand(projected, num_queries), attention_maps.flatten(0, 1)], dim=1)
        hidden_states = self.blocks[1](self.blocks[0](hidden_states))
        for adapter, block, features in zip(self.adapters, self.blocks[2:], fpn_features):
            # adapt once per image, then repeat for the queries (cheaper than adapting the repeated maps)
            lateral = _expand(adapter(features), num_queries)
            upsampled = F.interpolate(hidden_states, size=lateral.shape[-2:], mode="nearest")
            hidden_states = block(lateral + upsampled)
        return self.output(hidden_states)


class HfVlDetrForSegmentation(HfVlDetrPreTrainedModel):
    """DETR with the panoptic mask head: ``logits``, ``pred_boxes`` and ``pred_masks`` per query."""

    def __init__(self, config: HfVlDetrConfig):
        super().__init__(config)
        # the same keys as the detection model; the trunk also returns layer1..3 for the FPN
        self.detr = HfVlDetrModel(config, backbone_features=("layer1", "layer2", "layer3", "layer4"))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels + 1)
        self.bbox_head = HfVlDetrMlpHead(config.hidden_size, config.hidden_size, 4, 3)
        heads = config.num_attention_heads
        self.bbox_attention = HfVlDetrQueryMaps(config.hidden_size, heads)
        fpn_channels = tuple(reversed(self.detr.backbone.body.channels[:3]))  # layer3, layer2, layer1
        self.mask_head = HfVlDetrMaskHead(config.hidden_size + heads, fpn_channels, config.hidden_size)
        self.post_init()

    def predict(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., hidden) slots -> logits (..., num_labels + 1) and sigmoid cxcywh boxes (..., 4)."""
        return self.classifier(hidden_states), self.bbox_head(hidden_states).sigmoid()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, HfVlDetrMaskHead):  # the original's kaiming_uniform_(a=1), zero biases
            for conv in module.modules():
                if isinstance(conv, nn.Conv2d):
                    init.kaiming_uniform_(conv.weight, a=1)
                    init.zeros_(conv.bias)
        elif isinstance(module, HfVlDetrQueryMaps):
            for linear in (module.q_proj, module.k_proj):
                init.xavier_uniform_(linear.weight)
                init.zeros_(linear.bias)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> HfVlDetrSegmentationOutput:
        r"""labels: as ``HfVlDetrForObjectDetection`` plus ``masks`` (num_boxes, H, W) per image (binary, at the
        padded input size, as ``HfVlDetrImageProcessor`` returns them with ``return_segmentation_masks=True``)."""
        collect = _collector(self.config, output_attentions, output_hidden_states)
        encoded = self.detr.encode(pixel_values, pixel_mask, collect, **kwargs)
        features, mask, projected, memory, position, key_mask = encoded
        last, intermediate = self.detr.decode(memory, position, key_mask, collect, **kwargs)
        logits, pred_boxes = self.predict(last)
        batch, hidden, height, width = projected.shape
        # (batch, h * w, hidden) -> (batch, hidden, h, w)
        memory_map = memory.transpose(1, 2).reshape(batch, hidden, height, width)
        attention_maps = self.bbox_attention(last, memory_map, ~mask)
        fpn = [features["layer3"], features["layer2"], features["layer1"]]
        masks = self.mask_head(projected, attention_maps, fpn)
        pred_masks = masks.view(batch, -1, *masks.shape[-2:])  # (batch * Q, 1, h4, w4) -> (batch, Q, h4, w4)
        auxiliary_outputs = loss = loss_dict = None
        if labels is not None:  # auxiliary outputs only feed the loss (see HfVlDetrObjectDetectionOutput)
            auxiliary_outputs = auxiliary_predictions(self, intermediate)
            loss, loss_dict = detr_set_loss(self.config, logits, pred_boxes, labels, auxiliary_outputs, pred_masks)
        return HfVlDetrSegmentationOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            pred_masks=pred_masks,
            auxiliary_outputs=auxiliary_outputs,
            last_hidden_state=last,
            encoder_last_hidden_state=memory,
            **{key: tuple(values) for key, values in collect.items()},
        )


__all__ = ["HfVlDetrForSegmentation", "HfVlDetrSegmentationOutput"]
