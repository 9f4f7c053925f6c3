"""CLIP's symmetric contrastive (InfoNCE) loss over the global batch.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", Figure 3: the
cross-entropy of image->text and text->image similarity logits against the diagonal, averaged. Under
``torch.distributed`` it matches open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``
(mlfoundations/open_clip ``src/open_clip/loss.py`` @89fb801): each rank scores its local rows against the
gathered columns of every rank, with labels offset by the number of rows on earlier ranks. With equal local batch
sizes, the mean of the per-rank losses equals the loss of one process on the global batch, and DDP's gradient
averaging plus the gradient-carrying gather give the global-batch gradients.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .hf_vl_distributed import all_gather_with_grad, gather_batch_sizes, is_distributed, rank


def _check_embeds(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
    for name, value in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.ndim != 2:
            raise ValueError(f"{name} must have shape (batch, dim), got {tuple(value.shape)}")
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} must have the "
            "same (batch, dim): row i of each is a matching pair"
        )
    if image_embeds.shape[0] == 0:
        raise ValueError("image_embeds and text_embeds are empty; the contrastive loss needs at least one pair")


def clip_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    gather_distributed: bool = True,
) -> torch.Tensor:
    """Symmetric image-text cross-entropy; pair i is (image_embeds[i], text_embeds[i]).

    Args:
        image_embeds: (batch, dim) L2-normalised image embeddings of this process.
        text_embeds: (batch, dim) L2-normalised text embeddings of this process.
        logit_scale: the temperature multiplier, already exponentiated and clamped (CLIP: ``exp(s).clamp(max=100)``).
        gather_distributed: when a process group is initialised, contrast against the embeddings of all ranks
            (the paper's large global batch); ignored in a single process.

    Returns:
        Scalar loss: the mean over this rank's rows of (CE(image->text) + CE(text->image)) / 2.
    """
    _check_embeds(image_embeds, text_embeds)
    local_batch = image_embeds.shape[0]
    if gather_distributed and is_distributed():
        sizes = gather_batch_sizes(local_batch, image_embeds.device)
        all_image_embeds = all_gather_with_grad(image_embeds, sizes)  # (global_batch, dim)
        all_text_embeds = all_gather_with_grad(text_embeds, sizes)
        offset = sum(sizes[: rank()])
    else:
        all_image_embeds, all_text_embeds, offset = image_embeds, text_embeds, 0
    logits_per_image = logit_scale * image_embeds @ all_text_embeds.t()  # (local_batch, global_batch)
    logits_per_text = logit_scale * text_embeds @ all_image_embeds.t()
    labels = torch.arange(local_batch, device=image_embeds.device) + offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


__all__ = ["clip_contrastive_loss"]
