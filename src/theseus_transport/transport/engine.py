"""The transport pipeline: calibration passes -> statistics -> maps -> plan -> target task vector.

Pure torch. Model-family specifics come from an adapter (theseus_transport.families).
Dtype policy: statistics, SVDs and the rule run in float64 (on the models' device when it has
float64); maps are moved to the CPU at the end and updates are cast to the parameter dtype last.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .alignment import align_tokens
from .errors import CalibrationError, DepthMismatchError, FamilyMismatchError, ShapeMismatchError, TaskVectorKeyError
from .layermap import LayerMap, expand_module
from .heads import AttentionLayout, head_block_maps
from .maps import MapOptions, float64_svd, numerical_rank, procrustes_from_svd, theseus_map
from .methods import get_method
from .plan import KeyReport, TransportPlan
from .rule import ParamRule
from .statistics import BATCH_PRODUCT_DTYPES, CrossStatistics, ReduceFn, StatisticsSet, derive_linear_output

log = logging.getLogger(__name__)

MAP_MODES = ("rank_aware", "paper")
DEFAULT_MAP_MODE = "rank_aware"
# per_point: q, k, v and the attention context each get their own map (DESIGN item 6);
# heads: q/k and v/context share head-block maps under a head matching (heads.py)
ATTENTION_MAPS = ("per_point", "heads")
DEFAULT_ATTENTION_MAPS = "per_point"


def resolve_family(family: Any, source_model: nn.Module, target_model: nn.Module) -> tuple[Any, nn.Module, nn.Module]:
    """Return (adapter, source encoder, target encoder) from a family name, an adapter, or None (detect)."""
    from ..families import detect_family, get_family

    adapter = get_family(family) if isinstance(family, str) else family
    if adapter is None:
        adapter = detect_family(getattr(source_model, "visual", source_model))
    source, target = adapter.encoder(source_model), adapter.encoder(target_model)
    for role, encoder in (("source", source), ("target", target)):
        if adapter.name != "generic" and not adapter.matches(encoder):
            raise FamilyMismatchError(
                f"the {role} model ({type(encoder).__name__}) is not a {adapter.name!r} model; "
                "source and target must belong to the same family"
            )
    if type(source) is not type(target):
        raise FamilyMismatchError(
            f"source ({type(source).__name__}) and target ({type(target).__name__}) are different model classes"
        )
    return adapter, source, target


def task_vector_from_models(base: nn.Module, finetuned: nn.Module) -> dict[str, torch.Tensor]:
    """Return fine-tuned minus base for every floating-point key (same architecture required)."""
    base_state, tuned_state = base.state_dict(), finetuned.state_dict()
    if base_state.keys() != tuned_state.keys():
        missing = sorted(set(base_state) ^ set(tuned_state))[:5]
        raise TaskVectorKeyError(f"base and fine-tuned models have different keys, e.g. {missing}")
    vector = {}
    for key, value in base_state.items():
        if not value.is_floating_point():
            continue
        if tuned_state[key].shape != value.shape:
            raise ShapeMismatchError(f"{key}: fine-tuned shape {tuple(tuned_state[key].shape)} != base {tuple(value.shape)}")
        vector[key] = (tuned_state[key].detach() - value.detach()).cpu()
    return vector


def _storage_identity(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Which memory a state-dict entry is: tied parameters (T5's shared / embed_tokens) share one."""
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()))


@torch.no_grad()
def apply_task_vector(encoder: nn.Module, task_vector: Mapping[str, torch.Tensor], alpha: float = 1.0) -> nn.Module:
    """Add alpha times a task vector to the encoder's parameters in place and return the encoder.

    A parameter tied under several names (T5's `shared.weight` and `encoder.embed_tokens.weight`) is
    updated once; the task vector must then give every one of its names the same update.
    """
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")
    state = encoder.state_dict()
    for key, delta in task_vector.items():
        if key not in state:
            raise TaskVectorKeyError(f"task-vector key {key!r} is not a parameter of the model")
        if state[key].shape != delta.shape:
            raise ShapeMismatchError(f"{key}: update shape {tuple(delta.shape)} != parameter {tuple(state[key].shape)}")
    applied: dict[tuple[Any, ...], str] = {}
    for key, delta in task_vector.items():
        identity = _storage_identity(state[key])
        if identity in applied:
            first = applied[identity]
            if not torch.equal(task_vector[first], delta):
                raise TaskVectorKeyError(
                    f"{first!r} and {key!r} are one tied parameter of this model, but the task vector gives them "
                    "different updates; keep one of the two keys, or make them equal"
                )
            continue
        applied[identity] = key
    for key in applied.values():
        target, delta = state[key], task_vector[key]
        # add in float64 and cast once, so alpha * delta is not rounded twice
        target.copy_((target.to(torch.float64) + alpha * delta.to(target.device, torch.float64)).to(target.dtype))
    return encoder


def split_pair(item: Any) -> tuple[Any, Any]:
    """Return (source batch, target batch) from a dict with 'source'/'target' or a 2-tuple."""
    if isinstance(item, Mapping) and "source" in item and "target" in item:
        return item["source"], item["target"]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise CalibrationError(
        "a calibration item must be a dict with 'source' and 'target' (the same examples preprocessed for "
        f"each model) or a (source, target) pair; got {type(item).__name__}"
    )


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def _frozen_eval(*modules: nn.Module):
    # calibration uses the base models as they are at inference: eval mode, no autograd; every
    # submodule's own mode is restored afterwards (a model may hold a frozen part in eval mode)
    modes = [(submodule, submodule.training) for module in modules for submodule in module.modules()]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for submodule, mode in modes:
            submodule.training = mode


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        first = next(value for value in batch.values() if isinstance(value, torch.Tensor))
        return first.shape[0]
    return 0


