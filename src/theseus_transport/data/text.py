"""Premise/hypothesis classification datamodule with fixed-length tokenisation for paired calibration."""

from __future__ import annotations

from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from ..arguments import init_arguments
from ..transport.errors import DataLayoutError
from .base import TaskDataModule, resolve_task
from .registry import find_text_task
from .sources import find_label_column
from .tokenizers import load_tokenizer

# column pairs tried, in order, for datasets outside the registry
TEXT_PAIR_COLUMNS = (
    ("premise", "hypothesis"),
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("question", "passage"),
    ("text_a", "text_b"),
)
DEFAULT_TEXT_TEMPLATE = "premise: {premise} hypothesis: {hypothesis}"


def find_text_pair_columns(features: datasets.Features) -> tuple[str, str]:
    """Return the (premise, hypothesis) column names of a text-pair dataset."""
    for first, second in TEXT_PAIR_COLUMNS:
        if first in features and second in features:
            return first, second
    raise DataLayoutError(f"no premise/hypothesis columns among {list(features)}; tried {TEXT_PAIR_COLUMNS}")


class TextPairDataset(Dataset):
    """Raw {"premise", "hypothesis", "label"} rows over one HF split, labels mapped to integers."""

    def __init__(self, split: datasets.Dataset, columns: tuple[str, str], label_column: str, label_map: dict | None) -> None:
        self.split, self.columns, self.label_column, self.label_map = split, columns, label_column, label_map

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.split[int(index)]
        label = row[self.label_column]
        return {
            "premise": row[self.columns[0]],
            "hypothesis": row[self.columns[1]],
            "label": int(self.label_map[label] if self.label_map is not None else label),
        }


# a cut that would go further back than this to reach a space is in unspaced text (Chinese, Japanese, Thai),
# not in a word
LONGEST_WORD = 32


