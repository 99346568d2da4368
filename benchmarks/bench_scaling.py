"""Transport time against calibration tokens and against model width; saves benchmarks/scaling.png.

* tokens: one pair (source width 192 -> target 256, 4 layers, 64/72 px, patch 8), k = 1..16 batches of
  16 images; time split into statistics (calibration passes + accumulation) and maps (SVDs).
* width: ViT-Ti / ViT-S / ViT-B widths (192 -> 224, 384 -> 448, 768 -> 896, the same +1/6 as
  ViT-B-16 -> ViT-B-16+), at a fixed depth (1 block by default, so the ViT-B width runs here in
  minutes) and a fixed number of tokens. Reports the fitted log-log exponent of each part.

    python benchmarks/bench_scaling.py
    python benchmarks/bench_scaling.py --depth 2 --token-batches 1 2 4 8 16 32
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import _common
import torch
from _common import (BENCH_DIR, RESULTS_DIR, add_results_arguments, companion_path, machine_info,
                     paired_random_batches, refuse_taken, results_path, table, write_results)
from torch import nn

WIDTHS = {"tiny (ViT-Ti)": (192, 224), "small (ViT-S)": (384, 448), "base (ViT-B)": (768, 896)}


def tower(width: int, layers: int, image_size: int) -> nn.Module:
    """Return a random OpenCLIP VisionTransformer with heads of 32 channels and patch 8."""
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=image_size, patch_size=8, width=width, layers=layers, heads=width // 32,
                             mlp_ratio=4.0, output_dim=width).eval()


def timed_transport(source: nn.Module, target: nn.Module, batches: int, batch_size: int, size: int, seed: int) -> dict[str, Any]:
    """Run one transport; return total seconds, the engine's phase timings and the token count."""
    from theseus_transport.transport.engine import transport

    task_vector = {k: 1e-3 * torch.randn_like(v) for k, v in source.state_dict().items() if v.is_floating_point()}
    started = time.perf_counter()
    result = transport(source, target, task_vector, paired_random_batches(batches, batch_size, size, size + 8, seed), family="openclip", progress=False)
    total = time.perf_counter() - started
    timings = result.report.timings
    return {"seconds": total, "statistics_s": timings["statistics_s"], "maps_s": timings["maps_s"], "apply_s": timings["apply_s"],
            "tokens": max(result.plan.metadata["calibration_tokens"].values())}


