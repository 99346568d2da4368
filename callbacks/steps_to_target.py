"""StepsToTarget: record the first step at which a monitored validation metric reaches a target."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.trainer.states import TrainerFn


def logging_step(trainer: L.Trainer) -> int:
    """The step Lightning attaches to metrics logged now (what TensorBoard shows on its x axis).

    Validation at the end of an epoch runs before the epoch loop counts the epoch's last batch, so
    its metrics are logged at ``global_step - 1``; using the same number keeps this callback, the
    logged curves and ``theseus compare`` in agreement.
    """
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(epoch_loop, "_batches_that_stepped", trainer.global_step))


class StepsToTarget(Callback):
    """Logs ``steps_to_target/<monitor>`` once, at the first validation where ``monitor`` reaches ``target``.

    ``reached_at`` is the logging step of that validation (the x value of the metric's point in the
    logs); ``optimizer_steps`` is how many optimizer steps had been taken by then.
    """

    def __init__(self, monitor: str = "val/acc", target: float = 0.9, mode: str = "max") -> None:
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.target, self.mode = monitor, target, mode
        self.reached_at: int | None = None
        self.optimizer_steps: int | None = None
        # the best value seen, so a fit that ends short of the target says how far it got
        self.best: float | None = None

    def _reached(self, value: float) -> bool:
        return value >= self.target if self.mode == "max" else value <= self.target

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Say whether the target was reached: a run that ends short of it logs no steps_to_target point at all."""
        if self.reached_at is not None:
            rank_zero_info(f"StepsToTarget: {self.monitor} reached {self.target} at step {self.reached_at}")
        elif self.best is not None:
            rank_zero_info(f"StepsToTarget: {self.monitor} did not reach {self.target} in {trainer.global_step} steps "
                           f"(best {self.best:.4g}); lower `target` to time this run")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check the monitored metric after each validation run of a fit."""
        if self.reached_at is not None or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self.observe(trainer, trainer.callback_metrics, logging_step(trainer))

    def observe(self, trainer: L.Trainer, metrics: Mapping[str, Any], step: int) -> None:
        """Record ``step`` if ``metrics`` (a validation's results) reach the target first (ValidateAtStart's step 0, too)."""
        if metrics.get(self.monitor) is None:
            return
        value = float(metrics[self.monitor])
        if self.best is None or self._better(value, self.best):
            self.best = value
        if self.reached_at is None and self._reached(value):
            self.reached_at, self.optimizer_steps = step, trainer.global_step
            for logger in trainer.loggers:
                logger.log_metrics({f"steps_to_target/{self.monitor}": float(step)}, step=step)

    def state_dict(self) -> dict[str, Any]:
        """The step at which the target was reached (None if not yet)."""
        return {
            "reached_at": self.reached_at,
            "optimizer_steps": self.optimizer_steps,
            "monitor": self.monitor,
            "target": self.target,
            "best": self.best,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the recorded step on resume."""
        self.reached_at = state_dict.get("reached_at")
        self.optimizer_steps = state_dict.get("optimizer_steps")
        self.best = state_dict.get("best")
