"""Segment Anything: Kirillov et al. 2023, "Segment Anything", https://arxiv.org/abs/2304.02643. Original:
facebookresearch/segment-anything @dca509f (``segment_anything/modeling/sam.py``, ``build_sam.py``; Apache-2.0).

:class:`HfVlSamModel` = image encoder (:mod:`.modeling_hf_vl_sam_vision`) + prompt encoder and mask decoder
(:mod:`.modeling_hf_vl_sam_decoder`). Its inputs and outputs follow transformers' ``SamModel``, so transformers'
``SamProcessor`` conventions and the ``mask-generation`` pipeline drive it unchanged.

Deviations from the original ``Sam``:
- No ``@torch.no_grad()``, no pixel normalisation or padding (the image processor's job), no mask upsampling to the
  image size (the processor's ``post_process_masks``): the model returns low-resolution mask logits.
- Prompts are batched tensors (batch, point_batch, ...) instead of a list of dicts; ``point_batch`` prompts per image
  are decoded independently against that image's embedding.
- ``get_image_embeddings`` exposes the encoder for caching; ``forward(image_embeddings=...)`` decodes against a cached
  embedding (the dense positional encoding of the grid is cached too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import initialization as init
from transformers.utils import ModelOutput
from transformers.utils.output_capturing import capture_outputs

from .configuration_hf_vl_sam import HfVlSamConfig
from .hf_vl_pretrained import HfVlPreTrainedModel
from .modeling_hf_vl_sam_decoder import HfVlSamMaskDecoder, HfVlSamPositionalEmbedding, HfVlSamPromptEncoder
from .modeling_hf_vl_sam_vision import HfVlSamVisionAttention, HfVlSamVisionEncoder, HfVlSamVisionLayer


@dataclass
class HfVlSamOutput(ModelOutput):
    r"""
    iou_scores: (batch, point_batch, num_masks) predicted IoU of each mask.
    pred_masks: (batch, point_batch, num_masks, 4 * grid, 4 * grid) low-resolution mask logits (256 x 256 for SAM),
        in the padded input frame; ``num_masks`` is ``num_multimask_outputs`` (3) or 1.
    image_embeddings: (batch, output_channels, grid, grid) the image embedding the masks were decoded against
        (computed from ``pixel_values`` or the one passed in), for reuse with other prompts.
    hidden_states: the image encoder's states, input of block 0 then each block's output, (batch, grid, grid, hidden)
        (with ``output_hidden_states=True`` and ``pixel_values``).
    attentions: the image encoder's attention weights per block (``attn_implementation="eager"``), (batch,
        windows * heads, window_len, window_len); global blocks have one window of the whole grid.
    """

    iou_scores: torch.Tensor | None = None
    pred_masks: torch.Tensor | None = None
    image_embeddings: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class HfVlSamPreTrainedModel(HfVlPreTrainedModel):
    config_class = HfVlSamConfig
    base_model_prefix = "sam"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["HfVlSamVisionLayer", "HfVlSamPromptEncoder", "HfVlSamMaskDecoder"]
    # eager and SDPA: the image encoder's relative position bias is an additive float mask, which flash kernels
    # do not take
    _supports_sdpa = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": HfVlSamVisionLayer, "attentions": HfVlSamVisionAttention}
    accepts_loss_kwargs = False

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, HfVlSamVisionEncoder):
            init.trunc_normal_(module.position_embedding, mean=0.0, std=std)
        elif isinstance(module, HfVlSamVisionAttention):
            # segment-anything's rel_pos_zero_init=True
            init.zeros_(module.rel_pos_h)
            init.zeros_(module.rel_pos_w)
        elif isinstance(module, HfVlSamPositionalEmbedding):
            scale = self.config.prompt_encoder_config.positional_embedding_scale
            init.normal_(module.positional_encoding_gaussian_matrix, mean=0.0, std=scale)


def _check_tensor(value, name: str, ndim: int, last: int | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != ndim or (last is not None and value.shape[-1] != last):
        raise ValueError(f"{name} must have {ndim} dimensions{f' with last dimension {last}' if last else ''}, "
                         f"got shape {tuple(value.shape)}")  # fmt: skip


def _check_prompts(points, labels, boxes, masks, batch: int, mask_size: tuple[int, int]) -> int:
    """Validates the prompt tensors against the image batch; returns the number of prompts per image."""
    point_batch = None
    if labels is not None:
        _check_tensor(labels, "input_labels", 3)
    if points is not None:
        _check_tensor(points, "input_points", 4, 2)
        if labels is not None and tuple(labels.shape) != tuple(points.shape[:3]):
            raise ValueError(f"input_labels must have shape {tuple(points.shape[:3])} (input_points without the "
                             f"last dimension), got {tuple(labels.shape)}")  # fmt: skip
        point_batch = points.shape[1]
        if points.shape[0] != batch:
            raise ValueError(f"input_points has {points.shape[0]} images, the image batch has {batch}")
    elif labels is not None:
        raise ValueError("input_labels was given without input_points")
    if boxes is not None:
        _check_tensor(boxes, "input_boxes", 3, 4)
        if boxes.shape[0] != batch:
            raise ValueError(f"input_boxes has {boxes.shape[0]} images, the image batch has {batch}")
        if point_batch is not None and boxes.shape[1] != point_batch:
            raise ValueError(f"input_points has {point_batch} prompts per image, input_boxes {boxes.shape[1]}")
        point_batch = boxes.shape[1]
    if masks is not None:
        _check_tensor(masks, "input_masks", 4)
        rows = masks.shape[0]
        if point_batch is None:
            point_batch = rows // batch if rows % batch == 0 and rows > 0 else None
        if (point_batch is None or rows not in (batch, batch * point_batch) or masks.shape[1] != 1
                or tuple(masks.shape[2:]) != tuple(mask_size)):
            raise ValueError(f"input_masks must have shape (batch * point_batch or batch, 1, {mask_size[0]}, "
                             f"{mask_size[1]}), got {tuple(masks.shape)} for {batch} images")  # fmt: skip
    return 1 if point_batch is None else point_batch


class HfVlSamModel(HfVlSamPreTrainedModel):
    """SAM: ``get_image_embeddings`` (the heavy encoder, run once per image) and ``forward`` (prompts -> masks)."""

    def __init__(self, config: HfVlSamConfig):
        super().__init__(config)
        config = self.config
        # the attention modules read their sub-config's implementation; transformers resolves only the top-level
        # one at init (the sub-configs are not PreTrainedModels of their own), so pass it down (the setter recurses)
        config._attn_implementation = config._attn_implementation
        self.vision_encoder = HfVlSamVisionEncoder(config.vision_config)
        self.prompt_encoder = HfVlSamPromptEncoder(config.prompt_encoder_config, config.vision_config)
        self.mask_decoder = HfVlSamMaskDecoder(config.mask_decoder_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.vision_encoder.patch_embedding

    def get_image_embeddings(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """pixel_values (batch, 3, image_size, image_size), normalised and padded -> (batch, 256, 64, 64) for SAM."""
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            raise TypeError("pixel_values must be a floating-point torch.Tensor")
        return self.vision_encoder(pixel_values.to(self.vision_encoder.patch_embedding.weight.dtype), **kwargs)

    def get_image_positional_embeddings(self) -> torch.Tensor:
        """The dense positional encoding of the embedding grid, (output_channels, grid, grid); cached."""
        return self.prompt_encoder.positional_embedding.dense(self.prompt_encoder.grid_size)

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        input_masks: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        multimask_output: bool = True,
        mask_iou_threshold: float | None = None,
        **kwargs,
    ) -> HfVlSamOutput:
        r"""Exactly one of ``pixel_values`` / ``image_embeddings``; prompts in the padded input frame (pixels):

        pixel_values: (batch, 3, image_size, image_size) from the image processor.
        input_points: (batch, point_batch, points, 2) x, y. input_labels: (batch, point_batch, points) ints: 1
            foreground, 0 background, -1 not-a-point, -10 padding (ignored); all 1 when omitted.
        input_boxes: (batch, point_batch, 4) x0, y0, x1, y1. input_masks: (batch * point_batch or batch, 1, 4 * grid,
            4 * grid) low-resolution mask logits (a previous ``pred_masks``).
        image_embeddings: (batch, output_channels, grid, grid) from :meth:`get_image_embeddings`.
        multimask_output: 3 masks per prompt (True) or the single-mask output (False).
        mask_iou_threshold: inference only (eval mode, autograd off): prompts none of whose returned masks has an
            ``iou_scores`` above it skip the upscaling and mask product; their ``pred_masks`` are filled with the
            dtype's lowest value (empty). What the automatic mask generator's ``pred_iou_thresh`` drops anyway.
        """
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("pass exactly one of pixel_values and image_embeddings")
        if pixel_values is not None:
            image_embeddings = self.get_image_embeddings(pixel_values, **kwargs)
        else:
            grid = self.prompt_encoder.grid_size
            _check_tensor(image_embeddings, "image_embeddings", 4)
            if tuple(image_embeddings.shape[1:]) != (self.prompt_encoder.hidden_size, *grid):
                raise ValueError(f"image_embeddings must have shape (batch, {self.prompt_encoder.hidden_size}, "
                                 f"{grid[0]}, {grid[1]}), got {tuple(image_embeddings.shape)}")  # fmt: skip
            image_embeddings = image_embeddings.to(self.mask_decoder.iou_token.weight.dtype)
        batch = image_embeddings.shape[0]
        point_batch = _check_prompts(
            input_points, input_labels, input_boxes, input_masks, batch, self.prompt_encoder.mask_input_size
        )
        if input_points is not None and input_labels is None:
            input_labels = torch.ones(input_points.shape[:3], dtype=torch.long, device=input_points.device)
        if input_masks is not None:
            input_masks = input_masks.to(image_embeddings.dtype)
        sparse, dense = self.prompt_encoder(
            input_points, input_labels, input_boxes, input_masks, batch_size=batch, point_batch_size=point_batch
        )
        pred_masks, iou_scores = self.mask_decoder(image_embeddings, self.get_image_positional_embeddings(), sparse,
                                                   dense, multimask_output, mask_iou_threshold)  # fmt: skip
        return HfVlSamOutput(iou_scores=iou_scores, pred_masks=pred_masks, image_embeddings=image_embeddings)


__all__ = ["HfVlSamModel", "HfVlSamOutput", "HfVlSamPreTrainedModel"]
