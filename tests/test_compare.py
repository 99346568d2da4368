"""Tests of `theseus compare`: TensorBoard runs in, one PNG with a curve per run and steps-to-target out."""

from __future__ import annotations

import os

# before datasets / huggingface_hub are imported: every hub call must fail fast
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from theseus_transport.callbacks import StepsToTarget, TheseusCallback
from theseus_transport.cli import main
from theseus_transport.compare import (compare_groups, compare_runs, mean_series, read_scalars, steps_to_target,
                                        unique_labels)
from theseus_transport.modules import TextClassifier
from theseus_transport.transport.errors import OutputExistsError, OutputPathError, RunLogError
from tiny_tasks import T5_SOURCE, T5_TARGET, t5_task_vector, text_data

TARGET = 0.75
MONITOR = "val/acc"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short logged fits of the same task: a Theseus warm start and a baseline."""
    root = tmp_path_factory.mktemp("runs")
    vector_path = t5_task_vector(root)
    folders, reached = [], []
    for name in ("warmstart", "baseline"):
        L.seed_everything(0)
        module = TextClassifier(T5_TARGET, num_classes=2, lr=3e-3, weight_decay=0.0, warmup_steps=0)
        steps = StepsToTarget(monitor=MONITOR, target=TARGET)
        callbacks = [steps] + ([TheseusCallback(vector_path, source_model=T5_SOURCE)] if name == "warmstart" else [])
        logger = TensorBoardLogger(save_dir=str(root), name=name, version=0)
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=6,
            logger=logger,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=callbacks,
        )
        trainer.fit(module, datamodule=text_data())
        folders.append(str(root / name))
        reached.append(steps.reached_at)
    return folders, reached


def _first_reaching(points: list[tuple[int, float]]) -> int | None:
    return next((step for step, value in points if value >= TARGET), None)


def test_compare_writes_one_curve_per_run_and_matches_the_logged_steps(runs, tmp_path, monkeypatch):
    folders, reached = runs
    out = tmp_path / "compare.png"
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect what was drawn
    summary = compare_runs(folders, out, monitor=MONITOR, target=TARGET)

    assert summary["target"] == TARGET and len(summary["runs"]) == 2
    assert any(step is not None for step in reached)  # the task is easy enough for the target to mean something
    for folder, callback_step in zip(folders, reached):
        scalars = read_scalars(folder)
        assert len(scalars[MONITOR]) == 6 and "train/loss" in scalars
        expected = _first_reaching(scalars[MONITOR])
        assert summary["runs"][folder]["steps_to_target"] == expected == callback_step
        logged = scalars.get(f"steps_to_target/{MONITOR}")
        assert (logged is None) if expected is None else (logged == [(expected, float(expected))])
    warm = read_scalars(folders[0])
    assert "theseus/norm_ratio_mean" in warm  # the callback logs its report to TensorBoard too

    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 300
    (figure,) = figures
    loss_axis, metric_axis = figure.axes
    curves = [line for line in metric_axis.get_lines() if not line.get_label().startswith("_")]
    assert len(curves) == 2 and len(loss_axis.get_lines()) == 2
    for curve, folder in zip(curves, folders):
        steps, values = zip(*read_scalars(folder)[MONITOR])
        assert list(curve.get_xdata()) == list(steps) and np.allclose(curve.get_ydata(), values)
        assert curve.get_label().startswith(summary["runs"][folder]["label"])
    close(figure)


def test_compare_cli_prints_the_same_summary_and_refuses_to_overwrite(runs, tmp_path, capsys):
    folders, _ = runs
    out = tmp_path / "cli.png"
    assert main(["compare", *folders, "--out", str(out), "--target", str(TARGET)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(compare_runs(folders, tmp_path / "api.png", monitor=MONITOR, target=TARGET)))
    assert out.stat().st_size > 0
    assert main(["compare", *folders, "--out", str(out)]) == 1  # exists, no --overwrite
    assert "OutputExistsError" in capsys.readouterr().err
    with pytest.raises(OutputExistsError):
        compare_runs(folders, out)


def test_steps_to_target_helper_and_missing_runs(tmp_path):
    points = [(4, 0.5), (8, 0.75), (12, 0.7), (16, 0.9)]
    assert steps_to_target(points, 0.75) == 8 and steps_to_target(points, 0.95) is None
    assert steps_to_target([(4, 1.2), (8, 0.4)], 0.5, mode="min") == 8
    assert main(["compare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")]) == 1


def test_compare_groups_averages_runs_step_by_step(runs, tmp_path, monkeypatch):
    folders, _ = runs
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    # one group holds both runs, the other only the baseline: its curve must be the baseline's own
    summary = compare_groups({"both": folders, "baseline": folders[1:]}, tmp_path / "groups.png", target=TARGET)
    series = [read_scalars(folder)[MONITOR] for folder in folders]
    expected = [(step, (a + b) / 2) for (step, a), (_, b) in zip(*series)]
    assert summary["runs"]["both"]["members"] == folders
    assert summary["runs"]["both"]["final"] == pytest.approx(expected[-1][1])
    assert summary["runs"]["both"]["steps_to_target"] == _first_reaching(expected)
    assert summary["runs"]["baseline"]["final"] == pytest.approx(series[1][-1][1])
    (figure,) = figures
    both = figure.axes[1].get_lines()[0]
    assert np.allclose(both.get_ydata(), [value for _, value in expected])
    close(figure)


def test_compare_groups_takes_the_target_from_a_group(runs, tmp_path):
    folders, _ = runs
    summary = compare_groups({"warm": folders[:1], "base": folders[1:]}, tmp_path / "t.png", target_from="base")
    baseline, warm = (read_scalars(folder)[MONITOR] for folder in (folders[1], folders[0]))
    assert summary["target"] == baseline[-1][1] == summary["runs"]["base"]["final"]
    assert summary["runs"]["warm"]["steps_to_target"] == steps_to_target(warm, baseline[-1][1])
    assert summary["runs"]["warm"]["first"] == warm[0][1]
    for bad in ({"target_from": "nobody"}, {"target_from": "base", "target": 0.5}):
        with pytest.raises(RunLogError, match="target_from"):
            compare_groups({"warm": folders[:1], "base": folders[1:]}, tmp_path / "bad.png", **bad)
    assert not (tmp_path / "bad.png").exists()


def test_mean_series_refuses_runs_logged_at_different_steps():
    averaged = mean_series([[(0, 0.2), (10, 0.4)], [(0, 0.4), (10, 0.8)]])
    assert [step for step, _ in averaged] == [0, 10]
    assert [value for _, value in averaged] == pytest.approx([0.3, 0.6])
    with pytest.raises(RunLogError, match="different steps"):
        mean_series([[(0, 0.2), (10, 0.4)], [(0, 0.4), (20, 0.8)]])
    with pytest.raises(RunLogError, match="no series"):
        mean_series([])


def test_compare_cli_groups(runs, tmp_path, capsys):
    folders, _ = runs
    out = tmp_path / "groups.png"
    assert main(["compare", "--group", "warm", folders[0], "--group", "base", folders[1], "--out", str(out),
                 "--target", str(TARGET)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["runs"]) == {"warm", "base"} and out.stat().st_size > 0
    # a run list and groups together, a group without runs, and a repeated label are refused
    assert main(["compare", folders[0], "--group", "warm", folders[0], "--out", str(tmp_path / "a.png")]) == 2
    assert main(["compare", "--group", "warm", "--out", str(tmp_path / "b.png")]) == 2
    assert main(["compare", "--group", "w", folders[0], "--group", "w", folders[1], "--out", str(tmp_path / "c.png")]) == 2
    assert main(["compare", "--group", "warm", folders[0], "--out", str(tmp_path / "d.png"), "--monitor", "val/nothing"]) == 1
    assert "RunLogError" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("a.png", "b.png", "c.png", "d.png"))


def _write_run(folder, scalars: dict[str, list[tuple[int, float]]]) -> str:
    """Write one TensorBoard event file under `folder` holding these tag -> [(step, value)] series."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    return str(folder)