def _stream_batch(
    adapter: Any,
    source: nn.Module,
    target: nn.Module,
    source_capture: Any,
    target_capture: Any,
    source_batch: Any,
    target_batch: Any,
    spaces: Sequence[str],
    token_alignment: str,
    consume: Callable[[str, torch.Tensor, torch.Tensor], None],
) -> None:
    """Run one paired batch through both models; hand each point's paired rows to `consume` once both exist.

    The source pass runs first and its activations are held; during the target pass each point is
    aligned, consumed and dropped as soon as the target produces it, so at most one model's
    activations (plus one point of the other) are alive instead of every point of both models.
    Failures are raised after the target pass for the first failing point in `spaces` order: the
    same error a loop over `spaces` after both passes would raise.
    """
    adapter.forward(source, adapter.batch_to(source_batch, _device_of(source)))
    from_source = set(source_capture.activations)
    from_target: set[str] = set()
    failures: dict[str, Exception] = {}
    mask = adapter.token_mask(target_batch)

    def pair(space: str, target_activation: torch.Tensor) -> None:
        if space in from_target:
            # its first activation is already in the statistics: a later one cannot replace it
            failures.setdefault(space, CalibrationError(
                f"capture point {space!r} produced more than one activation in one forward pass of the target "
                "model (a module called twice?); each capture point must fire once per pass"))
            return
        from_target.add(space)
        source_activation = source_capture.activations.pop(space, None)
        if source_activation is None:
            return  # reported as missing below
        try:
            consume(space, *align_tokens(source_activation, target_activation, token_alignment, mask))
        except Exception as error:  # noqa: BLE001 - re-raised below, in `spaces` order, after the pass
            failures[space] = error

    try:
        with target_capture.streaming(pair):
            adapter.forward(target, adapter.batch_to(target_batch, _device_of(target)))
    finally:
        source_capture.clear()
    for space in spaces:
        if space in failures:
            raise failures[space]
        missing = [role for role, produced in (("source", from_source), ("target", from_target)) if space not in produced]
        if missing:
            raise CalibrationError(f"capture point {space!r} produced no activation in the {' and '.join(missing)} model (missing layer?)")


def plan_groups(space_bytes: Mapping[str, int], budget_bytes: int | None) -> list[list[str]]:
    """Pack capture points, in order, into groups whose statistics fit `budget_bytes` each."""
    names = list(space_bytes)
    if budget_bytes is None:
        return [names]
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = space_bytes[name]
        if groups[-1] and used + size > budget_bytes:
            groups.append([])
            used = 0
        if size > budget_bytes:
            log.warning("capture point %s needs %.1f MB, over the %.1f MB budget: it gets a pass of its own", name, size / 2**20, budget_bytes / 2**20)
        groups[-1].append(name)
        used += size
    return groups


def _probe_dims(adapter: Any, source: nn.Module, target: nn.Module, spaces: set[str], first_item: Any) -> dict[str, tuple[int, int]]:
    source_batch, target_batch = split_pair(first_item)
    source_widths: dict[str, int] = {}
    target_widths: dict[str, int] = {}
    with adapter.capture(source, spaces) as source_capture, adapter.capture(target, spaces) as target_capture:
        # only the widths are needed: note each as its activation appears and hold none
        with source_capture.streaming(lambda space, activation: source_widths.update({space: activation.shape[-1]})):
            adapter.forward(source, adapter.batch_to(source_batch, _device_of(source)))
        with target_capture.streaming(lambda space, activation: target_widths.update({space: activation.shape[-1]})):
            adapter.forward(target, adapter.batch_to(target_batch, _device_of(target)))
    return {space: (source_widths[space], target_widths[space]) for space in spaces if space in source_widths and space in target_widths}


def svd_workspace_bytes(source_dim: int, target_dim: int) -> int:
    """Return the bytes of the float64 thin-SVD factors U and V^T of a source_dim x target_dim matrix."""
    return 8 * (source_dim + target_dim) * min(source_dim, target_dim)


@dataclass(frozen=True)
class LinearDerivation:
    """How a derived point's statistics follow from its input point's: Y = X W^T + b on each side."""

    input_space: str
    source_weight: torch.Tensor
    source_bias: torch.Tensor | None
    target_weight: torch.Tensor
    target_bias: torch.Tensor | None

    def apply(self, statistics: CrossStatistics) -> CrossStatistics:
        """Return the derived point's statistics from its input point's."""
        return derive_linear_output(statistics, self.source_weight, self.source_bias, self.target_weight, self.target_bias)


