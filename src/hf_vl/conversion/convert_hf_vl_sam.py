"""Segment Anything checkpoints -> hf_vl ``HfVlSamModel`` (``vision_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``).

Sources (``hf-vl convert sam --source <name>``):

- ``original``: a facebookresearch/segment-anything release file (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``,
  ``sam_vit_h_4b8939.pth``): a bare state dict with ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``
  (``pixel_mean``/``pixel_std`` are non-persistent buffers, absent; dropped if present). The fused ``attn.qkv`` is
  split into q/k/v; ``nn.Sequential`` indices become names (``neck.0`` -> ``neck.conv1``, ``mask_downscaling.3`` ->
  ``mask_embed.conv2``, ``output_upscaling.1`` -> ``upscale_layer_norm``, ``point_embeddings.1`` ->
  ``positive_point_embed``). The variant is read from the tensor shapes (width, depth, global blocks, window, ...)
  and must be a released one unless ``config_overrides`` give the config (tests use tiny models); ``--variant``, if
  given, must agree. The decoder's head count is the one size no shape shows: 8, as in every release.
- ``transformers``: a transformers ``SamModel`` ``save_pretrained`` directory (Hub names = in-memory names for SAM,
  checkpoints.md section 10). The config is read from ``config.json``. transformers' ``proj_in``/``layers.i``/
  ``proj_out`` MLP names map back to ``layers.0``/``layers.{i+1}``/``layers.{depth-1}``; the tied
  ``prompt_encoder.shared_embedding.positional_embedding`` copy is dropped (``shared_image_embedding`` is kept).
  transformers' two-way blocks use its config's ``layer_norm_eps`` (1e-6), which is carried over.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..modeling.configuration_hf_vl_sam import SAM_VARIANTS, HfVlSamConfig, HfVlSamVisionConfig, sam_variant_config
from ..modeling.modeling_hf_vl_sam import HfVlSamModel
from .loaders import StateDict, load_state_dict_file, load_transformers_directory
from .rules import Drop, Rename, Split
from .spec import ConversionSpec, Source
from .transforms import split_qkv

_WB = r"(weight|bias)"
_VL = r"vision_encoder.layers.\1."
_TL = r"mask_decoder.transformer.layers.\1."
_ATTN = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
_POINT_NAMES = ("negative_point_embed", "positive_point_embed", "top_left_embed", "bottom_right_embed")


def _decoder_shared(prefix: str) -> tuple:
    """Two-way transformer attention and heads whose names both formats share."""
    return (
        Rename(prefix + r"transformer\.layers\.(\d+)\." + _ATTN + r"\.(q|k|v|out)_proj\." + _WB,
               _TL + r"\2.\3_proj.\4"),
        Rename(prefix + r"transformer\.layers\.(\d+)\.mlp\.lin([12])\." + _WB, _TL + r"mlp.fc\2.\3"),
        Rename(prefix + r"transformer\.final_attn_token_to_image\.(q|k|v|out)_proj\." + _WB,
               r"mask_decoder.transformer.final_attn_token_to_image.\1_proj.\2"),
        Rename(prefix + r"(iou_token|mask_tokens)\.weight", r"mask_decoder.\1.weight"),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------- original
_IE = r"image_encoder\."
_PE = r"prompt_encoder\."
_MD = r"mask_decoder\."
ORIGINAL_RULES = (
    Rename(_IE + r"pos_embed", "vision_encoder.position_embedding"),
    Rename(_IE + r"patch_embed\.proj\." + _WB, r"vision_encoder.patch_embedding.\1"),
    Rename(_IE + r"blocks\.(\d+)\.norm([12])\." + _WB, _VL + r"layer_norm\2.\3"),
    Split(_IE + r"blocks\.(\d+)\.attn\.qkv\." + _WB, tuple(_VL + rf"self_attn.{p}_proj.\2" for p in "qkv"), split_qkv),
    Rename(_IE + r"blocks\.(\d+)\.attn\.proj\." + _WB, _VL + r"self_attn.out_proj.\2"),
    Rename(_IE + r"blocks\.(\d+)\.attn\.rel_pos_([hw])", _VL + r"self_attn.rel_pos_\2"),
    Rename(_IE + r"blocks\.(\d+)\.mlp\.lin([12])\." + _WB, _VL + r"mlp.fc\2.\3"),
    Rename(_IE + r"neck\.0\.weight", "vision_encoder.neck.conv1.weight"),
    Rename(_IE + r"neck\.1\." + _WB, r"vision_encoder.neck.layer_norm1.\1"),
    Rename(_IE + r"neck\.2\.weight", "vision_encoder.neck.conv2.weight"),
    Rename(_IE + r"neck\.3\." + _WB, r"vision_encoder.neck.layer_norm2.\1"),
    Rename(_PE + r"pe_layer\.positional_encoding_gaussian_matrix",
           "prompt_encoder.positional_embedding.positional_encoding_gaussian_matrix"),
    *(Rename(_PE + rf"point_embeddings\.{i}\.weight", f"prompt_encoder.{name}.weight")
      for i, name in enumerate(_POINT_NAMES)),
    Rename(_PE + r"(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
    *(Rename(_PE + rf"mask_downscaling\.{i}\." + _WB, rf"prompt_encoder.mask_embed.{name}.\1")
      for i, name in ((0, "conv1"), (1, "layer_norm1"), (3, "conv2"), (4, "layer_norm2"), (6, "conv3"))),
    *_decoder_shared(_MD),
    Rename(_MD + r"transformer\.layers\.(\d+)\.norm([1-4])\." + _WB, _TL + r"layer_norm\2.\3"),
    Rename(_MD + r"transformer\.norm_final_attn\." + _WB, r"mask_decoder.transformer.final_layer_norm.\1"),
    *(Rename(_MD + rf"output_upscaling\.{i}\." + _WB, rf"mask_decoder.{name}.\1")
      for i, name in ((0, "upscale_conv1"), (1, "upscale_layer_norm"), (3, "upscale_conv2"))),
    Rename(_MD + r"output_hypernetworks_mlps\.(\d+)\.layers\.(\d+)\." + _WB,
           r"mask_decoder.output_hypernetworks_mlps.\1.layers.\2.\3"),
    Rename(_MD + r"iou_prediction_head\.layers\.(\d+)\." + _WB, r"mask_decoder.iou_prediction_head.layers.\1.\2"),
    Drop(r"pixel_(mean|std)", reason="input normalisation lives in the image processor (SAM_MEAN / SAM_STD)"),
)  # fmt: skip


def _count(state_dict: StateDict, prefix: str) -> int:
    """Number of numbered children under ``prefix`` (``image_encoder.blocks.`` -> blocks)."""
    return len({key[len(prefix) :].split(".")[0] for key in state_dict if key.startswith(prefix)})


def _vision_from_shapes(sd: StateDict) -> dict:
    patch = sd["image_encoder.patch_embed.proj.weight"]
    grid = sd["image_encoder.pos_embed"].shape[1]
    depth = _count(sd, "image_encoder.blocks.")
    rel_lengths = [sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
    windows = {(length + 1) // 2 for length in rel_lengths if length != 2 * grid - 1}
    if len(windows) > 1:
        raise ValueError(f"blocks use several window sizes {sorted(windows)}; SAM has one")
    head_dim = sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    return dict(
        hidden_size=patch.shape[0], num_hidden_layers=depth, num_attention_heads=patch.shape[0] // head_dim,
        intermediate_size=sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0], image_size=grid * patch.shape[-1],
        patch_size=patch.shape[-1], num_channels=patch.shape[1], window_size=windows.pop() if windows else 0,
        global_attn_indexes=[i for i, length in enumerate(rel_lengths) if length == 2 * grid - 1],
        output_channels=sd["image_encoder.neck.0.weight"].shape[0],
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in sd,
    )  # fmt: skip


def _decoder_from_shapes(sd: StateDict) -> dict:
    hidden = sd["mask_decoder.iou_token.weight"].shape[1]
    cross = sd["mask_decoder.transformer.final_attn_token_to_image.q_proj.weight"].shape[0]
    iou_depth = _count(sd, "mask_decoder.iou_prediction_head.layers.")
    return dict(
        hidden_size=hidden, num_hidden_layers=_count(sd, "mask_decoder.transformer.layers."),
        mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        attention_downsample_rate=hidden // cross,
        num_multimask_outputs=sd["mask_decoder.mask_tokens.weight"].shape[0] - 1, iou_head_depth=iou_depth,
        iou_head_hidden_dim=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
    )  # fmt: skip


def read_original_variant(path: Path, state_dict: StateDict) -> dict:
    """The variant row of a segment-anything state dict, from its tensor shapes: a released row of
    ``SAM_VARIANTS`` when the shapes are one, else the sizes read (a ``config_overrides`` must then supply the
    decoder's head count if it is not 8)."""
    try:
        config = {
            "vision_config": _vision_from_shapes(state_dict),
            "prompt_encoder_config": dict(
                hidden_size=state_dict["prompt_encoder.not_a_point_embed.weight"].shape[1],
                mask_input_channels=state_dict["prompt_encoder.mask_downscaling.3.weight"].shape[0],
            ),
            "mask_decoder_config": _decoder_from_shapes(state_dict),
        }
    except KeyError as error:
        raise ValueError(f"{path} is not a segment-anything state dict: no key {error}") from None
    for name, row in SAM_VARIANTS.items():
        if _same_sizes(sam_variant_config(name), config):
            return row
    processor = SAM_VARIANTS["vit_b"]["processor"]
    return {"config": config, "processor": processor, "source": f"{path} (not a released SAM size)"}


def _same_sizes(released: HfVlSamConfig, read: dict) -> bool:
    return all(
        getattr(getattr(released, part), key) == value for part, sizes in read.items() for key, value in sizes.items()
    )


# ------------------------------------------------------------------------------------------------ transformers
_HV = r"vision_encoder\.layers\.(\d+)\."
_HFMLP = r"mask_decoder\.output_hypernetworks_mlps\.(\d+)\."
TRANSFORMERS_RULES = (
    Rename(r"shared_image_embedding\.positional_embedding",
           "prompt_encoder.positional_embedding.positional_encoding_gaussian_matrix"),
    Drop(r"prompt_encoder\.shared_embedding\.positional_embedding",
         reason="tied copy of shared_image_embedding.positional_embedding (one matrix in hf_vl)"),
    Rename(r"vision_encoder\.pos_embed", "vision_encoder.position_embedding"),
    Rename(r"vision_encoder\.patch_embed\.projection\." + _WB, r"vision_encoder.patch_embedding.\1"),
    Rename(_HV + r"layer_norm([12])\." + _WB, _VL + r"layer_norm\2.\3"),
    Split(_HV + r"attn\.qkv\." + _WB, tuple(_VL + rf"self_attn.{p}_proj.\2" for p in "qkv"), split_qkv),
    Rename(_HV + r"attn\.proj\." + _WB, _VL + r"self_attn.out_proj.\2"),
    Rename(_HV + r"attn\.rel_pos_([hw])", _VL + r"self_attn.rel_pos_\2"),
    Rename(_HV + r"mlp\.lin([12])\." + _WB, _VL + r"mlp.fc\2.\3"),
    Rename(r"vision_encoder\.neck\.(conv[12]|layer_norm[12])\." + _WB, r"vision_encoder.neck.\1.\2"),
    *(Rename(rf"prompt_encoder\.point_embed\.{i}\.weight", f"prompt_encoder.{name}.weight")
      for i, name in enumerate(_POINT_NAMES)),
    Rename(r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
    Rename(r"prompt_encoder\.mask_embed\.(conv[123]|layer_norm[12])\." + _WB, r"prompt_encoder.mask_embed.\1.\2"),
    *_decoder_shared(r"mask_decoder\."),
    Rename(r"mask_decoder\.transformer\.layers\.(\d+)\.layer_norm([1-4])\." + _WB, _TL + r"layer_norm\2.\3"),
    Rename(r"mask_decoder\.transformer\.layer_norm_final_attn\." + _WB,
           r"mask_decoder.transformer.final_layer_norm.\1"),
    Rename(r"mask_decoder\.(upscale_conv1|upscale_conv2|upscale_layer_norm)\." + _WB, r"mask_decoder.\1.\2"),
    # the hypernetwork MLPs have 3 layers in every SAM: proj_in, layers.0, proj_out
    Rename(_HFMLP + r"proj_in\." + _WB, r"mask_decoder.output_hypernetworks_mlps.\1.layers.0.\2"),
    Rename(_HFMLP + r"layers\.0\." + _WB, r"mask_decoder.output_hypernetworks_mlps.\1.layers.1.\2"),
    Rename(_HFMLP + r"proj_out\." + _WB, r"mask_decoder.output_hypernetworks_mlps.\1.layers.2.\2"),
    Rename(r"mask_decoder\.iou_prediction_head\.proj_in\." + _WB, r"mask_decoder.iou_prediction_head.layers.0.\1"),
)  # fmt: skip


def iou_head_rules(config: HfVlSamConfig) -> tuple:
    """transformers' IoU head ``layers.i`` -> ``layers.{i+1}`` and ``proj_out`` -> ``layers.{depth-1}``: depends on the
    configured depth."""
    depth = config.mask_decoder_config.iou_head_depth
    rules = [
        Rename(rf"mask_decoder\.iou_prediction_head\.layers\.{i}\." + _WB,
               rf"mask_decoder.iou_prediction_head.layers.{i + 1}.\1")
        for i in range(depth - 2)
    ]  # fmt: skip
    if depth > 1:
        rules.append(
            Rename(r"mask_decoder\.iou_prediction_head\.proj_out\." + _WB,
                   rf"mask_decoder.iou_prediction_head.layers.{depth - 1}.\1")
        )  # fmt: skip
    return tuple(rules)


def _pick(raw: dict, keys: dict) -> dict:
    """hf_vl name -> transformers name, for the keys present in ``raw``."""
    return {ours: raw[theirs] for ours, theirs in keys.items() if theirs in raw}


def read_transformers_variant(directory: Path, state_dict: StateDict) -> dict:
    """The variant row of a transformers ``SamModel`` directory, from ``config.json``."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no config.json (expected a save_pretrained directory)")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != "sam":
        raise ValueError(f"{path} has model_type={raw.get('model_type')!r}; the transformers source reads 'sam'")
    vision = raw.get("vision_config") or {}
    if not vision.get("use_abs_pos", True) or not vision.get("use_rel_pos", True):
        raise ValueError("only SAM encoders with absolute and relative position embeddings are supported")
    same = ["hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps", "image_size",
            "patch_size", "num_channels", "qkv_bias", "window_size", "global_attn_indexes", "output_channels",
            "attention_dropout"]  # fmt: skip
    vision_config = _pick(vision, {**{key: key for key in same}, "intermediate_size": "mlp_dim"})
    prompt_keys = ("hidden_size", "mask_input_channels", "hidden_act", "layer_norm_eps")
    prompt = _pick(raw.get("prompt_encoder_config") or {}, {k: k for k in prompt_keys})
    decoder_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_dim", "hidden_act",
                    "attention_downsample_rate", "num_multimask_outputs", "iou_head_depth", "iou_head_hidden_dim",
                    "layer_norm_eps")  # fmt: skip
    decoder = _pick(raw.get("mask_decoder_config") or {}, {k: k for k in decoder_keys})
    config = {"vision_config": _table_shaped(vision_config), "prompt_encoder_config": prompt,
              "mask_decoder_config": decoder}  # fmt: skip
    return {"config": config, "processor": SAM_VARIANTS["vit_b"]["processor"], "source": str(directory)}


def _table_shaped(vision: dict) -> dict:
    """The encoder sizes as ``SAM_VARIANTS`` rows spell them (the keys they list, plus any other key whose value
    differs from the default), so ``--variant`` agreement compares like with like."""
    listed = set(SAM_VARIANTS["vit_b"]["config"]["vision_config"])
    defaults = HfVlSamVisionConfig().to_dict()
    return {key: value for key, value in vision.items() if key in listed or value != defaults.get(key)}


ORIGINAL = Source(
    name="original",
    description="facebookresearch/segment-anything state dict (dl.fbaipublicfiles.com/segment_anything/sam_vit_*.pth)",
    load=load_state_dict_file,
    rules=ORIGINAL_RULES,
    read_variant=read_original_variant,
)
TRANSFORMERS = Source(
    name="transformers",
    description="transformers SamModel save_pretrained directory (facebook/sam-vit-*)",
    load=load_transformers_directory,
    rules=TRANSFORMERS_RULES,
    read_variant=read_transformers_variant,
    config_rules=iou_head_rules,
)

SAM_CONVERSION = ConversionSpec(arch="sam", sources=(ORIGINAL, TRANSFORMERS), model_class=HfVlSamModel)

__all__ = [
    "ORIGINAL_RULES",
    "SAM_CONVERSION",
    "TRANSFORMERS_RULES",
    "iou_head_rules",
    "read_original_variant",
    "read_transformers_variant",
]
