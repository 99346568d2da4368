"""Streaming float64 cross-statistics between paired source and target activations.

Dtype policy: every statistic is accumulated in float64 on the activations' device (CPU when the
device has no float64, e.g. MPS), whatever the models' dtype; nothing of a batch is kept after it.
Each batch's products are computed in float64 too, unless `batch_products="float32"` is chosen for
speed (the products are then rounded once per batch, and summed across batches in float64).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from .errors import CalibrationError

ReduceFn = Callable[[torch.Tensor], torch.Tensor]


BATCH_PRODUCT_DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}


def accumulation_device(device: torch.device) -> torch.device:
    """Return the device on which float64 statistics for activations on `device` are kept."""
    return torch.device("cpu") if device.type == "mps" else device


@dataclass
class CrossStatistics:
    """Token count, column sums and cross products of one paired capture point (source A, target B)."""

    source_dim: int
    target_dim: int
    with_grams: bool = False
    count: int = 0
    source_sum: torch.Tensor | None = None
    target_sum: torch.Tensor | None = None
    cross: torch.Tensor | None = None  # X_A^T X_B, uncentered
    source_gram: torch.Tensor | None = None  # X_A^T X_A, only for least-squares baselines
    target_gram: torch.Tensor | None = None  # X_B^T X_B
    # dtype of each batch's products before they join the float64 totals: "float64" (exact, default)
    # or "float32" (about 2x faster on CPUs and far faster on GPUs, whose FP64 rate is a fraction of FP32;
    # rounding ~1e-7 relative per batch, never accumulated across batches)
    batch_products: str = "float64"

    def _allocate(self, device: torch.device) -> None:
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.source_sum = zeros(self.source_dim)
        self.target_sum = zeros(self.target_dim)
        self.cross = zeros(self.source_dim, self.target_dim)
        if self.with_grams:
            self.source_gram = zeros(self.source_dim, self.source_dim)
            self.target_gram = zeros(self.target_dim, self.target_dim)

    def update(self, source_rows: torch.Tensor, target_rows: torch.Tensor) -> None:
        """Add one batch of paired rows (N x d_A and N x d_B) to the statistics."""
        if source_rows.ndim != 2 or target_rows.ndim != 2 or source_rows.shape[0] != target_rows.shape[0]:
            raise CalibrationError(
                f"paired activations must be N x d matrices with equal N, got {tuple(source_rows.shape)} "
                f"and {tuple(target_rows.shape)}"
            )
        if source_rows.shape[1] != self.source_dim or target_rows.shape[1] != self.target_dim:
            raise CalibrationError(
                f"activation widths {source_rows.shape[1]}, {target_rows.shape[1]} do not match "
                f"the capture point's {self.source_dim}, {self.target_dim}"
            )
        device = accumulation_device(source_rows.device)
        if self.cross is None:
            self._allocate(device)
        product_dtype = BATCH_PRODUCT_DTYPES[self.batch_products]
        source_rows = source_rows.detach().to(device=self.cross.device, dtype=product_dtype)
        target_rows = target_rows.detach().to(device=self.cross.device, dtype=product_dtype)
        source_batch_sum = source_rows.sum(0, dtype=torch.float64)
        target_batch_sum = target_rows.sum(0, dtype=torch.float64)
        # a NaN or Inf anywhere in a column makes that column's sum non-finite, so checking the sums is
        # as strict as checking every element, at a fraction of the cost
        if not (torch.isfinite(source_batch_sum).all() and torch.isfinite(target_batch_sum).all()):
            raise CalibrationError("calibration activations contain NaN or Inf")
        self.count += source_rows.shape[0]
        self.source_sum += source_batch_sum
        self.target_sum += target_batch_sum
        if product_dtype == torch.float64:
            self.cross.addmm_(source_rows.T, target_rows)
            if self.with_grams:
                self.source_gram.addmm_(source_rows.T, source_rows)
                self.target_gram.addmm_(target_rows.T, target_rows)
        else:
            self.cross += (source_rows.T @ target_rows).to(torch.float64)
            if self.with_grams:
                self.source_gram += (source_rows.T @ source_rows).to(torch.float64)
                self.target_gram += (target_rows.T @ target_rows).to(torch.float64)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return the accumulated tensors by name (for reduction across processes or saving)."""
        self._require()
        out = {"count": torch.tensor([float(self.count)], dtype=torch.float64, device=self.cross.device)}
        for name in ("source_sum", "target_sum", "cross", "source_gram", "target_gram"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def reduce(self, reduce_fn: ReduceFn) -> None:
        """Sum the statistics across processes with `reduce_fn` (e.g. a DDP all-reduce of a sum)."""
        for name, value in self.tensors().items():
            reduced = reduce_fn(value)
            if name == "count":
                self.count = int(round(float(reduced.reshape(-1)[0])))
            else:
                setattr(self, name, reduced)

    def _require(self) -> None:
        if self.cross is None or self.count == 0:
            raise CalibrationError("no calibration tokens reached this capture point (empty calibration set?)")

    def cross_covariance(self, center: bool = False) -> torch.Tensor:
        """Return X_A^T X_B, or the centered C = X_A^T X_B - n mu_A mu_B^T when `center`."""
        self._require()
        if not center:
            return self.cross
        return self.cross - torch.outer(self.source_sum, self.target_sum) / self.count

    def gram(self, side: str, center: bool = False) -> torch.Tensor:
        """Return the (optionally centered) Gram matrix of the source ('source') or target side."""
        self._require()
        gram = self.source_gram if side == "source" else self.target_gram
        if gram is None:
            raise CalibrationError("Gram matrices were not collected; the chosen method needs with_grams=True")
        if not center:
            return gram
        total = self.source_sum if side == "source" else self.target_sum
        return gram - torch.outer(total, total) / self.count

    def to(self, device: torch.device | str) -> "CrossStatistics":
        """Move the accumulated tensors to `device` in place and return self."""
        for name in ("source_sum", "target_sum", "cross", "source_gram", "target_gram"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def nbytes(self) -> int:
        """Return the memory the statistics take (or will take) in bytes."""
        numbers = self.source_dim + self.target_dim + self.source_dim * self.target_dim
        if self.with_grams:
            numbers += self.source_dim**2 + self.target_dim**2
        return 8 * numbers


def _linear_sum(weight: torch.Tensor, bias: torch.Tensor | None, column_sum: torch.Tensor, count: int) -> torch.Tensor:
    # column sums of Y = X W^T + b: W s + n b
    total = weight @ column_sum
    return total if bias is None else total + count * bias


def _linear_product(
    left_weight: torch.Tensor, left_bias: torch.Tensor | None, left_sum: torch.Tensor,
    product: torch.Tensor, right_weight: torch.Tensor, right_bias: torch.Tensor | None, right_sum: torch.Tensor, count: int,
) -> torch.Tensor:
    # Y_L^T Y_R = W_L P W_R^T + (W_L s_L) b_R^T + b_L (W_R s_R)^T + n b_L b_R^T, for P = X_L^T X_R
    out = left_weight @ product @ right_weight.T
    if right_bias is not None:
        out += torch.outer(left_weight @ left_sum, right_bias)
    if left_bias is not None:
        out += torch.outer(left_bias, right_weight @ right_sum)
    if left_bias is not None and right_bias is not None:
        out += count * torch.outer(left_bias, right_bias)
    return out


def derive_linear_output(
    statistics: CrossStatistics,
    source_weight: torch.Tensor,
    source_bias: torch.Tensor | None,
    target_weight: torch.Tensor,
    target_bias: torch.Tensor | None,
) -> CrossStatistics:
    """Return the statistics of Y = X W^T + b on both sides from those of the paired inputs X (exact, float64).

    Valid whenever the paired output rows are the linear layers applied to the paired input rows,
    which holds after any token alignment that mixes tokens with weights summing to 1 ('mean',
    1-D / 2-D interpolation) or selects rows (padding masks): the bias then passes through unchanged.
    Weights are `out x in` (nn.Linear convention); a missing bias is zero.
    """
    statistics._require()
    device = statistics.cross.device
    weight_a, bias_a, weight_b, bias_b = (
        None if tensor is None else tensor.detach().to(device=device, dtype=torch.float64)
        for tensor in (source_weight, source_bias, target_weight, target_bias)
    )
    if weight_a.shape[1] != statistics.source_dim or weight_b.shape[1] != statistics.target_dim:
        raise CalibrationError(
            f"linear layers take inputs of width {weight_a.shape[1]} and {weight_b.shape[1]}, the input statistics "
            f"have {statistics.source_dim} and {statistics.target_dim}"
        )
    n = statistics.count
    sum_a, sum_b = statistics.source_sum, statistics.target_sum
    derived = CrossStatistics(weight_a.shape[0], weight_b.shape[0], with_grams=statistics.with_grams,
                              batch_products=statistics.batch_products)
    derived.count = n
    derived.source_sum = _linear_sum(weight_a, bias_a, sum_a, n)
    derived.target_sum = _linear_sum(weight_b, bias_b, sum_b, n)
    derived.cross = _linear_product(weight_a, bias_a, sum_a, statistics.cross, weight_b, bias_b, sum_b, n)
    if statistics.with_grams:
        derived.source_gram = _linear_product(weight_a, bias_a, sum_a, statistics.gram("source"), weight_a, bias_a, sum_a, n)
        derived.target_gram = _linear_product(weight_b, bias_b, sum_b, statistics.gram("target"), weight_b, bias_b, sum_b, n)
    return derived


@dataclass
class StatisticsSet(Mapping[str, CrossStatistics]):
    """Cross-statistics of every capture point, keyed by the point's name."""

    points: dict[str, CrossStatistics] = field(default_factory=dict)

    def __getitem__(self, name: str) -> CrossStatistics:
        return self.points[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.points)

    def __len__(self) -> int:
        return len(self.points)

    def reduce(self, reduce_fn: ReduceFn) -> None:
        """Sum every capture point's statistics across processes, in a fixed (sorted) order."""
        for name in sorted(self.points):
            self.points[name].reduce(reduce_fn)

    def to(self, device: torch.device | str) -> "StatisticsSet":
        """Move every capture point's statistics to `device` and return self."""
        for stats in self.points.values():
            stats.to(device)
        return self
