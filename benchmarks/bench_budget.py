"""Statistics memory and time with and without `memory_budget_bytes` on a T5-3B -> T5-Large encoder pair.

Both encoders are built from their configs with random weights (no download): T5-3B's encoder
(d_model 1024, d_ff 16384, 32 heads of 128) as source, T5-Large's (d_model 1024, d_ff 4096, 16 heads
of 64) as target. All 24 layers do not fit this 24 GiB machine next to their statistics (~16.7 GiB of
float64 cross-products, plus ~6.3 GB of fp32 weights), so `--layers` (default 4) truncates both;
every capture point keeps its real size, so a budget means the same thing per point as at full depth
(at 24 layers there are 6x as many points, hence about 6x as many passes for the same budget).

Each setting runs in a fresh subprocess and reports peak RSS (ru_maxrss), the number of calibration
passes, the size of the largest group, and time. By default it times `collect_statistics` (the
part the budget changes) with the capture points `build_plan` would use; `--full-plan` runs
`build_plan` itself, which adds the same SVDs to every setting (tens of minutes here).

    python benchmarks/bench_budget.py
    python benchmarks/bench_budget.py --layers 24 --budgets none 1GiB 256MiB --full-plan   # big machine
    python benchmarks/bench_budget.py --full-plan --width-divisor 4 --layers 8 --budgets none 64MiB  # ~1 min

`--width-divisor k` divides d_model, d_ff and d_kv of both configs by k (head counts kept): every
statistic shrinks by ~k^2 and every SVD by ~k^3, so `--full-plan` (where the budget now bounds the
statistics and SVD factors held) fits in a minute or two at the same shape ratios.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import _common
import torch
from _common import (capture_spaces, current_rss_bytes, fmt_bytes, machine_info, peak_rss_bytes, run_child, table,
                     write_results, add_results_arguments, results_path)

SOURCE_CONFIG = dict(d_model=1024, d_ff=16384, num_heads=32, d_kv=128, feed_forward_proj="relu", vocab_size=32128)  # T5-3B
TARGET_CONFIG = dict(d_model=1024, d_ff=4096, num_heads=16, d_kv=64, feed_forward_proj="relu", vocab_size=32128)  # T5-Large
UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(text: str) -> int | None:
    """Parse 'none', a byte count, or a size like '256MiB' / '1GiB'."""
    lowered = text.strip().lower()
    if lowered == "none":
        return None
    for unit, factor in UNITS.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)
    return int(lowered)


def scaled(config: dict[str, Any], divisor: int) -> dict[str, Any]:
    """Return a T5 config with d_model, d_ff and d_kv divided by `divisor` (head counts and vocab kept)."""
    return dict(config, **{key: config[key] // divisor for key in ("d_model", "d_ff", "d_kv")})


def calibration(batches: int, batch_size: int, length: int, seed: int) -> list[dict[str, Any]]:
    """Return paired batches of random token ids (vocab 32128), all-ones attention masks, same ids for both."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(batches):
        batch = {"input_ids": torch.randint(0, 32128, (batch_size, length), generator=generator),
                 "attention_mask": torch.ones(batch_size, length, dtype=torch.long)}
        items.append({"source": batch, "target": batch})
    return items


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run one setting (the first budget) in this process and return its figures."""
    from theseus_transport.transport import engine
    from transformers import T5Config, T5EncoderModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    budget = parse_budget(args.budgets[0])
    source = T5EncoderModel(T5Config(num_layers=args.layers, **scaled(SOURCE_CONFIG, args.width_divisor))).eval()
    target = T5EncoderModel(T5Config(num_layers=args.layers, **scaled(TARGET_CONFIG, args.width_divisor))).eval()
    items = calibration(args.batches, args.batch_size, args.length, args.seed)
    groups_seen: list[list[str]] = []
    original_groups = engine._statistics_groups

    def recording_groups(*args: Any, **kwargs: Any) -> list[list[str]]:
        """Call the engine's grouping and remember its groups (one calibration pass each), derived points included."""
        groups = original_groups(*args, **kwargs)
        groups_seen.extend(groups)
        return groups

    engine._statistics_groups = recording_groups
    baseline = current_rss_bytes()
    started = time.perf_counter()
    if args.full_plan:
        plan, _ = engine.build_plan(source, target, items, family="t5", memory_budget_bytes=budget, progress=False)
        names = list(plan.maps)
        point_bytes = {s: 8 * (m.shape[0] * m.shape[1] + sum(m.shape)) for s, m in plan.maps.items()}
    else:
        # the capture points build_plan would collect (same code path as engine.build_plan)
        adapter, source_encoder, target_encoder, spaces = capture_spaces("t5", source, target)
        stats = engine.collect_statistics(adapter, source_encoder, target_encoder, items, spaces, adapter.default_token_alignment,
                                          memory_budget_bytes=budget, progress=False)
        names = list(stats)
        point_bytes = {s: stats[s].nbytes() for s in stats}
    seconds = time.perf_counter() - started
    engine._statistics_groups = original_groups
    groups = groups_seen or [names]
    return {
        "budget": args.budgets[0], "budget_bytes": budget, "passes": len(groups), "seconds": seconds,
        "peak_rss": peak_rss_bytes(), "baseline_rss": baseline, "statistics_bytes": sum(point_bytes.values()),
        "largest_group_bytes": max(sum(point_bytes.get(s, 0) for s in g) for g in groups),
        "largest_point_bytes": max(point_bytes.values()), "capture_points": len(point_bytes),
        "source_params": sum(p.numel() for p in source.parameters()), "target_params": sum(p.numel() for p in target.parameters()),
    }


