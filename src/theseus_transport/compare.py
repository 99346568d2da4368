"""Read TensorBoard logs of several runs and draw their convergence curves in one figure."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .transport.errors import OutputPathError, RunLogError
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
    """Return every scalar series of a run as tag -> [(step, value)], over its event folders."""
    per_folder = [(folder, _read_folder(folder)) for folder in find_event_dirs(run)]
    per_folder = [(folder, series) for folder, series in per_folder if series]
    first_steps = [min(step for points in series.values() for step, _ in points) for _, series in per_folder]
    order = sorted(range(len(per_folder)), key=lambda index: first_steps[index])
    starts = [first_steps[index] for index in order]
    if len(set(starts)) < len(starts):
        # folders that start at the same step are separate runs (e.g. Lightning's version_0 and version_1
        # of one config run twice), not one run resumed: merging would mix their curves silently
        names = [str(folder.relative_to(run)) for folder, _ in per_folder]
        raise RunLogError(f"run directory {run} holds {len(names)} runs that start at the same step, in {names}; "
                          f"pass the one you mean, e.g. {Path(run) / names[-1]}")
    # a resumed run continues in a new folder from a later step: read in order, the later value wins
    series: dict[str, dict[int, float]] = {}
    for index in order:
        for tag, points in per_folder[index][1].items():
            series.setdefault(tag, {}).update(points)
    return {tag: sorted(points.items()) for tag, points in series.items()}


def _read_folder(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalar series of one event folder (several event files in it are read in order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    series: dict[str, dict[int, float]] = {}
    for tag in accumulator.Tags().get("scalars", []):
        for event in accumulator.Scalars(tag):
            series.setdefault(tag, {})[event.step] = event.value
    return {tag: sorted(points.items()) for tag, points in series.items()}


def plot_path(out: str | os.PathLike) -> Path:
    """Return the file matplotlib will write for `out`: no suffix gets ".png"; other suffixes must be writable."""
    from matplotlib.backend_bases import FigureCanvasBase

    if Path(out).is_dir():
        raise OutputPathError(f"{out} is a directory; name the image file, e.g. {Path(out) / 'compare.png'}")
    # the same split as matplotlib's savefig, so the path checked is the path written
    suffix = os.path.splitext(os.fspath(out))[1][1:]
    if not suffix:
        path = Path(os.fspath(out).rstrip(".") + ".png")
    elif suffix.lower() in FigureCanvasBase.get_supported_filetypes():
        path = Path(out)
    else:
        raise OutputPathError(f"cannot write a plot as .{suffix} ({out}); use one of "
                              f"{sorted(FigureCanvasBase.get_supported_filetypes())}, e.g. .png")
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory; name the image file, e.g. {path / 'compare.png'}")
    return path


def default_mode(monitor: str) -> str:
    """Return "min" for a monitored tag that names a loss, else "max"."""
    return "min" if "loss" in monitor else "max"


def unique_labels(runs: Sequence[str | os.PathLike]) -> list[str]:
    """Label each run by the shortest trailing part of its path that no other run's path ends with."""
    parts = [Path(run).parts for run in runs]
    labels = []
    for index, mine in enumerate(parts):
        others = [theirs for other, theirs in enumerate(parts) if other != index]
        length = next((length for length in range(1, len(mine) + 1)
                       if all(theirs[-length:] != mine[-length:] for theirs in others)), None)
        # paths equal part by part (e.g. "a" and "a/") have no telling suffix: their full text still differs
        labels.append(str(runs[index]) if length is None else str(Path(*mine[-length:])))
    return labels


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
    mode: str | None = None,
) -> dict[str, Any]:
    """Plot loss and `monitor` against steps for each run; return steps-to-target per run.

    `mode` is "max" (reach a value at least `target`) or "min" (at most `target`); None means "min" when
    `monitor` contains "loss", else "max". Without `target`: 0.9 x the highest final value for "max",
    1.1 x the lowest final value for "min".
    """
    mode = _check_mode(mode, monitor)
    out = plot_path(out)
    check_writable(out, overwrite=overwrite)
    scalars = {str(run): read_scalars(run) for run in runs}
    for run, series in scalars.items():
        if monitor not in series:
            raise RunLogError(f"run {run} logged no {monitor!r}; it has {sorted(series)}")
    labels = list(labels) if labels is not None else unique_labels(list(scalars))
    curves = {run: (label, series) for label, (run, series) in zip(labels, scalars.items())}
    return _plot(curves, out, monitor, target, loss_tag, mode)


def compare_groups(
    groups: Mapping[str, Sequence[str | os.PathLike]],
    out: str | os.PathLike,
    monitor: str = "val/acc",
    target: float | None = None,
    loss_tag: str = "train/loss",
    overwrite: bool = False,
    target_from: str | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """Plot each group's curves averaged over its runs (e.g. over tasks); return steps-to-target per group.

    `target_from` names a group whose mean curve's final value is the target (a baseline's end point).
    `mode` and the default target are as in `compare_runs`.
    """
    mode = _check_mode(mode, monitor)
    if target_from is not None and (target is not None or target_from not in groups):
        raise RunLogError(f"target_from must name one of the groups {list(groups)} and replaces target; "
                          f"got target_from={target_from!r}, target={target!r}")
    out = plot_path(out)
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
    summary = _plot(curves, out, monitor, target, loss_tag, mode)
    for label, runs in groups.items():
        summary["runs"][label]["members"] = [str(run) for run in runs]
    return summary


def _check_mode(mode: str | None, monitor: str) -> str:
    """Return `mode`, or the default for `monitor` when None; refuse anything but "max" and "min"."""
    if mode is None:
        return default_mode(monitor)
    if mode not in ("max", "min"):
        raise RunLogError(f"mode must be 'max' or 'min', got {mode!r}")
    return mode


def _plot(curves: Mapping[str, tuple[str, dict[str, list[tuple[int, float]]]]], out: str | os.PathLike,
          monitor: str, target: float | None, loss_tag: str, mode: str = "max") -> dict[str, Any]:
    """Draw loss and `monitor` for each (label, series) and return the steps-to-target summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if target is None:
        finals = [series[monitor][-1][1] for _, series in curves.values()]
        target = 0.9 * max(finals) if mode == "max" else 1.1 * min(finals)
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    summary: dict[str, Any] = {"monitor": monitor, "mode": mode, "target": target, "runs": {}}
    for key, (label, series) in curves.items():
        reached = steps_to_target(series[monitor], target, mode)
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