def slope(xs: list[float], ys: list[float]) -> float:
    """Return the least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    """Run both sweeps, print tables and fitted exponents, save the plot and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--token-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--token-layers", type=int, default=4, help="depth of the pair used for the token sweep")
    parser.add_argument("--depth", type=int, default=1, help="depth of the pairs in the width sweep")
    parser.add_argument("--width-batches", type=int, default=2, help="calibration batches in the width sweep")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: see README, shared 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the plot of a results JSON (--results, default results/bench_scaling.json) "
                             "to the PNG beside it (default scaling.png); an existing PNG needs --overwrite")
    add_results_arguments(parser)
    args = parser.parse_args()
    if args.replot:
        replot(args)
        return
    png = companion_path(args, BENCH_DIR / "scaling.png", ".png")
    out = results_path("bench_scaling", args, png)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    info = machine_info("cpu")
    print("machine:", info)
    size = args.image_size

    source, target = tower(192, args.token_layers, size), tower(256, args.token_layers, size + 8)
    timed_transport(source, target, 1, 2, size, args.seed)  # warm-up
    token_runs = []
    for count in args.token_batches:
        run = timed_transport(source, target, count, args.batch_size, size, args.seed) | {"batches": count}
        token_runs.append(run)
        print(f"tokens {run['tokens']:7d}: {run['seconds']:.2f} s")
    base = token_runs[0]
    print(f"\n## scaling with calibration tokens: width 192 -> 256, {args.token_layers} layers")
    print(table(["batches", "tokens", "total s", "statistics s", "maps s", "x first (total)", "statistics s / 1k tokens"],
                [[r["batches"], r["tokens"], r["seconds"], r["statistics_s"], r["maps_s"], r["seconds"] / base["seconds"],
                  1000 * r["statistics_s"] / r["tokens"]] for r in token_runs]))
    token_slope = slope([r["tokens"] for r in token_runs], [r["statistics_s"] for r in token_runs])
    print(f"statistics time ~ tokens^{token_slope:.2f}; maps time is constant in tokens "
          f"({min(r['maps_s'] for r in token_runs):.2f}-{max(r['maps_s'] for r in token_runs):.2f} s)")

    width_runs = []
    for name, (width_a, width_b) in WIDTHS.items():
        pair = tower(width_a, args.depth, size), tower(width_b, args.depth, size + 8)
        run = timed_transport(*pair, args.width_batches, args.batch_size, size, args.seed) | {"name": name, "source_width": width_a, "target_width": width_b}
        width_runs.append(run)
        print(f"{name}: {run['seconds']:.2f} s")
    first = width_runs[0]
    print(f"\n## scaling with width: {args.depth} block(s), {first['tokens']} tokens")
    print(table(["size", "widths", "total s", "statistics s", "maps s", "x tiny (total)"],
                [[r["name"], f"{r['source_width']}->{r['target_width']}", r["seconds"], r["statistics_s"], r["maps_s"],
                  r["seconds"] / first["seconds"]] for r in width_runs]))
    widths = [r["source_width"] for r in width_runs]
    width_slopes = {part: slope(widths, [r[part] for r in width_runs]) for part in ("seconds", "statistics_s", "maps_s")}
    print(f"fitted exponents vs width: total {width_slopes['seconds']:.2f}, statistics {width_slopes['statistics_s']:.2f}, "
          f"maps {width_slopes['maps_s']:.2f} (GEMM statistics ~ width^2 per token, SVDs ~ width^3)")

    payload = {"machine": info, "settings": vars(args), "tokens": token_runs, "widths": width_runs,
               "statistics_token_exponent": token_slope, "width_exponents": width_slopes}
    plot(payload, png)
    write_results(out, payload)


def replot(args: argparse.Namespace) -> Path:
    """Redraw the plot of a recorded run: --results names it (the committed JSON by default), the PNG goes beside it."""
    source = Path(args.results) if args.results is not None else RESULTS_DIR / "bench_scaling.json"
    png = companion_path(args, BENCH_DIR / "scaling.png", ".png")
    # the default target is the committed scaling.png the README shows, as for a full run
    refuse_taken(args, png, hint="pass --results RUN.json to draw that run's plot beside it")
    plot(json.loads(source.read_text()), png)
    return png


def plot(payload: dict[str, Any], png: Path) -> None:
    """Save the scaling plot (time vs tokens, time vs width) of a results payload to `png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    token_runs, width_runs, settings, info = payload["tokens"], payload["widths"], payload["settings"], payload["machine"]
    widths = [r["source_width"] for r in width_runs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    tokens = [r["tokens"] for r in token_runs]
    for part, label in (("seconds", "total"), ("statistics_s", "statistics"), ("maps_s", "maps (SVD)")):
        left.plot(tokens, [r[part] for r in token_runs], marker="o", label=label)
        right.plot(widths, [r[part] for r in width_runs], marker="o", label=label)
    left.set(xscale="log", yscale="log", xlabel="calibration tokens per capture point", ylabel="seconds",
             title=f"vs tokens (192->256, {settings['token_layers']} layers)")
    right.set(xscale="log", yscale="log", xlabel="source width", ylabel="seconds",
              title=f"vs width ({settings['depth']} block, {width_runs[0]['tokens']} tokens)")
    right.set_xticks(widths, [str(w) for w in widths])
    left.set_xticks(tokens, [str(t) for t in tokens])
    for axis in (left, right):
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"theseus transport time, {info['cpu']}, torch threads {settings['threads']}, torch {info['torch']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    print(f"plot saved to {png}")


if __name__ == "__main__":
    main()
