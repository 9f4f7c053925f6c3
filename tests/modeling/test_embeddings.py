"""Shared position embeddings against the originals (segment-anything) or a naive oracle (the paper's formula)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_vl.modeling.hf_vl_embeddings import (
    HfVlRandomFourierPositionEmbedding,
    interpolate_learned_position_embeddings,
    sinusoidal_position_embedding_1d,
)


def test_random_fourier_matches_segment_anything():
    prompt_encoder = pytest.importorskip("segment_anything.modeling.prompt_encoder")
    torch.manual_seed(0)
    reference = prompt_encoder.PositionEmbeddingRandom(num_pos_feats=16)
    ours = HfVlRandomFourierPositionEmbedding(num_pos_feats=16)
    ours.load_state_dict(reference.state_dict())  # the same buffer name: positional_encoding_gaussian_matrix
    torch.testing.assert_close(ours((5, 7)), reference((5, 7)), atol=1e-6, rtol=0)
    coords = torch.rand(2, 9, 2) * torch.tensor([40.0, 30.0])  # (x, y) pixels in a 40 wide, 30 high image
    expected = reference.forward_with_coords(coords, (30, 40))  # segment-anything takes (h, w)
    normalised = coords / torch.tensor([40.0, 30.0])
    torch.testing.assert_close(ours.encode(normalised), expected, atol=1e-5, rtol=0)


def test_random_fourier_runs_in_bf16():
    # segment-anything fails here: its fp32 Gaussian matrix meets bf16 coordinates
    module = HfVlRandomFourierPositionEmbedding(8).to(torch.bfloat16)
    out = module.encode(torch.rand(3, 2, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 16)


def test_sinusoidal_1d_is_the_papers_formula():
    length, dim = 11, 8
    table = sinusoidal_position_embedding_1d(length, dim)
    for pos in range(length):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)  # Vaswani et al. 2017, section 3.5
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_position_embedding_1d(4, 7)


def test_learned_interpolation_keeps_prefix_and_identity():
    grid = torch.randn(1, 1 + 4 * 4, 6)
    assert interpolate_learned_position_embeddings(grid, (4, 4), (4, 4)) is grid
    resized = interpolate_learned_position_embeddings(grid, (4, 4), (6, 3))
    assert resized.shape == (1, 1 + 6 * 3, 6)
    torch.testing.assert_close(resized[:, :1], grid[:, :1])
    no_prefix = interpolate_learned_position_embeddings(grid[:, 1:], (4, 4), (2, 2), num_prefix_tokens=0)
    assert no_prefix.shape == (1, 4, 6)
