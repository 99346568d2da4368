"""`theseus demo --quick` and the quickstart notebook run offline end to end (issue 4; slow: minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from theseus_transport.cli import main


@pytest.mark.slow
def test_quick_demo_writes_results_table_and_plots(tmp_path):
    out = tmp_path / "demo"
    # two workers: the quick preset runs inline, and this is where the worker-process path runs end to end
    assert main(["demo", "--quick", "--output-dir", str(out), "--workers", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"sizes", "positions"} and results["settings"]["workers"] == 2
    for task, entry in results["tasks"].items():
        diagnostics = entry["diagnostics"]
        assert 0.0 < diagnostics["linear_cka"] <= 1.0
        assert 0.0 <= diagnostics["readout_source_finetuned"] <= 1.0 and diagnostics["held_out_images"] > 0
        for batches, block in entry["transport"].items():
            assert "Theseus (rank-aware)" in block["variants"] and "Theseus (paper)" in block["variants"]
            for variant in block["variants"].values():
                assert 0.0 <= variant["test_acc"] <= 1.0
        with Image.open(entry["warm_start"]["plot"]) as plot:
            assert plot.size[0] > 100
    # the task-averaged warm start (paper Fig. 3) is the step-by-step mean of the per-task curves
    from theseus_transport.compare import read_scalars, steps_to_target

    average = results["warm_start_average"]
    entries = list(results["tasks"].values())
    assert average["target_val_acc"] == pytest.approx(sum(e["warm_start"]["target_val_acc"] for e in entries) / 2)
    assert all(len(e["warm_start"]["warm_runs"]) == e["warm_start"]["seeds"] == 1 for e in entries)
    curves = [read_scalars(e["warm_start"]["warm_runs"][0])["val/acc"] for e in entries]
    mean_curve = [(step, (a + b) / 2) for (step, a), (_, b) in zip(*curves)]
    assert average["warm_steps_to_target"] == steps_to_target(mean_curve, average["target_val_acc"])
    assert average["warm_final_val_acc"] == pytest.approx(mean_curve[-1][1])
    with Image.open(average["plot"]) as plot:
        assert plot.size[0] > 100
    table = (out / "results.md").read_text()
    assert "Averaged over tasks (the paper's Fig. 3 protocol)" in table
    assert "Theseus (paper)" in table and "Warm start" in table and "linear CKA" in table
    assert "the warm start begins from the target + Theseus (rank-aware, + embeddings, head-aware attention)" in table
    assert "lr 0.0003 for both (the upper bound and the source's fine-tune: lr 0.001)" in table
    # the race (warm start and its baseline) ran at warm_start_lr, the upper bound at the fine-tune's rate
    import yaml

    def rate(run: str | Path) -> float:
        return yaml.safe_load((Path(run) / "hparams.yaml").read_text())["lr"]

    for task, entry in results["tasks"].items():
        warm = entry["warm_start"]
        assert warm["lr"] == 3e-4 and [Path(run).name for run in warm["baseline_runs"]] == ["target_race_pretrained_seed0"]
        assert [rate(run) for run in warm["baseline_runs"] + warm["warm_runs"]] == [3e-4, 3e-4]
        assert rate(out / "runs" / task / "target_finetune_seed0") == rate(out / "runs" / task / "source_finetune") == 1e-3
        assert entry["target_finetuned_test_acc_per_seed"] != [] and 0.0 <= warm["baseline_test_acc"] <= 1.0
    with pytest.raises(FileExistsError):
        from theseus_transport.zoo.demo import run_demo

        run_demo(output_dir=out, quick=True)  # refuses to overwrite earlier results


def test_warm_start_uses_the_chosen_transport_variant(tmp_path):
    from theseus_transport.zoo.demo import DemoSettings, warm_start_callback

    settings = DemoSettings.quick()
    assert settings.warm_start_variant == "Theseus (rank-aware, + embeddings, head-aware attention)"
    callback = warm_start_callback(tmp_path / "task.safetensors", settings)
    assert (callback.method, callback.map_mode, callback.center, callback.transport_embeddings, callback.attention_maps) == (
        "theseus", "rank_aware", False, True, "heads")
    paper = warm_start_callback(tmp_path / "task.safetensors", DemoSettings(tasks=("sizes",), warm_start_variant="Theseus (paper)"))
    assert (paper.map_mode, paper.transport_embeddings, paper.attention_maps) == ("paper", False, "per_point")
    with pytest.raises(ValueError, match="unknown demo variants"):
        DemoSettings(tasks=("sizes",), warm_start_variant="Theseus (typo)")


def _logged_run(folder: Path, curve: list[float], test_acc: float) -> dict:
    """A fake fine-tune: its val/acc curve written to TensorBoard every 10 steps, as the demo's runs are."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as writer:
        for index, value in enumerate(curve):
            writer.add_scalar("val/acc", value, index * 10)
    return {"run_dir": str(folder), "test_acc": test_acc, "steps": 10 * (len(curve) - 1)}


