"""Hugging Face tokenizers by name, with an offline byte-level tokenizer for tests and demos."""

from __future__ import annotations

import os

from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

from ..transport.errors import OfflineError

OFFLINE_BYTE_TOKENIZER = "byt5-offline"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Return a tokenizer for a hub id or local folder; ``byt5-offline`` (and the tiny T5 names) build ByT5's byte tokenizer."""
    from ..families.t5 import TINY_T5_CONFIGS  # lazy: the tiny offline T5 models read bytes

    if name == OFFLINE_BYTE_TOKENIZER or name in TINY_T5_CONFIGS:
        return ByT5Tokenizer()  # bytes need no vocabulary file, so this never downloads
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as error:
        if _hub_offline() or isinstance(error, ConnectionError) or "connect" in str(error).lower():
            raise OfflineError(
                f"tokenizer {name!r} is not in the local Hugging Face cache and the hub cannot be reached. On a "
                f"machine with network run `python -c \"import transformers; transformers.AutoTokenizer."
                f"from_pretrained('{name}')\"` and copy ~/.cache/huggingface/hub here (or set HF_HOME), or pass a "
                f"local folder; `{OFFLINE_BYTE_TOKENIZER}` needs no download."
            ) from error
        raise
