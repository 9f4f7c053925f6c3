"""SAM's prompt encoder and mask decoder (Kirillov et al. 2023, "Segment Anything", https://arxiv.org/abs/2304.02643,
section 3 and appendix A). Original: facebookresearch/segment-anything @dca509f ``segment_anything/modeling/``
``prompt_encoder.py`` (``PromptEncoder``), ``transformer.py`` (``TwoWayTransformer``, ``TwoWayAttentionBlock``) and
``mask_decoder.py`` (``MaskDecoder``, ``MLP``).

Prompts are batched as transformers' ``SamModel`` batches them: (batch, point_batch, ...) with ``point_batch`` prompts
per image, each decoded independently against its image's embedding.

Deviations from the original:
- Attention is hf_vl's :class:`.hf_vl_attention.HfVlAttention` (separate q/k/v/out, ``inner_dim`` for the
  downsampled cross-attentions, SDPA by default); the token MLP is :class:`.hf_vl_mlp.HfVlMlp` (``fc1``/``fc2``).
- Named modules instead of indices: the four learned point embeddings ``point_embeddings.{0..3}`` are
  ``negative_point_embed``, ``positive_point_embed``, ``top_left_embed``, ``bottom_right_embed``; ``mask_downscaling``
  is ``mask_embed.{conv1, layer_norm1, conv2, layer_norm2, conv3}``; ``output_upscaling`` is ``upscale_conv1``,
  ``upscale_layer_norm``, ``upscale_conv2``; block norms ``norm1..4`` are ``layer_norm1..4``.
- Label ``-10`` (transformers' padding point) zeroes a point's embedding, as in transformers.
- The dense positional encoding of the image grid is cached per (size, device, dtype) and recomputed when the random
  Fourier matrix changes (loading weights), so decoding against a cached image embedding does not recompute it.
- Prompts that decode against the same image state (no mask prompt, or one mask per image) share it: the image is
  not repeated per prompt, and the first two-way layer projects its keys/values (token->image) and queries
  (image->token) once per image; the original repeats the image embedding per prompt. Same arithmetic per prompt.
  Without a mask prompt that work depends on the image alone and, in inference, is kept for the next call on the
  same embedding (``HfVlSamMaskDecoder._image_projections``).
- Outside training, the image->token attention applies ``out_proj`` to the few token values before the attention
  weights (``_low_rank_attention``): the same sums, reassociated, and a smaller product.
- In inference with autograd off, while heads x query tokens stays below the attention's inner width
  (``modeling_hf_vl_sam_two_way.FOLD_BELOW``), the cross-attentions not served by the first layer's image-side work
  (every layer's after the first, the final one; all of them with a mask prompt) never project the h*w image
  positions: image->token folds ``q_proj`` into the token keys, scores (X + pe) (W_q^T K^T) + b_q K^T
  (``_image_to_token_logits``); token->image folds ``k_proj`` / ``v_proj`` into the queries, scores (q W_k) (X + pe)^T
  (q . b_k is the same for every key and drops out of the softmax) and output (P X) W_v^T + b_v (each row of P sums
  to one) (``_folded_token_to_image``). The same sums, reassociated; the two-way transformer is in
  :mod:`.modeling_hf_vl_sam_two_way`.
- In inference with the cached first-layer work and at least two prompts per call, the layers after the first, the
  final attention and the first upscaling read the prompts' image states through their factors: each layer's
  update is low-rank (attention weights x token values) and each LayerNorm a row scaling of a fixed linear map, so
  every linear map of the states is a per-image product plus a narrow per-prompt one
  (:mod:`.modeling_hf_vl_sam_factored`). The same sums, reassociated; the h*w positions are never projected per
  prompt, and the grid encoding is never added to them.
- The output upscaling's transposed convolutions (kernel 2, stride 2) run as per-pixel linear maps on the
  channels-last image states (see :class:`HfVlSamMaskDecoder`). ``predict_masks`` returns every mask token's
  output by default (the ONNX export's need) or the ``mask_tokens`` selected by ``forward``; outside autograd only
  the selected ones are computed (the original computes all four and slices), and the final token->image attention
  runs only for the IoU and selected mask tokens (the prompt tokens' outputs are never read; attention rows are
  independent, so the rows kept are unchanged).
- In inference (autograd off) prompts decode in chunks of ``DECODE_CHUNK_BYTES`` of image states, and upscale in
  pieces of ``UPSCALE_PIECE_BYTES``, each prompt's arithmetic unchanged (cache-sized working sets on the CPU, no
  allocation past glibc's mmap ceiling), written into one output; the cached first-layer work is looked up once per
  call. On the CPU inference fast path the folded cross-attentions' products against the h*w image states are oneDNN
  GEMMs (``modeling_hf_vl_sam_two_way._products``); the hypernetwork's product is a ``bmm`` (``_mask_product``).
- The masks' 4x4 sub-pixel blocks are laid out by a copy that moves pairs of neighbouring pixels as one integer
  (``_unshuffle_masks``); bf16/fp16 softmaxes on the CPU run on the logits as they are (PyTorch computes them in fp32
  internally, ``modeling_hf_vl_sam_two_way._softmax``) instead of on an fp32 copy.
- ``mask_iou_threshold`` (inference only; not in the original): prompts none of whose returned masks has a predicted
  IoU above it skip the upscaling and mask product and get masks of the lowest value; segment-anything's automatic
  mask generator upscales every candidate and then drops those.
- Point labels 2 / 3 (a box's corners given as points, as in segment-anything's ONNX model) add the top-left /
  bottom-right embeddings.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_hf_vl_sam import HfVlSamMaskDecoderConfig, HfVlSamPromptEncoderConfig, HfVlSamVisionConfig
from .hf_vl_embeddings import HfVlRandomFourierPositionEmbedding
from .hf_vl_mlp import HfVlFastLinearModule, HfVlMlpStack, can_fuse_linear, fused_linear
from .modeling_hf_vl_sam_factored import FactoredImage, FactoredStates, factorable, memory_key
from .modeling_hf_vl_sam_two_way import HfVlSamTwoWayLayer, HfVlSamTwoWayTransformer, _ImageProjections
from .modeling_hf_vl_sam_vision import HfVlSamLayerNorm2d

PAD_LABEL = -10  # transformers SamProcessor's padding label: the point contributes nothing
NOT_A_POINT_LABEL = -1  # segment-anything's padding point: the learned not-a-point embedding
# inference decodes prompts in chunks of about this many bytes of image states (prompts x images x hidden x h x w x
# element size): the fastest per prompt for vit_b on 2 CPU threads, 64 points. First tuned before the factored path:
# 8 MiB (2 prompts fp32: 25 ms/prompt against 34 ms unchunked; 4 bf16: 11.8 against 19.7 ms); with it (interleaved
# medians, ms per prompt): fp32 8 / 16 / 24 MiB 16.8 / 14.9 / 14.3, bf16 10.3 / 9.0 / 9.6; unfactored fp32 8 / 16 MiB
# 20.0 / 19.1; re-tuned in the automatic mask generator (2 workers of 1 thread, 32x32 grid, decode stage, 3 interleaved
# rounds) once the upscaling ran in pieces: bf16 12 / 16 / 24 MiB 8.5 / 8.2 / 7.9 s, fp32 16 / 24 MiB 14.0 / 13.4 s
DECODE_CHUNK_BYTES = 24 << 20
# ... and upscale them a few rows at a time (bytes of upscaled features, (h*w*16, hidden/8) per row): a whole chunk's
# (32 MiB for vit_b at 16 MiB of states) crossed glibc's mmap ceiling (32 MiB), so every chunk page-faulted its
# fresh output (0.2-3.9 GB per 32x32 grid); 1 thread, 32 points, bf16: 18.0 -> 15.3 ms per prompt
UPSCALE_PIECE_BYTES = 8 << 20


class HfVlSamPositionalEmbedding(HfVlRandomFourierPositionEmbedding):
    """The random Fourier encoding shared by prompts and the image grid, with the dense grid encoding cached."""

    def __init__(self, num_pos_feats: int, scale: float = 1.0):
        super().__init__(num_pos_feats, scale)
        self._dense_cache: dict = {}

    def dense(self, size: tuple[int, int]) -> torch.Tensor:
        """(2 * num_pos_feats, h, w) encoding of the image grid's cell centres, cached."""
        matrix = self.positional_encoding_gaussian_matrix
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and matrix.requires_grad):
            return self(size)
        key = (tuple(size), matrix.device, matrix.dtype, matrix.data_ptr(), matrix._version)
        cached = self._dense_cache.get("dense")
        if cached is None or cached[0] != key:
            # an ordinary tensor even under inference_mode, so the cache stays usable after leaving it
            with torch.inference_mode(False), torch.no_grad():
                cached = self._dense_cache["dense"] = (key, self(size))
        return cached[1]

    def _apply(self, fn, recurse=True):
        self._dense_cache = {}  # .to()/.half(): new storage, drop the stale encoding
        return super()._apply(fn, recurse)

    def encode_points(self, coords: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
        """coords: (..., 2) x, y pixels in the input frame. Returns (..., 2 * num_pos_feats)."""
        # normalise to [0, 1] by the padded input size (width for x, height for y)
        scale = torch.tensor([input_size[1], input_size[0]], dtype=coords.dtype, device=coords.device)
        return self.encode(coords / scale)


class HfVlSamMaskEmbedding(nn.Module):
    """Mask prompt (batch, 1, 4h, 4w) -> dense embedding (batch, hidden, h, w): two stride-2 convs, a 1x1 conv."""

    def __init__(self, config: HfVlSamPromptEncoderConfig):
        super().__init__()
        quarter = config.mask_input_channels // 4
        self.conv1 = nn.Conv2d(1, quarter, kernel_size=2, stride=2)
        self.layer_norm1 = HfVlSamLayerNorm2d(quarter, eps=config.layer_norm_eps)
        self.conv2 = nn.Conv2d(quarter, config.mask_input_channels, kernel_size=2, stride=2)
        self.layer_norm2 = HfVlSamLayerNorm2d(config.mask_input_channels, eps=config.layer_norm_eps)
        self.conv3 = nn.Conv2d(config.mask_input_channels, config.hidden_size, kernel_size=1)
        self.activation = ACT2FN[config.hidden_act]

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation(self.layer_norm1(self.conv1(masks)))
        hidden_states = self.activation(self.layer_norm2(self.conv2(hidden_states)))
        return self.conv3(hidden_states)


class HfVlSamPromptEncoder(nn.Module):
    """Points, boxes and masks -> sparse (token) and dense (grid) prompt embeddings."""

    def __init__(self, config: HfVlSamPromptEncoderConfig, vision_config: HfVlSamVisionConfig):
        super().__init__()
        hidden = config.hidden_size
        self.hidden_size = hidden
        self.input_size = (vision_config.image_size, vision_config.image_size)
        self.grid_size = (vision_config.grid_size, vision_config.grid_size)
        self.positional_embedding = HfVlSamPositionalEmbedding(hidden // 2, config.positional_embedding_scale)
        self.negative_point_embed = nn.Embedding(1, hidden)
        self.positive_point_embed = nn.Embedding(1, hidden)
        self.top_left_embed = nn.Embedding(1, hidden)
        self.bottom_right_embed = nn.Embedding(1, hidden)
        self.not_a_point_embed = nn.Embedding(1, hidden)
        self.no_mask_embed = nn.Embedding(1, hidden)
        self.mask_embed = HfVlSamMaskEmbedding(config)

    @property
    def mask_input_size(self) -> tuple[int, int]:
        return (4 * self.grid_size[0], 4 * self.grid_size[1])

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """points (batch, P, N, 2), labels (batch, P, N) -> (batch, P, N [+1], hidden). ``pad`` appends the
        original's not-a-point (done when no box follows the points). Labels: 1 foreground, 0 background, 2 / 3 a
        box's top-left / bottom-right corner, -1 not-a-point, -10 padding (contributes nothing)."""
        points = points + 0.5  # pixel centres
        if pad:
            points = torch.cat([points, points.new_zeros(*points.shape[:2], 1, 2)], dim=2)
            labels = torch.cat([labels, labels.new_full((*labels.shape[:2], 1), NOT_A_POINT_LABEL)], dim=2)
        embedding = self.positional_embedding.encode_points(points, self.input_size)
        labels = labels[..., None]
        embedding = torch.where(labels == NOT_A_POINT_LABEL, self.not_a_point_embed.weight, embedding)
        embedding = torch.where(labels == PAD_LABEL, torch.zeros_like(embedding), embedding)
        # labels 2 / 3: box corners given as points (segment-anything's ONNX model), top-left / bottom-right
        for value, learned in enumerate(
            (self.negative_point_embed, self.positive_point_embed, self.top_left_embed, self.bottom_right_embed)
        ):
            embedding = embedding + (labels == value).to(embedding.dtype) * learned.weight
        return embedding

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """boxes (batch, P, 4) xyxy -> corner embeddings (batch, P, 2, hidden)."""
        corners = (boxes + 0.5).reshape(*boxes.shape[:2], 2, 2)  # (batch, P, 4) -> (batch, P, [tl, br], xy)
        embedding = self.positional_embedding.encode_points(corners, self.input_size)
        corner_types = torch.cat([self.top_left_embed.weight, self.bottom_right_embed.weight])  # (2, hidden)
        return embedding + corner_types

    def forward(
        self,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        batch_size: int,
        point_batch_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse (batch, P, tokens, hidden) (tokens may be 0) and dense (batch * P, hidden, h, w)."""
        sparse = [self.no_mask_embed.weight.new_zeros(batch_size, point_batch_size, 0, self.hidden_size)]
        if points is not None:
            sparse.append(self.embed_points(points, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        sparse_embeddings = torch.cat(sparse, dim=2)
        rows = batch_size * point_batch_size
        if masks is not None:
            dense = self.mask_embed(masks)
            if dense.shape[0] != rows:  # one mask per image: shared by its P prompts
                dense = dense.repeat_interleave(point_batch_size, dim=0)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(rows, -1, *self.grid_size)
        return sparse_embeddings, dense


class HfVlSamFeedForward(HfVlMlpStack):
    """The original's ``MLP`` (keys ``layers.{i}``): the shared linear/ReLU stack."""


def _subpixel_linear_weights(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel-2 stride-2 transposed convolution as a linear map from one input pixel to its 2x2 output pixels.

    weight (in, out, 2, 2) -> (2, 2, out, in) -> (4 * out, in): output features ordered (sub-row, sub-column,
    channel), so the channels of each output pixel stay contiguous (LayerNorm over them needs no permute)."""
    weight = conv.weight.permute(2, 3, 1, 0).reshape(-1, conv.in_channels)
    return weight, conv.bias.repeat(4)


def _one_dense(dense_embeddings: torch.Tensor) -> bool:
    """Whether every prompt has the same dense embedding: no mask prompt (the no-mask embedding, an expanded view)."""
    return dense_embeddings.stride(0) == 0 or dense_embeddings.shape[0] == 1


# a sub-pixel pair (two neighbouring mask columns) of these element sizes moved as one integer of twice the width
_PAIR_DTYPES = {2: torch.int32, 4: torch.int64}


def _pairs_movable(*tensors: torch.Tensor) -> bool:
    """Whether :func:`_unshuffle_masks` may move column pairs as single integers (``Tensor.view(dtype)``): eager,
    no autograd through them, unit last stride and even offsets / other strides (what such a view requires)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        return False
    for tensor in tensors:
        if tensor.element_size() not in _PAIR_DTYPES or (tensor.requires_grad and torch.is_grad_enabled()):
            return False
        if tensor.stride(-1) != 1 or tensor.storage_offset() % 2 or any(s % 2 for s in tensor.stride()[:-1]):
            return False
    return True


def _unshuffle_masks(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sub-pixel blocks (batch, P, masks, h, w, 2, 2, 2, 2) (each embedding cell's 4x4 pixels: row 1, column 1, row 2,
    column 2, as :meth:`HfVlSamMaskDecoder.upscale` orders them) -> masks (batch, P, masks, 4h, 4w), written into
    ``out`` (any strides) when given.

    Row 2 sits between column 1 and column 2 in the blocks, so no run longer than a column-2 pair is contiguous in
    both layouts; an elementwise permute copies such 2-element runs ~10x slower than a loop over the pairs viewed as
    one integer each (0.91 against 0.07 ms per fp32 prompt, 64x64 grid, 3 masks), which this takes where it can."""
    batch, point_batch, masks, height, width = blocks.shape[:5]
    shape = (batch, point_batch, masks, height, 2, 2, width, 2, 2)  # rows (h, r1, r2), columns (w, c1, c2)
    if _pairs_movable(blocks) and (out is None or (out.dtype == blocks.dtype and _pairs_movable(out))):
        out = blocks.new_empty(batch, point_batch, masks, 4 * height, 4 * width) if out is None else out
        pairs = _PAIR_DTYPES[blocks.element_size()]
        # (.., h, w, r1, c1, r2, c2) -> (.., h, w, r1, c1, r2, 1) integers -> (.., h, r1, r2, w, c1, 1)
        out.view(shape).view(pairs).copy_(blocks.view(pairs).permute(0, 1, 2, 3, 5, 7, 4, 6, 8))
        return out
    # (batch, P, masks, h, w, 2, 2, 2, 2) -> (batch, P, masks, h, 2, 2, w, 2, 2)
    blocks = blocks.permute(0, 1, 2, 3, 5, 7, 4, 6, 8)
    if out is None:
        return blocks.reshape(batch, point_batch, masks, 4 * height, 4 * width)
    out.view(shape).copy_(blocks)
    return out


def _mask_product(hyper_in: torch.Tensor, upscaled: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """hyper_in (rows, masks, c) x upscaled (rows, pixels, c) -> (rows, masks, pixels), into ``out`` when given
    (contiguous). ``bmm`` reads the transposed operand as it is; here (3 masks, 32 channels, 65536 pixels) it beats a
    oneDNN GEMM taking the pixels as its weight (:func:`.modeling_hf_vl_sam_two_way._products`), which reorders that
    8 MB operand first: 0.46 -> 0.30 ms per fp32 prompt, 0.19 -> 0.14 ms bf16 (2 threads)."""
    return torch.bmm(hyper_in, upscaled.transpose(1, 2), out=out)


def _check_iou_threshold(threshold, training: bool) -> None:
    """``mask_iou_threshold`` is None or a real number, and used only outside training and autograd."""
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"mask_iou_threshold must be a real number or None, got {type(threshold).__name__}")
    if training or torch.is_grad_enabled():
        raise ValueError("mask_iou_threshold leaves some masks uncomputed, an inference option: use it in eval mode "
                         "under torch.no_grad() or torch.inference_mode()")


class HfVlSamMaskDecoder(HfVlFastLinearModule):
    """Output tokens + prompt tokens through the two-way transformer; masks from the upscaled image states dotted
    with per-token hypernetwork outputs; IoU from the IoU token.

    The output upscaling (two kernel-2 stride-2 transposed convolutions) runs as two per-pixel linear maps on the
    channels-last image states (:func:`_subpixel_linear_weights`): the same arithmetic without the layout
    round trips, and on the CPU inference fast path with the second GELU fused into its GEMM; the 4x4 sub-pixel
    grid of each embedding cell is interleaved into the mask only after the hypernetwork product."""

    def __init__(self, config: HfVlSamMaskDecoderConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, hidden)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, hidden)
        self.transformer = HfVlSamTwoWayTransformer(config)
        self.upscale_conv1 = nn.ConvTranspose2d(hidden, hidden // 4, kernel_size=2, stride=2)
        self.upscale_layer_norm = HfVlSamLayerNorm2d(hidden // 4, eps=config.upscaling_layer_norm_eps)
        self.upscale_conv2 = nn.ConvTranspose2d(hidden // 4, hidden // 8, kernel_size=2, stride=2)
        self.upscale_act = ACT2FN[config.upscaling_act]
        self.output_hypernetworks_mlps = nn.ModuleList(
            HfVlSamFeedForward(hidden, hidden, hidden // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = HfVlSamFeedForward(
            hidden, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth
        )
        self._image_cache: dict = {}  # the last image's first-layer work (_image_projections), not state

    def _apply(self, fn, recurse=True):
        self._image_cache = {}  # .to()/.half(): new parameters, drop the projections of the old ones
        return super()._apply(fn, recurse)

    def __getstate__(self):
        return {**super().__getstate__(), "_image_cache": {}}

    def _image_projections(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
    ) -> _ImageProjections | None:
        """The first two-way layer's image-side work for ``image_embeddings + dense`` (dense: one vector, the
        no-mask embedding, expanded), kept for the next call on the same embedding; None where nothing is cached
        (training, autograd on, compiling or tracing, no two-way layer, inference-tensor weights).

        The entry is reused only while all it was computed from is unchanged: the same memory (the entry holds each
        source's storage, so no other tensor can take its place), layout and version counter of the embedding (the
        same tensor or a view of the same base; an inference tensor, which has no version counter, is compared by
        value with a copy instead), of the no-mask embedding, the grid encoding and the three projections' weights."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or self.training or torch.is_grad_enabled():
            return None
        if not len(self.transformer.layers):
            return None
        first = self.transformer.layers[0]
        linears = (first.cross_attn_token_to_image.k_proj, first.cross_attn_token_to_image.v_proj,
                   first.cross_attn_image_to_token.q_proj)  # fmt: skip
        weights = [p for linear in linears for p in (linear.weight, linear.bias) if p is not None]
        sources = (image_embeddings, dense, image_pe, *weights)
        if any(t.is_inference() for t in sources[1:]):
            return None
        key = tuple(memory_key(t) for t in sources)
        base = image_embeddings if image_embeddings._base is None else image_embeddings._base
        cached = self._image_cache.get("first_layer")
        if cached is not None and cached["key"] == key and (
            cached["base"] is base if cached["snapshot"] is None else torch.equal(cached["snapshot"], image_embeddings)
        ):
            return cached["projections"]
        # ordinary tensors even under inference_mode, so the entry stays usable after leaving it
        with torch.inference_mode(False), torch.no_grad():
            snapshot = image_embeddings.clone() if image_embeddings.is_inference() else None
            projections = self.transformer.project_image(image_embeddings + dense, image_pe)
        storages = [t.untyped_storage() for t in sources]
        self._image_cache["first_layer"] = dict(key=key, base=None if snapshot is not None else base, snapshot=snapshot,
                                                storages=storages, projections=projections)  # fmt: skip
        return projections

    def _upscale_weights(self, fast: bool, rows: int) -> tuple[torch.Tensor, ...]:
        """(weight1, bias1, weight2, bias2) of the two upscaling convolutions as linear maps; cached (and pre-packed
        for oneDNN) on the fast path, rebuilt whenever a source parameter changes."""
        convs = (self.upscale_conv1, self.upscale_conv2)
        if not fast:
            return (*_subpixel_linear_weights(convs[0]), *_subpixel_linear_weights(convs[1]))
        sources = [p for conv in convs for p in (conv.weight, conv.bias)]
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in sources)
        cached = self._fast_weights.get("upscale")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                weights = []
                for conv, rows_in in zip(convs, (rows, 4 * rows)):
                    weight, bias = _subpixel_linear_weights(conv)
                    if hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
                        weight = torch.ops.mkldnn._reorder_linear_weight(weight, max(rows_in, 1))
                    weights += [weight, bias]
            cached = self._fast_weights["upscale"] = (key, tuple(weights))
        return cached[1]

    def _factored_upscale(self, states: FactoredStates | None, rows: torch.Tensor | None = None):
        """The first upscaling's linear map of the final image ``states`` (in factored form, or None: returns None)
        of the prompt ``rows`` (all by default)."""
        if states is None:
            return None
        states = states if rows is None else states.select(rows)
        conv = self.upscale_conv1
        return states.linear("upscale", (conv.weight, conv.bias), lambda: _subpixel_linear_weights(conv)[0],
                             conv.bias.repeat(4))  # fmt: skip

    def upscale(self, image_states: torch.Tensor | None, first: torch.Tensor | None = None) -> torch.Tensor:
        """image_states (rows, h*w, hidden) -> upscaled features (rows, h*w, 16, hidden/8): for each embedding cell
        its 4x4 output pixels, ordered (sub-row 1, sub-column 1, sub-row 2, sub-column 2). ``first``: the first
        upscaling's linear map of the states (rows, h*w, hidden) when already computed (:meth:`_factored_upscale`);
        ``image_states`` is then not read and may be None."""
        if image_states is None and first is None:
            raise TypeError("upscale needs image_states (rows, h*w, hidden) unless first is given, got neither")
        params = [p for conv in (self.upscale_conv1, self.upscale_conv2) for p in (conv.weight, conv.bias)]
        source = image_states if first is None else first
        fast = not self.training and can_fuse_linear(source, *params)
        weight1, bias1, weight2, bias2 = self._upscale_weights(fast, source.shape[0] * source.shape[1])
        linear = fused_linear if fast else F.linear
        # (rows, h*w, hidden) -> (rows, h*w, 4, hidden/4): each cell's 2x2 pixels of the first upscaling
        hidden_states = (linear(image_states, weight1, bias1) if first is None else first).unflatten(-1, (4, -1))
        norm = self.upscale_layer_norm
        hidden_states = F.layer_norm(hidden_states, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        if fast and type(self.upscale_act) is type(ACT2FN["gelu"]):
            hidden_states = torch.ops.aten.gelu_(hidden_states)  # in place on the fresh norm output: one pass less
            hidden_states = fused_linear(hidden_states, weight2, bias2, "gelu")
        else:
            hidden_states = self.upscale_act(linear(self.upscale_act(hidden_states), weight2, bias2))
        # (rows, h*w, 4, 4 * hidden/8) -> (rows, h*w, 16, hidden/8)
        return hidden_states.unflatten(-1, (4, -1)).flatten(2, 3)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_embeddings: torch.Tensor,
        dense_embeddings: torch.Tensor,
        mask_tokens: slice = slice(None),
        mask_iou_threshold: float | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask tokens' outputs (all by default, the single-mask one first): masks (batch, P, M, 4h, 4w), IoU
        (batch, P, M); ``mask_tokens`` selects which (outside autograd only those masks are computed; with autograd
        all are, so every hypernetwork takes part in the loss's graph, as in the original). Inputs as in
        :meth:`forward`.

        In inference (autograd off) the prompts decode a few at a time (``DECODE_CHUNK_BYTES``): each prompt has
        its own (h*w, hidden) image states, and on the CPU a few of them fit in cache while many make every
        intermediate a fresh multi-MB allocation (page faults); each prompt's arithmetic is unchanged.

        ``mask_iou_threshold`` (inference only): prompts none of whose selected outputs has a predicted IoU above it
        skip the upscaling and the mask product, the costliest steps after the transformer; their masks are filled
        with the dtype's lowest value (empty at any threshold). The automatic mask generator passes its
        ``pred_iou_thresh``, whose filter drops those masks anyway."""
        _check_iou_threshold(mask_iou_threshold, self.training)
        batch, point_batch = sparse_embeddings.shape[:2]
        per_prompt = batch * image_embeddings[0].numel() * image_embeddings.element_size()
        chunk = max(1, DECODE_CHUNK_BYTES // per_prompt)
        if self.training or torch.is_grad_enabled():
            # every mask token takes part, so every hypernetwork gets a gradient (DDP needs all parameters used)
            masks, iou = self._predict_masks(image_embeddings, image_pe, sparse_embeddings, dense_embeddings,
                                             slice(None), **kwargs)  # fmt: skip
            return masks[:, :, mask_tokens], iou[:, :, mask_tokens]
        per_row_dense = dense_embeddings.shape[0] == batch * point_batch  # else one per image: not split by prompt
        if torch.compiler.is_compiling() or point_batch <= chunk or not per_row_dense:
            return self._predict_masks(image_embeddings, image_pe, sparse_embeddings, dense_embeddings, mask_tokens,
                                       mask_iou_threshold=mask_iou_threshold, **kwargs)  # fmt: skip
        # dense (batch * P, hidden, h, w) -> (batch, P, hidden, h, w): a view, expanded (no mask prompt) or not
        dense = dense_embeddings.view(batch, point_batch, *dense_embeddings.shape[1:])
        # the cached first-layer work (no mask prompt) is looked up once for all chunks, not once per chunk
        shared = self._shared_image_side(image_embeddings, image_pe, dense[:, :1].flatten(0, 1))
        masks = ious = None
        for start in range(0, point_batch, chunk):
            part = self._predict_masks(image_embeddings, image_pe, sparse_embeddings[:, start : start + chunk],
                                       dense[:, start : start + chunk].flatten(0, 1), mask_tokens, shared=shared,
                                       unshuffled=True, mask_iou_threshold=mask_iou_threshold,
                                       **kwargs)  # fmt: skip
            if masks is None:  # (batch, P, M, 4h, 4w): each chunk's masks are written in place, no concatenation
                size = part[0].shape
                masks = part[0].new_empty(batch, point_batch, size[2], 4 * size[3], 4 * size[4])
                ious = part[1].new_empty(batch, point_batch, part[1].shape[-1])
            _unshuffle_masks(part[0], masks[:, start : start + chunk])
            ious[:, start : start + chunk] = part[1]
        return masks, ious

    def _shared_image_side(self, image_embeddings, image_pe, dense_embeddings) -> tuple | None:
        """(image_embeddings, projections) when every prompt decodes against one cacheable image state per image
        (no mask prompt: ``dense_embeddings`` one vector, expanded) and the cache serves it, else None."""
        if not (_one_dense(dense_embeddings) and dense_embeddings.stride(-1) == dense_embeddings.stride(-2) == 0):
            return None
        if image_embeddings.stride(0) == 0:  # one image repeated (an expanded view): one image state
            image_embeddings = image_embeddings[:1]
        projections = self._image_projections(image_embeddings, image_pe[None],
                                              dense_embeddings[: image_embeddings.shape[0]])  # fmt: skip
        return None if projections is None else (image_embeddings, projections)

    def _predict_masks(self, image_embeddings, image_pe, sparse_embeddings, dense_embeddings, mask_tokens,
                       shared: tuple | None = None, unshuffled: bool = False,
                       mask_iou_threshold: float | None = None, **kwargs):  # fmt: skip
        """:meth:`predict_masks` for all prompts at once. ``shared``: :meth:`_shared_image_side` for these inputs,
        already looked up; ``unshuffled``: masks as (rows, masks, h, w, 2, 2, 2, 2) sub-pixel blocks
        (:func:`_unshuffle_masks` lays them out); ``mask_iou_threshold``: see :meth:`predict_masks`."""
        batch, point_batch = sparse_embeddings.shape[:2]
        rows = batch * point_batch
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])  # (1 + masks, hidden)
        output_tokens = output_tokens.expand(rows, -1, -1)
        tokens = torch.cat([output_tokens, sparse_embeddings.flatten(0, 1).to(output_tokens.dtype)], dim=1)
        one_dense = _one_dense(dense_embeddings)
        if one_dense and image_embeddings.stride(0) == 0:  # one image repeated (an expanded view): one image state
            image_embeddings = image_embeddings[:1]
        projections = image = None
        shared = self._shared_image_side(image_embeddings, image_pe, dense_embeddings) if shared is None else shared
        if shared is not None:  # one no-mask vector for every prompt: the cached first-layer work
            image_embeddings, projections = shared
        groups, (height, width) = image_embeddings.shape[0], image_embeddings.shape[-2:]
        if projections is None and (one_dense or dense_embeddings.shape[0] == batch):
            # one dense embedding for all prompts (no mask prompt: an expanded view) or one per image: each image
            # state is built once and the transformer shares its first layer's image-side work among the prompts
            image = image_embeddings + dense_embeddings[:groups]
        elif projections is None:
            image = image_embeddings.repeat_interleave(point_batch, dim=0) + dense_embeddings
        indices = range(self.num_mask_tokens)[mask_tokens]
        # with the cached first-layer work, the later layers and the first upscaling read the prompts' image states
        # through their factors (modeling_hf_vl_sam_factored)
        norms, factored = [layer.layer_norm4 for layer in self.transformer.layers], None
        if projections is not None and factorable(norms, self.transformer.final_attn_token_to_image.num_heads,
                                                  tokens.shape[1], rows):  # fmt: skip
            factored = FactoredImage(projections, norms, self._image_cache)
        # the final attention runs for the IoU token and the selected mask tokens only (prompt tokens are not read)
        tokens_out, image_states = self.transformer(image, image_pe[None], tokens, projections,
                                                    output_tokens=[0, *(1 + index for index in indices)],
                                                    factored=factored, **kwargs)  # fmt: skip
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[index](tokens_out[:, 1 + position])
             for position, index in enumerate(indices)], dim=1
        )  # (rows, masks, hidden/8), tokens_out: (rows, 1 + masks, hidden)
        iou_pred = self.iou_prediction_head(tokens_out[:, 0])[:, mask_tokens].reshape(batch, point_batch, -1)
        # (rows, masks, h*w*16) -> (batch, P, masks, h, w, 2, 2, 2, 2) (sub-pixels: row 1, column 1, row 2, column 2),
        # laid out as (batch, P, masks, 4h, 4w) by _unshuffle_masks
        factored = None if factored is None else factored.final
        masks = self._mask_logits(image_states, hyper_in, iou_pred.flatten(0, 1), mask_iou_threshold, factored)
        masks = masks.view(batch, point_batch, -1, height, width, 2, 2, 2, 2)
        if unshuffled:
            return masks, iou_pred
        return _unshuffle_masks(masks), iou_pred

    def _mask_logits(self, image_states, hyper_in, iou, threshold: float | None, factored=None) -> torch.Tensor:
        """Mask logits (rows, masks, h*w*16) in sub-pixel order: the upscaled image states (rows, h*w, hidden) times
        the hypernetwork outputs (rows, masks, hidden/8). With a ``threshold``, only for the rows with an IoU (rows,
        masks) above it (compared in fp32 or wider, as the generator's filter compares); the others' are the lowest
        value. ``factored``: see :meth:`_factored_upscale`."""
        keep = None if threshold is None else iou.to(torch.promote_types(iou.dtype, torch.float32)) > threshold
        if keep is None or bool(keep.all()):
            return self._upscaled_products(image_states, hyper_in, self._factored_upscale(factored))
        # with factored states the kept rows' image states are not read: no copy of them (4096 x 256 per prompt)
        rows = keep.any(-1).nonzero().flatten()
        positions = factored.length if image_states is None else image_states.shape[1]  # h*w
        out = hyper_in.new_full((*hyper_in.shape[:2], positions * 16), torch.finfo(hyper_in.dtype).min)
        if rows.numel():
            first = self._factored_upscale(factored, rows)
            out[rows] = self._upscaled_products(image_states[rows] if first is None else None, hyper_in[rows], first)
        return out

    def _upscaled_products(self, image_states, hyper_in, first=None) -> torch.Tensor:
        """:meth:`upscale` times the hypernetwork outputs (rows, masks, h*w*16), a few rows at a time at inference
        (:data:`UPSCALE_PIECE_BYTES`; whole under autograd, tracing and compilation: no loop frozen into a graph)."""
        source = image_states if first is None else first
        rows, positions = source.shape[:2]
        per_row = positions * 16 * self.upscale_conv2.out_channels * source.element_size()
        piece = max(1, UPSCALE_PIECE_BYTES // per_row)
        whole = torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling()
        if rows <= piece or whole:
            return _mask_product(hyper_in, self.upscale(image_states, first).flatten(1, 2))
        out = hyper_in.new_empty(rows, hyper_in.shape[1], positions * 16)
        for start in range(0, rows, piece):
            part = slice(start, start + piece)
            upscaled = self.upscale(None if image_states is None else image_states[part],
                                    None if first is None else first[part])  # fmt: skip
            _mask_product(hyper_in[part], upscaled.flatten(1, 2), out=out[part])
        return out

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_embeddings: torch.Tensor,
        dense_embeddings: torch.Tensor,
        multimask_output: bool,
        mask_iou_threshold: float | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings (batch, hidden, h, w); image_pe (hidden, h, w); sparse (batch, P, tokens, hidden);
        dense (batch * P, hidden, h, w). Returns masks (batch, P, M, 4h, 4w) and IoU (batch, P, M): the three
        multimask outputs (``multimask_output``) or the single-mask one. ``mask_iou_threshold``: see
        :meth:`predict_masks`."""
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return self.predict_masks(image_embeddings, image_pe, sparse_embeddings, dense_embeddings, selected,
                                  mask_iou_threshold=mask_iou_threshold, **kwargs)  # fmt: skip


__all__ = [
    "HfVlSamMaskDecoder",
    "HfVlSamPositionalEmbedding",
    "HfVlSamPromptEncoder",
    "HfVlSamTwoWayLayer",
    "HfVlSamTwoWayTransformer",
]
