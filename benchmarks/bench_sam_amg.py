"""SAM automatic mask generation speed: hf_vl's ``HfVlSamAutomaticMaskGenerator`` against segment-anything's
``SamAutomaticMaskGenerator`` and transformers' ``pipeline("mask-generation")``, same process, same weights, same
photograph.

Protocol (``/work/shared/docs/benchmarks.md``): segment-anything's model is built with random weights and its state
dict is converted into the model hf_vl runs (hf_vl's ``HfVlSamModel`` through ``hf_vl.conversion.convert_hf_vl_sam``
when that exists, else transformers' ``SamModel`` through the key mapping of transformers' ``convert_sam_to_hf.py``)
and into transformers' ``SamModel`` for the pipeline column. Same image (scikit-image ``astronaut``), same grid, same
thresholds; ``eval()``, ``torch.inference_mode()``, one thread count. A full generation takes minutes per call for
the references, so by default each generator runs once (``--rounds`` interleaved rounds), hf_vl's without warm-up
unless ``--warmup`` (the references cache nothing between calls either). ``ratio`` = reference time / hf_vl time.
The random weights are edited by :func:`vary_masks` (the same edit for all three) so grid prompts give varied masks.
Match statistics compare every record set against segment-anything's: matched = the best mask IoU >= 0.99 and the
predicted IoU and stability score within 1e-3 (bf16 and the pipeline, which filters differently: IoU >= 0.9, scores
within 0.05). On these random weights every candidate's box spans the image, so box NMS leaves one record; an
untimed pass on a 16x16 grid with box NMS off then compares every candidate of hf_vl fp32 with segment-anything's
record from the same grid point (``--parity-grid``).

Usage: ``python benchmarks/bench_sam_amg.py [--quick] [--rounds N] [--no-pipeline] [--no-bf16]``; ``--quick`` is a
tiny random model and an 8x8 grid (a smoke run). ``tests/benchmarks/test_bench_sam_amg.py`` runs :func:`run` tiny.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

# the reference models live next to this script (shared with bench_sam.py); importable however it is loaded
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_timing import host_line  # noqa: E402
from sam_references import (  # noqa: E402
    TINY,
    VIT_B,
    build_hf_vl_sam,
    build_segment_anything,
    build_transformers_sam,
    segment_anything_to_transformers_state,
)

# thresholds 0 as in benchmarks.md's reference figure: every one of the 3 x grid candidates reaches NMS
BENCH_AMG = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.7)


# ----------------------------------------------------------------------------------------------- models
def build_models(config: dict, seed: int = 0, with_hf_vl_model: bool = True) -> dict[str, nn.Module]:
    """``segment_anything`` (random weights), ``transformers`` (same weights) and ``amg_model``: the model hf_vl's
    generator runs (HfVlSamModel with ``with_hf_vl_model``, else the transformers model)."""
    return build_models_from(build_segment_anything(config, seed), config, with_hf_vl_model)


def build_models_from(sam: nn.Module, config: dict, with_hf_vl_model: bool = True) -> dict[str, nn.Module]:
    """:func:`build_models` for a given segment-anything model (e.g. after :func:`vary_masks`)."""
    transformers_model = build_transformers_sam(sam, config)
    amg_model = build_hf_vl_sam(sam, config) if with_hf_vl_model else transformers_model
    return dict(segment_anything=sam, transformers=transformers_model, amg_model=amg_model)


def vary_masks(sam: nn.Module, logit_scale: float = 300.0) -> nn.Module:
    """Edit random weights in place so grid prompts give varied, coherent masks (random init gives near-zero,
    fragmented logits): nearly tie each 2x2 kernel of the two upscaling transposed convolutions (blob-shaped masks),
    shrink the second one so its GELU stays near-linear (no all-positive features), and scale the hypernetwork
    outputs."""
    decoder = sam.mask_decoder
    with torch.no_grad():
        for index in (0, 3):  # output_upscaling: ConvTranspose2d, LayerNorm2d, GELU, ConvTranspose2d, GELU
            weight = decoder.output_upscaling[index].weight
            weight.copy_(weight[:, :, :1, :1] + 0.3 * weight)  # mostly tied, no exactly flat logit plateaus
        decoder.output_upscaling[3].weight.mul_(0.1)
        decoder.output_upscaling[3].bias.zero_()
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(logit_scale)
    return sam


class SegmentAnythingAsSamModel(nn.Module):
    """segment-anything's ``Sam`` behind the transformers ``SamModel`` calls the generator makes, so hf_vl's
    generator can run on the reference's own model: comparisons then isolate the generator (no model numerics)."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam
        vision = type("VisionConfig", (), {"image_size": sam.image_encoder.img_size})
        self.config = type("Config", (), {"vision_config": vision})

    def get_image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.sam.image_encoder(pixel_values)

    def forward(self, image_embeddings, input_points, input_labels, multimask_output: bool = True):
        # one image: (1, P, N, 2) -> (P, N, 2)
        sparse, dense = self.sam.prompt_encoder(points=(input_points[0], input_labels[0]), boxes=None, masks=None)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=image_embeddings, image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask_output,
        )
        return type("SamOutput", (), {"iou_scores": iou[None], "pred_masks": low_res[None]})


