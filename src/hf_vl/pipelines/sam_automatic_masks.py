"""Automatic ("segment everything") mask generation for SAM models, a fast counterpart of segment-anything's
``SamAutomaticMaskGenerator`` with the same options and the same output records.

Works with any model following the SAM contract of transformers' ``SamModel`` / hf_vl's ``HfVlSamModel``:
``get_image_embeddings(pixel_values)`` and ``forward(image_embeddings=, input_points=, input_labels=,
multimask_output=True)`` returning ``iou_scores`` (B, P, 3) and low-resolution ``pred_masks`` (B, P, 3, h, w).

Where the time goes and what is done about it:
- the image encoder runs once per crop, batched over the crops of *all* images given in one call;
- every grid point of a crop goes through the decoder in batches of ``points_per_batch``, split among
  ``decode_workers`` threads that decode and filter side by side;
- the predicted-IoU filter runs on the scores *before* any mask is upsampled, and only its survivors are upsampled;
  hf_vl's model is also given the threshold (``mask_iou_threshold``), so prompts whose masks all fail it skip the
  decoder's upscaling;
- SAM's two bilinear resizes (to the padded model input, then to the original image) are composed into one
  matrix per axis, applied as two matmuls, with no padded full-size intermediate;
- masks that pass the filters are bit-packed until NMS has picked the few to return; RLEs are vectorised;
- ``dtype=torch.bfloat16`` runs the encoder and decoder in bf16 while every filter stays in float32.
"""

from __future__ import annotations

import copy
import inspect
import numbers
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..processing import sam_mask_ops as ops

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# segment-anything's pixel statistics (ImageNet, 0-255 scale)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class _CropMasks:
    """Masks of one crop that passed the filters: boxes/points in the image frame, masks bit-packed at crop size."""

    crop_box: list[int]
    boxes: torch.Tensor  # (n, 4) int64 XYXY
    iou: torch.Tensor  # (n,) float32
    stability: torch.Tensor  # (n,) float32
    points: torch.Tensor  # (n, 2) float64
    packed: np.ndarray  # (n, ceil(h*w/8)) uint8, row-major (h, w) bits

    def unpack(self, index: np.ndarray) -> torch.Tensor:
        """(len(index), h, w) boolean masks."""
        x0, y0, x1, y1 = self.crop_box
        bits = np.unpackbits(self.packed[index], axis=1, count=(y1 - y0) * (x1 - x0))
        return torch.from_numpy(bits.reshape(-1, y1 - y0, x1 - x0).view(bool))


@dataclass
class _Timings:
    seconds: dict[str, float] = field(default_factory=lambda: dict(encode=0.0, decode=0.0, filter=0.0, output=0.0))

    def add(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - start
        return now


# default decode workers at most: measured on 2 cores only (2 workers of 1 thread); with many cores, more Python
# threads would contend for the GIL, so larger hosts get a few workers of several intra-op threads each
MAX_DEFAULT_WORKERS = 4


def _to_uint8_rgb(image: Any, index: int) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"images[{index}] must be a numpy array, torch tensor or PIL image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"images[{index}] must be an (H, W, 3) RGB array, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"images[{index}] must be uint8 (0-255), got dtype {image.dtype}")
    return image


def _takes_workspace(model: torch.nn.Module) -> bool:
    """Whether ``model``'s image encoder keeps its bias-mask buffer in a caller's dict (``rel_pos_workspace``, hf_vl's
    SAM, installed or as remote code); transformers' SamModel and other SAM-like models do not."""
    encoder = getattr(model, "vision_encoder", None)
    return encoder is not None and "rel_pos_workspace" in inspect.signature(encoder.forward).parameters


