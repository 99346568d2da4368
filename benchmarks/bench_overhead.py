"""Overhead of a full transport vs the bare forward passes of both models over the same batches.

Default pair (the issue's): OpenCLIP ViT-B-16 (224 px) -> ViT-B-16-plus-240 (240 px), random weights,
k calibration batches of 32 images. Measured side by side in one run:

    bare  = time of source(batch_src) + target(batch_tgt) over the k batches (no hooks, no statistics)
    full  = time of theseus_transport.transport(...) over the same k batches (hooks, statistics, SVDs, rule)
    ratio = full / bare                   (target of the issue: <= 1.15)

The bare passes are timed before and after the transport (the mean is the reference; both are
printed, so drift from other load on the machine shows). The transport is instrumented by wrapping
engine functions, which gives the breakdown of where the time goes without a second run.

    python benchmarks/bench_overhead.py                    # ViT-B-16 -> ViT-B-16+, k=4, CPU
    python benchmarks/bench_overhead.py --device cuda --k 8
    python benchmarks/bench_overhead.py --preset small     # 4-layer ViT-S-ish pair, minutes on a laptop
    python benchmarks/bench_overhead.py --derive off       # only the engine with every point captured

`--derive both` (default) runs the transport twice in the same process, with `derive_linear_outputs`
on (statistics of linear outputs derived from their input point's, proposal C) and off (every point
captured), between the two bare timings, and prints them side by side.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import statistics as pystats
import time
from pathlib import Path
from typing import Any

import _common
import torch
from _common import (SectionTimer, add_results_arguments, machine_info, peak_rss_bytes, refuse_taken, results_path,
                     sync, table, write_results)
from torch import nn

PRESETS: dict[str, dict[str, Any]] = {
    # open_clip model names (random weights) or VisionTransformer kwargs for source / target
    "vit-b16": {"source": "ViT-B-16", "target": "ViT-B-16-plus-240"},
    "small": {
        "source": dict(image_size=224, patch_size=16, width=384, layers=4, heads=6, mlp_ratio=4.0, output_dim=384),
        "target": dict(image_size=240, patch_size=16, width=448, layers=4, heads=7, mlp_ratio=4.0, output_dim=448),
    },
    "tiny": {
        "source": dict(image_size=64, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4.0, output_dim=64),
        "target": dict(image_size=72, patch_size=8, width=96, layers=2, heads=4, mlp_ratio=4.0, output_dim=96),
    },
}


def build_tower(spec: str | dict[str, Any]) -> nn.Module:
    """Return an OpenCLIP vision tower with random weights from a model name or VisionTransformer kwargs."""
    import open_clip
    from open_clip.transformer import VisionTransformer

    if isinstance(spec, str):
        logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded" is the point here
        return open_clip.create_model(spec, pretrained=None).visual
    return VisionTransformer(**spec)


def image_size(tower: nn.Module) -> int:
    """Return the square input size of an OpenCLIP vision tower."""
    size = tower.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def make_batches(k: int, batch_size: int, source_size: int, target_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Return k paired calibration batches: the same random images resized to each model's size."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(k):
        images = torch.rand(batch_size, 3, max(source_size, target_size), max(source_size, target_size), generator=generator)
        resize = lambda size: torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)  # noqa: E731
        batches.append({"source": resize(source_size).contiguous(), "target": resize(target_size).contiguous()})
    return batches


@torch.no_grad()
def bare_forward_seconds(source: nn.Module, target: nn.Module, batches: list[dict[str, torch.Tensor]], device: str) -> float:
    """Time the plain forward passes of both models over the batches (including the host-to-device copy)."""
    sync(device)
    started = time.perf_counter()
    for batch in batches:
        source(batch["source"].to(device))
        target(batch["target"].to(device))
    sync(device)
    return time.perf_counter() - started


def forward_flops(model: nn.Module, example: torch.Tensor) -> int:
    """Return the FLOPs of one forward pass as counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return counter.get_total_flops()