def linear_derivations(adapter: Any, source: nn.Module, target: nn.Module, spaces: Iterable[str]) -> dict[str, LinearDerivation]:
    """Return the points of `spaces` whose statistics are derived (not captured): linear outputs of a captured point.

    A point qualifies when the adapter links it, in both models, to the same input point, and that
    input is among `spaces` and captured itself. An input the caller did not ask for is not collected
    just for this: it can be wider than the output (c_proj's input is 4x its output).
    """
    spaces = set(spaces)
    source_links, target_links = adapter.linear_outputs(source), adapter.linear_outputs(target)
    derivations = {}
    for space in sorted(spaces & source_links.keys() & target_links.keys()):
        (input_space, source_weight, source_bias), (target_input, target_weight, target_bias) = source_links[space], target_links[space]
        if input_space != target_input or input_space not in spaces or input_space in source_links:
            continue
        derivations[space] = LinearDerivation(input_space, source_weight.detach(), None if source_bias is None else source_bias.detach(),
                                              target_weight.detach(), None if target_bias is None else target_bias.detach())
    return derivations


def _statistics_groups(
    adapter: Any, source: nn.Module, target: nn.Module, calibration: Iterable[Any], spaces: Sequence[str],
    with_grams: bool, memory_budget_bytes: int | None, svd_copies: int = 0,
    derivations: Mapping[str, LinearDerivation] | None = None, together: Sequence[Sequence[str]] = (),
) -> list[list[str]]:
    # one group (one pass) without a budget; otherwise a probe batch gives each captured point's widths
    # and the points are packed so each group's statistics plus `svd_copies` SVD factors fit the budget.
    # A derived point is computed from its input point at the end of the pass that collects the input,
    # so it is packed with its input as one unit (its widths are those of its weights)
    derivations = derivations or {}
    if memory_budget_bytes is None:
        return [list(spaces)]
    if iter(calibration) is calibration:
        # a generator or iterator would lose the probe batch here and be empty for a second group's pass
        raise CalibrationError(
            "with a memory budget the calibration data is read more than once (a probe batch, then a pass "
            f"per group of capture points), but a one-shot {type(calibration).__name__} was given: pass a list "
            "of batches or a DataLoader"
        )
    first = next(iter(calibration), None)
    if first is None:
        raise CalibrationError("the calibration set is empty: at least one batch is needed")
    captured = [space for space in spaces if space not in derivations]
    with _frozen_eval(source, target):
        dims = _probe_dims(adapter, source, target, set(captured), first)
    for space, derivation in derivations.items():
        dims[space] = (derivation.source_weight.shape[0], derivation.target_weight.shape[0])

    def size(space: str) -> int:
        source_dim, target_dim = dims.get(space, (0, 0))
        return (CrossStatistics(source_dim, target_dim, with_grams=with_grams).nbytes()
                + svd_copies * svd_workspace_bytes(source_dim, target_dim))

    dependents: dict[str, list[str]] = {space: [] for space in captured}
    for space, derivation in derivations.items():
        dependents[derivation.input_space].append(space)
    # a unit is a captured point with its derived points; points whose maps are built together (an
    # attention layer's q, k, v and context with head-aware maps) merge their units into one
    members: dict[str, list[str]] = {space: [space] for space in captured}
    owner = {space: space for space in captured}
    for tied in together:
        roots = sorted({owner[derivations[space].input_space if space in derivations else space]
                        for space in tied if space in owner or space in derivations})
        for root in roots[1:]:
            for member in members.pop(root):
                owner[member] = roots[0]
                members[roots[0]].append(member)
    units = {name: sum(size(space) + sum(size(d) for d in dependents[space]) for space in group)
             for name, group in members.items()}
    return [sorted(name for unit in group for space in members[unit] for name in [space, *dependents[space]])
            for group in plan_groups(units, memory_budget_bytes)]


def _collect_group(
    adapter: Any, source: nn.Module, target: nn.Module, calibration: Iterable[Any], group: Sequence[str],
    token_alignment: str, with_grams: bool, reduce_fn: ReduceFn | None, progress: bool, batch_products: str,
    description: str, derivations: Mapping[str, LinearDerivation] | None = None,
) -> StatisticsSet:
    # one calibration pass accumulating the statistics of the captured points in `group` (then reduced
    # across ranks); the group's derived points are computed from their (reduced) input points after it
    derived = {space: derivation for space, derivation in (derivations or {}).items() if space in group}
    captured = [space for space in group if space not in derived]
    points: dict[str, CrossStatistics] = {}
    batches = 0

    def update(space: str, source_rows: torch.Tensor, target_rows: torch.Tensor) -> None:
        if space not in points:
            points[space] = CrossStatistics(source_rows.shape[1], target_rows.shape[1], with_grams, batch_products=batch_products)
        try:
            points[space].update(source_rows, target_rows)
        except CalibrationError as error:
            raise CalibrationError(f"calibration batch {batches}, capture point {space!r}: {error}") from None

    wanted = set(captured)
    with _frozen_eval(source, target):
        with adapter.capture(source, wanted) as source_capture, adapter.capture(target, wanted) as target_capture:
            for item in tqdm(calibration, desc=description, disable=not progress, leave=False):
                source_batch, target_batch = split_pair(item)
                if _batch_size(source_batch) != _batch_size(target_batch):
                    raise CalibrationError(
                        f"calibration batch {batches}: source has {_batch_size(source_batch)} examples, "
                        f"target {_batch_size(target_batch)}; pairs must hold the same examples"
                    )
                _stream_batch(adapter, source, target, source_capture, target_capture, source_batch, target_batch,
                              captured, token_alignment, update)
                batches += 1
    if batches == 0:
        raise CalibrationError("the calibration set is empty: at least one batch is needed")
    if reduce_fn is not None:
        # every rank reduces the same captured points in the same (sorted) order
        StatisticsSet({space: points[space] for space in sorted(points)}).reduce(reduce_fn)
    # after the reduce, so every rank derives from the same totals (and nothing derived is reduced)
    for space, derivation in derived.items():
        if derivation.input_space in points:
            points[space] = derivation.apply(points[derivation.input_space])
    # points were created in hook order; keep the set in `group` (sorted) order
    return StatisticsSet({space: points[space] for space in group if space in points})


