"""SAM model speed: hf_vl's ``HfVlSamModel`` against transformers' ``SamModel`` and segment-anything's ``Sam``, same
process, same weights, same photograph: the image encoder, and the prompt encoder + mask decoder against a cached
image embedding (one point prompt, and 64 one-point prompts decoded together).

Protocol (``/work/shared/docs/benchmarks.md``): segment-anything's ``vit_b`` is built with random weights; its state
dict goes into hf_vl through hf_vl's own converter (``convert_checkpoint("sam", "original", ...)``) and into
transformers' ``SamModel`` through the key mapping of transformers' ``convert_sam_to_hf.py``. Input: scikit-image's
``astronaut`` resized to the model's square input and normalised with SAM's mean/std. ``eval()``,
``torch.inference_mode()``, one thread count; ``warmup`` untimed calls each, then interleaved rounds (hf_vl,
transformers[, segment_anything]); medians and the median per-round ratio ``ratio`` = reference time / hf_vl time
(> 1: hf_vl faster). ``max|d|`` is the largest difference to hf_vl (image embeddings, or mask logits and IoU
together), so a fast wrong answer cannot pass. Every model decodes against the embedding hf_vl computed in that
dtype. segment-anything has no bf16 decoder row: its prompt encoder fails in bf16 (an fp32 Gaussian matrix meets
bf16 coordinates).

Usage: ``python benchmarks/bench_sam.py [--quick] [--rounds N] [--encoder-rounds N] [--cases enc:fp32,dec64:bf16]``
(cases: ``enc``/``dec1``/``dec64`` x ``fp32``/``bf16``; default all six). ``--quick`` is a tiny random model (a smoke
run); ``tests/benchmarks/test_bench_sam.py`` runs :func:`run` tiny.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

# the reference models live next to this script (shared with bench_sam_amg.py); importable however it is loaded
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_timing import host_line, interleaved_times  # noqa: E402
from sam_references import (  # noqa: E402
    SAM_MEAN, SAM_STD, TINY, VIT_B, build_hf_vl_sam, build_segment_anything, build_transformers_sam,
)  # fmt: skip

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KINDS = ("enc", "dec1", "dec64")
CASES = tuple((kind, dtype) for kind in KINDS for dtype in DTYPES)


# ----------------------------------------------------------------------------------------------- models
def build_models(config: dict, seed: int = 0) -> dict[str, nn.Module]:
    """hf_vl, transformers and segment_anything models with the same (random) weights, fp32, eval mode."""
    sam = build_segment_anything(config, seed, random_rel_pos=True)
    return {"hf_vl": build_hf_vl_sam(sam, config), "transformers": build_transformers_sam(sam, config),
            "segment_anything": sam}


# ----------------------------------------------------------------------------------------------- inputs
def photo_pixels(image_size: int) -> torch.Tensor:
    """scikit-image's astronaut (512x512) resized to ``image_size`` square, SAM-normalised, (1, 3, size, size)."""
    from skimage import data

    resized = Image.fromarray(data.astronaut()).resize((image_size, image_size), Image.BILINEAR)
    # (h, w, 3) -> (1, 3, h, w)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1)[None]
    return (pixels - torch.tensor(SAM_MEAN)[:, None, None]) / torch.tensor(SAM_STD)[:, None, None]


