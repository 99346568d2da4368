"""Markdown tables of the demo's results, in the paper's layout (methods x tasks, average last)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SOURCE, TARGET = "theseus-tiny-s", "theseus-tiny-w"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _row(label: str, values: list[float]) -> str:
    cells = " | ".join(f"{100 * v:.1f}" for v in values)
    return f"| {label} | {cells} | **{100 * _mean(values):.1f}** |"


def accuracy_rows(results: dict[str, Any], batches: str) -> list[tuple[str, list[float]]]:
    """Return (label, per-task accuracy) rows for one calibration size."""
    tasks = results["tasks"]
    names = list(tasks)
    rows = [("Target zero-shot", [tasks[t]["target_zeroshot_test_acc"] for t in names])]
    labels = list(tasks[names[0]]["transport"][batches]["variants"])
    for label in labels:
        rows.append((f"Target + {label}, α=1", [tasks[t]["transport"][batches]["variants"][label]["test_acc"] for t in names]))
    for label in labels:
        if "swept_test_acc" in tasks[names[0]]["transport"][batches]["variants"][label]:
            rows.append((f"Target + {label}, α swept on val",
                         [tasks[t]["transport"][batches]["variants"][label]["swept_test_acc"] for t in names]))
    seeds = len(results["settings"].get("warm_start_seeds", (0,)))
    label = "Target fine-tuned (upper bound)" + (f", mean of {seeds} seeds" if seeds > 1 else "")
    rows.append((label, [tasks[t]["target_finetuned_test_acc"] for t in names]))
    rows.append(("Source fine-tuned", [tasks[t]["source_finetuned_test_acc"] for t in names]))
    return rows


def gap_recovered(results: dict[str, Any], batches: str, label: str, key: str = "test_acc") -> float:
    """Share of the zero-shot -> fine-tuned gap of the target that a variant recovers, task-averaged."""
    tasks = results["tasks"].values()
    zero_shot = _mean([t["target_zeroshot_test_acc"] for t in tasks])
    finetuned = _mean([t["target_finetuned_test_acc"] for t in tasks])
    transported = _mean([t["transport"][batches]["variants"][label][key] for t in tasks])
    if finetuned == zero_shot:
        return float("nan")  # no gap to recover: the share is undefined, not a division error
    return (transported - zero_shot) / (finetuned - zero_shot)


def write_markdown(results: dict[str, Any], path: str | os.PathLike) -> str:
    """Write the demo's tables to `path` and return the Markdown text."""
    tasks = list(results["tasks"])
    header = "| | " + " | ".join(tasks) + " | Avg |\n|---|" + "---|" * (len(tasks) + 1)
    lines = ["# theseus demo results", "",
             f"{SOURCE} -> {TARGET}, test accuracy (%), {len(tasks)} tasks; settings in results.json.", ""]
    for batches in results["tasks"][tasks[0]]["transport"]:
        lines += [f"## {batches} calibration batch(es) of {results['settings']['calibration_batch_size']} images", "", header]
        lines += [_row(label, values) for label, values in accuracy_rows(results, batches)]
        recovered = {label: gap_recovered(results, batches, label)
                     for label in results["tasks"][tasks[0]]["transport"][batches]["variants"]}
        lines += ["", "Gap recovered (target zero-shot -> target fine-tuned), α=1: "
                  + ", ".join(f"{label} {100 * value:.0f} %" for label, value in recovered.items())]
        variants = results["tasks"][tasks[0]]["transport"][batches]["variants"]
        swept = {label: gap_recovered(results, batches, label, key="swept_test_acc")
                 for label, entry in variants.items() if "swept_test_acc" in entry}
        if swept:
            lines += ["", "Gap recovered with α swept on the validation split (the paper's protocol): "
                      + ", ".join(f"{label} {100 * value:.0f} %" for label, value in swept.items())]
        lines += [""]
    settings = results["settings"]
    warm_variant = settings.get("warm_start_variant", "Theseus (rank-aware)")
    race_lr = settings.get("warm_start_lr") or settings["lr"]
    rate = (f"lr {race_lr:g} for both" if race_lr == settings["lr"] else
            f"lr {race_lr:g} for both (the upper bound and the source's fine-tune: lr {settings['lr']:g})")
    lines += ["## Warm start", "",
              "Steps for the target to reach the validation accuracy that fine-tuning from the pretrained target has at its "
              f"final step; same settings and seeds, {rate}; the warm start begins from the target + {warm_variant}, α=1. "
              f"Both curves are means over the fine-tuning seeds {list(settings.get('warm_start_seeds', (0,)))} "
              "(training data order; the transport is the same for every seed).", "",
              "| task | target val acc | from pretrained: steps run / first reached | from Theseus: steps to target | ratio | val acc at step 0 (pretrained / Theseus) |",
              "|---|---|---|---|---|---|"]
    ratios, all_ratios, learning_ratios = [], [], []
    for task in tasks:
        warm = results["tasks"][task]["warm_start"]
        steps = warm["warm_steps_to_target"]
        ratio = None if steps is None else steps / warm["baseline_steps"]
        if ratio is not None:
            ratios.append(ratio)
        all_ratios.append(1.0 if ratio is None else ratio)  # a task not reached costs at least the whole run
        if warm["baseline_steps_to_target"] != 0:  # the baseline had something to learn on this task
            learning_ratios.append(all_ratios[-1])
        lines.append(
            f"| {task} | {100 * warm['target_val_acc']:.1f} | {warm['baseline_steps']} / {warm['baseline_steps_to_target']} | "
            f"{steps if steps is not None else 'not reached'} | {'' if ratio is None else f'{ratio:.2f}'} | "
            f"{100 * warm['baseline_val_acc_at_start']:.1f} / {100 * warm['warm_val_acc_at_start']:.1f} |"
        )
    reached = f"{len(ratios)} of {len(tasks)} tasks reached the target"
    lines += ["", f"Average ratio (steps from Theseus / steps of the baseline run) over tasks that reached it: "
              f"{_mean(ratios):.2f}; {reached}. Over all tasks, a task not reached counting as 1: "
              f"{_mean(all_ratios):.2f}; over the {len(learning_ratios)} tasks whose baseline was below its final "
              f"accuracy at step 0 (the others need 0 steps from any start): {_mean(learning_ratios):.2f}.", ""]
    average = results.get("warm_start_average")
    if average is not None:
        warm_steps = average["warm_steps_to_target"]
        outcome = ("never reaches it" if warm_steps is None else
                   f"reaches it at step {warm_steps}, ratio {warm_steps / average['baseline_steps']:.2f}")
        lines += [f"Averaged over tasks (the paper's Fig. 3 protocol): the baseline's mean validation accuracy at its "
                  f"final step {average['baseline_steps']} is {100 * average['target_val_acc']:.1f} %; the warm start's "
                  f"mean curve {outcome} (it ends at {100 * average['warm_final_val_acc']:.1f} %). "
                  f"Plot: `{Path(average['plot']).name}`.", ""]
        lines += _average_readings_lines(results, average)
    lines += _diagnostics_lines(results)
    lines += _depth_lines(results)
    lines += _alignment_lines(results)
    text = "\n".join(lines) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return text


