"""Mask operations for SAM's automatic mask generation: point grids, crop boxes, stability scores, mask -> box, box
filters, vectorised run-length encoding, small-region removal and a composed (one matmul per axis) upsampling of
low-resolution mask logits.

Conventions follow segment-anything's ``utils/amg.py`` so results can be compared record for record: boxes are
XYXY with *inclusive* right/bottom pixel indices ([0, 0, 0, 0] for an empty mask), RLEs are pycocotools'
uncompressed form (column-major runs, starting with a run of zeros). Everything here is pure torch / numpy /
torchvision / scipy so the SAM image processor can import it as a single-dot sibling.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

# --------------------------------------------------------------------------------------------- grids and crops


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n_per_side**2, 2) x,y points at the centres of an n x n tiling of [0, 1]^2, x fastest."""
    if not isinstance(n_per_side, (int, np.integer)) or n_per_side < 1:
        raise ValueError(f"n_per_side must be a positive int, got {n_per_side!r}")
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs, ys = np.meshgrid(side, side)  # (n, n) each, rows follow y
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer; layer i has int(n_per_side / scale_per_layer**i) points per side."""
    if n_layers < 0 or scale_per_layer < 1:
        raise ValueError(f"need n_layers >= 0 and scale_per_layer >= 1, got {n_layers}, {scale_per_layer}")
    return [build_point_grid(int(n_per_side / scale_per_layer**i)) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes [x0, y0, x1, y1] (the whole image first) and their layer index; layer i has (2**i)**2 crops that
    overlap by ``overlap_ratio * short_side * 2 / crops_per_side`` pixels."""
    im_h, im_w = im_size
    if n_layers < 0:
        raise ValueError(f"n_layers must be >= 0, got {n_layers}")
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    short_side = min(im_h, im_w)
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_w = int(math.ceil((overlap * (per_side - 1) + im_w) / per_side))
        crop_h = int(math.ceil((overlap * (per_side - 1) + im_h) / per_side))
        x0s = [int((crop_w - overlap) * i) for i in range(per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0, y0 in product(x0s, y0s):  # x outer, y inner: the reference order
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer)
    return boxes, layers


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(new_h, new_w) with the longest side resized to ``long_side``, rounded half up like segment-anything."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


# --------------------------------------------------------------------------------------------- scores and boxes


def exact_threshold(threshold: float, dtype: torch.dtype) -> float:
    """A cut-off ``t`` with ``x > t`` equal to ``x > threshold`` for every value ``x`` of a bf16/fp16 tensor: the
    largest ``dtype`` value <= ``threshold``. Comparing such a tensor with a Python number rounds the number to the
    tensor's dtype, to nearest: in bf16 0.952 becomes 0.953125, and ``x > 0.952`` is False for x = 0.953125. Other
    dtypes: ``threshold`` as given (float32 logits compare as segment-anything's do)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return threshold
    value = torch.tensor(threshold, dtype=torch.float64).to(dtype)
    if float(value) > threshold:  # rounded up: the next value down lies below it
        value = torch.nextafter(value, value.new_tensor(-math.inf))
    return float(value)


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``mask_threshold + offset`` and ``- offset`` (the first lies inside the
    second, so IoU = count ratio). logits (..., H, W) -> (...) float32; an empty union gives nan like the reference.
    bf16/fp16 logits compare exactly (:func:`above`)."""
    lead = logits.shape[:-2]
    flat = logits.reshape(-1, *logits.shape[-2:])
    inner = count_true(above(flat, mask_threshold + offset))
    outer = count_true(above(flat, mask_threshold - offset))
    return (inner.float() / outer.float()).reshape(lead)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (inclusive max indices, int64) of boolean masks (..., H, W); [0, 0, 0, 0] when empty."""
    height, width = masks.shape[-2:]
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, dtype=torch.int64, device=masks.device)
    if _numpy_usable(masks) and masks.dtype == torch.bool:  # numpy's any: ~10-40x faster here on (16, 512, 512)
        array = masks.numpy()
        rows, cols = torch.from_numpy(array.any(-1)), torch.from_numpy(array.any(-2))
    else:
        rows, cols = masks.any(-1), masks.any(-2)  # (..., H), (..., W)
    ys = torch.arange(height, device=masks.device)
    xs = torch.arange(width, device=masks.device)
    bottom = torch.where(rows, ys, -1).amax(-1)
    top = torch.where(rows, ys, height).amin(-1)
    right = torch.where(cols, xs, -1).amax(-1)
    left = torch.where(cols, xs, width).amin(-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    return boxes * rows.any(-1, keepdim=True)  # empty masks -> zeros


def box_xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) XYXY -> XYWH (width = x1 - x0, matching the inclusive-index boxes)."""
    return torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: list[int], orig_box: list[int], atol: float = 20.0
) -> torch.Tensor:
    """(N,) True where a crop-frame box lies within ``atol`` of a crop edge that is not also an image edge: such
    masks are probably cut by the crop."""
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float32, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = torch.isclose(boxes, crop[None], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: list[int]) -> torch.Tensor:
    """Crop-frame XYXY boxes (..., 4) -> image frame."""
    x0, y0 = crop_box[:2]
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device, dtype=boxes.dtype)