class HfVlSamAutomaticMaskGenerator:
    """Segment everything in an image (or a list of images) by prompting SAM with a grid of points.

    Args mirror segment-anything's ``SamAutomaticMaskGenerator`` (see its docs for the meaning of each filter); in
    addition ``image_processor`` (optional: a SAM image processor whose ``__call__`` returns ``pixel_values`` and
    ``reshaped_input_sizes``; by default crops are resized with PIL bilinear, normalised and padded as in
    segment-anything), ``mask_threshold`` (logit cut-off), ``dtype`` (run the model in this dtype, e.g.
    ``torch.bfloat16``; a converted copy is made, the given model is left as is; with bf16 the candidates' upsampling
    runs in bf16 too, :func:`.sam_mask_ops.upsample_logits`), ``image_batch_size`` (crops per
    image-encoder call) and ``decode_workers``.

    ``decode_workers``: threads that decode and filter a crop's points side by side, each with an equal share of
    the intra-op threads (at least one) and ``points_per_batch / decode_workers`` points at a time (default: for a
    model on the CPU the intra-op thread count, at most ``MAX_DEFAULT_WORKERS``; else 1; 1: ``points_per_batch``
    at a time with all threads). The decoder's many small, memory-bound operations keep two cores busier this way
    than split across them (vit_b, 2 cores, 32x32 grid, fp32: decode and filters ~19.5 -> ~17.5 s); results equal
    the sequential ones to rounding. The first batch of a crop runs alone (it fills the model's caches).

    Memory: with hf_vl's SAM the generator keeps the image encoder's attention-mask buffer between calls (the
    largest intermediate of an encoder call, one image's whatever ``image_batch_size``: vit_b, 400 MB in bf16, 800
    MB in fp32), so that each image does not map it afresh (automatic masks, vit_b, bf16: up to ~0.45 s of page
    faults per image on this project's CPU, where free huge pages are scarce). It is freed with the generator.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor: Any = None,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        mask_threshold: float = 0.0,
        dtype: torch.dtype | None = None,
        image_batch_size: int = 4,
        decode_workers: int | None = None,
    ) -> None:
        self._validate(points_per_side, point_grids, points_per_batch, crop_n_layers, output_mode, image_batch_size,
                       decode_workers)  # fmt: skip
        if points_per_side is not None:
            grids = ops.build_all_layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        else:
            grids = [np.asarray(grid, dtype=np.float64).reshape(-1, 2) for grid in point_grids]
        self.point_grids = grids
        model_dtype = next(model.parameters()).dtype
        if dtype is not None and dtype != model_dtype:
            model = copy.deepcopy(model).to(dtype)
        self.model = model.eval()
        self.dtype = dtype if dtype is not None else model_dtype
        # prompt coordinates stay float32 (bf16 would round them to ~4 px); float64 models get float64 ones
        self._point_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.image_processor = image_processor
        self.image_size = int(model.config.vision_config.image_size)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self._iou_gate = pred_iou_thresh > 0.0 and "mask_iou_threshold" in inspect.signature(model.forward).parameters
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.mask_threshold = mask_threshold
        self.image_batch_size = image_batch_size
        self.decode_workers = decode_workers
        self.last_timings: dict[str, float] = {}
        # the image encoder's bias-mask buffer, kept between calls where the encoder takes one (hf_vl's SAM; see
        # the class docstring); the lock keeps two threads' encoder calls from writing it at once
        self._encoder_workspace = {} if _takes_workspace(self.model) else None
        self._encode_lock = threading.Lock()

    @staticmethod
    def _validate(points_per_side, point_grids, points_per_batch, crop_n_layers, output_mode, image_batch_size,
                  decode_workers):  # fmt: skip
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("exactly one of points_per_side and point_grids must be given")
        if point_grids is not None and len(point_grids) != crop_n_layers + 1:
            raise ValueError(f"point_grids needs one grid per crop layer ({crop_n_layers + 1}), got {len(point_grids)}")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_batch < 1 or image_batch_size < 1:
            raise ValueError(
                f"points_per_batch and image_batch_size must be >= 1, got {points_per_batch}, {image_batch_size}"
            )
        if decode_workers is not None and (isinstance(decode_workers, bool) or
                                           not isinstance(decode_workers, numbers.Integral)):  # fmt: skip
            raise TypeError(f"decode_workers must be an int or None, got {type(decode_workers).__name__}")
        if decode_workers is not None and decode_workers < 1:
            raise ValueError(f"decode_workers must be >= 1, got {decode_workers}")

    # ----------------------------------------------------------------------------------------- public entry point

    def generate(self, images: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Mask records for one image (HWC uint8 array, tensor or PIL image), or a list of records per image for a
        list of images. Each record: ``segmentation`` (per ``output_mode``), ``area``, ``bbox`` (XYWH),
        ``predicted_iou``, ``point_coords`` ([[x, y]]), ``stability_score``, ``crop_box`` (XYWH)."""
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        if not batch:
            raise ValueError("images is an empty list")
        arrays = [_to_uint8_rgb(image, i) for i, image in enumerate(batch)]
        timings = _Timings()
        with torch.inference_mode():
            records = self._generate(arrays, timings)
        self.last_timings = dict(timings.seconds)
        return records[0] if single else records

    def _generate(self, arrays: list[np.ndarray], timings: _Timings) -> list[list[dict[str, Any]]]:
        jobs = []  # (image index, crop box, layer index) for every crop of every image
        for index, array in enumerate(arrays):
            boxes, layers = ops.generate_crop_boxes(array.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)
            jobs.extend((index, box, layer) for box, layer in zip(boxes, layers))
        per_image: list[list[_CropMasks]] = [[] for _ in arrays]
        for start in range(0, len(jobs), self.image_batch_size):
            chunk = jobs[start : start + self.image_batch_size]
            clock = time.perf_counter()
            crops = [arrays[i][box[1] : box[3], box[0] : box[2]] for i, box, _ in chunk]
            embeddings, input_sizes = self._encode(crops)
            timings.add("encode", clock)
            for (index, box, layer), embedding, input_size in zip(chunk, embeddings, input_sizes):
                orig_size = arrays[index].shape[:2]
                per_image[index].append(self._process_crop(embedding, box, layer, input_size, orig_size, timings))
        out = []
        for array, crop_masks in zip(arrays, per_image):
            clock = time.perf_counter()
            out.append(self._records(crop_masks, array.shape[:2]))
            timings.add("output", clock)
        return out

    # ----------------------------------------------------------------------------------------- encoder

    def _encode(self, crops: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Image embeddings (len(crops), C, e, e) and the resized (h, w) of each crop in the model frame."""
        if self.image_processor is not None:
            inputs = self.image_processor(images=crops, return_tensors="pt")
            pixels = inputs["pixel_values"]
            sizes = [tuple(int(v) for v in size) for size in inputs["reshaped_input_sizes"]]
        else:
            pixels, sizes = self._preprocess(crops)
        device = next(self.model.parameters()).device
        pixels = pixels.to(device=device, dtype=self.dtype)
        if self._encoder_workspace is None:
            return self.model.get_image_embeddings(pixels), sizes
        with self._encode_lock:
            embeddings = self.model.get_image_embeddings(pixels, rel_pos_workspace=self._encoder_workspace)
        return embeddings, sizes

    def _preprocess(self, crops: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """segment-anything's preprocessing: PIL bilinear resize of the longest side, normalise, zero-pad."""
        size = self.image_size
        pixels = torch.zeros(len(crops), 3, size, size)
        mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
        std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
        sizes = []
        for i, crop in enumerate(crops):
            new_h, new_w = ops.preprocess_shape(crop.shape[0], crop.shape[1], size)
            resized = np.array(Image.fromarray(np.ascontiguousarray(crop)).resize((new_w, new_h), Image.BILINEAR))
            # (h, w, 3) -> (3, h, w)
            pixels[i, :, :new_h, :new_w] = (torch.from_numpy(resized).permute(2, 0, 1).float() - mean) / std
            sizes.append((new_h, new_w))
        return pixels, sizes

    # ----------------------------------------------------------------------------------------- decoder + filters

    def _process_crop(self, embedding, crop_box, layer, input_size, orig_size, timings) -> _CropMasks:
        """Decode every grid point of one crop, filter, NMS within the crop; boxes and points to the image frame."""
        crop_h, crop_w = crop_box[3] - crop_box[1], crop_box[2] - crop_box[0]
        points = torch.from_numpy(self.point_grids[layer] * np.array([crop_w, crop_h]))  # (P, 2) float64
        # crop pixels -> model-input pixels
        scale = torch.tensor([input_size[1] / crop_w, input_size[0] / crop_h], dtype=torch.float64)
        # with several workers, each takes an equal share of points_per_batch: as many points in flight as with one
        size = -(-self.points_per_batch // self._workers())
        batches = [points[start : start + size] for start in range(0, points.shape[0], size)]
        orig_box = [0, 0, orig_size[1], orig_size[0]]
        matrices = []  # the interpolation matrices and their bands, built by the first batch (run alone)

        def batch_masks(batch: torch.Tensor) -> tuple[tuple, float, float]:
            """Decode and filter one batch of points: (filtered parts, decode seconds, filter seconds)."""
            clock = time.perf_counter()
            iou, low = self._decode(embedding, (batch * scale).to(self._point_dtype))
            decoded = time.perf_counter()
            if not matrices:
                matrices.extend(ops.postprocess_matrices(low.shape[-2:], self.image_size, input_size, (crop_h, crop_w)))
                matrices.append(ops.upsample_bands(*matrices))
            part = self._filter_batch(iou, low, batch, matrices, crop_box, orig_box)
            return part, decoded - clock, time.perf_counter() - decoded

        parts = self._map_batches(batch_masks, batches, timings)
        clock = time.perf_counter()
        merged = _CropMasks(
            crop_box,
            *(torch.cat([p[i] for p in parts]) for i in range(4)),
            np.concatenate([p[4] for p in parts]),
        )
        keep = ops.box_nms(merged.boxes, merged.iou, self.box_nms_thresh)
        result = _select(merged, keep)
        result.boxes = ops.uncrop_boxes_xyxy(result.boxes, crop_box)
        result.points = ops.uncrop_points(result.points, crop_box)
        timings.add("filter", clock)
        return result

    def _workers(self) -> int:
        if self.decode_workers is not None:
            return self.decode_workers
        on_cpu = next(self.model.parameters()).device.type == "cpu"
        return min(torch.get_num_threads(), MAX_DEFAULT_WORKERS) if on_cpu else 1

    def _map_batches(self, fn, batches: list, timings: _Timings) -> list:
        """``fn`` (:meth:`_process_crop`'s ``batch_masks``) over the point batches, results in order: the first here,
        the rest on :attr:`decode_workers` threads sharing the intra-op threads. Stage times: each batch's decode and
        filter seconds; for the threads' share, the section's wall time split in proportion to their sums."""
        results = [fn(batches[0])]
        workers = min(self._workers(), len(batches) - 1)
        if workers <= 1:
            results += [fn(batch) for batch in batches[1:]]
            scale = 1.0
        else:
            threads, start = torch.get_num_threads(), time.perf_counter()
            share = max(1, threads // workers)
            with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(share,)) as pool:
                results += list(pool.map(partial(_in_inference_mode, fn), batches[1:]))
            torch.set_num_threads(threads)  # the workers' setting may reach process-wide pools (MKL)
            busy = sum(decode + filtered for _, decode, filtered in results[1:])
            scale = (time.perf_counter() - start) / busy if busy > 0 else 1.0
        for index, (_, decode, filtered) in enumerate(results):
            timings.seconds["decode"] += decode * (1.0 if index == 0 else scale)
            timings.seconds["filter"] += filtered * (1.0 if index == 0 else scale)
        return [part for part, _, _ in results]

    def _decode(self, embedding: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """IoU predictions (P*3,) float32 and low-res logits (P*3, h, w) (model dtype) for P single-point prompts."""
        n = points.shape[0]
        labels = torch.ones(1, n, 1, dtype=torch.int64, device=embedding.device)
        # (P, 2) -> (1, P, 1, 2): one image, P prompts of one point each
        prompts = points.to(embedding.device).view(1, n, 1, 2)
        # prompts whose three IoU predictions all fail pred_iou_thresh: hf_vl's model skips their masks' upscaling
        gate = {"mask_iou_threshold": float(self.pred_iou_thresh)} if self._iou_gate else {}
        out = self.model(image_embeddings=embedding[None], input_points=prompts, input_labels=labels,
                         multimask_output=True, **gate)
        return out.iou_scores[0].flatten().float(), out.pred_masks[0].flatten(0, 1)

    def _filter_batch(self, iou, low, points, matrices, crop_box, orig_box):
        """IoU filter on scores, then upsample only survivors (in chunks) for stability, boxes and the edge filter.
        Returns (boxes, iou, stability, points, packed masks) of the survivors, all in the crop frame."""
        multimask = low.shape[0] // points.shape[0]
        points = points.repeat_interleave(multimask, dim=0)
        keep = iou > self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
        index = keep.nonzero().flatten()
        crop_h, crop_w = crop_box[3] - crop_box[1], crop_box[2] - crop_box[0]
        dtype = torch.bfloat16 if low.dtype == torch.bfloat16 else torch.float32
        # chunks of <= 4M pixels (16 MB float32): small enough for the allocator to reuse without page faults
        chunk = max(1, (4 << 20) // (crop_h * crop_w))
        out = []
        for start in range(0, index.shape[0], chunk):
            sel = index[start : start + chunk]
            # (n, crop_h, crop_w), float32, or bf16 for a bf16 model (compared with exact cut-offs below)
            logits = ops.upsample_logits(low[sel], *matrices, dtype=dtype)
            stability = ops.stability_score(logits, self.mask_threshold, self.stability_score_offset)
            good = stability >= self.stability_score_thresh if self.stability_score_thresh > 0.0 else None
            if good is not None:
                sel, logits, stability = _rows(good, sel, logits, stability)
            masks = ops.above(logits, self.mask_threshold)
            boxes = ops.masks_to_boxes(masks)
            inside = ~ops.is_box_near_crop_edge(boxes, crop_box, orig_box)
            sel, masks, stability, boxes = _rows(inside, sel, masks, stability, boxes)
            packed = np.packbits(masks.reshape(masks.shape[0], crop_h * crop_w).numpy(), axis=1)
            out.append((boxes, iou[sel], stability, points[sel], packed))
        if not out:
            nbytes = (crop_h * crop_w + 7) // 8
            empty = torch.zeros(0)
            return (empty.long().view(0, 4), empty, empty, empty.double().view(0, 2), np.zeros((0, nbytes), np.uint8))
        return tuple(torch.cat([o[i] for o in out]) for i in range(4)) + (np.concatenate([o[4] for o in out]),)

    # ----------------------------------------------------------------------------------------- records

    def _records(self, crop_masks: list[_CropMasks], orig_size: tuple[int, int]) -> list[dict[str, Any]]:
        """Cross-crop NMS, small-region removal and output encoding for one image."""
        orig_h, orig_w = orig_size
        boxes = torch.cat([c.boxes for c in crop_masks])
        crop_of = torch.cat([torch.full((c.boxes.shape[0],), i) for i, c in enumerate(crop_masks)])
        if len(crop_masks) > 1:
            crop_boxes = torch.tensor([c.crop_box for c in crop_masks], dtype=torch.float32)
            crop_area = (crop_boxes[:, 2] - crop_boxes[:, 0]) * (crop_boxes[:, 3] - crop_boxes[:, 1])
            keep = ops.box_nms(boxes, (1 / crop_area)[crop_of], self.crop_nms_thresh)  # prefer smaller crops
        else:
            keep = torch.arange(boxes.shape[0])
        masks, meta = self._gather(crop_masks, crop_of, keep, orig_h, orig_w)
        if self.min_mask_region_area > 0 and masks.shape[0] > 0:
            masks, meta = self._remove_small_regions(masks, meta)
        return self._encode_records(masks, meta)

    def _gather(self, crop_masks, crop_of, keep, orig_h, orig_w):
        """Full-frame boolean masks (n, H, W) of the kept candidates, in ``keep`` order, and their metadata."""
        offsets = np.cumsum([0] + [c.boxes.shape[0] for c in crop_masks])
        masks = torch.zeros(keep.shape[0], orig_h, orig_w, dtype=torch.bool)
        keep_np, crop_np = keep.numpy(), crop_of[keep].numpy()
        for i, crops in enumerate(crop_masks):
            rows = np.nonzero(crop_np == i)[0]
            if rows.size:
                x0, y0, x1, y1 = crops.crop_box
                masks[rows, y0:y1, x0:x1] = crops.unpack(keep_np[rows] - offsets[i])
        fields = ("boxes", "iou", "stability", "points")
        meta = {name: torch.cat([getattr(c, name) for c in crop_masks])[keep] for name in fields}
        crop_boxes = torch.tensor([c.crop_box for c in crop_masks], dtype=torch.int64).view(-1, 4)
        meta["crop_boxes"] = crop_boxes[crop_of[keep]]
        return masks, meta

    def _remove_small_regions(self, masks, meta):
        """Fill small holes, drop small islands, then NMS preferring unchanged masks (segment-anything's order)."""
        step = max(1, (8 << 20) // (masks.shape[1] * masks.shape[2]))  # <= 8M pixels: bounds scipy's label memory
        chunks = [masks[i : i + step] for i in range(0, masks.shape[0], step)]
        new, changed = [], []
        for chunk in chunks:
            filled, holes = ops.remove_small_regions(chunk, self.min_mask_region_area, "holes")
            cleaned, islands = ops.remove_small_regions(filled, self.min_mask_region_area, "islands")
            new.append(torch.from_numpy(cleaned))
            changed.append(torch.from_numpy(holes | islands))
        new_masks, changed = torch.cat(new), torch.cat(changed)
        new_boxes = ops.masks_to_boxes(new_masks)
        keep = ops.box_nms(new_boxes, (~changed).float(), max(self.box_nms_thresh, self.crop_nms_thresh))
        # only changed masks take their new pixels and box
        masks = torch.where(changed[:, None, None], new_masks, masks)[keep]
        meta = {name: value[keep] for name, value in meta.items()}
        meta["boxes"] = torch.where(changed[keep, None], new_boxes[keep], meta["boxes"])
        return masks, meta

    def _encode_records(self, masks: torch.Tensor, meta: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        if self.output_mode == "binary_mask":
            segmentations = list(masks.numpy())
        elif self.output_mode == "uncompressed_rle":
            segmentations = ops.mask_to_rle(masks)
        else:
            segmentations = _coco_rle(masks)
        areas = masks.flatten(1).sum(1).tolist()
        bboxes = ops.box_xyxy_to_xywh(meta["boxes"]).tolist()
        crop_boxes = ops.box_xyxy_to_xywh(meta["crop_boxes"]).tolist()
        ious, stabilities, points = meta["iou"].tolist(), meta["stability"].tolist(), meta["points"].tolist()
        return [
            dict(segmentation=segmentations[i], area=int(areas[i]), bbox=bboxes[i], predicted_iou=ious[i],
                 point_coords=[points[i]], stability_score=stabilities[i], crop_box=crop_boxes[i])
            for i in range(masks.shape[0])
        ]


def _in_inference_mode(fn, *args):
    """``fn(*args)`` under ``torch.inference_mode`` (grad mode is per thread: a worker starts with autograd on)."""
    with torch.inference_mode():
        return fn(*args)


def _rows(keep: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows of each tensor where the boolean ``keep`` is True; the tensors themselves when all are (a boolean
    index copies: 16 MB per chunk of upsampled logits, mostly for nothing with loose thresholds)."""
    if bool(keep.all()):
        return tensors
    return tuple(tensor[keep] for tensor in tensors)


def _select(crop: _CropMasks, keep: torch.Tensor) -> _CropMasks:
    return _CropMasks(crop.crop_box, crop.boxes[keep], crop.iou[keep], crop.stability[keep], crop.points[keep],
                      crop.packed[keep.numpy()])


def _coco_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Compressed COCO RLEs (``counts`` as str, json-ready) via pycocotools."""
    from pycocotools import mask as mask_utils

    if masks.shape[0] == 0:
        return []
    # pycocotools wants (H, W, N) column-major uint8
    encoded = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    return [{"size": list(rle["size"]), "counts": rle["counts"].decode("utf-8")} for rle in encoded]