def test_warm_start_summary_times_seed_mean_curves(tmp_path):
    from theseus_transport.zoo.demo import _average_warm_start, _warm_start_summary

    # two seeds per side; the seed means are baseline 0.2 0.4 0.6 0.7 and warm 0.5 0.65 0.7 0.75
    baselines = [_logged_run(tmp_path / "b0", [0.2, 0.5, 0.6, 0.8], 0.8), _logged_run(tmp_path / "b1", [0.2, 0.3, 0.6, 0.6], 0.6)]
    warms = [_logged_run(tmp_path / "w0", [0.5, 0.6, 0.8, 0.7], 0.9), _logged_run(tmp_path / "w1", [0.5, 0.7, 0.6, 0.8], 0.7)]
    summary = _warm_start_summary(baselines, warms, tmp_path / "task.png", "warm")
    assert summary["target_val_acc"] == pytest.approx(0.7)
    # warm seed 1 reaches 0.7 at step 10, before the warm mean does: the summary must time the means
    assert summary["baseline_steps_to_target"] == 30 and summary["warm_steps_to_target"] == 20
    assert summary["baseline_steps"] == 30 and summary["seeds"] == 2
    assert summary["warm_test_acc"] == pytest.approx(0.8)
    assert summary["warm_val_acc_at_start"] == pytest.approx(0.5) and summary["baseline_val_acc_at_start"] == pytest.approx(0.2)
    assert (tmp_path / "task.png").stat().st_size > 0

    other = _warm_start_summary([_logged_run(tmp_path / "b2", [0.5, 0.5, 0.5, 0.9], 0.9)] * 2,
                                [_logged_run(tmp_path / "w2", [0.9, 0.9, 0.9, 0.9], 0.9)] * 2, tmp_path / "other.png", "warm")
    average = _average_warm_start({"a": {"warm_start": summary}, "b": {"warm_start": other}}, tmp_path / "avg.png", "warm")
    # mean of the two tasks: baseline 0.35 0.425 0.55 0.8, warm 0.7 0.775 0.8 0.825
    assert average["target_val_acc"] == pytest.approx(0.8)
    assert average["warm_steps_to_target"] == 20 and average["baseline_steps_to_target"] == 30
    assert average["warm_final_val_acc"] == pytest.approx(0.825)
    # the last evaluation within a third of the 30 steps is step 10, where the warm mean is 0.775
    assert average["warm_step_at_third"] == 10 and average["warm_val_acc_at_third"] == pytest.approx(0.775)
    # each seed alone, over both tasks: seed 0 (b0, b2 / w0, w2) targets 0.85 and the warm start reaches it at
    # step 20; seed 1 (b1, b2 / w1, w2) targets 0.75, reached at step 10 (the seed-mean curve: step 20)
    readings = average["per_seed"]
    assert [reading["target_val_acc"] for reading in readings] == [pytest.approx(0.85), pytest.approx(0.75)]
    assert [reading["warm_steps_to_target"] for reading in readings] == [20, 10]
    assert [reading["baseline_steps_to_target"] for reading in readings] == [30, 30]
    from theseus_transport.zoo.report import _average_readings_lines

    table = "\n".join(_average_readings_lines({"settings": {"warm_start_seeds": [4, 7]}}, average))
    assert "At step 10, the last evaluation within a third of the run, the warm start's mean curve is at 77.50 %" in table
    assert "accuracy, 85.00 / 75.00 %): the warm start reaches it at step 20 / 10 (seeds 4 / 7), ratio 0.67 / 0.33." in table


def test_warm_start_seeds_are_checked():
    from theseus_transport.zoo.demo import DemoSettings

    assert DemoSettings.full().warm_start_seeds == (0, 1, 2) and DemoSettings.quick().warm_start_seeds == (0,)
    for seeds in ((), (1, 1)):
        with pytest.raises(ValueError, match="warm_start_seeds"):
            DemoSettings(tasks=("sizes",), warm_start_seeds=seeds)


def test_demo_command_takes_other_warm_start_seeds(monkeypatch, capsys):
    import theseus_transport.zoo.demo as demo_module

    seen = []
    monkeypatch.setattr(demo_module, "run_demo", lambda **options: seen.append(options["settings"]))
    assert main(["demo", "--warm-start-seeds", "3", "4", "5", "--workers", "2"]) == 0
    assert seen[0].warm_start_seeds == (3, 4, 5) and seen[0].workers == 2 and len(seen[0].tasks) == 8
    assert main(["demo", "--quick"]) == 0 and seen[1].warm_start_seeds == (0,)
    assert main(["demo", "--quick", "--warm-start-seeds", "1", "1"]) == 2 and len(seen) == 2  # refused, nothing ran
    assert "warm_start_seeds must be distinct" in capsys.readouterr().err