def _check_batch_products(batch_products: str) -> None:
    if batch_products not in BATCH_PRODUCT_DTYPES:
        raise ValueError(f"unknown batch_products {batch_products!r}; choose one of {sorted(BATCH_PRODUCT_DTYPES)}")


def _group_description(index: int, count: int) -> str:
    return "calibration" if count == 1 else f"calibration (group {index + 1}/{count})"


def collect_statistics(
    adapter: Any,
    source: nn.Module,
    target: nn.Module,
    calibration: Iterable[Any],
    spaces: Iterable[str],
    token_alignment: str,
    with_grams: bool = False,
    memory_budget_bytes: int | None = None,
    reduce_fn: ReduceFn | None = None,
    progress: bool = True,
    batch_products: str = "float64",
    derive_linear_outputs: bool = True,
) -> StatisticsSet:
    """Stream paired calibration batches through both base models and accumulate cross-statistics.

    With `memory_budget_bytes`, capture points are split into groups whose statistics each fit the
    budget and the calibration data is passed once per group (it must then be re-iterable, e.g. a
    DataLoader); all groups' statistics are returned, so the budget bounds only what one pass
    accumulates (`build_plans` drops each group's statistics once its maps are built).
    `reduce_fn` sums the statistics across processes (DDP) before anything is derived from them.
    `batch_products` ("float64" or "float32") is the dtype of each batch's products; the totals are
    float64 either way (see CrossStatistics).
    `derive_linear_outputs` computes the statistics of a linear layer's output point from its input
    point's, once per pass, instead of capturing it (`linear_derivations`); False captures every point.
    """
    _check_batch_products(batch_products)
    spaces = sorted(set(spaces))
    derivations = linear_derivations(adapter, source, target, spaces) if derive_linear_outputs else {}
    groups = _statistics_groups(adapter, source, target, calibration, spaces, with_grams, memory_budget_bytes,
                                derivations=derivations)
    statistics = StatisticsSet()
    for index, group in enumerate(groups):
        statistics.points.update(_collect_group(
            adapter, source, target, calibration, group, token_alignment, with_grams, reduce_fn, progress,
            batch_products, _group_description(index, len(groups)), derivations,
        ).points)
    return statistics


# (space, centered) -> thin SVD (U, S, V^T) of that cross-covariance, shared by maps and rank reports
SvdCache = dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def build_maps(
    statistics: StatisticsSet, method_name: str, options: MapOptions, progress: bool = True,
    svd_cache: SvdCache | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, int]]]:
    """Return a map per capture point (float64, moved to the CPU) and each point's numerical rank.

    The SVD of each cross-covariance is computed once and shared by the Procrustes map and the rank
    report; `svd_cache` (keyed by space and centering) shares it across several calls as well.
    """
    method = get_method(method_name)
    svd_cache = {} if svd_cache is None else svd_cache
    maps, ranks = {}, {}
    for space in tqdm(sorted(statistics), desc="maps", disable=not progress, leave=False):
        stats = statistics[space]
        key = (space, options.center)
        if method.build_map is theseus_map:
            if key not in svd_cache:
                svd_cache[key] = float64_svd(stats.cross_covariance(options.center))
            left, singular_values, right_t = svd_cache[key]
            maps[space] = procrustes_from_svd(left, singular_values, right_t, options.rank_aware, options.rank_rtol).cpu()
        else:
            maps[space] = method.build_map(stats, options).cpu()
            # baselines need only the spectrum for the rank report
            singular_values = svd_cache[key][1] if key in svd_cache else torch.linalg.svdvals(
                stats.cross_covariance(options.center).to(torch.float64))
        ranks[space] = {
            "rank": numerical_rank(singular_values, options.rank_rtol),
            "full_rank": min(stats.source_dim, stats.target_dim),
            "tokens": stats.count,
        }
    return maps, ranks


