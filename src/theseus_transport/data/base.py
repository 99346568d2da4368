"""Split handling, labels and paired calibration loaders shared by the image and text datamodules."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from .calibration import CALIBRATION_PROTOCOLS, sample_k_batches, sample_k_shots
from .sources import TOY_PREFIX, ZOO_PREFIX, load_dataset_dict
from .splits import CALIBRATION_SPLIT, limit, standard_splits


def resolve_task(
    find: Callable[[str, str | None], Any | None], dataset: str, dataset_config: str | None
) -> tuple[Any | None, str, str | None]:
    """Return (registry spec or None, dataset, config): a known short name or id resolves to the spec's hub id and config."""
    spec = find(dataset, dataset_config)
    if spec is None:
        return None, dataset, dataset_config
    return spec, spec.hub_id, spec.config


class EpochRandomSampler(RandomSampler):
    """A seeded shuffle that depends only on (seed, epoch), so a resumed fit replays the same order.

    A DataLoader's own generator advances from pass to pass, so after a restart the resumed epoch
    would repeat epoch 0's order. Lightning calls ``set_epoch`` before every epoch (also on resume);
    a plain loop without ``set_epoch`` still gets a new order per pass. Subclassing RandomSampler
    lets Lightning swap in its seeded DistributedSampler under DDP as it does for ``shuffle=True``.
    """

    def __init__(self, data_source: Dataset, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of this epoch."""
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        self.epoch += 1  # the next pass differs even when nobody calls set_epoch
        return iter(order)


# calibration sizes when not given: k = 1 batch (batches protocol), k = 4 examples per class (shots)
DEFAULT_BATCHES, DEFAULT_SHOTS = 1, 4


def inactive_calibration_size(protocol: str, batches: int | None, shots: int | None) -> tuple[str, int] | None:
    """The size setting given for the protocol not in use (("calibration_shots", k) under 'batches'), else None."""
    name, value = ("calibration_shots", shots) if protocol == "batches" else ("calibration_batches", batches)
    return None if value is None else (name, value)


class TaskDataModule(L.LightningDataModule):
    """Base datamodule: load a dataset, standardise its splits, sample calibration examples.

    Subclasses resolve registry short names to ``self.spec`` (a task spec with ``name`` and split
    names), set ``label_column`` (and ``label_map`` for string labels) and ``_classnames`` once the
    splits exist, and implement ``_wrap`` and ``_paired``.
    """

    def __init__(
        self,
        dataset: str,
        dataset_config: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        calibration_protocol: str = "batches",
        calibration_batches: int | None = None,
        calibration_batch_size: int = 32,
        calibration_shots: int | None = None,
        calibration_seed: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        split_seed: int = 0,
        train_limit: int | None = None,
        val_limit: int | None = None,
        test_limit: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if calibration_protocol not in CALIBRATION_PROTOCOLS:
            raise ValueError(f"calibration_protocol must be one of {CALIBRATION_PROTOCOLS}, got {calibration_protocol!r}")
        # each protocol has its own size; the other one's would be ignored, so it is refused instead. Its
        # default value is accepted: config.yaml files saved before these defaults became None list it
        inactive = inactive_calibration_size(calibration_protocol, calibration_batches, calibration_shots)
        defaults = {"calibration_shots": DEFAULT_SHOTS, "calibration_batches": DEFAULT_BATCHES}
        if inactive is not None and inactive[1] != defaults[inactive[0]]:
            raise ValueError(
                f"{inactive[0]}={inactive[1]} does not apply to calibration_protocol {calibration_protocol!r} "
                f"(it sizes the {'shots' if calibration_protocol == 'batches' else 'batches'} protocol); drop it or "
                "switch the protocol"
            )
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.calibration_protocol = calibration_protocol
        self.calibration_batches = calibration_batches if calibration_batches is not None else DEFAULT_BATCHES
        self.calibration_batch_size = calibration_batch_size
        self.calibration_shots = calibration_shots if calibration_shots is not None else DEFAULT_SHOTS
        self.calibration_seed = calibration_seed
        self.val_fraction = val_fraction
        self.seed = seed  # training order only
        self.split_seed = split_seed  # the validation split carved from train, and the train / val / test limits
        self.limits = {"train": train_limit, "val": val_limit, "test": test_limit}
        self.cache_dir = cache_dir
        self._raw: datasets.DatasetDict | None = None
        self._splits: dict[str, datasets.Dataset] | None = None
        self.spec: Any | None = None  # the registry's task spec, set by subclasses for known datasets
        self.label_column: str | None = None
        self.label_map: dict | None = None  # string label -> integer, for datasets with string labels
        self._classnames: list[str] | None = None

    # ----- construction from in-memory data --------------------------------------------------------
    @classmethod
    def from_datasets(cls, raw: datasets.DatasetDict, name: str = "custom", **kwargs: Any) -> "TaskDataModule":
        """Build the datamodule on an in-memory DatasetDict instead of a hub id or path."""
        module = cls(dataset=name, **kwargs)
        module._raw = raw
        return module

    # ----- hooks for subclasses ----------------------------------------------------------------------
    def _split_names(self) -> dict[str, str | None]:
        """Return train_split / val_split / test_split names for standard_splits: the spec's, if any."""
        if self.spec is None:
            return {}
        return {"train_split": self.spec.train_split, "val_split": self.spec.val_split, "test_split": self.spec.test_split}

    def _clean(self, dataset: datasets.Dataset) -> datasets.Dataset:
        """Drop unusable rows (e.g. unlabelled ones); identity by default."""
        return dataset

    def _on_splits_ready(self, splits: dict[str, datasets.Dataset]) -> None:
        """Inspect columns and features once the splits exist."""

    def _string_label_map(self, splits: dict[str, datasets.Dataset], names: list[str] | None) -> dict[str, int] | None:
        """For a string label column: label -> index, by `names` if given, else the sorted labels of all splits."""
        feature = splits["train"].features[self.label_column]
        if not (isinstance(feature, datasets.Value) and feature.dtype == "string"):
            return None
        if names is None:
            names = sorted({label for split in splits.values() for label in split[self.label_column]})
        return {name: index for index, name in enumerate(names)}

    def _labels(self, dataset: datasets.Dataset) -> list[int]:
        """Return the integer labels of a split (for k-shot sampling), mapped through label_map if set."""
        labels = dataset[self.label_column]
        return [int(self.label_map[label] if self.label_map is not None else label) for label in labels]

    def _wrap(self, split: str) -> Dataset:
        """Return the torch Dataset that yields training / evaluation examples of a split."""
        raise NotImplementedError

    def _paired(
        self, split: datasets.Dataset, source_model_name: str | None, source_pretrained: str | None, **options: Any
    ) -> tuple[Dataset, Callable | None]:
        """Return the dataset of a split prepared for both the source and the target model, and its collate."""
        raise NotImplementedError

    def _collate(self) -> Callable | None:
        return None

    # ----- names ---------------------------------------------------------------------------------------
    @property
    def task_name(self) -> str:
        """Short task name: the registry's, the zoo task, the toy name, or the last part of the id or path."""
        if self.spec is not None:
            return self.spec.name
        for prefix in (ZOO_PREFIX, TOY_PREFIX):
            if self.dataset.startswith(prefix):
                return self.dataset[len(prefix) :]
        return Path(self.dataset.rstrip("/")).name

    @property
    def classnames(self) -> list[str]:
        """Class names in label order."""
        self._ensure_splits()
        if self._classnames is None:
            raise ValueError(f"{self.dataset!r} has no ClassLabel names; pass classnames=[...] to the datamodule")
        return list(self._classnames)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classnames)

    # ----- splits ------------------------------------------------------------------------------------------
    def _is_remote(self) -> bool:
        return self._raw is None and not self.dataset.startswith(TOY_PREFIX) and not Path(self.dataset).expanduser().exists()

    def prepare_data(self) -> None:
        """Download (hub) or build (zoo) the dataset once, on the main process only."""
        if self._is_remote():
            load_dataset_dict(self.dataset, self.dataset_config, cache_dir=self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load the dataset and prepare the splits (idempotent)."""
        self._ensure_splits()

    def _ensure_splits(self) -> dict[str, datasets.Dataset]:
        if self._splits is None:
            raw = self._raw if self._raw is not None else load_dataset_dict(
                self.dataset, self.dataset_config, cache_dir=self.cache_dir
            )
            splits = standard_splits(raw, val_fraction=self.val_fraction, seed=self.split_seed, **self._split_names())
            splits = {name: self._clean(split) for name, split in splits.items()}
            # columns and the class list come from the whole splits: a train_limit must not drop a class
            # (or, for string labels, renumber them) while test still holds it
            self._on_splits_ready(splits)
            splits = {name: limit(split, self.limits.get(name), seed=self.split_seed) for name, split in splits.items()}
            self._splits = splits
        return self._splits

    @property
    def splits(self) -> dict[str, datasets.Dataset]:
        """The prepared HF splits: train, val, test and, when shipped, calibration."""
        return self._ensure_splits()

    # ----- dataloaders ------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        if shuffle:
            sampler = EpochRandomSampler(dataset, self.seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self._collate(),
        )

    def evaluation_sampler(self, dataset: Dataset, limit_batches: int | float | None = None) -> Sampler | None:
        """Under a distributed trainer, this rank's unpadded share of an evaluation split; None otherwise.

        Lightning would otherwise wrap evaluation loaders in a DistributedSampler, which repeats examples
        until every rank has as many, so val/test figures would count some examples twice. Each example
        goes to one rank instead (round robin, in order; ranks differ by at most one example and one
        batch): the modules' torchmetrics metrics sum the shares, and Lightning keeps a sampler that
        already is a DistributedSampler (DataConnector._requires_distributed_sampler). Code calling the
        loaders directly (ValidateAtStart) gets the same share, so it must sum across ranks too.
        """
        trainer = self.trainer
        kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        if not kwargs or kwargs.get("num_replicas", 1) <= 1:
            return None
        replicas, size = int(kwargs["num_replicas"]), len(dataset)
        # DDP broadcasts buffers at the first evaluation forward: a rank without a batch would leave the
        # others waiting there. Every rank sees the same length, so every rank refuses together.
        if 0 < size < replicas:
            raise ValueError(
                f"an evaluation split of {size} examples cannot give each of {replicas} ranks one: use at least "
                f"{replicas} examples (val_limit / test_limit) or fewer devices"
            )
        # Lightning applies a fractional batch limit per rank, and refuses 0 batches on that rank alone, while
        # the other ranks wait for it: refused here on every rank together (shares differ by one example)
        smallest = math.ceil((size // replicas) / self.eval_batch_size)
        if isinstance(limit_batches, float) and 0.0 < limit_batches < 1.0 and int(smallest * limit_batches) == 0:
            raise ValueError(
                f"a fractional batch limit of {limit_batches} leaves no batch of {self.eval_batch_size} examples to the "
                f"rank with {size // replicas} of this split's {size} examples ({replicas} ranks): raise the limit, give "
                "it as a number of batches, or use fewer devices"
            )
        return UnrepeatedDistributedSampler(dataset, num_replicas=replicas, rank=int(kwargs["rank"]), shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training batches."""
        return self._loader(self._wrap("train"), self.batch_size, shuffle=True)

    def _evaluation_loader(self, split: str) -> DataLoader:
        dataset = self._wrap(split)
        limit = getattr(self.trainer, f"limit_{split}_batches", None)  # the trainer's limit for this split
        return self._loader(dataset, self.eval_batch_size, shuffle=False, sampler=self.evaluation_sampler(dataset, limit))

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order (under DDP, this rank's share; see evaluation_sampler)."""
        return self._evaluation_loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order (under DDP, this rank's share; see evaluation_sampler)."""
        return self._evaluation_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test batches, in the same fixed order, for `predict`."""
        return self.test_dataloader()

    # ----- calibration --------------------------------------------------------------------------------------
    def calibration_split(self) -> datasets.Dataset:
        """The split calibration examples come from: the shipped calibration split, else train."""
        splits = self._ensure_splits()
        return splits.get(CALIBRATION_SPLIT, splits["train"])

    def calibration_indices(self) -> list[int]:
        """Indices (into calibration_split) of the calibration examples, in their fixed order."""
        source = self.calibration_split()
        if self.calibration_protocol == "batches":
            return sample_k_batches(len(source), self.calibration_batches, self.calibration_batch_size, self.calibration_seed)
        return sample_k_shots(self._labels(source), self.calibration_shots, self.calibration_seed)

    def calibration_batches_for(self, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """Calibration indices cut into batches; with world_size > 1 only this rank's share (round robin)."""
        indices = self.calibration_indices()
        size = self.calibration_batch_size
        batches = [indices[start : start + size] for start in range(0, len(indices), size)]
        return batches[rank::world_size]

    def held_out_split(self) -> datasets.Dataset:
        """The split held-out batches come from: validation, which never overlaps calibration examples."""
        return self._ensure_splits()["val"]

    def held_out_batches_for(self, batches: int = 1, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """Seeded validation indices cut into ``batches`` batches of calibration_batch_size (this rank's share)."""
        if batches < 1:
            raise ValueError(f"need at least one held-out batch, got {batches}")
        available = len(self.held_out_split())
        size = self.calibration_batch_size
        wanted = batches * size
        if wanted > available:
            warnings.warn(
                f"{batches} held-out batches of {size} need {wanted} validation examples; using all {available}",
                stacklevel=2,
            )
        # seeded like calibration, but over the validation split, so the two sets stay disjoint
        generator = torch.Generator().manual_seed(int(self.calibration_seed))
        indices = torch.randperm(available, generator=generator)[: min(wanted, available)].tolist()
        return [indices[start : start + size] for start in range(0, len(indices), size)][rank::world_size]

    def calibration_dataloader(
        self,
        source_model_name: str | None = None,
        source_pretrained: str | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> DataLoader:
        """Paired calibration batches: the same examples prepared for the source and the target model.

        The source model defaults to the datamodule's own setting; a callback that knows the source
        model passes it here instead. ``rank``/``world_size`` shard the batches.
        """
        return self._paired_loader(source_model_name, source_pretrained, rank, world_size)

    def held_out_dataloader(
        self,
        source_model_name: str | None = None,
        source_pretrained: str | None = None,
        batches: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> DataLoader:
        """Paired batches like calibration, drawn from the validation split (for the activation-cosine report)."""
        return self._paired_loader(source_model_name, source_pretrained, rank, world_size, held_out_batches=batches)

    def _paired_loader(
        self,
        source_model_name: str | None,
        source_pretrained: str | None,
        rank: int,
        world_size: int,
        held_out_batches: int | None = None,
        **options: Any,
    ) -> DataLoader:
        """Paired batches of the calibration examples, or of ``held_out_batches`` validation batches."""
        split = self.calibration_split() if held_out_batches is None else self.held_out_split()
        paired, collate = self._paired(split, source_model_name, source_pretrained, **options)
        if held_out_batches is None:
            batch_sampler = self.calibration_batches_for(rank, world_size)
        else:
            batch_sampler = self.held_out_batches_for(held_out_batches, rank, world_size)
        return DataLoader(paired, batch_sampler=batch_sampler, num_workers=self.num_workers, collate_fn=collate)