def test_finetune_pool_size():
    from concurrent.futures import ProcessPoolExecutor

    from theseus_transport.zoo.demo import DemoSettings, _finetune_pool, _InlineExecutor

    with pytest.raises(ValueError, match="workers must be at least 1"):
        DemoSettings(tasks=("sizes",), workers=0)
    assert main(["demo", "--quick", "--workers", "0"]) == 2  # refused before anything runs
    inline = _finetune_pool(DemoSettings(tasks=("sizes",), workers=1))
    assert isinstance(inline, _InlineExecutor) and inline.submit(pow, 2, 5).result() == 32
    # never more workers than a task has target fine-tunes per seed: the upper bound, the race's baseline
    # (a run of its own at warm_start_lr) and the warm start; two when the race reuses the upper bound's runs
    for warm_start_lr, runs in ((3e-4, 3), (None, 2)):
        pool = _finetune_pool(DemoSettings(tasks=("sizes",), workers=8, warm_start_seeds=(0,), warm_start_lr=warm_start_lr))
        try:
            assert isinstance(pool, ProcessPoolExecutor) and pool._max_workers == runs
        finally:
            pool.shutdown()


def test_the_race_has_its_own_rate_and_runs_and_the_upper_bound_keeps_the_fine_tune_rate(tmp_path):
    from theseus_transport.zoo.demo import DemoSettings, _run_names, demo_outputs

    settings = DemoSettings(tasks=("sizes",), warm_start_seeds=(0, 1))
    assert (settings.lr, settings.warm_start_lr, settings.race.lr) == (1e-3, 3e-4, 3e-4) and settings.separate_race
    assert settings.race.warm_start_seeds == settings.warm_start_seeds and settings.race.warm_start_steps == 250
    source, finetunes, baselines, warms = _run_names(settings)
    assert finetunes == ["target_finetune_seed0", "target_finetune_seed1"]
    assert baselines == ["target_race_pretrained_seed0", "target_race_pretrained_seed1"]
    assert warms == ["target_warmstart_theseus_seed0", "target_warmstart_theseus_seed1"]
    # every run folder is checked before the demo starts (a previous run's logs would merge into its curves)
    _, runs = demo_outputs(settings, tmp_path)
    assert sorted(run.name for run in runs) == sorted([source, *finetunes, *baselines, *warms])
    # without a rate of its own, the race's baselines are the upper bound's runs, run once
    same = DemoSettings(tasks=("sizes",), warm_start_lr=None)
    assert same.race is same and not same.separate_race and _run_names(same)[1] == _run_names(same)[2]
    assert not DemoSettings(tasks=("sizes",), warm_start_lr=1e-3).separate_race
    assert len(demo_outputs(same, tmp_path)[1]) == 1 + 2 * len(same.warm_start_seeds)


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert any("image/png" in output.get("data", {}) for output in outputs), "plots must be inline"
    assert not any(output.get("output_type") == "error" for output in outputs)


def test_demo_settings_are_checked_before_any_work():
    from theseus_transport.zoo.demo import DemoSettings

    for bad in (dict(tasks=()), dict(tasks=("sizes", "nope")), dict(finetune_steps=0), dict(eval_every=0),
                dict(warm_start_steps=-1), dict(calibration_batches=()), dict(calibration_batches=(0, 5)),
                dict(held_out_batches=0), dict(lr=0.0), dict(warm_start_lr=0.0), dict(warm_start_lr=-1e-3)):
        with pytest.raises(ValueError):
            DemoSettings(**{"tasks": ("sizes",), **bad})


def test_demo_refuses_or_replaces_only_its_own_earlier_outputs(tmp_path, monkeypatch):
    from theseus_transport.transport.errors import OutputExistsError
    from theseus_transport.zoo import demo

    monkeypatch.setattr(demo, "_run", lambda settings, output, overwrite: {"ran": True})  # the checks only
    out = tmp_path / "demo"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "sizes.png").write_bytes(b"the user's plot")
    with pytest.raises(OutputExistsError, match="sizes.png"):
        demo.run_demo(output_dir=out, quick=True)
    (out / "plots" / "sizes.png").unlink()
    # an earlier run's logs: TensorBoard would merge them into this run's curves
    old_run = out / "runs" / "sizes" / "source_finetune"
    old_run.mkdir(parents=True)
    (old_run / "events.out.tfevents.old").write_bytes(b"old")
    (out / "runs" / "sizes" / "notes.txt").write_text("the user's")
    with pytest.raises(OutputExistsError, match="run folders of an earlier demo"):
        demo.run_demo(output_dir=out, quick=True)
    assert old_run.exists()
    assert demo.run_demo(output_dir=out, quick=True, overwrite=True) == {"ran": True}
    assert not old_run.exists() and (out / "runs" / "sizes" / "notes.txt").read_text() == "the user's"