# ----------------------------------------------------------------------------------------------- inputs
def photo(name: str = "astronaut", scale: int = 1) -> np.ndarray:
    """A scikit-image photograph as (H, W, 3) uint8, every ``scale``-th pixel."""
    from skimage import data

    return np.ascontiguousarray(getattr(data, name)()[::scale, ::scale])


# ----------------------------------------------------------------------------------------------- generators
def _reference_call(sam: nn.Module, image: np.ndarray, grid: int, amg: dict) -> Callable[[], list]:
    from segment_anything import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(sam, points_per_side=grid, points_per_batch=64, **amg)
    return partial(generator.generate, image)


def _pipeline_call(model: nn.Module, image: np.ndarray, grid: int, amg: dict) -> Callable[[], list]:
    """transformers' mask-generation pipeline; its masks returned as boolean arrays."""
    from PIL import Image
    from transformers import SamImageProcessor, pipeline

    processor = SamImageProcessor(size={"longest_edge": model.config.vision_config.image_size},
                                  pad_size={"height": model.config.vision_config.image_size,
                                            "width": model.config.vision_config.image_size})
    generator = pipeline("mask-generation", model=model, image_processor=processor, device="cpu")
    kwargs = dict(points_per_batch=64, points_per_crop=grid, pred_iou_thresh=amg["pred_iou_thresh"],
                  stability_score_thresh=amg["stability_score_thresh"], crops_nms_thresh=amg["box_nms_thresh"],
                  stability_score_offset=amg.get("stability_score_offset", 1.0))
    pil = Image.fromarray(image)

    def call() -> list:
        out = generator(pil, **kwargs)
        return [{"segmentation": np.asarray(mask, dtype=bool), "predicted_iou": float(score)}
                for mask, score in zip(out["masks"], out["scores"])]

    return call


def _hf_vl_call(model: nn.Module, image: np.ndarray, grid: int, amg: dict, dtype=None):
    from hf_vl.pipelines.sam_automatic_masks import HfVlSamAutomaticMaskGenerator

    generator = HfVlSamAutomaticMaskGenerator(model, points_per_side=grid, points_per_batch=64, dtype=dtype, **amg)
    return generator, partial(generator.generate, image)


# ----------------------------------------------------------------------------------------------- agreement
def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _best_partner(record: dict, candidates: list[dict]) -> tuple[dict | None, float]:
    """The candidate whose mask overlaps ``record``'s most, and that IoU (None, -1.0 without candidates)."""
    best, best_iou = None, -1.0
    for candidate in candidates:
        iou = _mask_iou(record["segmentation"], candidate["segmentation"])
        if iou > best_iou:
            best, best_iou = candidate, iou
    return best, best_iou


