"""Helpers for converter parity tests (importable as ``conversion_helpers``: pytest puts this folder on sys.path).

Parity is the proof of a conversion: the reference implementation (timm, transformers, ...) and the converted hf_vl
model get the same pixels of a real photograph and must agree to ``atol``. Reference models are randomised first
(:func:`randomize_`) because default inits make many tensors equal (LayerNorm weights 1, biases 0): swapping
``norm1`` and ``norm2`` or two biases would otherwise go unnoticed.
"""

from __future__ import annotations

import torch
from torch import nn

PARITY_ATOL = 1e-4
MEASURED: dict[str, float] = {}  # name -> max |difference|; printed by the parity helper (pytest -s shows it)


@torch.no_grad()
def randomize_(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Give every parameter distinct random values of realistic scale: LayerNorm weights 1 + N(0, 0.1), all other
    tensors N(0, std) (biases included)."""
    generator = torch.Generator().manual_seed(1234)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if isinstance(module, nn.LayerNorm) and name == "weight":
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(std * noise)
    return model.eval()


def random_model(factory, std: float = 0.02) -> nn.Module:
    """``factory()`` built on the meta device, materialised and filled by :func:`randomize_` (skipping the
    reference library's own init, which :func:`randomize_` overwrites anyway: seconds per full-size model)."""
    with torch.device("meta"):
        model = factory()
    if any(True for _ in model.buffers()):
        raise ValueError(f"{type(model).__name__} has buffers that randomize_ would leave uninitialised")
    return randomize_(model.to_empty(device="cpu"), std=std)


def pixel_values(image_processor, image) -> torch.Tensor:
    """(1, 3, H, W) float pixels of ``image`` as the converted model's saved processor prepares them."""
    return image_processor(images=image, return_tensors="pt")["pixel_values"]


def assert_parity(name: str, ours: torch.Tensor, reference: torch.Tensor, atol: float = PARITY_ATOL) -> float:
    """Assert equal shapes and max |ours - reference| <= atol; record and print the measured difference."""
    assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(reference.shape)}"
    assert reference.abs().max() > 1e-3, f"{name}: the reference output is ~0, the comparison would prove nothing"
    difference = (ours.double() - reference.double()).abs().max().item()
    MEASURED[name] = difference
    print(f"[parity] {name}: max |delta| = {difference:.2e}")
    assert difference <= atol, f"{name}: max |delta| = {difference:.3e} > {atol}"
    return difference
