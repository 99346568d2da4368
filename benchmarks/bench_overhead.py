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
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import statistics as pystats
import time
from typing import Any

import _common
import torch
from _common import SectionTimer, machine_info, peak_rss_bytes, sync, table, write_results
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
                           instrument: bool = True, batch_products: str = "float64") -> tuple[Any, SectionTimer, float, str]:
    """Run transport() once with engine functions wrapped in timers; return result, timer, seconds, profile text."""
    from theseus_transport.families.openclip import OpenCLIPVisionAdapter
    from theseus_transport.transport import engine, plan, statistics
    from theseus_transport.transport.engine import transport

    timer = SectionTimer(device)
    restore = [] if not instrument else [
        timer.wrap(OpenCLIPVisionAdapter, "forward", "forward with capture (hooks, CapturingAttention)"),
        timer.wrap(engine, "_paired_rows", "token alignment (interpolate2d)"),
        timer.wrap(statistics.CrossStatistics, "update", "statistics update (fp64 cast, isfinite, addmm)"),
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
                           batch_products=batch_products)
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
    parser.add_argument("--save-maps", default=None, help="torch.save the plan's maps and ranks here (to compare engines)")
    args = parser.parse_args()

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
    result, timer, full_seconds, profile_text = instrumented_transport(source, target, task_vector, batches, device, args.cprofile,
                                                                         instrument=not args.no_instrument,
                                                                         batch_products=args.batch_products)
    print(f"full transport: {full_seconds:.2f} s (x bare-before {full_seconds / bare_before:.3f}); sections so far:")
    for name, seconds in sorted(timer.seconds.items(), key=lambda item: -item[1]):
        print(f"  {name}: {seconds:.2f} s")
    print(f"  engine phases: {result.report.timings}", flush=True)
    bare_after = bare_forward_seconds(source, target, batches, device)
    print(f"bare forward passes (after): {bare_after:.2f} s")
    bare = pystats.mean([bare_before, bare_after])
    ratio = full_seconds / bare

    sections = dict(timer.seconds)
    forward_key = "forward with capture (hooks, CapturingAttention)"
    accounted = sum(sections.values())
    sections["other (rules, capture setup, bookkeeping)"] = full_seconds - accounted
    hooks_overhead = sections.get(forward_key, 0.0) - bare if args.no_instrument is False else float("nan")
    # the engine's own phase timings: calibration passes + statistics (per batch) vs maps + rule (fixed)
    engine_timings = result.report.timings
    per_batch = engine_timings["statistics_s"]
    fixed = full_seconds - per_batch
    per_batch_ratio = per_batch / bare
    # ratio(k') = per-batch ratio + fixed cost amortised over k' batches of the bare forward
    bare_per_batch = bare / args.k

    # where the FLOPs go: statistics GEMMs vs the forward passes
    stats_macs = sum(m.shape[0] * m.shape[1] * result.plan.metadata["calibration_tokens"][s] for s, m in result.plan.maps.items())
    fwd_flops = args.k * args.batch_size * (
        forward_flops(source, batches[0]["source"][:1].to(device)) + forward_flops(target, batches[0]["target"][:1].to(device)))
    map_shapes: dict[str, int] = {}
    for matrix in result.plan.maps.values():
        shape = f"{matrix.shape[0]}x{matrix.shape[1]}"
        map_shapes[shape] = map_shapes.get(shape, 0) + 1

    rows = [
        ["bare forward passes (mean of before/after)", bare, 1.0],
        ["  before", bare_before, bare_before / bare],
        ["  after", bare_after, bare_after / bare],
        ["full transport", full_seconds, ratio],
    ]
    print(f"\n## overhead: {args.preset}  k={args.k} x {args.batch_size}  threads={args.threads}  device={device}"
          + (f" ({info['gpu']})" if "gpu" in info else ""))
    print(table(["measurement", "seconds", "x bare"], rows))
    print(f"\nRATIO full / bare = {ratio:.3f}  (target <= 1.15: {'MET' if ratio <= 1.15 else 'MISSED'})")
    print("engine phases (report.timings): " + ", ".join(f"{k} {v:.2f}" for k, v in engine_timings.items()))
    if not args.no_instrument:
        breakdown = sorted(sections.items(), key=lambda item: -item[1])
        print("\nwhere the transport time goes (instrumented, one run):")
        print(table(["section", "seconds", "share of transport", "x bare"],
                    [[name, sec, sec / full_seconds, sec / bare] for name, sec in breakdown]))
        print(f"\nhooks/capture overhead on the forward passes: {hooks_overhead:.2f} s ({hooks_overhead / bare:+.1%} of bare)")
    print(f"per-batch work (engine statistics phase: passes with capture, alignment, accumulation) = {per_batch_ratio:.3f} x bare;"
          f" fixed work (maps, rule, setup) = {fixed:.1f} s = {fixed / bare_per_batch:.1f} bare batches")
    print(f"extrapolated ratio: k=32 -> {per_batch_ratio + fixed / (32 * bare_per_batch):.2f},"
          f" k=128 -> {per_batch_ratio + fixed / (128 * bare_per_batch):.2f}, k->inf -> {per_batch_ratio:.2f}")
    print(f"statistics GEMM FLOPs (float64) / forward FLOPs (fp32) = {2 * stats_macs / fwd_flops:.2f}"
          f"  ({2 * stats_macs / 1e12:.2f} vs {fwd_flops / 1e12:.2f} TFLOP); maps: {map_shapes}")
    print(f"peak RSS of this process: {peak_rss_bytes() / 2**30:.2f} GiB"
          + (f"; peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.startswith("cuda") else ""))
    if args.save_maps:
        torch.save({"maps": result.plan.maps, "ranks": result.report.ranks}, args.save_maps)
    if profile_text:
        print("\ncProfile, top functions by self time:\n" + profile_text)

    name = f"bench_overhead_{args.preset}" if args.preset != "vit-b16" else "bench_overhead"
    write_results(name + ("_float32_products" if args.batch_products == "float32" else ""), {
        "machine": info,
        "settings": vars(args) | {"source_image_size": source_size, "target_image_size": target_size},
        "bare_seconds": bare, "bare_before_seconds": bare_before, "bare_after_seconds": bare_after,
        "transport_seconds": full_seconds, "ratio": ratio, "target_ratio": 1.15, "target_met": ratio <= 1.15,
        "sections_seconds": sections, "section_calls": dict(timer.calls),
        "hooks_overhead_seconds": hooks_overhead, "per_batch_ratio": per_batch_ratio, "fixed_seconds": fixed,
        "engine_timings": result.report.timings,
        "statistics_gemm_flops": 2 * stats_macs, "forward_flops": fwd_flops, "map_shapes": map_shapes,
        "cprofile_top": profile_text, "peak_rss_bytes": peak_rss_bytes(),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None,
    })


if __name__ == "__main__":
    main()
