"""clip_contrastive_loss against a naive per-pair oracle, its properties, and the 2-process gathered loss."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn import functional as F

from hf_vl.modeling.hf_vl_contrastive_loss import clip_contrastive_loss
from hf_vl.modeling.hf_vl_distributed import all_gather_with_grad, gather_batch_sizes, is_distributed, rank, world_size


def naive_clip_loss(image_embeds, text_embeds, scale):
    """Loss spelled out per row with python loops: -log of the matching pair's softmax probability."""
    n = image_embeds.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * float(image_embeds[i] @ text_embeds[j]) for j in range(n)]
        col = [scale * float(text_embeds[i] @ image_embeds[j]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        total += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return total / (2 * n)


def random_embeds(batch, dim, seed):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    return image, text


@pytest.mark.parametrize("batch", [1, 2, 5, 16])
@pytest.mark.parametrize("dim", [3, 32])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_matches_naive_oracle(batch, dim, scale):
    image, text = random_embeds(batch, dim, seed=batch * 100 + dim)
    loss = clip_contrastive_loss(image, text, torch.tensor(scale, dtype=torch.float64))
    assert loss.shape == ()
    assert loss.item() == pytest.approx(naive_clip_loss(image, text, scale), rel=1e-10, abs=1e-10)


def test_symmetric_in_image_and_text():
    image, text = random_embeds(7, 9, seed=0)
    a = clip_contrastive_loss(image, text, 10.0)
    b = clip_contrastive_loss(text, image, 10.0)
    torch.testing.assert_close(a, b)


def test_invariant_to_shuffling_pairs():
    image, text = random_embeds(6, 8, seed=1)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = clip_contrastive_loss(image[perm], text[perm], 5.0)
    torch.testing.assert_close(clip_contrastive_loss(image, text, 5.0), shuffled)


def test_aligned_pairs_have_near_zero_loss_and_swapped_ones_high():
    image = torch.eye(4, dtype=torch.float64)
    assert clip_contrastive_loss(image, image.clone(), 100.0).item() < 1e-30
    # every image matched to another image's text: the diagonal is the worst entry
    swapped = clip_contrastive_loss(image, image[[1, 2, 3, 0]], 100.0).item()
    assert swapped == pytest.approx(100.0 + math.log1p(3 * math.exp(-100.0)), rel=1e-6)


def test_gradients_match_oracle_autograd():
    image, text = random_embeds(5, 6, seed=2)
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    clip_contrastive_loss(image, text, scale).backward()
    # oracle: the dense log-softmax formulation written independently
    i2, t2, s2 = (x.detach().clone().requires_grad_(True) for x in (image, text, scale))
    logits = s2 * i2 @ t2.T
    oracle = -(torch.diagonal(logits.log_softmax(1)).mean() + torch.diagonal(logits.log_softmax(0)).mean()) / 2
    oracle.backward()
    for got, want in ((image.grad, i2.grad), (text.grad, t2.grad), (scale.grad, s2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_single_process_helpers_are_identity():
    assert not is_distributed()
    assert world_size() == 1 and rank() == 0
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x
    assert gather_batch_sizes(3, x.device) == [3]


@pytest.mark.parametrize(
    "bad, match",
    [
        ((torch.randn(3, 4), torch.randn(4, 4)), "same"),
        ((torch.randn(3), torch.randn(3)), r"\(batch, dim\)"),
        ((torch.randn(0, 4), torch.randn(0, 4)), "empty"),
        (([[1.0]], torch.randn(1, 1)), "image_embeds must be a torch.Tensor"),
    ],
)
def test_bad_input(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        clip_contrastive_loss(*bad, 1.0)


_WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from torch.nn import functional as F
    from hf_vl.modeling.hf_vl_contrastive_loss import clip_contrastive_loss
    from hf_vl.modeling.hf_vl_distributed import all_gather_with_grad, rank, world_size

    dist.init_process_group("gloo")
    sizes = [int(s) for s in sys.argv[1].split(",")]
    r = rank()
    assert world_size() == len(sizes) == 2
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 5, generator=g, dtype=torch.float64)
    images = torch.randn(sum(sizes), 8, generator=g, dtype=torch.float64)
    texts = torch.randn(sum(sizes), 8, generator=g, dtype=torch.float64)
    start = sum(sizes[:r])
    local = slice(start, start + sizes[r])

    def loss_of(w, imgs, txts, gather):
        return clip_contrastive_loss(F.normalize(imgs @ w, dim=-1), F.normalize(txts @ w, dim=-1), 9.0, gather)

    w = weight.clone().requires_grad_(True)
    loss = loss_of(w, images[local], texts[local], True)
    loss.backward()
    # what DDP does: average the gradients (and, for logging, the losses) over ranks
    grad = w.grad / 2
    dist.all_reduce(grad)  # a new tensor: w.grad keeps this rank's own gradient
    mean_loss = loss.detach() / 2
    dist.all_reduce(mean_loss)

    # single-process oracle of that objective: the mean over rank slices of each slice's rows scored against all
    # columns; with equal slices it is the plain loss over the global batch
    def sliced_loss(w, scale=9.0):
        img, txt = F.normalize(images @ w, dim=-1), F.normalize(texts @ w, dim=-1)
        per_slice = []
        for k, size in enumerate(sizes):
            rows = slice(sum(sizes[:k]), sum(sizes[:k]) + size)
            labels = torch.arange(rows.start, rows.stop)
            image_to_text = F.cross_entropy(scale * img[rows] @ txt.T, labels)
            text_to_image = F.cross_entropy(scale * txt[rows] @ img.T, labels)
            per_slice.append((image_to_text + text_to_image) / 2)
        return sum(per_slice) / len(per_slice)

    w1 = weight.clone().requires_grad_(True)
    oracle = sliced_loss(w1)
    oracle.backward()
    torch.testing.assert_close(mean_loss, oracle.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, w1.grad, rtol=1e-10, atol=1e-12)
    full = loss_of(weight, images, texts, False)
    if sizes[0] == sizes[1]:
        torch.testing.assert_close(mean_loss, full, rtol=1e-12, atol=1e-12)
        # open_clip's gathered loss (torch.distributed.nn.all_gather) gives the same loss and gradients per rank
        import warnings
        from open_clip.loss import ClipLoss

        reference = ClipLoss(local_loss=True, gather_with_grad=True, rank=r, world_size=2)
        w2 = weight.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ref_loss = reference(F.normalize(images[local] @ w2, dim=-1), F.normalize(texts[local] @ w2, dim=-1), 9.0)
            ref_loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w.grad, w2.grad, rtol=1e-10, atol=1e-12)
    # gathered features really are the global batch in rank order
    torch.testing.assert_close(all_gather_with_grad(images[local]), images)
    # without gathering, each rank sees only its own rows
    local_only = loss_of(weight, images[local], texts[local], False)
    assert not torch.allclose(local_only, full)
    print("RANK_OK", r, float(loss), float(full))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", ["3,3", "4,2"])
def test_two_process_loss_and_gradients_equal_one_process(tmp_path, sizes):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), sizes]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("RANK_OK") == 2
