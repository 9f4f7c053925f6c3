"""ViT-B/16 speed: hf_vl's ``HfVlVitForImageClassification`` against transformers' ``ViTForImageClassification``
(and timm's ``VisionTransformer``), same process, same weights, same photographs.

Protocol (``/work/shared/docs/benchmarks.md``): transformers' random weights are converted into hf_vl's layout with
hf_vl's own converter (and into timm's fused-``qkv`` layout here); inputs are scikit-image photographs at 224x224;
``eval()``, ``torch.inference_mode()``, one ``torch.get_num_threads()`` for all; 2+ warm-up calls each, then
interleaved rounds (reference, hf_vl[, timm]); medians and the median of per-round ratios. ``ratio`` is
reference time / hf_vl time (> 1: hf_vl faster). ``max|d|`` is the largest logit difference to hf_vl, so a fast
wrong answer cannot pass; bf16 rows also give each model's largest error against the fp32 transformers logits.

Usage: ``python benchmarks/bench_vit.py [--quick] [--pairs N] [--no-timm] [--cases fp32:1,bf16:8]``. A test
imports this module and calls :func:`run` with a tiny config (``tests/benchmarks/test_bench_vit.py``).
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from hf_vl.modeling.configuration_hf_vl_vit import HfVlVitConfig
from hf_vl.modeling.modeling_hf_vl_vit import HfVlVitForImageClassification

# shared benchmark helpers live next to this script; importable however it is loaded
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_timing import host_line, interleaved_times, parse_dtype_batch_cases  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = (("fp32", 1), ("fp32", 8), ("bf16", 1), ("bf16", 8))
# transformers' ViTConfig defaults are ViT-B/16 at 224 (exact GELU, layer_norm_eps=1e-12)
VIT_B16 = dict(num_labels=1000)


# ----------------------------------------------------------------------------------------------- weights
# Fallback for when hf_vl.conversion is unavailable: transformers 5.24 in-memory names -> hf_vl names.
_LOCAL_TRANSFORMERS_RULES = (
    (r"vit\.embeddings\.cls_token", r"vit.embeddings.class_embedding"),
    (r"vit\.embeddings\.position_embeddings", r"vit.embeddings.position_embedding"),
    (r"vit\.embeddings\.patch_embeddings\.projection\.(.+)", r"vit.embeddings.patch_embedding.\1"),
    (r"vit\.layers\.(\d+)\.attention\.([qkv])_proj\.(.+)", r"vit.encoder.layers.\1.self_attn.\2_proj.\3"),
    (r"vit\.layers\.(\d+)\.attention\.o_proj\.(.+)", r"vit.encoder.layers.\1.self_attn.out_proj.\2"),
    (r"vit\.layers\.(\d+)\.layernorm_before\.(.+)", r"vit.encoder.layers.\1.layer_norm1.\2"),
    (r"vit\.layers\.(\d+)\.layernorm_after\.(.+)", r"vit.encoder.layers.\1.layer_norm2.\2"),
    (r"vit\.layers\.(\d+)\.mlp\.(fc[12])\.(.+)", r"vit.encoder.layers.\1.mlp.\2.\3"),
    (r"vit\.layernorm\.(.+)", r"vit.final_layer_norm.\1"),
    (r"classifier\.(.+)", r"classifier.\1"),
)


def _local_convert(state_dict: dict) -> dict:
    converted = {}
    for key, tensor in state_dict.items():
        for source, target in _LOCAL_TRANSFORMERS_RULES:
            if re.fullmatch(source, key):
                converted[re.sub(source, target, key)] = tensor
                break
        else:
            raise KeyError(f"no rule for transformers key {key!r}")
    return converted


def transformers_to_hf_vl(state_dict: dict, hf_vl_model: nn.Module) -> dict:
    """transformers ViT state dict -> hf_vl layout, with hf_vl's converter when it is importable."""
    try:
        from hf_vl.conversion.convert_hf_vl_vit import TRANSFORMERS_RULES
        from hf_vl.conversion.rules import convert_state_dict
    except ImportError:
        return _local_convert(state_dict)
    return convert_state_dict(state_dict, TRANSFORMERS_RULES, expected_keys=hf_vl_model.state_dict())