def _losses(*values: float) -> dict[str, list[tuple[int, float]]]:
    points = [(10 * (index + 1), value) for index, value in enumerate(values)]
    return {"val/loss": points, "train/loss": points, "val/acc": [(step, 1.0 - value) for step, value in points]}


def test_compare_out_resolves_the_real_file_before_reading_logs(tmp_path, monkeypatch, capsys):
    run = _write_run(tmp_path / "runs" / "a", _losses(1.0, 0.5))
    kept = tmp_path / "noext.png"
    kept.write_bytes(b"keep me")
    # no suffix: matplotlib writes noext.png, so that is the file that must not be overwritten
    with pytest.raises(OutputExistsError, match="noext.png"):
        compare_runs([run], tmp_path / "noext")
    assert main(["compare", run, "--out", str(tmp_path / "noext")]) == 1
    assert "OutputExistsError" in capsys.readouterr().err and kept.read_bytes() == b"keep me"
    compare_runs([run], tmp_path / "fresh")
    assert (tmp_path / "fresh.png").stat().st_size > 0 and not (tmp_path / "fresh").exists()

    # a suffix matplotlib cannot write, or a directory, is refused before any log is read
    def no_reading(run):
        raise AssertionError("logs read before the output path was checked")

    monkeypatch.setattr("theseus_transport.compare.read_scalars", no_reading)
    (tmp_path / "plots.png").mkdir()
    for out in (tmp_path / "x.xyz", tmp_path / "plots.png", tmp_path):
        with pytest.raises(OutputPathError):
            compare_runs([run], out, overwrite=True)
        with pytest.raises(OutputPathError):
            compare_groups({"a": [run]}, out, overwrite=True)
    assert main(["compare", run, "--out", str(tmp_path / "x.xyz")]) == 1
    err = capsys.readouterr().err
    assert "OutputPathError" in err and ".xyz" in err and "Traceback" not in err
    assert not (tmp_path / "x.xyz").exists()


