"""T5 encoders from transformers (T5EncoderModel, or the encoder of any T5 model)."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..transport.errors import OfflineError, SharedParameterError
from ..transport.heads import AttentionLayout
from ..transport.rule import ParamRule, Piece
from .base import Capture, FamilyAdapter, LinearLink, hook_input, hook_output, register_family

NOT_TRANSPORTED = {
    "shared.weight": "token embedding: indexed by token id, not a linear map between activations",
    "encoder.embed_tokens.weight": "token embedding (tied to shared.weight)",
}
ENCODER_MODELS = frozenset({"T5EncoderModel", "MT5EncoderModel", "UMT5EncoderModel"})
ENCODER_STACKS = frozenset({"T5Stack", "MT5Stack", "UMT5Stack"})
# the embedding stage's output space (beyond the paper, DESIGN item 5; transport_embeddings=True)
EMBEDDING_SPACE = "embed_tokens:out"
RELATIVE_BIAS_REASON = "relative attention bias: per-head position table, not a linear map between activations"

TINY_T5_CONFIGS: dict[str, dict[str, Any]] = {
    # offline configs of the real class, for tests and demos; vocab 384 fits ByT5's byte tokenizer
    "t5-tiny-offline": dict(vocab_size=384, d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2),
    "t5-tiny-offline-wide": dict(vocab_size=384, d_model=48, d_ff=96, num_heads=6, d_kv=8, num_layers=2),
}


@register_family("t5")
class T5EncoderAdapter(FamilyAdapter):
    """Adapter for T5 encoders: q, k, v, o; wi / wi_0 / wi_1 / wo; RMS layer norms."""

    default_token_alignment = "none"

    def encoder(self, model: nn.Module) -> nn.Module:
        """Return an encoder model (T5 / mT5 / umT5 EncoderModel) as is, or the encoder stack of a full T5 model."""
        if type(model).__name__ in ENCODER_MODELS:
            return model  # its keys keep the `encoder.` prefix its fine-tunes are saved with
        return model.get_encoder() if hasattr(model, "get_encoder") else model

    def matches(self, encoder: nn.Module) -> bool:
        """Whether `encoder` is a transformers T5-family encoder (a decoder stack is not)."""
        name = type(encoder).__name__
        return name in ENCODER_MODELS or (name in ENCODER_STACKS and not getattr(encoder, "is_decoder", False))

    def _stack(self, encoder: nn.Module) -> tuple[nn.Module, str]:
        if hasattr(encoder, "encoder") and hasattr(encoder.encoder, "block"):
            return encoder.encoder, "encoder."
        return encoder, ""

    def blocks(self, encoder: nn.Module) -> nn.ModuleList:
        """Return the encoder's T5Block list."""
        return self._stack(encoder)[0].block

    def block_prefix(self, encoder: nn.Module) -> str:
        """Return the state-dict prefix of the blocks."""
        return self._stack(encoder)[1] + "block"

    def describe(self, encoder: nn.Module) -> dict[str, Any]:
        """Return d_model, d_ff, heads and depth."""
        config = encoder.config
        return {"width": config.d_model, "d_ff": config.d_ff, "heads": config.num_heads, "depth": len(self.blocks(encoder))}

    def _modules(self, encoder: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module, nn.Module]]:
        stack, prefix = self._stack(encoder)
        for index, block in enumerate(stack.block):
            yield f"{prefix}block.{index}", block.layer[0], block.layer[1], block

    def param_rules(self, encoder: nn.Module, map_mode: str) -> dict[str, ParamRule]:
        """Return the rule of every floating-point key of the encoder."""
        tied = map_mode == "rank_aware"
        rules: dict[str, ParamRule] = {}
        for p, attention_layer, ff_layer, _ in self._modules(encoder):
            attention = attention_layer.SelfAttention
            a, f = f"{p}.layer.0", f"{p}.layer.1"
            rules[f"{a}.layer_norm.weight"] = ParamRule((Piece("vector", f"{a}.layer_norm:out"),))
            rules[f"{f}.layer_norm.weight"] = ParamRule((Piece("vector", f"{f}.layer_norm:out"),))
            for name in "qkv":
                rules[f"{a}.SelfAttention.{name}.weight"] = ParamRule(
                    (Piece("matrix", f"{a}.SelfAttention.{name}:out", f"{a}.layer_norm:out"),)
                )
            rules[f"{a}.SelfAttention.o.weight"] = ParamRule(
                (Piece("matrix", f"{a}.SelfAttention.o:out", f"{a}.SelfAttention.o:in"),)
            )
            if getattr(attention, "relative_attention_bias", None) is not None:
                rules[f"{a}.SelfAttention.relative_attention_bias.weight"] = ParamRule(skip_reason=RELATIVE_BIAS_REASON)
            dense = ff_layer.DenseReluDense
            hidden_in = f"{f}.DenseReluDense.wo:in"
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(dense, name):
                    out_space = hidden_in if tied else f"{f}.DenseReluDense.{name}:out"
                    rules[f"{f}.DenseReluDense.{name}.weight"] = ParamRule(
                        (Piece("matrix", out_space, f"{f}.layer_norm:out"),)
                    )
            rules[f"{f}.DenseReluDense.wo.weight"] = ParamRule(
                (Piece("matrix", f"{f}.DenseReluDense.wo:out", hidden_in),)
            )
        stack, prefix = self._stack(encoder)
        rules[f"{prefix}final_layer_norm.weight"] = ParamRule((Piece("vector", f"{prefix}final_layer_norm:out"),))
        for key, value in encoder.state_dict().items():
            if key in rules or not value.is_floating_point():
                continue
            rules[key] = ParamRule(skip_reason=NOT_TRANSPORTED.get(key, "no transport rule for this parameter"))
        return rules

    def embedding_rules(self, source: nn.Module, target: nn.Module) -> dict[str, ParamRule]:
        """Rules for the token embedding (and its tied copy), whose rows live in the embedding output space.

        Beyond the paper (DESIGN item 5 leaves it untransported): every row of the embedding table is a
        vector of the space the first block reads (captured as `embed_tokens:out`), so that space's map
        carries each token's row; the rows are matched by token id, which needs one vocabulary.
        """
        source_vocab = self._stack(source)[0].embed_tokens.num_embeddings
        target_vocab = self._stack(target)[0].embed_tokens.num_embeddings
        if source_vocab == target_vocab:
            rule = ParamRule((Piece("token_rows", EMBEDDING_SPACE),))
        else:
            rule = ParamRule(skip_reason=(
                f"token embedding: source vocabulary of {source_vocab} tokens and target vocabulary of "
                f"{target_vocab} tokens; rows are matched by token id, so the vocabularies must be the same"))
        return {key: rule for key in self._embedding_keys(source) | self._embedding_keys(target)}

    def check_embedding_target(self, model: nn.Module) -> None:
        """Refuse a whole encoder-decoder target: its encoder's token table is also its decoder's (and a tied LM head's).

        The transported update of `embed_tokens.weight` would change those parts too, which nothing
        transports: a silently different model. A T5EncoderModel's `shared` table is the encoder's own.
        """
        if type(model).__name__ in ENCODER_MODELS:
            return
        encoder = self.encoder(model)
        if encoder is model:
            return  # a bare stack: whatever else holds its table is out of sight
        table = self._stack(encoder)[0].embed_tokens.weight
        inside = tuple(f"{name}." for name, module in model.named_modules(remove_duplicate=False) if module is encoder)
        # `shared` is the table itself (the model's input embeddings), not another reader of it
        readers = [name for name, param in model.named_parameters(remove_duplicate=False)
                   if _same_memory(param, table) and not name.startswith(inside)
                   and name.rpartition(".")[0].rpartition(".")[2] != "shared"]
        if not readers:
            return
        name = type(model).__name__
        encoder_model = next((prefix for prefix in ("UMT5", "MT5", "T5") if name.startswith(prefix)), "T5") + "EncoderModel"
        raise SharedParameterError(
            f"transport_embeddings=True would change more than the encoder of this {name}: the encoder's token table "
            f"(embed_tokens.weight) is one tensor with {', '.join(readers)}, so adding the transported embedding update "
            "to it also changes the decoder's input embeddings (and the LM head, when tie_word_embeddings is true), "
            f"which are not transported. Load the target as a {encoder_model}, or give its encoder its own copy of the "
            "table first (model.encoder.set_input_embeddings(copy.deepcopy(model.shared))); passing model.encoder alone "
            "does not help, it still holds the shared table. Or leave transport_embeddings off (the token table is then "
            "not transported, as in the paper)"
        )

    def _embedding_keys(self, encoder: nn.Module) -> set[str]:
        _, prefix = self._stack(encoder)
        keys = {f"{prefix}embed_tokens.weight"}
        if prefix:  # a T5EncoderModel also names the table `shared` (tied)
            keys.add("shared.weight")
        return keys & set(encoder.state_dict())

    def attention_layouts(self, encoder: nn.Module) -> list[AttentionLayout]:
        """q, k, v and the context (o's input) of every block's self-attention, with its heads."""
        layouts = []
        for p, attention_layer, _, _ in self._modules(encoder):
            a, attention = f"{p}.layer.0.SelfAttention", attention_layer.SelfAttention
            layouts.append(AttentionLayout(f"{a}.q:out", f"{a}.k:out", f"{a}.v:out", f"{a}.o:in", attention.n_heads,
                                           attention.key_value_proj_dim))
        return layouts

    def linear_outputs(self, encoder: nn.Module) -> dict[str, LinearLink]:
        """Link q, k, v and wi / wi_0 / wi_1 outputs to their layer norm's output, o and wo outputs to their inputs."""
        links: dict[str, LinearLink] = {}
        for p, attention_layer, ff_layer, _ in self._modules(encoder):
            a, f = f"{p}.layer.0", f"{p}.layer.1"
            attention, dense = attention_layer.SelfAttention, ff_layer.DenseReluDense
            for name in "qkv":
                linear = getattr(attention, name)
                links[f"{a}.SelfAttention.{name}:out"] = (f"{a}.layer_norm:out", linear.weight, linear.bias)
            links[f"{a}.SelfAttention.o:out"] = (f"{a}.SelfAttention.o:in", attention.o.weight, attention.o.bias)
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(dense, name):
                    linear = getattr(dense, name)
                    links[f"{f}.DenseReluDense.{name}:out"] = (f"{f}.layer_norm:out", linear.weight, linear.bias)
            links[f"{f}.DenseReluDense.wo:out"] = (f"{f}.DenseReluDense.wo:in", dense.wo.weight, dense.wo.bias)
        return links

    @contextlib.contextmanager
    def capture(self, encoder: nn.Module, spaces: set[str]) -> Iterator[Capture]:
        """Hook layer norms and every linear of attention and feed-forward."""
        capture = Capture(spaces)
        handles = []
        try:
            for p, attention_layer, ff_layer, _ in self._modules(encoder):
                a, f = f"{p}.layer.0", f"{p}.layer.1"
                attention, dense = attention_layer.SelfAttention, ff_layer.DenseReluDense
                handles.append(hook_output(attention_layer.layer_norm, capture, f"{a}.layer_norm:out"))
                handles.append(hook_output(ff_layer.layer_norm, capture, f"{f}.layer_norm:out"))
                for name in ("q", "k", "v", "o"):
                    handles.append(hook_output(getattr(attention, name), capture, f"{a}.SelfAttention.{name}:out"))
                handles.append(hook_input(attention.o, capture, f"{a}.SelfAttention.o:in"))
                for name in ("wi", "wi_0", "wi_1", "wo"):
                    if hasattr(dense, name):
                        handles.append(hook_output(getattr(dense, name), capture, f"{f}.DenseReluDense.{name}:out"))
                handles.append(hook_input(dense.wo, capture, f"{f}.DenseReluDense.wo:in"))
            stack, prefix = self._stack(encoder)
            handles.append(hook_output(stack.final_layer_norm, capture, f"{prefix}final_layer_norm:out"))
            handles.append(hook_output(stack.embed_tokens, capture, EMBEDDING_SPACE))
            yield capture
        finally:
            for handle in handles:
                handle.remove()
            capture.clear()

    def forward(self, encoder: nn.Module, batch: Any) -> None:
        """Run the encoder on a tokenised batch (dict with input_ids and attention_mask)."""
        encoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))

    def token_mask(self, batch: Any) -> torch.Tensor | None:
        """Return the attention mask, so padding tokens stay out of the statistics."""
        return batch.get("attention_mask") if isinstance(batch, dict) or hasattr(batch, "get") else None


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are one (a tied parameter), also when the tie is two Parameters over one storage."""
    if a is b:
        return True
    if a.device != b.device or a.device.type == "meta":  # meta tensors have no memory to compare
        return False
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.storage_offset() == b.storage_offset()
            and a.shape == b.shape)


def load_t5_encoder(model_id: str, device: str | torch.device = "cpu") -> nn.Module:
    """Load a T5 encoder by hub id or local path; `t5-tiny-offline[-wide]` build random tiny ones."""
    from transformers import T5Config, T5EncoderModel

    if model_id in TINY_T5_CONFIGS:
        # seeded per name: every process (a callback, another rank, a later run) builds the same base
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(model_id.encode()))
            return T5EncoderModel(T5Config(**TINY_T5_CONFIGS[model_id])).to(device)
    try:
        return T5EncoderModel.from_pretrained(model_id).to(device)
    except OSError as error:
        raise OfflineError(
            f"could not load T5 encoder {model_id!r}: download it first on a machine with network "
            f"(`huggingface-cli download {model_id}`) and copy the cache (HF_HOME), or pass a local path. "
            f"Cause: {error}"
        ) from error