def match_stats(reference: list[dict], other: list[dict], mask_iou: float = 0.99, tol: float = 1e-3) -> dict:
    """Counts, and the share of reference records with a partner in ``other`` (best mask IoU >= ``mask_iou``,
    predicted IoU within ``tol`` and, when both have it, stability within ``tol``), and the worst best-IoU."""
    matched, worst = 0, 1.0
    for record in reference:
        best, best_iou = _best_partner(record, other)
        worst = min(worst, best_iou)
        if best is None or best_iou < mask_iou or abs(best["predicted_iou"] - record["predicted_iou"]) > tol:
            continue
        if "stability_score" in best and abs(best["stability_score"] - record["stability_score"]) > tol:
            continue
        matched += 1
    return dict(n_ref=len(reference), n=len(other), matched=matched / max(len(reference), 1), worst_iou=worst)


def candidate_parity(reference: list[dict], other: list[dict]) -> dict:
    """Record-by-record agreement where every candidate survives (box NMS off): each reference record against the
    records of ``other`` from the same grid point (a point yields up to three masks), best mask IoU among them; the
    worst IoU and the largest predicted-IoU and stability differences of those partners."""
    by_point: dict = {}
    for record in other:
        by_point.setdefault(tuple(np.round(record["point_coords"][0], 3)), []).append(record)
    worst, iou_diff, stability_diff, matched = 1.0, 0.0, 0.0, 0
    for record in reference:
        best, best_iou = _best_partner(record, by_point.get(tuple(np.round(record["point_coords"][0], 3)), []))
        if best is None:
            worst = 0.0
            continue
        d_iou = abs(best["predicted_iou"] - record["predicted_iou"])
        d_stability = abs(best["stability_score"] - record["stability_score"])
        worst, iou_diff, stability_diff = min(worst, best_iou), max(iou_diff, d_iou), max(stability_diff, d_stability)
        matched += best_iou >= 0.99 and d_iou <= 1e-3 and d_stability <= 1e-3
    return dict(n_ref=len(reference), n=len(other), matched=matched / max(len(reference), 1), worst_iou=worst,
                max_iou_diff=iou_diff, max_stability_diff=stability_diff)