def instrumented_transport(source: nn.Module, target: nn.Module, task_vector: dict[str, torch.Tensor],
                           batches: list[dict[str, torch.Tensor]], device: str, use_cprofile: bool,
                           instrument: bool = True, batch_products: str = "float64",
                           derive_linear_outputs: bool = True) -> tuple[Any, SectionTimer, float, str]:
    """Run transport() once with engine functions wrapped in timers; return result, timer, seconds, profile text."""
    from theseus_transport.families.openclip import OpenCLIPVisionAdapter
    from theseus_transport.transport import engine, plan, statistics
    from theseus_transport.transport.engine import transport

    timer = SectionTimer(device)
    restore = [] if not instrument else [
        timer.wrap(OpenCLIPVisionAdapter, "forward", "forward with capture (hooks, CapturingAttention)"),
        timer.wrap(engine, "align_tokens", "token alignment (interpolate2d)"),
        timer.wrap(statistics.CrossStatistics, "update", "statistics update (fp64 cast, isfinite, addmm)"),
        timer.wrap(engine.LinearDerivation, "apply", "derived statistics (linear outputs, once per pass)"),
        timer.wrap(engine, "float64_svd", "maps: SVD of each cross-covariance (float64)"),
        timer.wrap(plan.TransportPlan, "apply", "rule: plan.apply"),
    ]
    profiler = cProfile.Profile() if use_cprofile else None
    try:
        sync(device)
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        result = transport(source, target, task_vector, batches, family="openclip", progress=False,
                           batch_products=batch_products, derive_linear_outputs=derive_linear_outputs)
        sync(device)
        seconds = time.perf_counter() - started
    finally:
        if profiler:
            profiler.disable()
        for undo in restore:
            undo()
    text = ""
    if profiler:
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(15)
        text = buffer.getvalue()
    return result, timer, seconds, text


