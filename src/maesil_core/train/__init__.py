"""Training: one loop for pretraining and fine-tuning, DDP under torchrun."""

from .loop import FitResult, fit, lr_at, pretrain_loss

__all__ = ["FitResult", "fit", "lr_at", "pretrain_loss"]