def uncrop_points(points: torch.Tensor, crop_box: list[int]) -> torch.Tensor:
    """Crop-frame x,y points (..., 2) -> image frame."""
    x0, y0 = crop_box[:2]
    return points + torch.tensor([x0, y0], device=points.device, dtype=points.dtype)


def uncrop_masks(masks: torch.Tensor, crop_box: list[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Crop-sized masks (..., h, w) zero-padded into the (orig_h, orig_w) image frame."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    return F.pad(masks, (x0, orig_w - x1, y0, orig_h - y1), value=0)


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by class-agnostic box NMS, highest score first (torchvision, float32 boxes)."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    groups = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
    return batched_nms(boxes.float(), scores.float(), groups, iou_threshold)


# --------------------------------------------------------------------------------------------- upsampling


def interpolation_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) matrix of 1-D linear interpolation with ``align_corners=False`` (F.interpolate's)."""
    eye = torch.eye(in_size, dtype=torch.float64)[None]  # (1, in, in): channel c is basis vector c
    return F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[0].T.contiguous()


def postprocess_matrices(
    low_res: tuple[int, int], pad_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column matrices (H x h, W x w) equal to SAM's mask post-processing -- bilinear resize to the padded
    model input, crop to the resized image, bilinear resize to the original -- composed into one linear map per
    axis, so a (h, w) logit map becomes R_h @ m @ R_w^T with no (pad_size, pad_size) intermediate."""
    matrices = []
    for axis in range(2):
        to_pad = interpolation_matrix(low_res[axis], pad_size)[: input_size[axis]]
        to_orig = interpolation_matrix(input_size[axis], original_size[axis])
        matrices.append((to_orig @ to_pad).float())
    return matrices[0], matrices[1]


def _bands(matrix: torch.Tensor, block: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, first, end): for each block of ``block`` output rows of an interpolation matrix (out, in), the
    range of input columns its non-zero weights touch (a composed bilinear map is banded: a few per row)."""
    touched = matrix != 0
    bands = []
    for start in range(0, matrix.shape[0], block):
        columns = touched[start : start + block].any(0).nonzero().flatten()
        first, end = (int(columns[0]), int(columns[-1]) + 1) if columns.numel() else (0, 0)
        bands.append((start, min(start + block, matrix.shape[0]), first, end))
    return bands


# output rows per band of upsample_logits: the fastest of 32/64/128 x 64/128/256 for 48 masks 256 -> 512 (2 threads)
UPSAMPLE_ROW_BLOCK, UPSAMPLE_COLUMN_BLOCK = 32, 64


def upsample_bands(rows: torch.Tensor, cols: torch.Tensor) -> tuple[list, list]:
    """The bands :func:`upsample_logits` multiplies for these matrices: computed once, passed to every call on them
    (~0.5 ms each time for 256 -> 512: ~0.1 s over a 32x32 grid's 3072 candidates in 16-mask chunks)."""
    return _bands(rows, UPSAMPLE_ROW_BLOCK), _bands(cols, UPSAMPLE_COLUMN_BLOCK)


def upsample_logits(
    logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, bands: tuple[list, list] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N, h, w) low-res logits -> (N, H, W) in ``dtype`` with the matrices of :func:`postprocess_matrices` (and
    their :func:`upsample_bands`, computed here when not given).

    Both products run band by band: each block of output rows (columns) multiplies only the low-res rows (columns)
    its weights touch, skipping the zeros of the banded matrices and the low-res cells that only feed the cropped-away
    padding (2.3x faster than the dense products for 256 -> 512: 0.64 against 1.5 ms per mask).

    ``dtype``: float32 (the default, whatever the logits' dtype), or ``torch.bfloat16``: the products in bf16 (fp32
    accumulation, the interpolation weights and the column pass rounded to bf16), ~3x faster here (48 masks 256 ->
    512: 0.20 against 0.59 ms per mask) for the automatic mask generator's bf16 mode; threshold the result with
    :func:`above`, which compares bf16 exactly."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype: expected torch.float32 or torch.bfloat16, got {dtype}")
    row_bands, col_bands = upsample_bands(rows, cols) if bands is None else bands
    if row_bands[-1][1] != rows.shape[0] or col_bands[-1][1] != cols.shape[0]:
        raise ValueError(f"bands: cover {row_bands[-1][1]} x {col_bands[-1][1]} output pixels, the matrices "
                         f"{rows.shape[0]} x {cols.shape[0]}: pass upsample_bands(rows, cols) of these matrices")
    low = logits.to(dtype)
    rows, cols = rows.to(low.device, dtype), cols.to(low.device, dtype)
    count, height, width = low.shape[0], rows.shape[0], cols.shape[0]
    wide = low.new_empty(count, low.shape[1], width)  # (N, h, W), every column written below
    for start, stop, first, end in col_bands:
        # (N, h, band of w) @ (band of w, block of W)
        wide[:, :, start:stop] = low[:, :, first:end] @ cols[start:stop, first:end].T
    out = low.new_empty(count, height, width)  # (N, H, W), every row written below
    for start, stop, first, end in row_bands:
        # (block of H, band of h) @ (N, band of h, W)
        out[:, start:stop] = torch.matmul(rows[start:stop, first:end], wide[:, first:end])
    return out


def _numpy_usable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` may go through numpy: on the CPU and not being traced, compiled or exported (numpy would be
    frozen into the graph)."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)() or torch.onnx.is_in_onnx_export()
    traced = torch.jit.is_tracing() or torch.compiler.is_compiling() or exporting
    return not traced and tensor.device.type == "cpu"


def count_true(masks: torch.Tensor) -> torch.Tensor:
    """Number of True pixels per mask, (N, ...) boolean -> (N,) int64; on CPU through numpy's bit counting, several
    times faster than summing booleans in torch."""
    if not _numpy_usable(masks) or not hasattr(np, "bitwise_count"):
        return masks.flatten(1).sum(1)
    packed = np.packbits(masks.reshape(masks.shape[0], -1).numpy(), axis=1)
    return torch.from_numpy(np.bitwise_count(packed).sum(1, dtype=np.int64))


# bf16 bit patterns as int16: +inf; above it the NaNs with the sign bit clear
_BF16_POSITIVE_INF = 0x7F80


def above(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """``values > threshold`` (boolean, same shape), bf16/fp16 values compared exactly (:func:`exact_threshold`).

    On the CPU, float32 and bf16 go through numpy, whose comparison kernels are much faster here than torch's (16 x
    512 x 512 values, 1 thread: float32 0.7 against 1.9 ms; bf16, compared as int16 bit patterns, 0.15 against 3.5
    ms) and round the threshold to float32 as torch does; the result shares numpy's memory."""
    if not _numpy_usable(values) or values.dtype not in (torch.float32, torch.bfloat16):
        return values > exact_threshold(threshold, values.dtype)
    if values.dtype == torch.float32:
        return torch.from_numpy(values.numpy() > np.float32(threshold))
    # bf16: the bit patterns as int16 order the non-negative values as numbers (+0 lowest) and the negative ones
    # in reverse (-0 lowest), with the NaNs past the infinities at each end
    cut = exact_threshold(threshold, torch.bfloat16)
    key = int(torch.tensor(cut, dtype=torch.bfloat16).view(torch.int16))
    bits = values.view(torch.int16).numpy()
    finite_or_inf = bits <= _BF16_POSITIVE_INF  # the positive NaNs excluded (negative ones are excluded below)
    if cut >= 0:  # -0.0 compares as +0.0: no negative value lies above it
        return torch.from_numpy((bits > max(key, 0)) & finite_or_inf)
    # above a negative cut: every non-negative value and the negative ones of smaller magnitude (smaller int16)
    return torch.from_numpy(((bits >= 0) & finite_or_inf) | (bits < key))


def boxes_from_logits(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """``masks_to_boxes(above(logits, threshold))`` for (N, H, W) logits; off the CPU from row/column maxima (no
    boolean pass)."""
    if _numpy_usable(logits) and logits.dtype in (torch.float32, torch.bfloat16):
        return masks_to_boxes(above(logits, threshold))
    height, width = logits.shape[-2:]
    threshold = exact_threshold(threshold, logits.dtype)
    rows = logits.amax(-1) > threshold  # (N, H)
    cols = logits.amax(-2) > threshold  # (N, W)
    ys, xs = torch.arange(height, device=logits.device), torch.arange(width, device=logits.device)
    boxes = torch.stack([torch.where(cols, xs, width).amin(-1), torch.where(rows, ys, height).amin(-1),
                         torch.where(cols, xs, -1).amax(-1), torch.where(rows, ys, -1).amax(-1)], dim=-1)
    return boxes * rows.any(-1, keepdim=True)


# --------------------------------------------------------------------------------------------- run-length encoding


def mask_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Boolean masks (N, H, W) -> pycocotools uncompressed RLEs ``{"size": [H, W], "counts": [...]}``.

    Runs are column-major and start with a (possibly empty) run of zeros. Vectorised over all masks: one
    ``nonzero`` for the run boundaries, then numpy splits; no per-pixel Python."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    n, height, width = masks.shape
    if n == 0:
        return []
    total = height * width
    flat = masks.bool().transpose(1, 2).reshape(n, total)  # column-major (Fortran) order
    # a run starts wherever a pixel differs from the previous one, the pixel before the first counting as 0
    starts = torch.empty_like(flat)
    starts[:, 0] = flat[:, 0]
    starts[:, 1:] = flat[:, 1:] ^ flat[:, :-1]
    mask_idx, pos = (t.cpu().numpy() for t in starts.nonzero(as_tuple=True))
    per_mask = np.bincount(mask_idx, minlength=n)
    # boundaries per mask: 0, its run starts, total; counts are their differences
    sizes = per_mask + 2
    ends = np.cumsum(sizes)
    bounds = np.empty(int(ends[-1]), dtype=np.int64)
    bounds[ends - sizes] = 0
    bounds[ends - 1] = total
    inner = np.ones(bounds.shape[0], dtype=bool)
    inner[ends - sizes] = False
    inner[ends - 1] = False
    bounds[inner] = pos
    diffs = np.diff(bounds)
    diffs = np.delete(diffs, ends[:-1] - 1)  # drop the differences that straddle two masks
    runs = np.split(diffs, np.cumsum(per_mask + 1)[:-1])
    return [{"size": [height, width], "counts": r.tolist()} for r in runs]


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed RLE -> (H, W) boolean numpy mask."""
    height, width = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != height * width:
        raise ValueError(f"RLE counts sum to {counts.sum()}, expected {height * width} for size {rle['size']}")
    parity = np.arange(counts.shape[0]) % 2 == 1  # runs alternate 0, 1, 0, ...
    return np.repeat(parity, counts).reshape(width, height).T


def area_from_rle(rle: dict[str, Any]) -> int:
    """Foreground pixel count of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


# --------------------------------------------------------------------------------------------- small regions

# 8-connectivity within each (H, W) slice and none across the stacked masks, so one label call covers a batch
_STACKED_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_STACKED_8_CONNECTED[1] = True


def remove_small_regions(
    masks: np.ndarray | torch.Tensor, area_thresh: float, mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Fill holes (``mode="holes"``) or drop islands (``mode="islands"``) smaller than ``area_thresh`` pixels in
    boolean masks (N, H, W) or (H, W); 8-connected regions. Returns (new masks, changed flags (N,) or ()).

    As in segment-anything, a mask whose islands are all small keeps its largest one."""
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    masks = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    single = masks.ndim == 2
    masks = masks[None].astype(bool) if single else masks.astype(bool)
    holes = mode == "holes"
    working = ~masks if holes else masks
    labels, n_labels = ndimage.label(working, structure=_STACKED_8_CONNECTED)
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=n_labels + 1)
    # labels are numbered in scan order and never span two masks, so each mask owns a contiguous label range
    last_label = np.maximum.accumulate(labels.reshape(labels.shape[0], -1).max(axis=1))
    owner = np.searchsorted(last_label, np.arange(n_labels + 1), side="left")
    small = sizes < area_thresh
    small[0] = False  # label 0 is the background of `working`
    changed = np.zeros(masks.shape[0], dtype=bool)
    changed[owner[small]] = True
    if holes:
        new = masks | small[labels]
    else:
        keep = ~small
        keep[0] = False
        # masks left with no island keep their largest one
        emptied = changed & ~np.isin(np.arange(masks.shape[0]), owner[keep])
        if emptied.any():
            best = np.full(masks.shape[0], -1, dtype=np.int64)
            # ascending size, ties by descending label: the largest (first on ties, like argmax) is written last
            ids = np.arange(1, n_labels + 1)
            order = ids[np.lexsort((-ids, sizes[1:]))]
            best[owner[order]] = order
            keep[best[emptied]] = True
        new = keep[labels]
    return (new[0], changed[0]) if single else (new, changed)


# --------------------------------------------------------------------------------------------- processor helpers


def filter_masks(
    masks: torch.Tensor,
    iou_scores: torch.Tensor,
    original_size: tuple[int, int],
    cropped_box_image: list[int],
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    mask_threshold: float = 0.0,
    stability_score_offset: float = 1.0,
) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor]:
    """transformers' ``SamImageProcessor.filter_masks`` semantics (full-resolution logits (B, P, H, W) of one crop,
    IoU and strict stability filters, edge filter, boxes in the image frame, RLEs), computed only on survivors."""
    original_height, original_width = original_size
    masks, iou_scores = masks.flatten(0, 1), iou_scores.flatten(0, 1).to(masks.device)
    if masks.shape[0] != iou_scores.shape[0]:
        raise ValueError(f"masks and iou_scores must have the same batch size, got {masks.shape[0]} and "
                         f"{iou_scores.shape[0]}")
    keep = torch.ones(masks.shape[0], dtype=torch.bool, device=masks.device)
    if pred_iou_thresh > 0.0:
        keep &= iou_scores > pred_iou_thresh
    masks, iou_scores = masks[keep], iou_scores[keep]
    if stability_score_thresh > 0.0:
        keep = stability_score(masks, mask_threshold, stability_score_offset) > stability_score_thresh
        masks, iou_scores = masks[keep], iou_scores[keep]
    binary = masks > exact_threshold(mask_threshold, masks.dtype)
    boxes = masks_to_boxes(binary)
    crop = [int(v) for v in cropped_box_image]
    keep = ~is_box_near_crop_edge(boxes, crop, [0, 0, original_width, original_height])
    binary, iou_scores, boxes = binary[keep], iou_scores[keep], boxes[keep]
    binary = uncrop_masks(binary, crop, original_height, original_width)
    return mask_to_rle(binary), iou_scores, uncrop_boxes_xyxy(boxes, crop)


def post_process_for_mask_generation(
    rle_masks: list[dict[str, Any]], iou_scores: torch.Tensor, mask_boxes: torch.Tensor, crops_nms_thresh: float = 0.7
) -> tuple[list[torch.Tensor], torch.Tensor, list[dict[str, Any]], torch.Tensor]:
    """transformers' ``post_process_for_mask_generation``: box NMS, then the kept RLEs decoded to masks."""
    keep = box_nms(mask_boxes, iou_scores, crops_nms_thresh)
    rle_masks = [rle_masks[i] for i in keep.tolist()]
    masks = [torch.from_numpy(rle_to_mask(rle)) for rle in rle_masks]
    return masks, iou_scores[keep], rle_masks, mask_boxes[keep]
