"""CLIP speed: hf_vl's ``HfVlClipModel`` against transformers' ``CLIPModel`` and open_clip's ``CLIP``, same process,
same weights, same photographs and sentences (image + text forward, as zero-shot classification runs it).

Protocol (``/work/shared/docs/benchmarks.md``): open_clip's random weights (``ViT-B-32-quickgelu``,
``RN50-quickgelu``, ``pretrained=None``) are converted into hf_vl's layout with hf_vl's own converter
(``hf_vl.conversion.convert_hf_vl_clip``, the ``open_clip`` source), and from there into transformers' ``CLIPModel``
keys here (transformers has no ResNet CLIP: the RN50 rows have no transformers column). Inputs: scikit-image
photographs through ``HfVlClipImageProcessor`` and real sentences through the CLIP tokenizer (77 tokens, with the
attention mask for hf_vl and transformers, as the pipeline passes it; open_clip takes none). ``eval()``,
``torch.inference_mode()``, one ``torch.get_num_threads()``; 2+ warm-up calls each, then interleaved rounds;
medians and the median of per-round ratios. ``ratio`` = reference time / hf_vl time (> 1: hf_vl faster).
``max|d|`` is the largest difference of the normalised image and text embeddings to hf_vl's.

Texts are padded to CLIP's 77-token context by default (the tokenizer's ``padding=True``, as the zero-shot pipeline
calls it; open_clip's tokenizer always gives 77): hf_vl's text tower stops after the batch's last real token, the
references compute every column. ``--padding longest`` pads hf_vl's and transformers' texts to the longest sentence
instead (no such saving); open_clip always gets 77 tokens, the only length its text tower takes.

Usage: ``python benchmarks/bench_clip.py [--quick] [--pairs N] [--variants ViT-B/32,RN50] [--cases fp32:1,bf16:8]
[--padding context|longest]``.
A smoke test can call ``run(cases=(("fp32", 2),), pairs=1, warmup=0, build=build_tiny_models)``.
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

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from hf_vl.conversion.convert_hf_vl_clip import OPENAI_RULES, image_tower_rules
from hf_vl.conversion.rules import convert_state_dict
from hf_vl.modeling.configuration_hf_vl_clip import HfVlClipConfig, clip_variant_config
from hf_vl.modeling.modeling_hf_vl_clip import HfVlClipModel
from hf_vl.processing.image_processing_hf_vl_clip import HfVlClipImageProcessor
from hf_vl.processing.tokenization_hf_vl_clip import load_clip_tokenizer

# shared benchmark helpers live next to this script; importable however it is loaded
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_timing import host_line, interleaved_times, parse_dtype_batch_cases  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = (("fp32", 1), ("fp32", 8), ("bf16", 1), ("bf16", 8))
VARIANTS = {"ViT-B/32": "ViT-B-32-quickgelu", "RN50": "RN50-quickgelu"}  # hf_vl variant -> open_clip model name
SENTENCES = [
    "a photo of an astronaut in a white space suit",
    "a cup of coffee on a saucer",
    "a tabby cat looking at the camera",
    "This is a photo of a red circle.",
    "two dogs playing in the snow near a wooden fence",
    "a diagram",
    "an old photograph of a city street with cars and people walking",
    "a close-up of a flower",
]


# ----------------------------------------------------------------------------------------------- models
def hf_vl_to_transformers(state_dict: dict) -> dict:
    """hf_vl ViT-CLIP layout -> transformers ``CLIPModel`` keys (same block names; table shapes differ)."""
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("embeddings.position_embedding"):
            out[key + ".weight"] = tensor[0]  # (1, positions, dim) -> (positions, dim)
        elif key == "vision_model.embeddings.class_embedding":
            out[key] = tensor.reshape(-1)  # (1, 1, dim) -> (dim,)
        else:
            out[re.sub(r"^vision_model\.pre_layernorm\.", "vision_model.pre_layrnorm.", key)] = tensor
    return out


def transformers_config(config: HfVlClipConfig):
    from transformers import CLIPConfig

    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
              "layer_norm_eps")
    text = {name: getattr(config.text_config, name) for name in fields}
    vision = {name: getattr(config.vision_config, name) for name in fields}
    text.update(vocab_size=config.text_config.vocab_size,
                max_position_embeddings=config.text_config.max_position_embeddings)
    vision.update(image_size=config.vision_config.image_size, patch_size=config.vision_config.patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.projection_dim)


def build_models(variant: str = "ViT-B/32", open_clip_model: nn.Module | None = None,
                 config: HfVlClipConfig | None = None, seed: int = 0) -> dict[str, nn.Module]:
    """open_clip with random weights, hf_vl (and for ViTs transformers) carrying the same weights, fp32 eval.

    ``open_clip_model`` / ``config`` replace the full-size variant (the tests pass tiny ones)."""
    import open_clip

    torch.manual_seed(seed)
    if open_clip_model is None:
        open_clip_model = open_clip.create_model(VARIANTS[variant], pretrained=None)
    config = clip_variant_config(variant) if config is None else config
    reference = open_clip_model.eval()
    hf_vl = HfVlClipModel(config).eval()
    rules = OPENAI_RULES + image_tower_rules(config)
    hf_vl.load_state_dict(convert_state_dict(reference.state_dict(), rules, hf_vl.state_dict()), strict=True)
    models = {"open_clip": reference, "hf_vl": hf_vl}
    if config.vision_config.vision_type == "vit":
        from transformers import CLIPModel

        transformers_model = CLIPModel(transformers_config(config)).eval()
        transformers_model.load_state_dict(hf_vl_to_transformers(hf_vl.state_dict()), strict=True)
        models["transformers"] = transformers_model
    return models


def build_tiny_models(variant: str = "ViT-B/32", seed: int = 0) -> dict[str, nn.Module]:
    """Toy-size stand-ins for ``variant`` (same tower type, 2-layer width-32 towers), for a smoke test of ``run``."""
    import open_clip

    torch.manual_seed(seed)
    text_cfg = dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if VARIANTS[variant].startswith("RN"):
        # open_clip's attention pool has width * 32 / head_width heads: 256 / 64 = 4
        vision_cfg = dict(layers=[1, 1, 1, 1], width=8, image_size=64, head_width=64)
        vision = dict(vision_type="resnet", resnet_depths=[1, 1, 1, 1], resnet_width=8, num_attention_heads=4,
                      image_size=64)
    else:
        vision_cfg = dict(layers=2, width=32, patch_size=8, image_size=32, head_width=8)
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      image_size=32, patch_size=8)
    reference = open_clip.model.CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True)
    config = HfVlClipConfig(projection_dim=16, text_config=text, vision_config=vision)
    return build_models(variant, reference, config, seed)


# ----------------------------------------------------------------------------------------------- inputs
PADDINGS = ("context", "longest")


def make_inputs(batch: int, image_size: int, padding: str = "context") -> dict[str, torch.Tensor]:
    """scikit-image photographs (cycled, mirrored on the second pass) and real sentences, preprocessed as CLIP:
    texts padded to the 77-token context (``padding="context"``: CLIP's tokenizer default, what the zero-shot
    pipeline and open_clip's tokenizer give) or to the longest sentence (``"longest"``)."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    images = [Image.fromarray(photos[i % 3][:, ::-1] if (i // 3) % 2 else photos[i % 3]) for i in range(batch)]
    processor = HfVlClipImageProcessor(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size})
    tokenizer, sentences = load_clip_tokenizer(), [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    text = tokenizer(sentences, padding=True if padding == "context" else "longest", return_tensors="pt")
    # open_clip adds its whole 77-position table: it only takes context-padded ids
    open_clip_ids = tokenizer(sentences, padding=True, return_tensors="pt")["input_ids"]
    return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"], **text,
            "open_clip_input_ids": open_clip_ids}