def main() -> None:
    """Parse flags, run the side-by-side measurement, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="vit-b16")
    parser.add_argument("--k", type=int, default=4, help="number of calibration batches")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: see README, shared 2-core machine)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up forward passes of each model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cprofile", action="store_true", help="also print the top functions by self time")
    parser.add_argument("--no-instrument", action="store_true",
                        help="time the transport without the per-section wrappers (they sync CUDA at every call)")
    parser.add_argument("--batch-products", choices=["float64", "float32"], default="float64",
                        help="dtype of each batch's statistics products (totals stay float64)")
    parser.add_argument("--derive", choices=["both", "on", "off"], default="both",
                        help="derive_linear_outputs of the transport: on, off, or both side by side in this run")
    parser.add_argument("--save-maps", type=Path, default=None,
                        help="torch.save the plan's maps and ranks here (to compare engines); an existing file needs --overwrite")
    add_results_arguments(parser)
    args = parser.parse_args()
    name = f"bench_overhead_{args.preset}" if args.preset != "vit-b16" else "bench_overhead"
    name += "_float32_products" if args.batch_products == "float32" else ""
    # earlier sessions' files (one engine, every point captured) keep their names
    name += "_derive_on_off" if args.derive == "both" else f"_derive_{args.derive}"
    out = results_path(name, args)
    if args.save_maps is not None:  # refused now, not after the timed runs
        refuse_taken(args, args.save_maps, hint="pass another --save-maps path")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = args.device
    info = machine_info(device)
    print("machine:", info)
    preset = PRESETS[args.preset]
    source = build_tower(preset["source"]).to(device).eval()
    target = build_tower(preset["target"]).to(device).eval()
    source_size, target_size = image_size(source), image_size(target)
    batches = make_batches(args.k, args.batch_size, source_size, target_size, args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    task_vector = {key: 1e-3 * torch.randn(value.shape, generator=generator)
                   for key, value in source.state_dict().items() if value.is_floating_point()}

    # warm-up: allocator, oneDNN/cuBLAS kernels, LAPACK/cuSOLVER initialisation
    with torch.no_grad():
        for _ in range(args.warmup):
            source(batches[0]["source"].to(device))
            target(batches[0]["target"].to(device))
    torch.linalg.svd(torch.randn(64, 64, dtype=torch.float64, device=device))
    sync(device)

    bare_before = bare_forward_seconds(source, target, batches, device)
    print(f"bare forward passes (before): {bare_before:.2f} s")
    modes = {"both": [True, False], "on": [True], "off": [False]}[args.derive]
    runs = {}
    for derive in modes:
        label = "derive on" if derive else "derive off"
        result, timer, full_seconds, profile_text = instrumented_transport(
            source, target, task_vector, batches, device, args.cprofile, instrument=not args.no_instrument,
            batch_products=args.batch_products, derive_linear_outputs=derive)
        print(f"full transport ({label}): {full_seconds:.2f} s (x bare-before {full_seconds / bare_before:.3f}); sections:")
        for name, seconds in sorted(timer.seconds.items(), key=lambda item: -item[1]):
            print(f"  {name}: {seconds:.2f} s")
        print(f"  engine phases: {result.report.timings}", flush=True)
        runs[label] = (result, timer, full_seconds, profile_text)
    bare_after = bare_forward_seconds(source, target, batches, device)
    print(f"bare forward passes (after): {bare_after:.2f} s")
    bare = pystats.mean([bare_before, bare_after])
    bare_per_batch = bare / args.k
    fwd_flops = args.k * args.batch_size * (
        forward_flops(source, batches[0]["source"][:1].to(device)) + forward_flops(target, batches[0]["target"][:1].to(device)))

    summaries = {}
    for label, (result, timer, full_seconds, profile_text) in runs.items():
        sections = dict(timer.seconds)
        forward_key = "forward with capture (hooks, CapturingAttention)"
        sections["other (rules, capture setup, bookkeeping)"] = full_seconds - sum(sections.values())
        hooks_overhead = sections.get(forward_key, 0.0) - bare if args.no_instrument is False else float("nan")
        # the engine's own phase timings: calibration passes + statistics (per batch) vs maps + rule (fixed)
        engine_timings = result.report.timings
        per_batch = engine_timings["statistics_s"]
        fixed = full_seconds - per_batch
        # where the FLOPs go: per-batch statistics GEMMs (derived points have none) vs the forward passes
        derived = set(result.plan.metadata.get("derived_points", []))
        tokens = result.plan.metadata["calibration_tokens"]
        stats_macs = sum(m.shape[0] * m.shape[1] * tokens[s] for s, m in result.plan.maps.items() if s not in derived)
        map_shapes: dict[str, int] = {}
        for matrix in result.plan.maps.values():
            shape = f"{matrix.shape[0]}x{matrix.shape[1]}"
            map_shapes[shape] = map_shapes.get(shape, 0) + 1
        summaries[label] = {
            "transport_seconds": full_seconds, "ratio": full_seconds / bare, "target_met": full_seconds / bare <= 1.15,
            "sections_seconds": sections, "section_calls": dict(timer.calls), "hooks_overhead_seconds": hooks_overhead,
            "per_batch_ratio": per_batch / bare, "fixed_seconds": fixed, "engine_timings": engine_timings,
            "statistics_gemm_flops": 2 * stats_macs, "derived_points": len(derived), "captured_points": len(result.plan.maps) - len(derived),
            "map_shapes": map_shapes, "cprofile_top": profile_text,
        }
        summary = summaries[label]
        print(f"\n## overhead ({label}): {args.preset}  k={args.k} x {args.batch_size}  threads={args.threads}  device={device}"
              + (f" ({info['gpu']})" if "gpu" in info else ""))
        print(table(["measurement", "seconds", "x bare"], [
            ["bare forward passes (mean of before/after)", bare, 1.0],
            ["  before", bare_before, bare_before / bare],
            ["  after", bare_after, bare_after / bare],
            ["full transport", full_seconds, summary["ratio"]],
        ]))
        print(f"\nRATIO full / bare = {summary['ratio']:.3f}  (target <= 1.15: {'MET' if summary['target_met'] else 'MISSED'})")
        print("engine phases (report.timings): " + ", ".join(f"{k} {v:.2f}" for k, v in engine_timings.items()))
        if not args.no_instrument:
            breakdown = sorted(sections.items(), key=lambda item: -item[1])
            print("\nwhere the transport time goes (instrumented, one run):")
            print(table(["section", "seconds", "share of transport", "x bare"],
                        [[name, sec, sec / full_seconds, sec / bare] for name, sec in breakdown]))
            print(f"\nhooks/capture overhead on the forward passes: {hooks_overhead:.2f} s ({hooks_overhead / bare:+.1%} of bare)")
        print(f"per-batch work (engine statistics phase: passes with capture, alignment, accumulation) = {per_batch / bare:.3f} x bare;"
              f" fixed work (maps, rule, setup) = {fixed:.1f} s = {fixed / bare_per_batch:.1f} bare batches")
        print(f"extrapolated ratio: k=32 -> {per_batch / bare + fixed / (32 * bare_per_batch):.2f},"
              f" k=128 -> {per_batch / bare + fixed / (128 * bare_per_batch):.2f}, k->inf -> {per_batch / bare:.2f}")
        print(f"statistics GEMM FLOPs (float64, per batch; {len(derived)} derived points excluded) / forward FLOPs (fp32) = "
              f"{2 * stats_macs / fwd_flops:.2f}  ({2 * stats_macs / 1e12:.3f} vs {fwd_flops / 1e12:.3f} TFLOP); maps: {map_shapes}")
        if profile_text:
            print("\ncProfile, top functions by self time:\n" + profile_text)

    if len(runs) == 2:
        on, off = summaries["derive on"], summaries["derive off"]
        names = sorted(set(on["sections_seconds"]) | set(off["sections_seconds"]), key=lambda n: -off["sections_seconds"].get(n, 0.0))
        rows = [["full transport", on["transport_seconds"], off["transport_seconds"], on["transport_seconds"] / off["transport_seconds"]],
                ["  x bare", on["ratio"], off["ratio"], on["ratio"] / off["ratio"]],
                ["engine statistics phase (passes + statistics)", on["engine_timings"]["statistics_s"],
                 off["engine_timings"]["statistics_s"], on["engine_timings"]["statistics_s"] / off["engine_timings"]["statistics_s"]]]
        for name in names:
            seconds_on, seconds_off = on["sections_seconds"].get(name, 0.0), off["sections_seconds"].get(name, 0.0)
            rows.append([name, seconds_on, seconds_off, seconds_on / seconds_off if seconds_off > 0 else "-"])
        rows.append(["statistics GEMM TFLOP (per batch)", on["statistics_gemm_flops"] / 1e12, off["statistics_gemm_flops"] / 1e12,
                     on["statistics_gemm_flops"] / off["statistics_gemm_flops"]])
        print(f"\n## derive_linear_outputs on vs off, same run (bare {bare:.2f} s)")
        print(table(["", "derive on (s)", "derive off (s)", "on / off"], rows))
        maps_on, maps_off = runs["derive on"][0].plan.maps, runs["derive off"][0].plan.maps
        difference = max(float((maps_on[s] - maps_off[s]).abs().max()) for s in maps_off)
        vector_on, vector_off = runs["derive on"][0].task_vector, runs["derive off"][0].task_vector
        vector_difference = max(float((vector_on[k] - vector_off[k]).norm() / vector_off[k].norm().clamp_min(1e-30)) for k in vector_off)
        print(f"largest map entry difference on vs off {difference:.2e}; largest relative task-vector key difference {vector_difference:.2e}"
              " (float32 towers: captured outputs carry float32 rounding, derived ones do not)")
        summaries["comparison"] = {"max_map_difference": difference, "max_relative_task_vector_difference": vector_difference}
    print(f"peak RSS of this process: {peak_rss_bytes() / 2**30:.2f} GiB"
          + (f"; peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.startswith("cuda") else ""))
    primary_label = next(iter(runs))
    if args.save_maps is not None:
        args.save_maps.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"maps": runs[primary_label][0].plan.maps, "ranks": runs[primary_label][0].report.ranks}, args.save_maps)

    write_results(out, {
        "machine": info,
        "settings": vars(args) | {"source_image_size": source_size, "target_image_size": target_size},
        "bare_seconds": bare, "bare_before_seconds": bare_before, "bare_after_seconds": bare_after,
        "target_ratio": 1.15, "forward_flops": fwd_flops, "peak_rss_bytes": peak_rss_bytes(),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None,
        # the first mode's figures at the top level (the layout of earlier sessions' files), each mode below
        **{key: value for key, value in summaries[primary_label].items()},
        "primary": primary_label, "by_mode": summaries,
    })


if __name__ == "__main__":
    main()