@dataclass
class TransportReport:
    """What a transport did: per-key norms, skipped keys, ranks, alignment before/after, settings."""

    method: str
    map_mode: str
    alpha: float
    settings: dict[str, Any]
    keys: list[KeyReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    ranks: dict[str, dict[str, int]] = field(default_factory=dict)
    alignment: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # per capture point: does the transported update move the target like the task vector moved the source
    update_alignment: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dict."""
        payload = asdict(self)
        payload["keys"] = [dict(key=k.key, source_norm=k.source_norm, target_norm=k.target_norm, norm_ratio=k.norm_ratio) for k in self.keys]
        return payload

    def summary(self) -> str:
        """Return a human-readable per-layer table."""
        lines = [f"method={self.method} map_mode={self.map_mode} alpha={self.alpha}"]
        lines.append(f"{'key':60s} {'|dW_A|':>10s} {'|dW_B|':>10s} {'ratio':>7s}")
        for k in self.keys:
            lines.append(f"{k.key:60s} {k.source_norm:10.4g} {k.target_norm:10.4g} {k.norm_ratio:7.4f}")
        if self.skipped:
            lines.append(f"skipped ({len(self.skipped)} keys, target delta = 0):")
            lines.extend(f"  {key}: {reason}" for key, reason in sorted(self.skipped.items()))
        deficient = {s: r for s, r in self.ranks.items() if r["rank"] < r["full_rank"]}
        if deficient:
            lines.append("rank-deficient cross-covariances (part of the map undetermined):")
            lines.extend(f"  {s}: rank {r['rank']} of {r['full_rank']} ({r['tokens']} tokens)" for s, r in sorted(deficient.items()))
        if self.alignment:
            before = sum(a["before"] for a in self.alignment.values()) / len(self.alignment)
            after = sum(a["after"] for a in self.alignment.values()) / len(self.alignment)
            lines.append(f"activation cosine on held-out batches, mean over {len(self.alignment)} layers: before {before:.4f} after {after:.4f}")
            for space, values in sorted(self.alignment.items()):
                lines.append(f"  {space:58s} {values['before']:.4f} -> {values['after']:.4f}")
        moved = {s: v for s, v in self.update_alignment.items() if not math.isnan(v["cosine"])}
        if moved:
            mean = sum(v["cosine"] for v in moved.values()) / len(moved)
            lines.append(f"update fidelity on held-out batches (cosine of the target's activation change with the "
                         f"source's, mapped; norm ratio), mean over {len(moved)} layers: {mean:.4f}")
            for space, values in sorted(moved.items()):
                lines.append(f"  {space:58s} {values['cosine']:.4f}  x{values['norm_ratio']:.3f}")
        return "\n".join(lines)


@dataclass
class TransportResult:
    """The target task vector, the report and the reusable plan."""

    task_vector: dict[str, torch.Tensor]
    report: TransportReport
    plan: TransportPlan


def _pad_or_crop(rows: torch.Tensor, width: int) -> torch.Tensor:
    if rows.shape[1] >= width:
        return rows[:, :width]
    return F.pad(rows, (0, width - rows.shape[1]))


@torch.no_grad()
def measure_alignment(
    adapter: Any,
    source: nn.Module,
    target: nn.Module,
    maps: Mapping[str, torch.Tensor],
    held_out: Iterable[Any],
    token_alignment: str,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Mean cosine similarity of paired tokens, before (zero-pad/crop) and after the maps (paper Sec. 4.7)."""
    totals = {space: [0.0, 0.0, 0] for space in maps}

    def accumulate(space: str, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.to(torch.float64), b.to(torch.float64)
        before = F.cosine_similarity(_pad_or_crop(a, b.shape[1]), b, dim=1)
        after = F.cosine_similarity(a @ maps[space].to(a.device), b, dim=1)
        totals[space][0] += float(before.sum())
        totals[space][1] += float(after.sum())
        totals[space][2] += a.shape[0]

    with _frozen_eval(source, target):
        with adapter.capture(source, set(maps)) as source_capture, adapter.capture(target, set(maps)) as target_capture:
            for item in tqdm(held_out, desc="alignment", disable=not progress, leave=False):
                source_batch, target_batch = split_pair(item)
                _stream_batch(adapter, source, target, source_capture, target_capture, source_batch, target_batch,
                              list(maps), token_alignment, accumulate)
    return {space: {"before": t[0] / t[2], "after": t[1] / t[2]} for space, t in totals.items() if t[2] > 0}


def _resolve_depth(adapter: Any, source: nn.Module, target: nn.Module, layer_map: LayerMap | str | None) -> LayerMap | None:
    source_depth, target_depth = len(adapter.blocks(source)), len(adapter.blocks(target))
    if isinstance(layer_map, str):
        if layer_map != "interpolate":
            raise ValueError(f"unknown layer map {layer_map!r}; use 'interpolate' or a LayerMap")
        if target_depth < source_depth:
            raise DepthMismatchError(
                f"layer_map='interpolate' expands a shallower source (paper Sec. 4.4), but the source has "
                f"{source_depth} blocks and the target {target_depth}: it would drop the updates of the source "
                "blocks it skips. Pass a LayerMap saying which source blocks each target block takes "
                "(e.g. LayerMap(((0, 0.5), (1, 0.5)), ...) to average pairs)"
            )
        layer_map = LayerMap.interpolated(source_depth, target_depth)
    if layer_map is None:
        if source_depth != target_depth:
            raise DepthMismatchError(
                f"source has {source_depth} blocks and target {target_depth}; pass layer_map='interpolate' "
                "(paper Sec. 4.4) or a LayerMap pairing source and target blocks"
            )
        return None
    if layer_map.target_depth != target_depth:
        raise DepthMismatchError(f"layer map has {layer_map.target_depth} target blocks, the target has {target_depth}")
    bad = [i for combination in layer_map.sources for i, _ in combination if i >= source_depth]
    if bad:
        raise DepthMismatchError(f"layer map refers to source blocks {sorted(set(bad))}, the source has {source_depth}")
    return layer_map


def _variant_rules(adapter: Any, source: nn.Module, target: nn.Module, map_mode: str, embeddings: bool = False) -> dict[str, ParamRule]:
    source_rules = adapter.param_rules(source, map_mode)
    target_rules = adapter.param_rules(target, map_mode)
    if embeddings:
        # the family's embedding-stage rules replace the default skips of those keys on both sides
        embedding_rules = adapter.embedding_rules(source, target)
        source_rules.update({key: rule for key, rule in embedding_rules.items() if key in source_rules})
        target_rules.update({key: rule for key, rule in embedding_rules.items() if key in target_rules})
    rules: dict[str, ParamRule] = {}
    for key, rule in source_rules.items():
        if not rule.skipped and (key not in target_rules or target_rules[key].skipped):
            rule = ParamRule(skip_reason="the target model has no transportable parameter of this name")
        rules[key] = rule
    return rules


def paired_attention_layouts(adapter: Any, source: nn.Module, target: nn.Module) -> list[tuple[AttentionLayout, AttentionLayout]]:
    """Pair the source's and target's attention layers for head-aware maps; refuse what they cannot map."""
    source_layouts = {layout.query_space: layout for layout in adapter.attention_layouts(source)}
    target_layouts = adapter.attention_layouts(target)
    if not source_layouts or not target_layouts:
        raise ValueError(f"the {adapter.name!r} family describes no attention heads; use attention maps 'per_point'")
    pairs = []
    for target_layout in target_layouts:
        source_layout = source_layouts.get(target_layout.query_space)
        if source_layout is None:
            raise ValueError(f"attention layer {target_layout.query_space!r} of the target has no source counterpart")
        if source_layout.head_dim != target_layout.head_dim:
            raise ShapeMismatchError(
                f"head-aware attention maps need equal head widths; at {target_layout.query_space!r} the source's heads "
                f"are {source_layout.head_dim} wide and the target's {target_layout.head_dim}: use attention maps 'per_point'"
            )
        pairs.append((source_layout, target_layout))
    return pairs


def _head_aware_maps(
    layers: Sequence[tuple[AttentionLayout, AttentionLayout]], statistics: StatisticsSet, available: set[str],
    options: MapOptions,
) -> tuple[dict[str, torch.Tensor], dict[str, list[list[int]]]]:
    """The head-block maps of every attention layer whose four points are in `available` (one group)."""
    maps: dict[str, torch.Tensor] = {}
    matchings: dict[str, list[list[int]]] = {}
    for _, target_layout in layers:  # paired and checked: the two models' head widths are equal
        if not set(target_layout.spaces) <= available:
            continue
        query, key, value, context = (statistics[space].cross_covariance(options.center) for space in target_layout.spaces)
        query_key, value_context, matching = head_block_maps(query, key, value, context, target_layout.head_dim,
                                                             options.rank_aware, options.rank_rtol)
        for space, value_map in zip(target_layout.spaces, (query_key, query_key, value_context, value_context)):
            maps[space] = value_map.cpu()
        matchings[target_layout.query_space] = [list(pair) for pair in matching]
    return maps, matchings


def build_plans(
    source_base: nn.Module,
    target_base: nn.Module,
    calibration: Iterable[Any],
    variants: Sequence[Mapping[str, Any]],
    family: Any = None,
    token_alignment: str | None = None,
    layer_map: LayerMap | str | None = None,
    rank_rtol: float = 1e-7,
    ridge: float = 1e-2,
    seed: int = 0,
    memory_budget_bytes: int | None = None,
    reduce_fn: ReduceFn | None = None,
    progress: bool = True,
    batch_products: str = "float64",
    derive_linear_outputs: bool = True,
) -> tuple[list[TransportPlan], dict[str, Any]]:
    """Compute plans for several (method, map_mode, center, embeddings, attention) variants from ONE pass of calibration data.

    Each variant is a mapping with optional keys 'method', 'map_mode', 'center', 'embeddings'
    (also transport the embedding stage: see `transport`) and 'attention' ('per_point' or 'heads':
    see `transport`); the statistics of the union of their capture points are collected once and
    every variant's maps derive from them.
    With `memory_budget_bytes`, the points are split into groups whose statistics and SVD factors
    fit the budget; each group gets its own pass, its maps are built right after it, and its
    statistics are dropped before the next pass (the finished maps are kept: they are the plans).
    `derive_linear_outputs` (default) derives the statistics of linear layers' output points from
    their input points' instead of capturing them (exact up to float64 rounding; see
    `linear_derivations`); False captures every point, as before.
    """
    variants = [dict(method=v.get("method", "theseus"), map_mode=v.get("map_mode", DEFAULT_MAP_MODE), center=bool(v.get("center", False)),
                     embeddings=bool(v.get("embeddings", False)), attention=v.get("attention", DEFAULT_ATTENTION_MAPS))
                for v in variants]
    for variant in variants:
        if variant["map_mode"] not in MAP_MODES:
            raise ValueError(f"unknown map mode {variant['map_mode']!r}; choose one of {MAP_MODES}")
        if variant["attention"] not in ATTENTION_MAPS:
            raise ValueError(f"unknown attention maps {variant['attention']!r}; choose one of {ATTENTION_MAPS}")
        if variant["attention"] == "heads" and get_method(variant["method"]).build_map is not theseus_map:
            raise ValueError(f"attention maps 'heads' are Procrustes maps: method {variant['method']!r} cannot use them")
        get_method(variant["method"])
    started = time.perf_counter()
    adapter, source, target = resolve_family(family, source_base, target_base)
    if any(variant["embeddings"] for variant in variants):
        # only the whole target shows whether its embedding table is also another part's (a T5 decoder's);
        # refused here, before any calibration pass
        adapter.check_embedding_target(target_base)
    resolved_map = _resolve_depth(adapter, source, target, layer_map)
    original_source_shapes = None
    if resolved_map is not None:
        original_source_shapes = {k: tuple(v.shape) for k, v in source.state_dict().items() if v.is_floating_point()}
        source = expand_module(source, adapter.blocks(source), adapter.block_prefix(source), resolved_map)
    token_alignment = token_alignment or adapter.default_token_alignment
    rules_by_mode = {(v["map_mode"], v["embeddings"]): _variant_rules(adapter, source, target, v["map_mode"], v["embeddings"])
                     for v in variants}
    needed_by_variant = [
        set().union(*(rule.spaces() for rule in rules_by_mode[v["map_mode"], v["embeddings"]].values() if not rule.skipped))
        for v in variants
    ]
    spaces = set().union(*needed_by_variant)
    _check_batch_products(batch_products)
    with_grams = any(get_method(v["method"]).needs_grams for v in variants)
    options_by_variant = [
        MapOptions(center=v["center"], rank_aware=v["map_mode"] == "rank_aware", rank_rtol=rank_rtol, ridge=ridge, seed=seed)
        for v in variants
    ]
    # the SVD factors of a point stay cached for its whole group, one per centering among the Procrustes
    # variants; baselines need comparable transient workspace (pinv, svdvals), so count at least one
    svd_copies = max(1, len({v["center"] for v in variants if get_method(v["method"]).build_map is theseus_map}))
    derivations = linear_derivations(adapter, source, target, spaces) if derive_linear_outputs else {}
    attention_layers = paired_attention_layouts(adapter, source, target) if any(v["attention"] == "heads" for v in variants) else []
    groups = _statistics_groups(adapter, source, target, calibration, sorted(spaces), with_grams, memory_budget_bytes, svd_copies,
                                derivations, together=[layer[1].spaces for layer in attention_layers])
    maps_by_variant: list[dict[str, torch.Tensor]] = [{} for _ in variants]
    ranks_by_variant: list[dict[str, dict[str, int]]] = [{} for _ in variants]
    matchings_by_variant: list[dict[str, list[list[int]]]] = [{} for _ in variants]
    tokens: dict[str, int] = {}
    statistics_s = time.perf_counter() - started
    maps_s = 0.0
    for index, group in enumerate(groups):
        # with a budget each group's maps are built right after its pass and its statistics and SVD
        # factors dropped before the next pass, so they are held for one group at a time
        pass_started = time.perf_counter()
        statistics = _collect_group(
            adapter, source, target, calibration, group, token_alignment, with_grams, reduce_fn, progress,
            batch_products, _group_description(index, len(groups)), derivations,
        )
        maps_started = time.perf_counter()
        svd_cache: SvdCache = {}
        for variant, options, needed, variant_maps, variant_ranks in zip(
                variants, options_by_variant, needed_by_variant, maps_by_variant, ranks_by_variant):
            group_maps, group_ranks = build_maps(StatisticsSet({space: statistics[space] for space in group if space in needed}),
                                                 variant["method"], options, progress=progress, svd_cache=svd_cache)
            variant_maps.update(group_maps)
            variant_ranks.update(group_ranks)
        # head-aware variants replace their attention points' per-point maps (whose SVDs still give the ranks)
        for variant, options, needed, variant_maps, matchings in zip(
                variants, options_by_variant, needed_by_variant, maps_by_variant, matchings_by_variant):
            if variant["attention"] == "heads":
                head_maps, head_matchings = _head_aware_maps(attention_layers, statistics, set(group) & needed, options)
                variant_maps.update(head_maps)
                matchings.update(head_matchings)
        tokens.update({space: stats.count for space, stats in statistics.items()})
        del statistics, svd_cache
        statistics_s += maps_started - pass_started
        maps_s += time.perf_counter() - maps_started
    source_shapes = {k: tuple(v.shape) for k, v in source.state_dict().items() if v.is_floating_point()}
    target_shapes = {k: tuple(v.shape) for k, v in target.state_dict().items() if v.is_floating_point()}
    plans, ranks = [], {}
    for variant, needed, variant_maps, variant_ranks, matchings in zip(
            variants, needed_by_variant, maps_by_variant, ranks_by_variant, matchings_by_variant):
        # sorted by point, whatever the groups were (a budget packs derived points with their inputs)
        variant_maps = {space: variant_maps[space] for space in sorted(variant_maps)}
        ranks.update({space: variant_ranks[space] for space in sorted(variant_ranks)})
        plans.append(TransportPlan(
            family=adapter.name,
            method=variant["method"],
            maps=variant_maps,
            rules=rules_by_mode[variant["map_mode"], variant["embeddings"]],
            source_shapes=source_shapes,
            target_shapes=target_shapes,
            metadata={
                "map_mode": variant["map_mode"], "center": variant["center"], "embeddings": variant["embeddings"],
                "attention": variant["attention"],
                # per attention layer (its query point): the (source head, target head) pairs of the maps
                **({"head_matching": {space: matchings[space] for space in sorted(matchings)}} if matchings else {}),
                "token_alignment": token_alignment,
                "rank_rtol": rank_rtol, "ridge": ridge, "seed": seed, "batch_products": batch_products,
                "derived_points": sorted(derivations.keys() & needed),
                "calibration_tokens": {s: tokens[s] for s in sorted(needed)},
                "source": adapter.describe(source), "target": adapter.describe(target),
            },
            layer_map=resolved_map,
            block_prefix=adapter.block_prefix(source) if resolved_map is not None else None,
            original_source_shapes=original_source_shapes,
        ))
    context = {
        "adapter": adapter, "source": source, "target": target, "ranks": ranks,
        "timings": {"statistics_s": statistics_s, "maps_s": maps_s},
    }
    return plans, context


def build_plan(
    source_base: nn.Module,
    target_base: nn.Module,
    calibration: Iterable[Any],
    family: Any = None,
    method: str = "theseus",
    map_mode: str = DEFAULT_MAP_MODE,
    center: bool = False,
    embeddings: bool = False,
    attention: str = DEFAULT_ATTENTION_MAPS,
    **options: Any,
) -> tuple[TransportPlan, dict[str, Any]]:
    """Compute the maps of one method between two base models; return the plan and context.

    `options` are those of `build_plans` (token_alignment, layer_map, rank_rtol, ridge, seed,
    memory_budget_bytes, reduce_fn, progress, batch_products, derive_linear_outputs).
    """
    plans, context = build_plans(
        source_base, target_base, calibration, [dict(method=method, map_mode=map_mode, center=center, embeddings=embeddings,
                                                          attention=attention)],
        family=family, **options
    )
    return plans[0], context


def transport(
    source_base: nn.Module,
    target_base: nn.Module,
    task_vector: Mapping[str, torch.Tensor] | None = None,
    calibration: Iterable[Any] = (),
    *,
    source_finetuned: nn.Module | None = None,
    family: Any = None,
    method: str = "theseus",
    map_mode: str = DEFAULT_MAP_MODE,
    alpha: float = 1.0,
    center: bool = False,
    transport_embeddings: bool = False,
    attention_maps: str = DEFAULT_ATTENTION_MAPS,
    token_alignment: str | None = None,
    layer_map: LayerMap | str | None = None,
    held_out: Iterable[Any] | None = None,
    rank_rtol: float = 1e-7,
    ridge: float = 1e-2,
    seed: int = 0,
    memory_budget_bytes: int | None = None,
    reduce_fn: ReduceFn | None = None,
    progress: bool = True,
    batch_products: str = "float64",
    derive_linear_outputs: bool = True,
) -> TransportResult:
    """Transport a source task vector (or fine-tuned source) onto the target; return vector, report, plan.

    `calibration` yields paired batches (the same examples preprocessed for each model) as dicts with
    'source' and 'target' or as (source, target) tuples; `held_out` (same form, disjoint examples)
    is used only to report activation cosine similarity before and after the maps. The returned
    task vector is already scaled by `alpha` and keyed like the target encoder's state dict.
    `transport_embeddings=True` also carries the embedding stage (OpenCLIP: patch embedding, class
    token, positional embedding, through a map of the embedding sum; T5: the token table's rows, through
    a map of the embedding output, for one shared vocabulary): beyond the paper, off by default. A whole
    T5 encoder-decoder target is then refused (SharedParameterError): its decoder reads the same table.
    `attention_maps='heads'` gives q and k one shared map, and v and the attention context another,
    each a rotation per matched (source head, target head) pair, so every matched head's attention
    logits are preserved (heads.py); beyond the paper ('per_point', the default, is DESIGN item 6).
    `derive_linear_outputs=False` captures every point instead of deriving linear outputs (see `build_plans`).
    """
    if (task_vector is None) == (source_finetuned is None):
        raise ValueError("pass exactly one of task_vector and source_finetuned")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")  # before any statistics are collected
    plan, context = build_plan(
        source_base, target_base, calibration, family=family, method=method, map_mode=map_mode, center=center,
        embeddings=transport_embeddings, attention=attention_maps, token_alignment=token_alignment, layer_map=layer_map, rank_rtol=rank_rtol, ridge=ridge, seed=seed,
        memory_budget_bytes=memory_budget_bytes, reduce_fn=reduce_fn, progress=progress, batch_products=batch_products,
        derive_linear_outputs=derive_linear_outputs,
    )
    adapter = context["adapter"]
    if task_vector is None:
        task_vector = task_vector_from_models(adapter.encoder(source_base), adapter.encoder(source_finetuned))
    started = time.perf_counter()
    scaled, norms, skipped = plan.apply(task_vector, seed=seed, alpha=alpha)
    timings = dict(context["timings"], apply_s=time.perf_counter() - started)
    alignment, update_alignment = {}, {}
    if held_out is not None:
        from .fidelity import measure_update_alignment  # fidelity imports this module

        # read twice (alignment, then update fidelity): a one-shot iterator is kept as a list
        held_out = list(held_out) if iter(held_out) is held_out else held_out
        alignment = measure_alignment(adapter, context["source"], context["target"], plan.maps, held_out, plan.metadata["token_alignment"])
        update_alignment = measure_update_alignment(
            adapter, context["source"], apply_task_vector(copy.deepcopy(context["source"]), plan.expand(task_vector)),
            context["target"], apply_task_vector(copy.deepcopy(context["target"]), scaled),
            plan.maps, held_out, plan.metadata["token_alignment"],
        )
    report = TransportReport(
        method=method, map_mode=map_mode, alpha=alpha, settings=dict(plan.metadata),
        keys=norms, skipped=skipped, ranks=context["ranks"], alignment=alignment, timings=timings,
        update_alignment=update_alignment,
    )
    if any(math.isnan(k.norm_ratio) for k in norms if k.source_norm > 0):
        raise CalibrationError("a transported update is NaN; the calibration statistics are degenerate")
    return TransportResult(scaled, report, plan)