def _average_readings_lines(results: dict[str, Any], average: dict[str, Any]) -> list[str]:
    """How close the task-mean warm start is at a third of the run, and the same race read per seed."""
    lines = []
    if average.get("warm_step_at_third") is not None:
        lines.append(f"At step {average['warm_step_at_third']}, the last evaluation within a third of the run, the "
                     f"warm start's mean curve is at {100 * average['warm_val_acc_at_third']:.2f} % against the "
                     f"target's {100 * average['target_val_acc']:.2f} %.")
    readings = average.get("per_seed") or []
    if len(readings) > 1:
        seeds = results["settings"]["warm_start_seeds"]
        steps = [reading["warm_steps_to_target"] for reading in readings]
        ratios = " / ".join("-" if step is None else f"{step / average['baseline_steps']:.2f}" for step in steps)
        targets = " / ".join(f"{100 * reading['target_val_acc']:.2f}" for reading in readings)
        reached = " / ".join("never" if step is None else str(step) for step in steps)
        lines.append(f"Each fine-tuning seed alone (its task-mean curves, against its own baseline's final accuracy, "
                     f"{targets} %): the warm start reaches it at step {reached} "
                     f"(seeds {' / '.join(str(seed) for seed in seeds)}), ratio {ratios}.")
    return [*lines, ""] if lines else []