def main() -> None:
    """Run one subprocess per budget, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["none", "1GiB", "256MiB"])
    parser.add_argument("--layers", type=int, default=4, help="encoder depth of both models (T5-3B/Large have 24)")
    parser.add_argument("--width-divisor", type=int, default=1, help="divide d_model, d_ff and d_kv of both configs by this")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: see README, shared 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-plan", action="store_true", help="run build_plan (adds every SVD) instead of collect_statistics")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_results_arguments(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    out = results_path("bench_budget", args)

    info = machine_info("cpu")
    print("machine:", info)
    runs = []
    for budget in args.budgets:
        runs.append(run_child(__file__, [
            "--budgets", budget, "--layers", str(args.layers), "--width-divisor", str(args.width_divisor), "--batches", str(args.batches),
            "--batch-size", str(args.batch_size), "--length", str(args.length), "--threads", str(args.threads),
            "--seed", str(args.seed)] + (["--full-plan"] if args.full_plan else [])))
        print(f"budget {budget}: {runs[-1]['passes']} passes, peak RSS {fmt_bytes(runs[-1]['peak_rss'])}, {runs[-1]['seconds']:.1f} s")
    first = runs[0]
    scale = "" if args.width_divisor == 1 else f", widths / {args.width_divisor}"
    print(f"\n## memory budget: T5-3B-config -> T5-Large-config encoders{scale}, {args.layers} of 24 layers, "
          f"{first['capture_points']} capture points, statistics {fmt_bytes(first['statistics_bytes'])} "
          f"(largest point {fmt_bytes(first['largest_point_bytes'])}); {args.batches} batches of {args.batch_size}x{args.length} tokens; "
          f"{'build_plan' if args.full_plan else 'collect_statistics'}")
    rows = [[r["budget"], r["passes"], fmt_bytes(r["largest_group_bytes"]), fmt_bytes(r["baseline_rss"]), fmt_bytes(r["peak_rss"]),
             fmt_bytes(r["peak_rss"] - r["baseline_rss"]), f"{(r['peak_rss'] - r['baseline_rss']) / (first['peak_rss'] - first['baseline_rss']):.3f}",
             r["seconds"], f"{r['seconds'] / first['seconds']:.2f}"] for r in runs]
    print(table(["budget", "passes", "largest group", "RSS before", "peak RSS", "peak - before", "x first (memory)", "seconds", "x first (time)"], rows))
    write_results(out, {"machine": info, "settings": vars(args), "runs": runs})


if __name__ == "__main__":
    main()