def test_compare_a_metric_to_minimise(tmp_path, capsys):
    fast = _write_run(tmp_path / "fast", _losses(1.0, 0.6, 0.4, 0.3))
    slow = _write_run(tmp_path / "slow", _losses(1.0, 0.8, 0.5, 0.45))
    summary = compare_runs([fast, slow], tmp_path / "loss.png", monitor="val/loss")
    # default for a loss: minimise, target 1.1 x the lowest final value
    assert summary["mode"] == "min" and summary["target"] == pytest.approx(1.1 * 0.3)
    assert summary["runs"][fast]["steps_to_target"] == 40 and summary["runs"][slow]["steps_to_target"] is None
    summary = compare_runs([fast, slow], tmp_path / "loss2.png", monitor="val/loss", target=0.5)
    assert [summary["runs"][run]["steps_to_target"] for run in (fast, slow)] == [30, 30]
    # an accuracy keeps the old default: maximise, target 0.9 x the highest final value
    summary = compare_runs([fast, slow], tmp_path / "acc.png", monitor="val/acc")
    assert summary["mode"] == "max" and summary["target"] == pytest.approx(0.9 * 0.7)
    groups = compare_groups({"fast": [fast], "slow": [slow]}, tmp_path / "g.png", monitor="val/loss", target_from="slow")
    assert groups["mode"] == "min" and groups["target"] == pytest.approx(0.45)
    assert groups["runs"]["fast"]["steps_to_target"] == 30 and groups["runs"]["slow"]["steps_to_target"] == 40
    with pytest.raises(RunLogError, match="mode"):
        compare_runs([fast], tmp_path / "bad.png", monitor="val/loss", mode="lowest")

    assert main(["compare", fast, slow, "--out", str(tmp_path / "cli.png"), "--monitor", "val/loss"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mode"] == "min" and printed["runs"][fast]["steps_to_target"] == 40
    assert main(["compare", fast, slow, "--out", str(tmp_path / "cli_max.png"), "--monitor", "val/loss",
                 "--mode", "max", "--target", "0.9"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mode"] == "max" and printed["runs"][fast]["steps_to_target"] == 10
    with pytest.raises(SystemExit):
        main(["compare", fast, "--out", str(tmp_path / "x.png"), "--mode", "lowest"])


def test_read_scalars_refuses_a_folder_holding_several_runs(tmp_path):
    run = tmp_path / "eurosat"
    _write_run(run / "version_2", _losses(0.9, 0.8))
    _write_run(run / "version_10", _losses(0.5, 0.2))
    # the runs are separate: merging them would let version_2 (sorted last as text) replace version_10
    with pytest.raises(RunLogError, match=r"version_10.*version_2.*pass the one you mean"):
        read_scalars(run)
    with pytest.raises(RunLogError, match="version_"):
        compare_runs([str(run)], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
    assert read_scalars(run / "version_10")["val/loss"] == [(10, 0.5), (20, pytest.approx(0.2))]

    # one run resumed: two event files in one folder are read as one series, the later value winning
    resumed = tmp_path / "resumed"
    _write_run(resumed, {"val/loss": [(10, 0.9), (20, 0.8)]})
    _write_run(resumed, {"val/loss": [(20, 0.7), (30, 0.6)]})
    assert len(list(resumed.glob("events.out.tfevents.*"))) == 2
    assert read_scalars(resumed)["val/loss"] == [(10, pytest.approx(0.9)), (20, pytest.approx(0.7)),
                                                 (30, pytest.approx(0.6))]
    # one run resumed into a new Lightning version folder: it starts later, and is read as the continuation
    continued = tmp_path / "continued"
    _write_run(continued / "version_0", {"val/loss": [(10, 0.9), (20, 0.8)]})
    _write_run(continued / "version_1", {"val/loss": [(20, 0.7), (30, 0.6)]})
    assert read_scalars(continued)["val/loss"] == [(10, pytest.approx(0.9)), (20, pytest.approx(0.7)),
                                                   (30, pytest.approx(0.6))]


def test_compare_labels_runs_by_the_shortest_unique_path_suffix(tmp_path, monkeypatch):
    runs = [_write_run(tmp_path / "t1" / "eurosat", _losses(1.0, 0.5)),
            _write_run(tmp_path / "t2" / "eurosat", _losses(1.0, 0.4)),
            _write_run(tmp_path / "t1" / "mnist", _losses(1.0, 0.3))]
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    summary = compare_runs(runs, tmp_path / "labels.png", monitor="val/loss")
    labels = [summary["runs"][run]["label"] for run in runs]
    assert labels == ["t1/eurosat", "t2/eurosat", "mnist"]
    (figure,) = figures
    legend = [line.get_label() for line in figure.axes[1].get_lines() if not line.get_label().startswith("_")]
    assert [text.split(" (target")[0] for text in legend] == labels
    close(figure)
    assert unique_labels(["runs/a", "runs/b"]) == ["a", "b"]
    assert unique_labels(["a", "x/a", "y/x/a"]) == ["a", "x/a", "y/x/a"]
