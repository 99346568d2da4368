"""`theseus transport` end to end on an offline T5 pair: files written, report, refusal to overwrite."""

from __future__ import annotations

import json

import pytest
import torch

from theseus_transport.cli import main
from theseus_transport.families import load_t5_encoder
from theseus_transport.transport import load_task_vector, save_task_vector


def test_transport_cli_writes_vector_sidecar_report_and_refuses_overwrite(tmp_path, capsys):
    source = load_t5_encoder("t5-tiny-offline")
    generator = torch.Generator().manual_seed(0)
    task_vector = {k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in source.state_dict().items()
                   if ".SelfAttention.q." in k or ".wo." in k or k == "shared.weight"}
    source_path = save_task_vector(tmp_path / "tv.safetensors", task_vector, {"family": "t5", "model": "t5-tiny-offline", "task": "toy"})
    output = tmp_path / "out" / "tv_wide.safetensors"
    args = ["transport", "--family", "t5", "--source-model", "t5-tiny-offline", "--target-model", "t5-tiny-offline-wide",
            "--task-vector", str(source_path), "--dataset", "toy:objects", "--calibration-batches", "2",
            "--calibration-batch-size", "8", "--output", str(output), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "shared.weight" in printed  # the report names what was not transported
    tensors, sidecar = load_task_vector(output)
    wide = load_t5_encoder("t5-tiny-offline-wide").state_dict()
    assert set(tensors) == set(task_vector) - {"shared.weight"}
    assert all(tensors[k].shape == wide[k].shape for k in tensors)
    assert sidecar["model"] == "t5-tiny-offline-wide" and sidecar["transported_from"]["sha256"]
    report = json.loads(output.with_suffix(".report.json").read_text())
    # rank-aware: never more than the source norm; exactly the norm where the maps are full rank
    # (block 0 sees few distinct byte tokens, so its layer-norm space is rank-deficient and reported)
    assert all(k["norm_ratio"] <= 1 + 1e-6 for k in report["keys"])
    assert all(abs(k["norm_ratio"] - 1) < 1e-6 for k in report["keys"] if ".wo." in k["key"])
    assert any(v["rank"] < v["full_rank"] for v in report["ranks"].values())
    assert report["alignment"], "held-out cosine before/after is reported"
    assert set(report["update_alignment"]) == set(report["alignment"])
    assert report["settings"]["derived_points"], "linear outputs' statistics are derived by default"
    captured = tmp_path / "out" / "tv_wide_captured.safetensors"
    assert main([*args[:-3], "--output", str(captured), "--no-progress", "--capture-linear-outputs"]) == 0
    captured_report = json.loads(captured.with_suffix(".report.json").read_text())
    assert not captured_report["settings"]["derived_points"]
    captured_tensors, _ = load_task_vector(captured)
    assert all(torch.allclose(captured_tensors[k], tensors[k], atol=1e-6) for k in tensors)
    heads = tmp_path / "out" / "tv_wide_heads.safetensors"
    assert main([*args[:-3], "--output", str(heads), "--no-progress", "--attention-maps", "heads"]) == 0
    heads_report = json.loads(heads.with_suffix(".report.json").read_text())
    assert heads_report["settings"]["attention"] == "heads" and heads_report["settings"]["head_matching"]
    assert load_task_vector(heads)[1]["attention_maps"] == "heads" and sidecar["attention_maps"] == "per_point"
    assert sidecar["calibration"]["protocol"] == "batches" and "shots" not in sidecar["calibration"]
    before = output.read_bytes()
    assert main(args) == 1  # exists: refused, untouched
    assert "OutputExistsError" in capsys.readouterr().err
    assert output.read_bytes() == before
    # names that would collide are refused before any work, with a one-line message
    for extra in (["--output", str(tmp_path / "out" / "tv.rte")],
                  ["--output", str(tmp_path / "x.safetensors"), "--plan-out", str(tmp_path / "x.report.safetensors")]):
        assert main([*args[:-3], *extra, "--no-progress"]) == 1
        assert "OutputPathError" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "out" / "tv.json").exists()
    # the input task vector is never an output, not even with --overwrite
    source_bytes = source_path.read_bytes()
    assert main([*args[:-3], "--output", str(source_path), "--overwrite", "--no-progress"]) == 1
    assert "input task vector" in capsys.readouterr().err and source_path.read_bytes() == source_bytes
    # a directory in the way is refused before any work, and the earlier outputs stay as they were
    (tmp_path / "out" / "plan.safetensors").mkdir()
    assert main([*args, "--overwrite", "--plan-out", str(tmp_path / "out" / "plan.safetensors")]) == 1
    assert "is a directory" in capsys.readouterr().err and output.read_bytes() == before
    # unknown names and impossible numbers: one line, before any model is loaded
    assert main([*args[:-3], "--output", str(tmp_path / "m.safetensors"), "--method", "nope", "--no-progress"]) == 1
    assert "UnknownNameError: unknown transport method 'nope'" in capsys.readouterr().err
    # the other protocol's size: refused, also before any model is loaded
    assert main([*args[:-3], "--output", str(tmp_path / "m.safetensors"), "--calibration-shots", "8", "--no-progress"]) == 1
    assert "CalibrationError: --calibration-shots does not apply to --calibration-protocol batches" in capsys.readouterr().err
    for flag, value in (("--alpha", "nan"), ("--calibration-batches", "0"), ("--memory-budget-mb", "-5")):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, flag, value])
        assert exit_info.value.code == 2 and "must be" in capsys.readouterr().err