def grid_points(prompts: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` one-point foreground prompts on a regular grid: points (1, prompts, 1, 2), labels (1, prompts, 1)."""
    side = int(np.ceil(np.sqrt(prompts)))
    offsets = (torch.arange(side, dtype=torch.float32) + 0.5) * image_size / side
    ys, xs = torch.meshgrid(offsets, offsets, indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], dim=-1)[:prompts]
    return points[None, :, None], torch.ones(1, prompts, 1, dtype=torch.long)


# ----------------------------------------------------------------------------------------------- calls
def encoder_calls(models: dict, pixels: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    calls = {"hf_vl": partial(models["hf_vl"].get_image_embeddings, pixels),
             "transformers": partial(models["transformers"].get_image_embeddings, pixels)}
    if "segment_anything" in models:
        calls["segment_anything"] = partial(models["segment_anything"].image_encoder, pixels)
    return calls


def _decode_hf_vl(model, embedding, points, labels):
    out = model(image_embeddings=embedding, input_points=points, input_labels=labels, multimask_output=True)
    return out.pred_masks, out.iou_scores


def _decode_transformers(model, embedding, points, labels):
    out = model(image_embeddings=embedding, input_points=points, input_labels=labels, multimask_output=True)
    return out.pred_masks, out.iou_scores


def _decode_segment_anything(sam, embedding, points, labels):
    # (1, P, 1, 2) -> P prompts of one point each, batched as segment-anything's predictor does
    sparse, dense = sam.prompt_encoder(points=(points[0], labels[0]), boxes=None, masks=None)
    masks, iou = sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True)
    return masks[None], iou[None]


def decoder_calls(models: dict, embedding: torch.Tensor, prompts: int) -> dict[str, Callable[[], tuple]]:
    points, labels = grid_points(prompts, models["hf_vl"].config.vision_config.image_size)
    points = points.to(embedding.dtype)
    calls = {"hf_vl": partial(_decode_hf_vl, models["hf_vl"], embedding, points, labels),
             "transformers": partial(_decode_transformers, models["transformers"], embedding, points, labels)}
    if "segment_anything" in models:
        calls["segment_anything"] = partial(_decode_segment_anything, models["segment_anything"], embedding,
                                            points, labels)
    return calls


# ----------------------------------------------------------------------------------------------- timing


def _max_diff(output, reference) -> float:
    outputs = output if isinstance(output, tuple) else (output,)
    references = reference if isinstance(reference, tuple) else (reference,)
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(outputs, references))


def _typed_models(models: dict, dtype: torch.dtype, kind: str) -> dict[str, nn.Module]:
    """The fp32 models, or bf16 copies (made outside inference_mode); no segment-anything bf16 decoder."""
    if dtype == torch.float32:
        return dict(models)
    return {name: copy.deepcopy(model).to(dtype) for name, model in models.items()
            if not (name == "segment_anything" and kind != "enc")}


def run_case(models: dict, kind: str, dtype_name: str, pixels: torch.Tensor, rounds: int, warmup: int) -> dict:
    """One row: median times, median per-round ratios (reference / hf_vl), largest differences to hf_vl."""
    dtype = DTYPES[dtype_name]
    typed = _typed_models(models, dtype, kind)
    with torch.inference_mode():
        if kind == "enc":
            calls = encoder_calls(typed, pixels.to(dtype))
        else:
            embedding = typed["hf_vl"].get_image_embeddings(pixels.to(dtype))
            calls = decoder_calls(typed, embedding, 1 if kind == "dec1" else 64)
        outputs = {name: call() for name, call in calls.items()}
        times = interleaved_times(calls, rounds, warmup)
    row = {"case": f"{kind} {dtype_name}", "threads": torch.get_num_threads()}
    for name, measured in times.items():
        row[f"{name}_s"] = statistics.median(measured)
        if name != "hf_vl":
            row[f"ratio_{name}"] = statistics.median(o / m for o, m in zip(measured, times["hf_vl"]))
            row[f"max_diff_{name}"] = _max_diff(outputs[name], outputs["hf_vl"])
    return row


def run(config: dict | None = None, cases: Sequence[tuple[str, str]] = CASES, rounds: int = 7,
        encoder_rounds: int = 3, warmup: int = 2, models: dict | None = None) -> list[dict]:
    """Benchmark every (kind, dtype) case; ``config`` as :data:`VIT_B` (the default)."""
    if rounds < 1 or encoder_rounds < 1 or warmup < 0:
        raise ValueError(f"rounds and encoder_rounds must be >= 1 and warmup >= 0, got {rounds}, {encoder_rounds}, "
                         f"{warmup}")
    for kind, dtype_name in cases:
        if kind not in KINDS or dtype_name not in DTYPES:
            raise ValueError(f"bad case ({kind!r}, {dtype_name!r}); kind one of {KINDS}, dtype one of "
                             f"{sorted(DTYPES)}")
    config = config if config is not None else VIT_B
    models = models if models is not None else build_models(config)
    pixels = photo_pixels(config["image_size"])
    return [run_case(models, kind, dtype_name, pixels, encoder_rounds if kind == "enc" else rounds, warmup)
            for kind, dtype_name in cases]


def format_rows(rows: list[dict]) -> str:
    """A plain-text table, one line per case; '-' where segment-anything has no row."""
    lines = [f"{'case':<11} {'hf_vl':>9} {'transformers':>12} {'ratio':>6} {'max|d|':>8} "
             f"{'segment_any':>11} {'ratio':>6} {'max|d|':>8}"]
    for row in rows:
        line = (f"{row['case']:<11} {row['hf_vl_s']:>8.4f}s {row['transformers_s']:>11.4f}s "
                f"{row['ratio_transformers']:>5.2f}x {row['max_diff_transformers']:>8.1e}")
        if "segment_anything_s" in row:
            line += (f" {row['segment_anything_s']:>10.4f}s {row['ratio_segment_anything']:>5.2f}x "
                     f"{row['max_diff_segment_anything']:>8.1e}")
        else:
            line += f" {'-':>11} {'-':>6} {'-':>8}"
        lines.append(line)
    return "\n".join(lines)


def _parse_cases(text: str) -> tuple[tuple[str, str], ...]:
    try:
        return tuple((kind, dtype) for kind, dtype in (item.split(":") for item in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected kind:dtype[,kind:dtype...], got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, 2 rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per decoder case")
    parser.add_argument("--encoder-rounds", type=int, default=3, help="interleaved rounds per encoder case")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cases", type=_parse_cases, default=CASES, help="e.g. enc:bf16,dec64:fp32 (default: all)")
    args = parser.parse_args(argv)
    config = TINY if args.quick else VIT_B
    rounds, encoder_rounds = (2, 2) if args.quick else (args.rounds, args.encoder_rounds)
    print(f"SAM {'tiny' if args.quick else 'ViT-B'} {config['image_size']}x{config['image_size']}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, rounds: encoder {encoder_rounds}, decoder {rounds}")
    print(host_line())
    rows = run(config, cases=args.cases, rounds=rounds, encoder_rounds=encoder_rounds, warmup=args.warmup)
    print(format_rows(rows))


if __name__ == "__main__":
    main()
