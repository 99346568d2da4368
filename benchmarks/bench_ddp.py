"""Calibration time with the batches sharded over 2 processes (gloo, statistics all-reduced) vs 1 process.

Both settings run `collect_statistics` with torch.set_num_threads(1) in every process: this machine
has 2 cores, so 2 ranks x 1 thread against 1 process x 1 thread is the fair comparison (2 ranks with
2 threads each would oversubscribe the cores). Rank r takes batches r, r+2, ...; statistics are
summed with `reduce_fn=lambda t: (dist.all_reduce(t), t)[1]`. The reduced statistics are compared
with the single-process ones (max abs diff; they differ only by float64 summation order).

    python benchmarks/bench_ddp.py
    python benchmarks/bench_ddp.py --batches 16 --width 384
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import capture_spaces, machine_info, table, write_results, add_results_arguments, results_path
from torch import nn


def models(width: int, layers: int, image_size: int, seed: int) -> tuple[nn.Module, nn.Module]:
    """Return the same random source/target OpenCLIP towers in every process (seeded construction)."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    kwargs = dict(patch_size=8, layers=layers, mlp_ratio=4.0)
    source = VisionTransformer(image_size=image_size, width=width, heads=width // 32, output_dim=width, **kwargs)
    target = VisionTransformer(image_size=image_size + 8, width=width + 64, heads=(width + 64) // 32, output_dim=width + 64, **kwargs)
    return source.eval(), target.eval()


def batch(index: int, batch_size: int, image_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Return calibration batch `index` (deterministic, so every process can make its own shard)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + index)
    images = torch.rand(batch_size, 3, image_size + 8, image_size + 8, generator=generator)
    source = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
    return {"source": source, "target": images}


def calibrate(args: argparse.Namespace, indices: list[int], reduce_fn: Any = None) -> tuple[dict[str, dict[str, torch.Tensor]], float, float, float]:
    """Collect statistics over the given batch indices; return tensors, wall s, CPU s, and wall s inside reduce_fn."""
    from theseus_transport.transport.engine import collect_statistics

    source, target = models(args.width, args.layers, args.image_size, args.seed)
    adapter, source, target, spaces = capture_spaces("openclip", source, target)
    items = [batch(i, args.batch_size, args.image_size, args.seed) for i in indices]
    with torch.no_grad():  # warm-up forward passes (first-call allocations and kernel selection)
        source(items[0]["source"][:2])
        target(items[0]["target"][:2])
    reduce_seconds = [0.0]

    def timed_reduce(tensor: torch.Tensor) -> torch.Tensor:
        """Call reduce_fn and add its wall time to the all-reduce total."""
        started = time.perf_counter()
        out = reduce_fn(tensor)
        reduce_seconds[0] += time.perf_counter() - started
        return out

    if dist.is_initialized():
        dist.barrier()
    started, cpu_started = time.perf_counter(), time.process_time()
    stats = collect_statistics(adapter, source, target, items, spaces, adapter.default_token_alignment,
                               reduce_fn=timed_reduce if reduce_fn else None, progress=False)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {name: {k: v.clone() for k, v in stats[name].tensors().items()} for name in stats}, seconds, cpu_seconds, reduce_seconds[0]


def rank_main(rank: int, world: int, args: argparse.Namespace, out_dir: str) -> None:
    """One DDP rank: shard the batches, collect, all-reduce, save timings (and rank 0 the statistics)."""
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        reduce_fn = lambda t: (dist.all_reduce(t), t)[1]  # noqa: E731
        stats, seconds, cpu_seconds, reduce_seconds = calibrate(args, list(range(rank, args.batches, world)), reduce_fn)
        torch.save({"seconds": seconds, "cpu_seconds": cpu_seconds, "reduce_seconds": reduce_seconds, "stats": stats if rank == 0 else None},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def single_main(rank: int, args: argparse.Namespace, out_dir: str) -> None:
    """The reference: one process, one thread, every batch."""
    torch.set_num_threads(1)
    stats, seconds, cpu_seconds, _ = calibrate(args, list(range(args.batches)))
    torch.save({"seconds": seconds, "cpu_seconds": cpu_seconds, "stats": stats}, Path(out_dir) / "single.pt")


def main() -> None:
    """Run the single-process reference, then 2 ranks; print the table and the statistics check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=192, help="source width (target: +64)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--seed", type=int, default=0)
    add_results_arguments(parser)
    args = parser.parse_args()
    if args.batches < args.world_size:
        parser.error(f"--batches {args.batches} leaves a rank of {args.world_size} without calibration batches")
    out = results_path("bench_ddp", args)
    torch.set_num_threads(1)
    info = machine_info("cpu") | {"torch_threads_per_process": 1}
    print("machine:", info)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(single_main, args=(args, out_dir), nprocs=1, join=True)  # same start-up path as the ranks
        single = torch.load(Path(out_dir) / "single.pt")
        mp.spawn(rank_main, args=(args.world_size, args, out_dir), nprocs=args.world_size, join=True)
        ranks = [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(args.world_size)]
    reduced = ranks[0]["stats"]
    max_abs, max_rel, worst = 0.0, 0.0, ""
    for name, tensors in single["stats"].items():
        for key, value in tensors.items():
            diff = (reduced[name][key] - value).abs().max().item()
            rel = diff / max(value.abs().max().item(), 1e-300)
            if diff > max_abs:
                max_abs, worst = diff, f"{name}/{key}"
            max_rel = max(max_rel, rel)
    per_rank = max(r["seconds"] for r in ranks)
    speedup = single["seconds"] / per_rank
    rows = [["1 process, all batches", 1, args.batches, single["seconds"], 1.0, single["cpu_seconds"], 1.0, "-"]]
    rows += [[f"rank {i} of {args.world_size}", 1, len(range(i, args.batches, args.world_size)), r["seconds"],
              r["seconds"] / single["seconds"], r["cpu_seconds"], r["cpu_seconds"] / single["cpu_seconds"], r["reduce_seconds"]]
             for i, r in enumerate(ranks)]
    print(f"\n## DDP calibration: {args.world_size} gloo ranks vs 1 process; width {args.width} -> {args.width + 64}, "
          f"{args.layers} layers, {args.batches} batches of {args.batch_size}; 1 torch thread per process")
    print(table(["setting", "threads", "batches", "wall s", "x single (wall)", "CPU s", "x single (CPU)", "all-reduce wall s"], rows))
    print(f"\nRATIO per-rank time / single-process time = {per_rank / single['seconds']:.3f} (ideal {1 / args.world_size:.2f};"
          f" speed-up {speedup:.2f}x); per-rank CPU time / single = {max(r['cpu_seconds'] for r in ranks) / single['cpu_seconds']:.3f}")
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}: other processes on these {os.cpu_count()} cores slow the ranks' wall time")
    print(f"reduced vs single-process statistics: max abs diff {max_abs:.3e} (at {worst}), max relative {max_rel:.3e}")
    write_results(out, {
        "machine": info, "settings": vars(args), "single_seconds": single["seconds"],
        "rank_seconds": [r["seconds"] for r in ranks], "single_cpu_seconds": single["cpu_seconds"],
        "rank_cpu_seconds": [r["cpu_seconds"] for r in ranks],
        "ratio_cpu_per_rank_over_single": max(r["cpu_seconds"] for r in ranks) / single["cpu_seconds"], "rank_reduce_seconds": [r["reduce_seconds"] for r in ranks],
        "ratio_per_rank_over_single": per_rank / single["seconds"], "speedup": speedup,
        "max_abs_diff": max_abs, "max_rel_diff": max_rel, "worst_tensor": worst,
    })


if __name__ == "__main__":
    main()
