"""ValidateAtStart: log validation loss and accuracy at step 0, after any warm start was applied."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback


class ValidateAtStart(Callback):
    """Logs `val/loss` and `val/acc` at step 0 so convergence curves start where training starts.

    Lightning's sanity check does not log, and a warm start's value is its starting point.
    """

    def __init__(self, loss_tag: str = "val/loss", accuracy_tag: str = "val/acc") -> None:
        super().__init__()
        self.loss_tag, self.accuracy_tag = loss_tag, accuracy_tag

    @torch.no_grad()
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate the datamodule's validation split once before the first step."""
        if trainer.global_step != 0 or trainer.datamodule is None:
            return  # resumed runs already have their curve
        was_training = pl_module.training
        pl_module.eval()
        total_loss, correct, count = 0.0, 0, 0
        for images, labels in trainer.datamodule.val_dataloader():
            images, labels = images.to(pl_module.device), labels.to(pl_module.device)
            logits = pl_module(images)
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            count += len(labels)
        pl_module.train(was_training)
        if count and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({self.loss_tag: total_loss / count, self.accuracy_tag: correct / count}, step=0)
