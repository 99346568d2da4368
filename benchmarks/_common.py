"""Shared helpers for the benchmark scripts: machine description, tables, JSON results, timers."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_SRC = BENCH_DIR.parent / "src"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
try:  # run from a checkout without an install: fall back to ./src
    import theseus_transport  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(REPO_SRC))

import torch  # noqa: E402


def cpu_model() -> str:
    """Return the CPU model name (plus family/model numbers) from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if ":" in line:
                key, value = (part.strip() for part in line.split(":", 1))
                fields.setdefault(key, value)
            elif fields:
                break
    name = fields.get("model name", platform.processor() or "unknown")
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Return a description of the machine the benchmark runs on."""
    import psutil

    info = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def sync(device: str | torch.device) -> None:
    """Wait for queued CUDA work on `device` (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def peak_rss_bytes() -> int:
    """Return this process's peak resident set size in bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Return this process's current resident set size in bytes."""
    import psutil

    return psutil.Process().memory_info().rss


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return a Markdown table (also readable in a terminal)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
        return str(value)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.extend("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in body)
    return "\n".join(lines)


def add_results_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --results (where the JSON goes) and --overwrite (replace an existing one) to a script's parser."""
    parser.add_argument("--results", type=Path, default=None,
                        help="results JSON to write (default: benchmarks/results/<name>.json, the committed record)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing results file")


def refuse_taken(args: argparse.Namespace, *paths: Path, hint: str = "pass --results OTHER.json to write elsewhere") -> None:
    """Stop, before any work, if one of `paths` exists and --overwrite was not given; `hint` says how to avoid it."""
    taken = [p for p in paths if p.exists()]
    if taken and not args.overwrite:
        # the committed files hold the figures the README quotes; a trial run must not replace them
        raise SystemExit(f"{', '.join(map(str, taken))} exists: {hint}, or --overwrite to replace it")


def results_path(name: str, args: argparse.Namespace, *companions: Path) -> Path:
    """Where this run's JSON goes; refuses, before any work, to replace it (or a companion file) without --overwrite."""
    path = Path(args.results) if args.results is not None else RESULTS_DIR / f"{name}.json"
    refuse_taken(args, path, *companions)
    return path


def companion_path(args: argparse.Namespace, default: Path, suffix: str) -> Path:
    """Another output of a run (e.g. a plot): beside --results when given, else `default`."""
    return Path(args.results).with_suffix(suffix) if args.results is not None else default


def write_results(path: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (plus the load average at the end and the command line) as JSON to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload.setdefault("machine", {})["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    payload["command"] = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nresults written to {path}")
    return path


class SectionTimer:
    """Accumulates wall time per named section; used to instrument engine functions by wrapping them."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        # time spent in sections nested inside each open section (innermost last)
        self._nested: list[float] = []

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time the enclosed block under `name`, exclusive of nested sections (so sections add up).

        Exclusive because the engine updates statistics inside the target's forward hooks: timed
        inclusively, a forward section would count the statistics a second time.
        """
        sync(self.device)
        started = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            sync(self.device)
            elapsed = time.perf_counter() - started
            self.seconds[name] += elapsed - self._nested.pop()
            self.calls[name] += 1
            if self._nested:
                self._nested[-1] += elapsed

    def wrap(self, owner: Any, attribute: str, name: str) -> Callable[[], None]:
        """Replace `owner.attribute` by a timed wrapper; return a function that restores it."""
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.section(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)
        return lambda: setattr(owner, attribute, original)


def fmt_bytes(value: float) -> str:
    """Return a byte count in MiB or GiB."""
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def capture_spaces(family: str, source: Any, target: Any, map_mode: str | None = None) -> tuple[Any, Any, Any, set[str]]:
    """Return (adapter, source encoder, target encoder, capture points) exactly as engine.build_plan chooses them."""
    from theseus_transport.transport import engine

    adapter, source_encoder, target_encoder = engine.resolve_family(family, source, target)
    rules = adapter.param_rules(source_encoder, map_mode or engine.DEFAULT_MAP_MODE)
    spaces = set().union(*(rule.spaces() for rule in rules.values() if not rule.skipped))
    return adapter, source_encoder, target_encoder, spaces


def paired_random_batches(count: int, batch_size: int, source_size: int, target_size: int,
                          seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yield `count` paired random batches (the same images at each model's size), one at a time."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        images = torch.rand(batch_size, 3, target_size, target_size, generator=generator)
        source = torch.nn.functional.interpolate(images, size=(source_size, source_size), mode="bilinear", antialias=True)
        yield {"source": source, "target": images}


def run_child(script: str, arguments: Sequence[str]) -> dict[str, Any]:
    """Run `script --child <arguments>` in a fresh interpreter and return the JSON of its last stdout line."""
    output = subprocess.run([sys.executable, script, "--child", *arguments], check=True, capture_output=True,
                            text=True).stdout
    return json.loads(output.strip().splitlines()[-1])
