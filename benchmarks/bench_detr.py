"""DETR-R50 speed: hf_vl's ``HfVlDetrForObjectDetection`` against transformers' ``DetrForObjectDetection``, same
process, same weights, same photographs.

Protocol (``/work/shared/docs/benchmarks.md``): transformers' DETR-R50 (its own ResNet, ``use_timm_backbone=False``)
gets random weights, including random frozen-batch-norm statistics, and hf_vl's ``transformers`` converter copies
them into hf_vl's layout. Inputs are scikit-image photographs (coffee, astronaut, chelsea) resized to 800x1066 (the
evaluation resolution of a 3:4 photo) and normalised with ImageNet statistics; ``eval()``,
``torch.inference_mode()``, one ``torch.get_num_threads()`` for both; 2+ warm-up calls each, then interleaved
rounds; medians and the median of per-round ratios (transformers time / hf_vl time: > 1 means hf_vl is faster).
``max|d|`` is the largest difference of logits and boxes between the two, so a fast wrong answer cannot pass; bf16
rows also give each model's largest logit error against the fp32 transformers logits.

Where the speed comes from (``hf_vl_resnet``): frozen batch norm folded into the convolutions once (cached), bias,
ReLU and residual addition fused into oneDNN convolutions, the trunk run channels-last; in the transformer, SDPA
with no mask when nothing is padded.

Usage: ``python benchmarks/bench_detr.py [--quick] [--pairs N] [--cases fp32:1,bf16:1] [--size 800x1066]``.
``tests/benchmarks/test_bench_detr.py`` runs :func:`run` on a tiny config.
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
from transformers import DetrConfig, DetrForObjectDetection

from hf_vl.conversion.convert_hf_vl_detr import TRANSFORMERS_RULES, backbone_depth_of
from hf_vl.conversion.rules import convert_state_dict
from hf_vl.modeling.configuration_hf_vl_detr import HfVlDetrConfig
from hf_vl.modeling.modeling_hf_vl_detr import HfVlDetrForObjectDetection

# shared benchmark helpers live next to this script; importable however it is loaded
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_timing import host_line, interleaved_times, parse_dtype_batch_cases  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = (("fp32", 1), ("bf16", 1))
# transformers' DetrConfig defaults are DETR-R50; its own ResNet-50 backbone (no timm, no download)
DETR_R50 = dict(use_timm_backbone=False, use_pretrained_backbone=False, num_labels=91)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------- models
@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights of realistic scale, frozen-BN statistics included (defaults would make BN the identity)."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        elif tensor.ndim == 4:
            tensor.copy_(noise * (2.0 / tensor[0].numel()) ** 0.5)
        elif tensor.ndim == 2:
            tensor.copy_(noise * tensor.shape[-1] ** -0.5)
        elif name.endswith("weight") and "predictor" not in name and "classifier" not in name:
            tensor.copy_(1.0 + 0.1 * noise)
        else:
            tensor.copy_(0.1 * noise)
    return model.eval()


def hf_vl_config(reference: DetrConfig) -> HfVlDetrConfig:
    """The HfVlDetrConfig of a transformers DetrConfig (sizes only; dropout is off in eval anyway)."""
    return HfVlDetrConfig(
        backbone_depth=backbone_depth_of(reference.to_dict()),
        hidden_size=reference.d_model,
        num_attention_heads=reference.encoder_attention_heads,
        encoder_layers=reference.encoder_layers,
        decoder_layers=reference.decoder_layers,
        intermediate_size=reference.encoder_ffn_dim,
        num_queries=reference.num_queries,
        num_labels=reference.num_labels,
        auxiliary_loss=False,
    )


def build_models(config: dict, seed: int = 0) -> dict[str, nn.Module]:
    """transformers DETR with random weights and an hf_vl DETR with the same weights (converted), fp32 eval."""
    torch.manual_seed(seed)
    reference = randomize_(DetrForObjectDetection(DetrConfig(**config)), seed)
    hf_vl = HfVlDetrForObjectDetection(hf_vl_config(reference.config)).eval()
    converted = convert_state_dict(reference.state_dict(), TRANSFORMERS_RULES, expected_keys=hf_vl.state_dict())
    hf_vl.load_state_dict(converted, strict=True)
    return {"transformers": reference, "hf_vl": hf_vl}


# ----------------------------------------------------------------------------------------------- inputs
def photo_batch(batch: int, height: int, width: int) -> torch.Tensor:
    """scikit-image photographs (coffee, astronaut, chelsea, cycled) resized bilinearly to (height, width) and
    normalised as DetrImageProcessor does."""
    from skimage import data

    photos = [data.coffee(), data.astronaut(), data.chelsea()]
    images = []
    for index in range(batch):
        resized = Image.fromarray(photos[index % 3]).resize((width, height), Image.BILINEAR)
        images.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0))
    pixels = torch.stack(images).permute(0, 3, 1, 2).contiguous()  # (batch, h, w, 3) -> (batch, 3, h, w)
    return (pixels - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


# ----------------------------------------------------------------------------------------------- timing
def _predict(model: nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """(batch, queries, classes + 1 + 4): logits and boxes side by side, one tensor to compare."""
    out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    return torch.cat([out.logits.float(), out.pred_boxes.float()], dim=-1)


def _cast(models: dict[str, nn.Module], dtype: torch.dtype) -> dict[str, nn.Module]:
    """The fp32 models themselves, or copies in ``dtype`` (made outside inference_mode)."""
    if dtype == torch.float32:
        return dict(models)
    return {name: copy.deepcopy(model).to(dtype) for name, model in models.items()}


def run_case(models, dtype_name: str, batch: int, pixels: torch.Tensor, pairs: int, warmup: int) -> dict:
    """One row: median times, the median per-round ratio, and the largest output differences."""
    dtype = DTYPES[dtype_name]
    mask = torch.ones(batch, *pixels.shape[-2:], dtype=torch.long)
    fp32_inputs = pixels[:batch]
    with torch.inference_mode():
        fp32_ref = _predict(models["transformers"], fp32_inputs, mask) if dtype != torch.float32 else None
    typed = _cast(models, dtype)
    inputs = fp32_inputs.to(dtype)
    with torch.inference_mode():
        outputs = {name: _predict(model, inputs, mask) for name, model in typed.items()}
        calls = {name: partial(_predict, model, inputs, mask) for name, model in typed.items()}
        times = interleaved_times(calls, pairs, warmup)
    ratios = [other / mine for other, mine in zip(times["transformers"], times["hf_vl"])]
    row = {
        "case": f"{dtype_name} b{batch}",
        "threads": torch.get_num_threads(),
        "transformers_s": statistics.median(times["transformers"]),
        "hf_vl_s": statistics.median(times["hf_vl"]),
        "ratio": statistics.median(ratios),
        "max_diff": (outputs["transformers"] - outputs["hf_vl"]).abs().max().item(),
    }
    if fp32_ref is not None:
        row["err_vs_fp32"] = {name: (out - fp32_ref).abs().max().item() for name, out in outputs.items()}
    return row


def run(
    config: dict | None = None,
    cases: Sequence[tuple[str, int]] = CASES,
    size: tuple[int, int] = (800, 1066),
    pairs: int = 7,
    warmup: int = 2,
) -> list[dict]:
    """Benchmark every (dtype, batch) case; ``config`` is ``DetrConfig`` kwargs (default DETR-R50)."""
    if pairs < 1 or warmup < 0:
        raise ValueError(f"pairs must be >= 1 and warmup >= 0, got pairs={pairs}, warmup={warmup}")
    for dtype_name, batch in cases:
        if dtype_name not in DTYPES or batch < 1:
            raise ValueError(f"bad case ({dtype_name!r}, {batch}); dtype one of {sorted(DTYPES)}, batch >= 1")
    models = build_models(config if config is not None else DETR_R50)
    pixels = photo_batch(max(batch for _, batch in cases), *size)
    return [run_case(models, dtype_name, batch, pixels, pairs, warmup) for dtype_name, batch in cases]


def format_rows(rows: list[dict]) -> str:
    """A plain-text table, one line per case."""
    lines = [f"{'case':<9} {'transformers':>12} {'hf_vl':>8} {'ratio':>6} {'max|d|':>8}  bf16 max err vs fp32 (t/h)"]
    for row in rows:
        line = (
            f"{row['case']:<9} {row['transformers_s']:>11.4f}s {row['hf_vl_s']:>7.4f}s "
            f"{row['ratio']:>5.2f}x {row['max_diff']:>8.1e}"
        )
        if "err_vs_fp32" in row:
            line += f"  {row['err_vs_fp32']['transformers']:.1e}/{row['err_vs_fp32']['hf_vl']:.1e}"
        lines.append(line)
    return "\n".join(lines)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, got {text!r}") from None
    return height, width


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds per case instead of 9")
    parser.add_argument("--pairs", type=int, default=None, help="interleaved rounds per case")
    parser.add_argument(
        "--cases", type=parse_dtype_batch_cases, default=CASES, help="e.g. fp32:1,bf16:2 (default fp32:1,bf16:1)"
    )
    parser.add_argument("--size", type=_parse_size, default=(800, 1066), help="input HEIGHTxWIDTH (default 800x1066)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before running")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = args.pairs if args.pairs is not None else (5 if args.quick else 9)
    height, width = args.size
    print(f"DETR-R50 {height}x{width}, torch {torch.__version__}, {torch.get_num_threads()} threads, {pairs} rounds")
    print(host_line())
    print(format_rows(run(cases=args.cases, size=args.size, pairs=pairs)))


if __name__ == "__main__":
    main()
