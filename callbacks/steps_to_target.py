"""StepsToTarget: record the first optimizer step at which a monitored metric reaches a target."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class StepsToTarget(Callback):
    """Logs `steps_to_target/<metric>` once, at the first validation where `monitor` reaches `target`."""

    def __init__(self, monitor: str = "val/acc", target: float = 0.9, mode: str = "max") -> None:
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.target, self.mode = monitor, target, mode
        self.reached_at: int | None = None

    def _reached(self, value: float) -> bool:
        return value >= self.target if self.mode == "max" else value <= self.target

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check the monitored metric after each validation run."""
        if self.reached_at is not None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and self._reached(float(value)):
            self.reached_at = trainer.global_step
            for logger in trainer.loggers:
                logger.log_metrics({f"steps_to_target/{self.monitor}": float(self.reached_at)}, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        """The step at which the target was reached (None if not yet)."""
        return {"reached_at": self.reached_at, "monitor": self.monitor, "target": self.target}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the recorded step on resume."""
        self.reached_at = state_dict.get("reached_at")
