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
from theseus_transport.compare import compare_groups, compare_runs, mean_series, read_scalars, steps_to_target
from theseus_transport.modules import TextClassifier
from theseus_transport.transport.errors import OutputExistsError, RunLogError
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
