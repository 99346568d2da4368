"""Read TensorBoard logs of several runs and draw their convergence curves in one figure."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .transport.errors import RunLogError
from .transport.io import check_writable


def find_event_dirs(run: str | os.PathLike) -> list[Path]:
    """Return the folders under `run` that hold TensorBoard event files."""
    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"run directory {run} does not exist")
    folders = sorted({path.parent for path in run.rglob("events.out.tfevents.*")})
    if not folders:
        raise FileNotFoundError(f"no TensorBoard event files under {run}")
    return folders


def read_scalars(run: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Return every scalar series of a run as tag -> [(step, value)], merged over its event folders."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for folder in find_event_dirs(run):
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            for event in accumulator.Scalars(tag):
                series.setdefault(tag, {})[event.step] = event.value  # a resumed run's later value wins
    return {tag: sorted(points.items()) for tag, points in series.items()}


def steps_to_target(points: Sequence[tuple[int, float]], target: float, mode: str = "max") -> int | None:
    """Return the first step whose value reaches `target` (>= for max, <= for min), or None."""
    for step, value in points:
        if (value >= target) if mode == "max" else (value <= target):
            return step
    return None


def mean_series(runs: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Return the step-by-step mean of several runs' series of one tag; they must share their steps."""
    if not runs:
        raise RunLogError("no series to average")
    steps = [step for step, _ in runs[0]]
    for points in runs[1:]:
        if [step for step, _ in points] != steps:
            # averaging curves logged at different steps would mix points that mean different things
            raise RunLogError(f"runs logged at different steps ({steps[:5]}... vs {[s for s, _ in points][:5]}...); "
                             "cannot average them step by step")
    return [(step, sum(points[index][1] for points in runs) / len(runs)) for index, step in enumerate(steps)]


def compare_runs(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    monitor: str = "val/acc",
    target: float | None = None,
    loss_tag: str = "train/loss",
    overwrite: bool = False,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Plot loss and `monitor` against steps for each run; return steps-to-target per run."""
    check_writable(out, overwrite=overwrite)
    scalars = {str(run): read_scalars(run) for run in runs}
    for run, series in scalars.items():
        if monitor not in series:
            raise RunLogError(f"run {run} logged no {monitor!r}; it has {sorted(series)}")
    labels = list(labels) if labels is not None else [Path(run).name for run in scalars]
    curves = {run: (label, series) for label, (run, series) in zip(labels, scalars.items())}
    return _plot(curves, out, monitor, target, loss_tag)


def compare_groups(
    groups: Mapping[str, Sequence[str | os.PathLike]],
    out: str | os.PathLike,
    monitor: str = "val/acc",
    target: float | None = None,
    loss_tag: str = "train/loss",
    overwrite: bool = False,
    target_from: str | None = None,
) -> dict[str, Any]:
    """Plot each group's curves averaged over its runs (e.g. over tasks); return steps-to-target per group.

    `target_from` names a group whose mean curve's final value is the target (a baseline's end point).
    """
    if target_from is not None and (target is not None or target_from not in groups):
        raise RunLogError(f"target_from must name one of the groups {list(groups)} and replaces target; "
                          f"got target_from={target_from!r}, target={target!r}")
    check_writable(out, overwrite=overwrite)
    curves = {}
    for label, runs in groups.items():
        if not runs:
            raise RunLogError(f"group {label!r} has no runs")
        scalars = [read_scalars(run) for run in runs]
        for run, series in zip(runs, scalars):
            if monitor not in series:
                raise RunLogError(f"run {run} of group {label!r} logged no {monitor!r}; it has {sorted(series)}")
        # a tag is averaged only where every run of the group logged it
        shared = set.intersection(*(set(series) for series in scalars))
        curves[label] = (label, {tag: mean_series([series[tag] for series in scalars]) for tag in sorted(shared)})
    if target_from is not None:
        target = curves[target_from][1][monitor][-1][1]
    summary = _plot(curves, out, monitor, target, loss_tag)
    for label, runs in groups.items():
        summary["runs"][label]["members"] = [str(run) for run in runs]
    return summary


def _plot(curves: Mapping[str, tuple[str, dict[str, list[tuple[int, float]]]]], out: str | os.PathLike,
          monitor: str, target: float | None, loss_tag: str) -> dict[str, Any]:
    """Draw loss and `monitor` for each (label, series) and return the steps-to-target summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if target is None:
        target = 0.9 * max(series[monitor][-1][1] for _, series in curves.values())
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    summary: dict[str, Any] = {"monitor": monitor, "target": target, "runs": {}}
    for key, (label, series) in curves.items():
        reached = steps_to_target(series[monitor], target)
        summary["runs"][key] = {"label": label, "steps_to_target": reached, "first": series[monitor][0][1],
                                "final": series[monitor][-1][1]}
        if loss_tag in series:
            steps, values = zip(*series[loss_tag])
            loss_axis.plot(steps, values, label=label, linewidth=1)
        steps, values = zip(*series[monitor])
        metric_axis.plot(steps, values, marker="o", markersize=3, label=f"{label} (target at {reached if reached is not None else 'never'})")
    metric_axis.axhline(target, color="grey", linestyle="--", linewidth=0.8)
    loss_axis.set(xlabel="step", ylabel=loss_tag, title="training loss")
    metric_axis.set(xlabel="step", ylabel=monitor, title=f"{monitor} (target {target:.3f})")
    figure.tight_layout()
    # one legend under both panels: run labels can be long, and both panels share the colours
    figure.legend(*metric_axis.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return summary