class PairTokenizer:
    """Collate rows into {"input_ids", "attention_mask"} padded to a fixed max_length."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, template: str) -> None:
        self.tokenizer, self.max_length, self.template = tokenizer, max_length, template

    def encode(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Tokenise rows through the text template; every sequence has exactly max_length tokens."""
        texts = [self.template.format(premise=row["premise"], hypothesis=row["hypothesis"]) for row in rows]
        # one tokenisation of the batch finds the pairs that do not fit; only those are cut and re-counted
        lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        texts = [text if length <= self.max_length else self._fitted_text(row["premise"], row["hypothesis"])
                 for text, length, row in zip(texts, lengths, rows)]
        # fixed-length padding keeps token positions of two tokenizers' outputs aligned for calibration
        encoded = self.tokenizer(
            texts, max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _token_count(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def _fitted_text(self, premise: str, hypothesis: str) -> str:
        """The templated pair of one that does not fit in max_length, its premise cut (by whole words where it has spaces).

        Cutting the joined text from the end (the tokenizer's own truncation) dropped the hypothesis
        whenever the premise was long, leaving nothing to classify; the hypothesis is kept whole unless
        it alone does not fit. The cut is found by characters, so a premise without spaces (Chinese,
        Japanese, Thai, one long token) keeps what fits instead of nothing.
        """
        def fits(characters: int) -> bool:
            text = self.template.format(premise=premise[:characters], hypothesis=hypothesis)
            return self._token_count(text) <= self.max_length

        kept, too_many = 0, len(premise)  # the longest premise prefix that fits: binary search
        while kept + 1 < too_many:
            middle = (kept + too_many) // 2
            if fits(middle):
                kept = middle
            else:
                too_many = middle
        cut = premise[:kept]
        space = cut.rfind(" ")
        if space > 0 and not premise[kept].isspace() and kept - space <= min(LONGEST_WORD, kept // 5):
            # mid-word: end at the last whole word instead, unless that throws away much of what fits
            # (unspaced text after an early space, e.g. "2019年 " and a Chinese sentence)
            cut = cut[:space]
        return self.template.format(premise=cut.rstrip(), hypothesis=hypothesis)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.encode(rows)
        batch["labels"] = torch.tensor([row["label"] for row in rows], dtype=torch.long)
        return batch


class PairedTokenizer:
    """Collate rows into {"source": {...}, "target": {...}, "label": Tensor} for calibration."""

    def __init__(self, source: PairTokenizer, target: PairTokenizer) -> None:
        self.source, self.target = source, target

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "source": self.source.encode(rows),
            "target": self.target.encode(rows),
            "label": torch.tensor([row["label"] for row in rows], dtype=torch.long),
        }


class TextPairDataModule(TaskDataModule):
    """Premise/hypothesis classification (MNLI, QNLI, RTE, SNLI, SciTail or any similar dataset).

    Batches are ``{"input_ids", "attention_mask", "labels"}`` from the target tokenizer; calibration
    batches are ``{"source": {...}, "target": {...}, "label"}`` of the same examples.
    """

    def __init__(
        self,
        dataset: str,
        dataset_config: str | None = None,
        tokenizer_name: str = "byt5-offline",
        source_tokenizer_name: str | None = None,
        max_length: int = 128,
        text_template: str = DEFAULT_TEXT_TEMPLATE,
        batch_size: int = 32,
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
        spec, dataset, dataset_config = resolve_task(find_text_task, dataset, dataset_config)
        # the signature above stays explicit because LightningCLI reads it; the base's share goes on by name
        super().__init__(**init_arguments(TaskDataModule, locals()))
        self.save_hyperparameters()
        self.spec = spec
        self.tokenizer_name, self.source_tokenizer_name = tokenizer_name, source_tokenizer_name
        self.max_length, self.text_template = max_length, text_template
        self.columns: tuple[str, str] | None = None
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}

    @property
    def task_name(self) -> str:
        """Registry short name (mnli, rte, ...) for known datasets, else the config or id tail."""
        if self.spec is None and self.dataset_config:
            return self.dataset_config
        return super().task_name

    def tokenizer(self, name: str | None = None) -> PreTrainedTokenizerBase:
        """The (cached) tokenizer of a name; the target tokenizer by default."""
        name = name or self.tokenizer_name
        if name not in self._tokenizers:
            self._tokenizers[name] = load_tokenizer(name)
        return self._tokenizers[name]

    # ----- splits ------------------------------------------------------------------------------------------
    def _columns_for(self, features: datasets.Features) -> tuple[tuple[str, str], str]:
        if self.spec is not None:
            return (self.spec.first_column, self.spec.second_column), self.spec.label_column
        return find_text_pair_columns(features), find_label_column(features)

    def _clean(self, dataset: datasets.Dataset) -> datasets.Dataset:
        _, label_column = self._columns_for(dataset.features)
        feature = dataset.features[label_column]
        if isinstance(feature, datasets.Value) and feature.dtype == "string":
            names = set(self.spec.label_names) if self.spec and self.spec.label_names else None
            if names is None:
                return dataset.filter(lambda label: bool(label), input_columns=label_column)
            return dataset.filter(lambda label: label in names, input_columns=label_column)
        # SNLI and GLUE mark examples without a gold label with -1
        return dataset.filter(lambda label: label >= 0, input_columns=label_column)

    def _on_splits_ready(self, splits: dict[str, datasets.Dataset]) -> None:
        features = splits["train"].features
        self.columns, self.label_column = self._columns_for(features)
        feature = features[self.label_column]
        if isinstance(feature, datasets.ClassLabel):
            self._classnames, self.label_map = list(feature.names), None
        elif isinstance(feature, datasets.Value) and feature.dtype == "string":
            names = list(self.spec.label_names) if self.spec and self.spec.label_names else None
            self.label_map = self._string_label_map(splits, names)
            self._classnames = list(self.label_map)
        else:
            largest = max(int(max(split[self.label_column])) for split in splits.values() if len(split))
            self._classnames = [str(index) for index in range(largest + 1)]
            self.label_map = None

    # ----- dataloaders ------------------------------------------------------------------------------------
    def _wrap(self, split: str) -> Dataset:
        splits = self._ensure_splits()
        return TextPairDataset(splits[split], self.columns, self.label_column, self.label_map)

    def _collate(self) -> PairTokenizer:
        return PairTokenizer(self.tokenizer(), self.max_length, self.text_template)

    def source_tokenizer_for(self, source_model_name: str | None = None, source_tokenizer_name: str | None = None) -> str:
        """Name of the source tokenizer: explicit, the datamodule's, the source model's, else the target's."""
        return source_tokenizer_name or self.source_tokenizer_name or source_model_name or self.tokenizer_name

    def _paired(
        self,
        split: datasets.Dataset,
        source_model_name: str | None,
        source_pretrained: str | None,
        source_tokenizer_name: str | None = None,
    ) -> tuple[Dataset, PairedTokenizer]:
        """Raw rows of a split and a collate that tokenises them with the source and the target tokenizer."""
        source_name = self.source_tokenizer_for(source_model_name, source_tokenizer_name)
        paired = TextPairDataset(split, self.columns, self.label_column, self.label_map)
        collate = PairedTokenizer(
            PairTokenizer(self.tokenizer(source_name), self.max_length, self.text_template),
            PairTokenizer(self.tokenizer(), self.max_length, self.text_template),
        )
        return paired, collate

    def calibration_dataloader(
        self,
        source_model_name: str | None = None,
        source_pretrained: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        source_tokenizer_name: str | None = None,
    ) -> DataLoader:
        """Paired calibration batches: the same examples tokenised by the source and the target tokenizer.

        The source tokenizer is ``source_tokenizer_name``, else the datamodule's, else the one named
        like ``source_model_name`` (what a callback passes; T5 sizes share one tokenizer), else the
        target's. ``source_pretrained`` is accepted for the callback's uniform call and not needed.
        """
        return self._paired_loader(
            source_model_name, source_pretrained, rank, world_size, source_tokenizer_name=source_tokenizer_name
        )

    def held_out_dataloader(
        self,
        source_model_name: str | None = None,
        source_pretrained: str | None = None,
        batches: int = 1,
        rank: int = 0,
        world_size: int = 1,
        source_tokenizer_name: str | None = None,
    ) -> DataLoader:
        """Paired batches like calibration, drawn from the validation split (for the activation-cosine report)."""
        return self._paired_loader(
            source_model_name,
            source_pretrained,
            rank,
            world_size,
            held_out_batches=batches,
            source_tokenizer_name=source_tokenizer_name,
        )