def hf_vl_to_timm(state_dict: dict) -> dict:
    """hf_vl layout -> timm ``VisionTransformer`` keys (q/k/v fused into ``attn.qkv``)."""
    layer = re.compile(r"vit\.encoder\.layers\.(\d+)\.(.+)")
    names = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj", "mlp": "mlp"}
    fixed = {
        "vit.embeddings.class_embedding": "cls_token",
        "vit.embeddings.position_embedding": "pos_embed",
        "vit.embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "vit.embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "vit.final_layer_norm.weight": "norm.weight",
        "vit.final_layer_norm.bias": "norm.bias",
        "classifier.weight": "head.weight",
        "classifier.bias": "head.bias",
    }
    out = {fixed[k]: v for k, v in state_dict.items() if k in fixed}
    for key, tensor in state_dict.items():
        match = layer.fullmatch(key)
        if match is None or ".self_attn.q_proj." in key or ".self_attn.k_proj." in key:
            continue
        block, rest = match.groups()
        if ".v_proj." in f".{rest}":
            kind = rest.rsplit(".", 1)[1]
            parts = [state_dict[f"vit.encoder.layers.{block}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(parts)
            continue
        for hf_name, timm_name in names.items():
            if rest.startswith(hf_name + "."):
                out[f"blocks.{block}.{timm_name}{rest[len(hf_name):]}"] = tensor
    return out


def build_models(config: dict, with_timm: bool = True, seed: int = 0) -> dict[str, nn.Module]:
    """transformers ViT with random weights, and hf_vl (and timm) models carrying the same weights, all fp32 eval."""
    torch.manual_seed(seed)
    ref_config = ViTConfig(**config)
    reference = ViTForImageClassification(ref_config).eval()
    hf_vl = HfVlVitForImageClassification(
        HfVlVitConfig(
            hidden_size=ref_config.hidden_size,
            num_hidden_layers=ref_config.num_hidden_layers,
            num_attention_heads=ref_config.num_attention_heads,
            intermediate_size=ref_config.intermediate_size,
            hidden_act=ref_config.hidden_act,
            layer_norm_eps=ref_config.layer_norm_eps,  # transformers' 1e-12, not hf_vl's 1e-6 default
            image_size=ref_config.image_size,
            patch_size=ref_config.patch_size,
            num_channels=ref_config.num_channels,
            qkv_bias=ref_config.qkv_bias,
            num_labels=ref_config.num_labels,
        )
    ).eval()
    hf_vl.load_state_dict(transformers_to_hf_vl(reference.state_dict(), hf_vl), strict=True)
    models = {"transformers": reference, "hf_vl": hf_vl}
    if with_timm:
        models["timm"] = _build_timm(ref_config, hf_vl.state_dict())
    return models


def _build_timm(ref_config: ViTConfig, hf_vl_state: dict) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if ref_config.hidden_act != "gelu":
        raise ValueError(f"the timm column needs exact GELU, got hidden_act={ref_config.hidden_act!r}")
    model = VisionTransformer(
        img_size=ref_config.image_size,
        patch_size=ref_config.patch_size,
        in_chans=ref_config.num_channels,
        num_classes=ref_config.num_labels,
        embed_dim=ref_config.hidden_size,
        depth=ref_config.num_hidden_layers,
        num_heads=ref_config.num_attention_heads,
        mlp_ratio=ref_config.intermediate_size / ref_config.hidden_size,
        qkv_bias=ref_config.qkv_bias,
        norm_layer=partial(nn.LayerNorm, eps=ref_config.layer_norm_eps),
    ).eval()
    model.load_state_dict(hf_vl_to_timm(hf_vl_state), strict=True)
    return model


# ----------------------------------------------------------------------------------------------- inputs
def photo_batch(batch: int, image_size: int) -> torch.Tensor:
    """scikit-image photographs (astronaut, coffee, chelsea, then their mirror images, cycled), resized
    bilinearly to ``image_size`` and normalised as ViTImageProcessor does (mean 0.5, std 0.5)."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    images = []
    for index in range(batch):
        photo = photos[index % 3]
        if (index // 3) % 2:
            photo = photo[:, ::-1]
        resized = Image.fromarray(np.ascontiguousarray(photo)).resize((image_size, image_size), Image.BILINEAR)
        images.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0))
    # (batch, h, w, 3) -> (batch, 3, h, w)
    pixels = torch.stack(images).permute(0, 3, 1, 2).contiguous()
    return (pixels - 0.5) / 0.5


# ----------------------------------------------------------------------------------------------- timing
def _logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values)
    return out if isinstance(out, torch.Tensor) else out.logits


def _cast(models: dict[str, nn.Module], dtype: torch.dtype) -> dict[str, nn.Module]:
    """The fp32 models themselves, or copies in ``dtype`` (made outside inference_mode, so their parameters are
    ordinary tensors); casting the originals back would leave them with bf16-rounded weights."""
    if dtype == torch.float32:
        return dict(models)
    return {name: copy.deepcopy(model).to(dtype) for name, model in models.items()}


def run_case(
    models: dict[str, nn.Module], dtype_name: str, batch: int, pixels: torch.Tensor, pairs: int, warmup: int
) -> dict:
    """One row: median times, median per-round ratios (other / hf_vl), and the largest logit differences."""
    dtype = DTYPES[dtype_name]
    fp32_inputs = pixels[:batch]
    with torch.inference_mode():  # models arrive in fp32: the bf16 rows are also checked against these logits
        fp32_ref = _logits(models["transformers"], fp32_inputs).float() if dtype != torch.float32 else None
    typed = _cast(models, dtype)
    inputs = fp32_inputs.to(dtype)
    with torch.inference_mode():
        logits = {name: _logits(model, inputs).float() for name, model in typed.items()}
        calls = {name: partial(_logits, model, inputs) for name, model in typed.items()}
        times = interleaved_times(calls, pairs, warmup)
    row = {"case": f"{dtype_name} b{batch}", "threads": torch.get_num_threads()}
    for name, measured in times.items():
        row[f"{name}_s"] = statistics.median(measured)
        if name != "hf_vl":
            ratios = [other / mine for other, mine in zip(measured, times["hf_vl"])]
            row[f"ratio_{name}"] = statistics.median(ratios)
            row[f"max_diff_{name}"] = (logits[name] - logits["hf_vl"]).abs().max().item()
    if fp32_ref is not None:
        row["err_vs_fp32"] = {name: (out - fp32_ref).abs().max().item() for name, out in logits.items()}
    return row


def run(
    config: dict | None = None,
    cases: Sequence[tuple[str, int]] = CASES,
    pairs: int = 7,
    warmup: int = 2,
    with_timm: bool = True,
) -> list[dict]:
    """Benchmark every (dtype, batch) case; ``config`` is ``ViTConfig`` kwargs (default ViT-B/16)."""
    if pairs < 1 or warmup < 0:
        raise ValueError(f"pairs must be >= 1 and warmup >= 0, got pairs={pairs}, warmup={warmup}")
    for dtype_name, batch in cases:
        if dtype_name not in DTYPES or batch < 1:
            raise ValueError(f"bad case ({dtype_name!r}, {batch}); dtype one of {sorted(DTYPES)}, batch >= 1")
    models = build_models(config if config is not None else VIT_B16, with_timm=with_timm)
    pixels = photo_batch(max(batch for _, batch in cases), models["hf_vl"].config.image_size)
    return [run_case(models, dtype_name, batch, pixels, pairs, warmup) for dtype_name, batch in cases]


def format_rows(rows: list[dict]) -> str:
    """A plain-text table, one line per case."""
    with_timm = any("timm_s" in row for row in rows)
    header = f"{'case':<9} {'transformers':>12} {'hf_vl':>8} {'ratio':>6} {'max|d|':>8}"
    if with_timm:
        header += f" {'timm':>8} {'ratio':>6} {'max|d|':>8}"
    lines = [header + "  bf16 max err vs fp32 (transformers/hf_vl)"]
    for row in rows:
        line = (
            f"{row['case']:<9} {row['transformers_s']:>11.4f}s {row['hf_vl_s']:>7.4f}s "
            f"{row['ratio_transformers']:>5.2f}x {row['max_diff_transformers']:>8.1e}"
        )
        if with_timm:
            line += f" {row['timm_s']:>7.4f}s {row['ratio_timm']:>5.2f}x {row['max_diff_timm']:>8.1e}"
        if "err_vs_fp32" in row:
            err = row["err_vs_fp32"]
            line += f"  {err['transformers']:.1e}/{err['hf_vl']:.1e}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="7 rounds per case instead of 15")
    parser.add_argument("--pairs", type=int, default=None, help="interleaved rounds per case")
    parser.add_argument("--no-timm", action="store_true", help="skip the timm column")
    parser.add_argument(
        "--cases", type=parse_dtype_batch_cases, default=CASES, help="e.g. fp32:1,bf16:8 (default: all four)"
    )
    args = parser.parse_args(argv)
    pairs = args.pairs if args.pairs is not None else (7 if args.quick else 15)
    print(f"ViT-B/16 224x224, torch {torch.__version__}, {torch.get_num_threads()} threads, {pairs} rounds per case")
    print(host_line())
    rows = run(cases=args.cases, pairs=pairs, with_timm=not args.no_timm)
    print(format_rows(rows))


if __name__ == "__main__":
    main()
