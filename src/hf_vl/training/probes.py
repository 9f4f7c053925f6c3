"""Small Trainer hooks that expose what one optimisation step did: the losses and the (synchronised) gradients.

They exist for equivalence checks (1 vs 2 processes, gradient accumulation 1 vs 2) and change nothing in training.
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback


class GradientCaptureCallback(TrainerCallback):
    """Copies every parameter's ``.grad`` right before each optimizer step.

    At that point DDP has averaged the gradients over processes and Trainer has accumulated its micro-batches, so
    ``gradients[step]`` is exactly what the optimizer applies (after clipping, if ``max_grad_norm > 0``).
    """

    def __init__(self):
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("GradientCaptureCallback needs the model; Trainer passes it to callbacks")
        self.gradients.append(
            {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        )


class LossRecordingTrainer(Trainer):
    """A ``Trainer`` that keeps the unscaled loss of every training micro-batch on this process (``losses``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = result[0] if return_outputs else result
        if model.training:
            self.losses.append(float(loss.detach()))
        return result


__all__ = ["GradientCaptureCallback", "LossRecordingTrainer"]