def _alignment_lines(results: dict[str, Any]) -> list[str]:
    """Per capture point, averaged over tasks: base-model alignment before/after the maps, and update fidelity."""
    collected: dict[str, dict[str, list[float]]] = {}
    for task in results["tasks"].values():
        largest = max(task["transport"], key=int)
        entry = task["transport"][largest]["variants"].get("Theseus (rank-aware)", {})
        for space, values in entry.get("alignment", {}).items():
            point = collected.setdefault(space, {})
            point.setdefault("before", []).append(values["before"])
            point.setdefault("after", []).append(values["after"])
        for space, values in entry.get("update_alignment", {}).items():
            point = collected.setdefault(space, {})
            point.setdefault("update", []).append(values["cosine"])
            point.setdefault("ratio", []).append(values["norm_ratio"])
    if not collected:
        return []

    def cell(values: list[float] | None) -> str:
        return f"{_mean(values):.3f}" if values else "-"

    lines = ["## Alignment (paper Sec. 4.7) and update fidelity", "",
             "Per capture point, averaged over tasks (Theseus rank-aware, largest calibration set): mean cosine "
             "similarity of paired source/target activations of the base models on held-out images, before "
             "(zero-pad / crop) and after the maps; and the update fidelity: cosine between the source's activation "
             "change under its task vector (carried by the map) and the target's activation change under the "
             "transported task vector, with the ratio of their norms (target / mapped source).", "",
             "| capture point | before | after | update cosine | update norm ratio |", "|---|---|---|---|---|"]
    for space, point in sorted(collected.items(), key=lambda item: _point_order(item[0])):
        lines.append(f"| {space} | {cell(point.get('before'))} | {cell(point.get('after'))} | "
                     f"{cell(point.get('update'))} | {cell(point.get('ratio'))} |")
    return lines


# the order in which a residual block's capture points are computed
_BLOCK_POINT_ORDER = ("ln_1:out", "attn:q", "attn:k", "attn:v", "attn:ctx", "attn:out", "ln_2:out", "mlp.c_fc:out",
                      "mlp.c_proj:in", "mlp.c_proj:out")


def _point_order(space: str) -> tuple[int, int, str]:
    """Capture points in forward order: the embedding, block by block, then the output."""
    if space.startswith("ln_pre"):
        return (-1, 0, space)
    if "resblocks." in space:
        block, point = space.split("resblocks.")[1].split(".", 1)
        rank = _BLOCK_POINT_ORDER.index(point) if point in _BLOCK_POINT_ORDER else len(_BLOCK_POINT_ORDER)
        return (int(block), rank, space)
    return (1 << 30, 0, space)


def _diagnostics_lines(results: dict[str, Any]) -> list[str]:
    """Per-task diagnostics: base-model CKA and the Procrustes read-out ceiling."""
    tasks = [t for t, entry in results["tasks"].items() if "diagnostics" in entry]
    if not tasks:
        return []
    lines = ["## Diagnostics", "",
             "Linear CKA of the base models' image embeddings on held-out images; accuracy of the target's zero-shot "
             "head on the source's embeddings carried over by a Procrustes map (base source, and source + task "
             "vector): what the target would score if it reproduced the source's features exactly; the two classes "
             "of the target's zero-shot head with the most similar text embeddings (cosine near 1: the text tower "
             "cannot tell them apart, so zero-shot is near chance on them and a fine-tune with the head frozen "
             "learns them slowly).", "",
             "| task | linear CKA | target zero-shot | read-out, source base | read-out, source fine-tuned | source fine-tuned | target fine-tuned | closest head classes (cosine) |",
             "|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        entry = results["tasks"][task]
        diagnostics = entry["diagnostics"]
        lines.append(
            f"| {task} | {diagnostics['linear_cka']:.2f} | {100 * entry['target_zeroshot_test_acc']:.1f} | "
            f"{100 * diagnostics['readout_source_base']:.1f} | {100 * diagnostics['readout_source_finetuned']:.1f} | "
            f"{100 * entry['source_finetuned_test_acc']:.1f} | {100 * entry['target_finetuned_test_acc']:.1f} | "
            f"{_closest_cell(diagnostics.get('zeroshot_head_closest'))} |"
        )
    return lines + [""]


def _closest_cell(closest: dict[str, Any] | None) -> str:
    """'a / b (0.9991)', or '-' for results written before the head diagnostic existed."""
    if closest is None:
        return "-"
    return f"{closest['first']} / {closest['second']} ({closest['cosine']:.4f})"


def _depth_lines(results: dict[str, Any]) -> list[str]:
    """The depth experiment (source -> deeper target through the interpolated layer map)."""
    tasks = [t for t, entry in results["tasks"].items() if "depth" in entry]
    if not tasks:
        return []
    first = results["tasks"][tasks[0]]["depth"]
    header = "| | " + " | ".join(tasks) + " | Avg |\n|---|" + "---|" * (len(tasks) + 1)
    lines = ["## Depth (paper Sec. 4.4)", "",
             f"{SOURCE} -> {first['target']} (6 blocks against 4, 96 wide), interpolated layer map, "
             f"{first['calibration_batches']} calibration batches, α=1, test accuracy (%).", "", header,
             _row("Deep target zero-shot", [results["tasks"][t]["depth"]["target_zeroshot_test_acc"] for t in tasks])]
    for label in first["variants"]:
        lines.append(_row(f"Deep target + {label}", [results["tasks"][t]["depth"]["variants"][label]["test_acc"] for t in tasks]))
    return lines + [""]
