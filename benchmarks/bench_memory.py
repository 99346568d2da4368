"""Peak resident memory of a transport with 1, 10 and 50 calibration batches (target: growth <= 5 %).

Each setting runs in a fresh subprocess (`--child`) and reports its own peak RSS (getrusage
ru_maxrss), so one setting's allocations cannot hide another's. Batches come from a generator:
the calibration set itself is never held in memory, only the batch being processed.

    python benchmarks/bench_memory.py                      # 1, 10, 50 batches of 16 images
    python benchmarks/bench_memory.py --batches 1 10 50 100 --width 384
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import _common
import torch
from _common import (current_rss_bytes, fmt_bytes, machine_info, paired_random_batches, peak_rss_bytes, run_child,
                     table, write_results, add_results_arguments, results_path)


def tower_kwargs(width: int, image_size: int, layers: int) -> dict[str, Any]:
    """Return VisionTransformer kwargs of a small OpenCLIP tower (head width 64, patch 8)."""
    return dict(image_size=image_size, patch_size=8, width=width, layers=layers, heads=max(1, width // 64),
                mlp_ratio=4.0, output_dim=width)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run one transport with `args.batches[0]` batches in this process; return its memory figures."""
    from open_clip.transformer import VisionTransformer
    from theseus_transport.transport.engine import transport

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    source = VisionTransformer(**tower_kwargs(args.width, args.image_size, args.layers)).eval()
    target = VisionTransformer(**tower_kwargs(args.width + 64, args.image_size + 8, args.layers)).eval()
    task_vector = {key: 1e-3 * torch.randn_like(value) for key, value in source.state_dict().items() if value.is_floating_point()}
    count = args.batches[0]
    baseline = current_rss_bytes()
    started = time.perf_counter()
    result = transport(source, target, task_vector, paired_random_batches(count, args.batch_size, args.image_size, args.image_size + 8, args.seed),
                       family="openclip", progress=False)
    seconds = time.perf_counter() - started
    tokens = max(result.plan.metadata["calibration_tokens"].values())
    statistics_bytes = sum(8 * (m.shape[0] * m.shape[1] + m.shape[0] + m.shape[1]) for m in result.plan.maps.values())
    return {
        "batches": count, "tokens_per_point": tokens, "peak_rss": peak_rss_bytes(), "baseline_rss": baseline,
        "statistics_bytes": statistics_bytes, "seconds": seconds,
        "source_width": source.transformer.width, "target_width": target.transformer.width,
    }


def main() -> None:
    """Run one subprocess per batch count, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=192, help="source width (the target has one more head of 64)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64, help="source image size (target: +8 px, one more patch per side)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: see README, shared 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_results_arguments(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    out = results_path("bench_memory", args)

    info = machine_info("cpu")
    print("machine:", info)
    runs = []
    for count in args.batches:
        runs.append(run_child(__file__, [
            "--batches", str(count), "--batch-size", str(args.batch_size), "--width", str(args.width),
            "--layers", str(args.layers), "--image-size", str(args.image_size), "--threads", str(args.threads),
            "--seed", str(args.seed)]))
        print(f"{count:4d} batches: peak RSS {fmt_bytes(runs[-1]['peak_rss'])} ({runs[-1]['seconds']:.1f} s)")
    first = runs[0]
    rows = []
    for run in runs:
        run["growth_vs_first"] = run["peak_rss"] / first["peak_rss"] - 1
        run["transport_growth_vs_first"] = (run["peak_rss"] - run["baseline_rss"]) / (first["peak_rss"] - first["baseline_rss"]) - 1
        rows.append([run["batches"], run["tokens_per_point"], fmt_bytes(run["baseline_rss"]), fmt_bytes(run["peak_rss"]),
                     f"{run['peak_rss'] / first['peak_rss']:.3f}", f"{run['growth_vs_first']:+.1%}",
                     fmt_bytes(run["peak_rss"] - run["baseline_rss"]), run["seconds"]])
    last = runs[-1]
    print(f"\n## memory: source width {first['source_width']} -> target {first['target_width']}, {args.layers} layers, "
          f"batches of {args.batch_size} (statistics: {fmt_bytes(first['statistics_bytes'])})")
    print(table(["batches", "tokens", "RSS before transport", "peak RSS", "x first", "growth", "peak - before", "seconds"], rows))
    met = last["growth_vs_first"] <= 0.05
    print(f"\nRATIO peak RSS {last['batches']} / {first['batches']} batches = {last['peak_rss'] / first['peak_rss']:.3f}"
          f" (growth {last['growth_vs_first']:+.1%}; target <= +5 %: {'MET' if met else 'MISSED'})")
    write_results(out, {"machine": info, "settings": vars(args), "runs": runs,
                                   "ratio_last_first": last["peak_rss"] / first["peak_rss"], "target_growth": 0.05, "target_met": met})


if __name__ == "__main__":
    main()
