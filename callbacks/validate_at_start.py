"""ValidateAtStart: log validation loss and accuracy at step 0, after any warm start was applied."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from .steps_to_target import StepsToTarget


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
        if trainer.limit_val_batches == 0:
            return  # validation is off: no curve to start (the same on every rank, so no rank waits below)
        was_training = pl_module.training
        pl_module.eval()
        loader = trainer.datamodule.val_dataloader()
        # the same batches and the same loss as the validation loop, so step 0 sits on the curve (the
        # batch limit applies per rank, as the loop's does)
        batches = _batch_limit(trainer.limit_val_batches, len(loader))
        total_loss, correct, count = 0.0, 0, 0
        precision = trainer.precision_plugin
        for index, batch in enumerate(loader):  # fetched outside the precision context, as the loop does
            if index >= batches:
                break
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            # the validation loop's precision: autocast for "-mixed", inputs cast for a "-true" (half) model
            with precision.val_step_context():
                loss, right = _evaluate(pl_module, precision.convert_input(batch))
            total_loss += float(loss) * len(right)
            correct += int(right.sum())
            count += len(right)
        pl_module.train(was_training)
        if trainer.world_size > 1:
            # under DDP the suite's datamodules give each rank its own unpadded share of the split
            # (TaskDataModule.evaluation_sampler), so the figures are sums over ranks. Every rank reaches this
            # one collective whatever its batch count; a loader that is not sharded is counted world_size
            # times, which leaves the ratios unchanged.
            totals = torch.tensor([total_loss, correct, count], dtype=torch.float64, device=pl_module.device)
            total_loss, correct, count = trainer.strategy.reduce(totals, reduce_op="sum").tolist()
        if not count:
            return
        metrics = {self.loss_tag: total_loss / count, self.accuracy_tag: correct / count}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=0)
        # a start that is already at the target counts as reached at step 0, as `theseus compare` reads it
        for callback in trainer.callbacks:
            if isinstance(callback, StepsToTarget):
                callback.observe(trainer, metrics, step=0)


def _batch_limit(limit: int | float | None, available: int) -> int:
    """How many validation batches Lightning's limit_val_batches lets through."""
    if limit is None:
        return available
    if isinstance(limit, float):
        return available if limit >= 1.0 else int(available * limit)
    return min(int(limit), available)


def _evaluate(pl_module: L.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-example correctness): the suite's modules say how; others get (inputs, labels) batches."""
    if hasattr(pl_module, "evaluate_batch"):
        return pl_module.evaluate_batch(batch)
    inputs, labels = batch
    logits = pl_module(inputs)
    return F.cross_entropy(logits, labels), logits.argmax(-1) == labels
