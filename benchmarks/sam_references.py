"""The reference SAM models the SAM benchmarks compare against, built once here for ``bench_sam.py`` and
``bench_sam_amg.py``: segment-anything's ``Sam`` with random weights, the same weights in transformers' ``SamModel``
(through the key mapping of transformers' ``convert_sam_to_hf.py``, checkpoints.md section 10) and in hf_vl's
``HfVlSamModel`` (through hf_vl's own converter)."""

from __future__ import annotations

import re
import tempfile
from functools import partial
from pathlib import Path

import torch
from torch import nn

# segment-anything's vit_b (build_sam.py) and a tiny model with the same structure
VIT_B = dict(embed_dim=768, depth=12, heads=12, global_attn=(2, 5, 8, 11), image_size=1024, window=14,
             prompt_dim=256, decoder_mlp=2048, decoder_heads=8, mask_in_chans=16)
TINY = dict(embed_dim=32, depth=2, heads=2, global_attn=(1,), image_size=128, window=4,
            prompt_dim=32, decoder_mlp=64, decoder_heads=2, mask_in_chans=4)
SAM_MEAN, SAM_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def build_segment_anything(config: dict, seed: int = 0, random_rel_pos: bool = False) -> nn.Module:
    """segment-anything ``Sam`` with random weights (default PyTorch init), eval mode. ``random_rel_pos``: fill the
    zero-initialised relative position tables with N(0, 0.02), so that path of the encoder is exercised."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    size, dim = config["image_size"], config["prompt_dim"]
    encoder = ImageEncoderViT(
        depth=config["depth"], embed_dim=config["embed_dim"], img_size=size, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=config["heads"], patch_size=16, qkv_bias=True,
        use_rel_pos=True, global_attn_indexes=tuple(config["global_attn"]), window_size=config["window"],
        out_chans=dim,
    )
    prompt = PromptEncoder(embed_dim=dim, image_embedding_size=(size // 16, size // 16),
                           input_image_size=(size, size), mask_in_chans=config["mask_in_chans"])
    transformer = TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=config["decoder_mlp"],
                                    num_heads=config["decoder_heads"])
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=transformer, transformer_dim=dim,
                          iou_head_depth=3, iou_head_hidden_dim=dim)
    sam = Sam(encoder, prompt, decoder, pixel_mean=list(SAM_MEAN), pixel_std=list(SAM_STD)).eval()
    if not random_rel_pos:
        return sam
    with torch.no_grad():
        for name, param in sam.named_parameters():
            if "rel_pos" in name:
                param.normal_(0.0, 0.02)
    return sam


# transformers' convert_sam_to_hf.py renames (substring replacements, applied in this order; checkpoints.md §10)
_TRANSFORMERS_RENAMES = (
    ("iou_prediction_head.layers.0", "iou_prediction_head.proj_in"),
    ("iou_prediction_head.layers.1", "iou_prediction_head.layers.0"),
    ("iou_prediction_head.layers.2", "iou_prediction_head.proj_out"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("image_encoder", "vision_encoder"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"),
    ("blocks", "layers"),
)
_HYPERNETWORK = re.compile(r"(.*)output_hypernetworks_mlps\.(\d+)\.layers\.(\d)\.(.*)")


def segment_anything_to_transformers_state(state_dict: dict) -> dict:
    """segment-anything ``Sam`` state dict -> transformers ``SamModel`` keys."""
    out = {}
    for key, tensor in state_dict.items():
        if key in ("pixel_mean", "pixel_std"):
            continue
        for old, new in _TRANSFORMERS_RENAMES:
            key = key.replace(old, new)
        match = _HYPERNETWORK.fullmatch(key)
        if match:
            head, index, layer, rest = match.groups()
            name = {"0": "proj_in", "1": "layers.0", "2": "proj_out"}[layer]
            key = f"{head}output_hypernetworks_mlps.{index}.{name}.{rest}"
        out[key] = tensor
    out["shared_image_embedding.positional_embedding"] = out["prompt_encoder.shared_embedding.positional_embedding"]
    return out


def build_transformers_sam(sam: nn.Module, config: dict) -> nn.Module:
    """transformers ``SamModel`` carrying ``sam``'s weights (strict load), eval mode."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    size, dim = config["image_size"], config["prompt_dim"]
    vision = SamVisionConfig(
        hidden_size=config["embed_dim"], output_channels=dim, num_hidden_layers=config["depth"],
        num_attention_heads=config["heads"], image_size=size, patch_size=16, window_size=config["window"],
        global_attn_indexes=list(config["global_attn"]), num_pos_feats=dim // 2, mlp_dim=4 * config["embed_dim"],
    )
    prompt = SamPromptEncoderConfig(hidden_size=dim, image_size=size, patch_size=16,
                                    mask_input_channels=config["mask_in_chans"])
    decoder = SamMaskDecoderConfig(hidden_size=dim, mlp_dim=config["decoder_mlp"],
                                   num_attention_heads=config["decoder_heads"], iou_head_hidden_dim=dim)
    model = SamModel(SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                               mask_decoder_config=decoder.to_dict())).eval()
    model.load_state_dict(segment_anything_to_transformers_state(sam.state_dict()), strict=True)
    return model


def build_hf_vl_sam(sam: nn.Module, config: dict) -> nn.Module:
    """hf_vl's ``HfVlSamModel`` with ``sam``'s weights through hf_vl's own converter."""
    from hf_vl.conversion.api import convert_checkpoint

    # the decoder's head count is the one size its tensor shapes do not show
    decoder = dict(hidden_size=config["prompt_dim"], num_hidden_layers=2, num_attention_heads=config["decoder_heads"],
                   mlp_dim=config["decoder_mlp"], iou_head_hidden_dim=config["prompt_dim"])
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "sam.pth"
        torch.save(sam.state_dict(), path)
        model = convert_checkpoint("sam", "original", path, config_overrides={"mask_decoder_config": decoder},
                                   progress=False)
    return model.eval()