def embed(name: str, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_embeds, text_embeds), L2-normalised, from one image+text forward of ``model``."""
    if name == "open_clip":
        image, text, _ = model(inputs["pixel_values"], inputs["open_clip_input_ids"])
        return image, text
    out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                attention_mask=inputs["attention_mask"])
    return out.image_embeds, out.text_embeds


# ----------------------------------------------------------------------------------------------- timing


def _cast(models: dict[str, nn.Module], dtype: torch.dtype) -> dict[str, nn.Module]:
    if dtype == torch.float32:
        return dict(models)
    return {name: copy.deepcopy(model).to(dtype) for name, model in models.items()}


def run_case(models: dict, variant: str, dtype_name: str, batch: int, inputs: dict, pairs: int, warmup: int) -> dict:
    """One row: median times, per-round ratios (reference / hf_vl) and embedding differences to hf_vl."""
    dtype = DTYPES[dtype_name]
    typed = _cast(models, dtype)
    case_inputs = {key: value[:batch] for key, value in inputs.items()}
    case_inputs["pixel_values"] = case_inputs["pixel_values"].to(dtype)
    with torch.inference_mode():
        outputs = {name: embed(name, model, case_inputs) for name, model in typed.items()}
        calls = {name: partial(embed, name, model, case_inputs) for name, model in typed.items()}
        times = interleaved_times(calls, pairs, warmup)
    row = {"case": f"{variant} {dtype_name} b{batch}", "threads": torch.get_num_threads()}
    mine = outputs["hf_vl"]
    for name, measured in times.items():
        row[f"{name}_s"] = statistics.median(measured)
        if name != "hf_vl":
            row[f"ratio_{name}"] = statistics.median(o / m for o, m in zip(measured, times["hf_vl"]))
            row[f"max_diff_{name}"] = max(
                (F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).abs().max().item()
                for a, b in zip(outputs[name], mine)
            )
    return row


def run(variants: Sequence[str] = tuple(VARIANTS), cases: Sequence[tuple[str, int]] = CASES, pairs: int = 7,
        warmup: int = 2, build: Callable[[str], dict] = build_models, padding: str = "context") -> list[dict]:
    """Benchmark every (variant, dtype, batch); ``build(variant)`` gives the models (tests pass tiny ones);
    ``padding`` as :func:`make_inputs`."""
    if pairs < 1 or warmup < 0:
        raise ValueError(f"pairs must be >= 1 and warmup >= 0, got pairs={pairs}, warmup={warmup}")
    for dtype_name, batch in cases:
        if dtype_name not in DTYPES or batch < 1:
            raise ValueError(f"bad case ({dtype_name!r}, {batch}); dtype one of {sorted(DTYPES)}, batch >= 1")
    rows = []
    for variant in variants:
        models = build(variant)
        inputs = make_inputs(max(batch for _, batch in cases), models["hf_vl"].config.vision_config.image_size,
                             padding)
        rows += [run_case(models, variant, dtype, batch, inputs, pairs, warmup) for dtype, batch in cases]
        del models
    return rows


def format_rows(rows: list[dict]) -> str:
    header = (f"{'case':<16} {'hf_vl':>8} {'open_clip':>10} {'ratio':>6} {'max|d|':>8} {'transformers':>13}"
              f" {'ratio':>6} {'max|d|':>8}")
    lines = [header]
    for row in rows:
        line = (f"{row['case']:<16} {row['hf_vl_s']:>7.4f}s {row['open_clip_s']:>9.4f}s {row['ratio_open_clip']:>5.2f}x"
                f" {row['max_diff_open_clip']:>8.1e}")
        if "transformers_s" in row:
            line += (f" {row['transformers_s']:>12.4f}s {row['ratio_transformers']:>5.2f}x"
                     f" {row['max_diff_transformers']:>8.1e}")
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="7 rounds per case instead of 15")
    parser.add_argument("--pairs", type=int, default=None, help="interleaved rounds per case")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: ViT-B/32,RN50")
    parser.add_argument(
        "--cases", type=parse_dtype_batch_cases, default=CASES, help="e.g. fp32:1,bf16:8 (default: all four)"
    )
    parser.add_argument("--padding", choices=PADDINGS, default="context",
                        help="texts padded to the 77-token context (the tokenizer's default) or the longest text")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    pairs = args.pairs if args.pairs is not None else (7 if args.quick else 15)
    print(f"CLIP image+text forward, torch {torch.__version__}, {torch.get_num_threads()} threads, {pairs} rounds, "
          f"texts padded to the {args.padding}")
    print(host_line())
    print(format_rows(run(variants, args.cases, pairs, padding=args.padding)))


if __name__ == "__main__":
    main()