# ----------------------------------------------------------------------------------------------- run
def run(config: dict | None = None, grid: int = 32, image: np.ndarray | None = None, rounds: int = 1,
        amg: dict | None = None, with_pipeline: bool = True, with_bf16: bool = True, seed: int = 0,
        warmup: int = 1, parity_grid: int | None = 16) -> dict:
    """Time every generator ``rounds`` times, interleaved, after ``warmup`` untimed hf_vl calls; returns
    ``{"rows": [...], "stages": {...}, ...}`` with per-generator median seconds, ratio (reference / hf_vl fp32, or
    / hf_vl bf16 for the bf16 row) and agreement with segment-anything's records.

    ``parity_grid``: afterwards, untimed, segment-anything's and hf_vl's fp32 generators on that grid with box NMS
    off, every candidate compared (:func:`candidate_parity`; ``result["parity"]``): on these random weights the
    candidates' boxes all span the image, so with NMS on only one record is left to compare. None: skipped."""
    if rounds < 1 or grid < 1:
        raise ValueError(f"rounds and grid must be >= 1, got rounds={rounds}, grid={grid}")
    config = config if config is not None else VIT_B
    amg = dict(BENCH_AMG if amg is None else amg)
    image = photo() if image is None else image
    sam = vary_masks(build_segment_anything(config, seed))
    models = build_models_from(sam, config)
    calls, generators = {"segment_anything": _reference_call(sam, image, grid, amg)}, {}
    if with_pipeline:
        calls["transformers_pipeline"] = _pipeline_call(models["transformers"], image, grid, amg)
    generators["hf_vl_fp32"], calls["hf_vl_fp32"] = _hf_vl_call(models["amg_model"], image, grid, amg)
    if with_bf16:
        generators["hf_vl_bf16"], calls["hf_vl_bf16"] = _hf_vl_call(models["amg_model"], image, grid, amg,
                                                                    torch.bfloat16)
    with torch.inference_mode():
        for _ in range(warmup):
            for name in generators:
                calls[name]()  # the references cache nothing between calls: only hf_vl's are warmed up
        times = {name: [] for name in calls}
        outputs = {}
        for _ in range(rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                outputs[name] = call()
                times[name].append(time.perf_counter() - start)
        result = _summarise(times, outputs, generators, models, grid, image)
        if parity_grid:
            every = {**amg, "box_nms_thresh": 1.0}  # IoU > 1 never happens: box NMS keeps every candidate
            reference = _reference_call(sam, image, parity_grid, every)()
            ours = _hf_vl_call(models["amg_model"], image, parity_grid, every)[1]()
            result["parity"] = dict(grid=parity_grid, **candidate_parity(reference, ours))
    return result


def _summarise(times, outputs, generators, models, grid, image) -> dict:
    seconds = {name: statistics.median(values) for name, values in times.items()}
    rows = []
    for name, value in seconds.items():
        row = dict(name=name, seconds=value)
        for ours in ("hf_vl_fp32", "hf_vl_bf16"):
            if ours in seconds and not name.startswith("hf_vl"):
                row[f"x_vs_{ours}"] = value / seconds[ours]
        loose = name == "hf_vl_bf16" or name == "transformers_pipeline"
        row.update(match_stats(outputs["segment_anything"], outputs[name], mask_iou=0.9 if loose else 0.99,
                               tol=0.05 if loose else 1e-3))
        rows.append(row)
    return dict(rows=rows, stages={name: gen.last_timings for name, gen in generators.items()},
                model=type(models["amg_model"]).__name__, grid=grid, image_shape=image.shape,
                threads=torch.get_num_threads())


def format_result(result: dict) -> str:
    lines = [f"{'generator':<22} {'seconds':>9} {'ref/fp32':>9} {'ref/bf16':>9} {'masks':>6} {'ref':>5} "
             f"{'matched':>8} {'worst IoU':>9}"]
    for row in result["rows"]:
        fp32, bf16 = row.get("x_vs_hf_vl_fp32"), row.get("x_vs_hf_vl_bf16")
        lines.append(
            f"{row['name']:<22} {row['seconds']:>9.2f} {'' if fp32 is None else f'{fp32:.2f}x':>9} "
            f"{'' if bf16 is None else f'{bf16:.2f}x':>9} {row['n']:>6} {row['n_ref']:>5} {row['matched']:>8.1%} "
            f"{row['worst_iou']:>9.4f}"
        )
    for name, stages in result["stages"].items():
        lines.append(f"{name} stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()))
    if "parity" in result:
        par = result["parity"]
        lines.append(
            f"every candidate, {par['grid']}x{par['grid']} grid, box NMS off: hf_vl_fp32 {par['n']} records, "
            f"segment_anything {par['n_ref']}, matched {par['matched']:.1%} (same point), worst IoU "
            f"{par['worst_iou']:.4f}, max |d predicted_iou| {par['max_iou_diff']:.1e}, max |d stability| "
            f"{par['max_stability_diff']:.1e}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, 8x8 grid, quarter-size photo")
    parser.add_argument("--grid", type=int, default=None, help="points per side (default 32, quick 8)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per generator (each takes minutes)")
    parser.add_argument("--no-pipeline", action="store_true", help="skip transformers' mask-generation pipeline")
    parser.add_argument("--no-bf16", action="store_true", help="skip the hf_vl bf16 row")
    parser.add_argument("--warmup", type=int, default=None, help="untimed hf_vl calls first (default: quick 1, else 0)")
    parser.add_argument("--parity-grid", type=int, default=None,
                        help="grid of the untimed every-candidate comparison (default 16, quick: the grid; 0: skip)")
    args = parser.parse_args(argv)
    config, image = (TINY, photo(scale=3)) if args.quick else (VIT_B, photo())
    grid = args.grid or (8 if args.quick else 32)
    print(f"SAM automatic masks, {'tiny' if args.quick else 'vit_b'} random weights, {grid}x{grid} grid, "
          f"image {image.shape}, thresholds {BENCH_AMG}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(host_line())
    result = run(config, grid=grid, image=image, rounds=args.rounds, with_pipeline=not args.no_pipeline,
                 with_bf16=not args.no_bf16, warmup=args.warmup if args.warmup is not None else int(args.quick),
                 parity_grid=args.parity_grid if args.parity_grid is not None else (grid if args.quick else 16))
    print(f"hf_vl model: {result['model']}")
    print(format_result(result))


if __name__ == "__main__":
    main()
