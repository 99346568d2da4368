"""OpenCLIP vision towers (VisionTransformer with nn.MultiheadAttention blocks)."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..transport.errors import OfflineError, UnknownNameError
from ..transport.heads import AttentionLayout
from ..transport.rule import ParamRule, Piece
from .base import Capture, FamilyAdapter, LinearLink, hook_input, hook_output, register_family

# the token sum (patch embeddings, class token, positional embedding) that enters ln_pre
EMBEDDING_SPACE = "ln_pre:in"
NOT_TRANSPORTED = {
    "conv1.weight": "patch embedding: not transported by default (DESIGN item 5; see transport_embeddings)",
    "conv1.bias": "patch embedding bias: not transported by default (DESIGN item 5; see transport_embeddings)",
    "class_embedding": "class token: not transported by default (DESIGN item 5; see transport_embeddings)",
    "positional_embedding": "positional embedding: not transported by default (DESIGN item 5; see transport_embeddings)",
}


class CapturingAttention(nn.Module):
    """Stand-in for nn.MultiheadAttention that computes the same output and exposes q, k, v and context.

    It shares the wrapped module's parameters (nothing is copied). It exists because the fused MHA
    kernel never exposes q/k/v or the out_proj input, and re-computing them in a hook would double
    the attention cost.
    """

    def __init__(self, attention: nn.MultiheadAttention, capture: Capture, prefix: str) -> None:
        super().__init__()
        self.attention = attention
        self.capture = capture
        self.prefix = prefix

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> tuple[torch.Tensor, None]:
        """Return (attention output, None) like nn.MultiheadAttention(need_weights=False)."""
        mha = self.attention
        if not mha.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        width, heads = mha.embed_dim, mha.num_heads
        weight, bias = mha.in_proj_weight, mha.in_proj_bias
        projections = []
        for index, (name, source) in enumerate(zip("qkv", (query, key, value))):
            rows = slice(index * width, (index + 1) * width)
            projected = F.linear(source, weight[rows], None if bias is None else bias[rows])
            self.capture.put(f"{self.prefix}:{name}", projected, sequence_first=False)
            projections.append(projected)
        batch, tokens, _ = projections[0].shape
        q, k, v = (p.reshape(batch, -1, heads, width // heads).transpose(1, 2) for p in projections)
        mask = _additive_mask(attn_mask, key_padding_mask, q.dtype, batch, heads)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        context = context.transpose(1, 2).reshape(batch, tokens, width)
        self.capture.put(f"{self.prefix}:ctx", context, sequence_first=False)
        output = mha.out_proj(context)
        self.capture.put(f"{self.prefix}:out", output, sequence_first=False)
        if not mha.batch_first:
            output = output.transpose(0, 1)
        return output, None


def _additive_mask(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, dtype: torch.dtype, batch: int, heads: int
) -> torch.Tensor | None:
    # nn.MultiheadAttention's boolean masks mean "do not attend"; SDPA's mean "attend": use additive
    mask = None
    if attn_mask is not None:
        mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn_mask.to(dtype)
        if mask.ndim == 3:
            mask = mask.reshape(batch, heads, *mask.shape[-2:])
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]
        padding = torch.zeros_like(padding, dtype=dtype).masked_fill(padding, float("-inf")) if padding.dtype == torch.bool else padding.to(dtype)
        mask = padding if mask is None else mask + padding
    return mask


@register_family("openclip")
class OpenCLIPVisionAdapter(FamilyAdapter):
    """Adapter for OpenCLIP's VisionTransformer (ViT-B/16, ViT-B/16+, ViT-L/14, ...)."""

    default_token_alignment = "interpolate2d"

    def encoder(self, model: nn.Module) -> nn.Module:
        """Return `model.visual` for a CLIP model, or the model itself if it is a vision tower."""
        return getattr(model, "visual", model)

    def matches(self, encoder: nn.Module) -> bool:
        """Whether `encoder` is an OpenCLIP VisionTransformer."""
        from open_clip.transformer import VisionTransformer

        return isinstance(encoder, VisionTransformer)

    def _check_supported(self, encoder: nn.Module) -> None:
        if getattr(encoder, "attn_pool", None) is not None:
            raise NotImplementedError("OpenCLIP towers with attentional pooling (attn_pool) are not supported yet")
        for index, block in enumerate(encoder.transformer.resblocks):
            if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
                raise NotImplementedError(
                    f"block {index} of this OpenCLIP tower has no nn.MultiheadAttention "
                    f"({type(block).__name__}); only the standard ResidualAttentionBlock is supported"
                )

    def blocks(self, encoder: nn.Module) -> nn.ModuleList:
        """Return `transformer.resblocks`."""
        return encoder.transformer.resblocks

    def block_prefix(self, encoder: nn.Module) -> str:
        """Return the state-dict prefix of the residual blocks."""
        return "transformer.resblocks"

    def describe(self, encoder: nn.Module) -> dict[str, Any]:
        """Return width, depth, heads and token count of the tower."""
        grid = encoder.grid_size if hasattr(encoder, "grid_size") else None
        return {
            "width": encoder.transformer.width,
            "depth": len(encoder.transformer.resblocks),
            "heads": encoder.transformer.resblocks[0].attn.num_heads,
            "tokens": None if grid is None else grid[0] * grid[1] + 1,
            "output_dim": encoder.output_dim,
        }

    def param_rules(self, encoder: nn.Module, map_mode: str) -> dict[str, ParamRule]:
        """Return the rule of every floating-point key of the vision tower."""
        self._check_supported(encoder)
        tied = map_mode == "rank_aware"
        rules: dict[str, ParamRule] = {}

        def vector(key: str, space: str) -> None:
            rules[key] = ParamRule((Piece("vector", space),))

        def linear(prefix: str, out_space: str, in_space: str, module: nn.Module) -> None:
            rules[f"{prefix}.weight"] = ParamRule((Piece("matrix", out_space, in_space),))
            if getattr(module, "bias", None) is not None:
                vector(f"{prefix}.bias", out_space)

        def norm(prefix: str, module: nn.Module) -> None:
            for name, _ in module.named_parameters(recurse=False):
                vector(f"{prefix}.{name}", f"{prefix}:out")

        norm("ln_pre", encoder.ln_pre)
        for index, block in enumerate(encoder.transformer.resblocks):
            p = f"transformer.resblocks.{index}"
            norm(f"{p}.ln_1", block.ln_1)
            norm(f"{p}.ln_2", block.ln_2)
            width = block.attn.embed_dim
            qkv = tuple(
                Piece("matrix", f"{p}.attn:{name}", f"{p}.ln_1:out", (i * width, (i + 1) * width))
                for i, name in enumerate("qkv")
            )
            rules[f"{p}.attn.in_proj_weight"] = ParamRule(qkv)
            if block.attn.in_proj_bias is not None:
                rules[f"{p}.attn.in_proj_bias"] = ParamRule(
                    tuple(Piece("vector", piece.out_space, None, piece.source_rows) for piece in qkv)
                )
            linear(f"{p}.attn.out_proj", f"{p}.attn:out", f"{p}.attn:ctx", block.attn.out_proj)
            hidden_space = f"{p}.mlp.c_proj:in" if tied else f"{p}.mlp.c_fc:out"
            linear(f"{p}.mlp.c_fc", hidden_space, f"{p}.ln_2:out", block.mlp.c_fc)
            linear(f"{p}.mlp.c_proj", f"{p}.mlp.c_proj:out", f"{p}.mlp.c_proj:in", block.mlp.c_proj)
            for scale in ("ls_1", "ls_2"):
                if hasattr(getattr(block, scale), "gamma"):
                    vector(f"{p}.{scale}.gamma", f"{p}.{scale}:out")
        norm("ln_post", encoder.ln_post)
        if encoder.proj is not None:
            out_space = "proj:tokens" if tied else "proj:out"
            rules["proj"] = ParamRule((Piece("input_projection", out_space, "ln_post:out"),))
        for key, value in encoder.state_dict().items():
            if key in rules or not value.is_floating_point():
                continue
            rules[key] = ParamRule(skip_reason=NOT_TRANSPORTED.get(key, "no transport rule for this parameter"))
        return rules

    def embedding_rules(self, source: nn.Module, target: nn.Module) -> dict[str, ParamRule]:
        """Rules for the patch embedding, class token and positional embedding, in the embedding-sum space.

        Beyond the paper (DESIGN item 5 leaves these keys untransported): their output is the token
        sum fed to `ln_pre` (captured as `ln_pre:in`), so its map carries them; the patch embedding's
        input side is pixels, the same space in both models when patch size and channels agree; the
        positional embedding's rows are resampled to the target's token grid as for the statistics.
        """
        rules = {"class_embedding": ParamRule((Piece("vector", EMBEDDING_SPACE),)),
                 "positional_embedding": ParamRule((Piece("token_rows", EMBEDDING_SPACE),))}
        source_patch, target_patch = source.conv1.weight.shape[1:], target.conv1.weight.shape[1:]
        if source_patch == target_patch:
            rules["conv1.weight"] = ParamRule((Piece("output_matrix", EMBEDDING_SPACE),))
        else:
            rules["conv1.weight"] = ParamRule(skip_reason=(
                f"patch embedding: source patches {tuple(source_patch)} and target patches {tuple(target_patch)} "
                "(channels x height x width) are different pixel spaces"))
        if source.conv1.bias is not None:
            rules["conv1.bias"] = ParamRule((Piece("vector", EMBEDDING_SPACE),))
        return rules

    def attention_layouts(self, encoder: nn.Module) -> list[AttentionLayout]:
        """q, k, v and the context (out_proj's input) of every block, with nn.MultiheadAttention's heads."""
        layouts = []
        for index, block in enumerate(encoder.transformer.resblocks):
            p = f"transformer.resblocks.{index}.attn"
            attention = block.attn
            layouts.append(AttentionLayout(f"{p}:q", f"{p}:k", f"{p}:v", f"{p}:ctx", attention.num_heads,
                                           attention.embed_dim // attention.num_heads))
        return layouts

    def linear_outputs(self, encoder: nn.Module) -> dict[str, LinearLink]:
        """Link q, k, v (ln_1:out), attn out (attn:ctx), c_fc (ln_2:out), c_proj and proj:tokens (ln_post:out) to their inputs."""
        self._check_supported(encoder)
        links: dict[str, LinearLink] = {}
        for index, block in enumerate(encoder.transformer.resblocks):
            p = f"transformer.resblocks.{index}"
            attention = block.attn
            width = attention.embed_dim
            # CapturingAttention projects ln_1's output with row slices of the fused in_proj (q, k, v)
            for i, name in enumerate("qkv"):
                rows = slice(i * width, (i + 1) * width)
                bias = None if attention.in_proj_bias is None else attention.in_proj_bias[rows]
                links[f"{p}.attn:{name}"] = (f"{p}.ln_1:out", attention.in_proj_weight[rows], bias)
            links[f"{p}.attn:out"] = (f"{p}.attn:ctx", attention.out_proj.weight, attention.out_proj.bias)
            mlp = block.mlp
            # only the standard MLP (Sequential c_fc, activation, c_proj) feeds ln_2's output to c_fc
            if isinstance(getattr(mlp, "c_fc", None), nn.Linear):
                links[f"{p}.mlp.c_fc:out"] = (f"{p}.ln_2:out", mlp.c_fc.weight, mlp.c_fc.bias)
            if isinstance(getattr(mlp, "c_proj", None), nn.Linear):
                links[f"{p}.mlp.c_proj:out"] = (f"{p}.mlp.c_proj:in", mlp.c_proj.weight, mlp.c_proj.bias)
        if encoder.proj is not None:
            # proj:tokens is ln_post:out @ proj (see _hook_ln_post): weight proj^T, no bias
            links["proj:tokens"] = ("ln_post:out", encoder.proj.T, None)
        return links

    @contextlib.contextmanager
    def capture(self, encoder: nn.Module, spaces: set[str]) -> Iterator[Capture]:
        """Hook norms, MLP linears and the output; swap attention for CapturingAttention meanwhile."""
        self._check_supported(encoder)
        capture = Capture(spaces, sequence_first=not encoder.transformer.batch_first)
        handles = []
        swapped: list[tuple[nn.Module, nn.MultiheadAttention]] = []

        try:
            # ln_pre and ln_post act on batch-first tensors outside the transformer
            handles.append(_hook_batch_first_input(encoder.ln_pre, capture, EMBEDDING_SPACE))
            handles.append(_hook_batch_first_output(encoder.ln_pre, capture, "ln_pre:out"))
            handles.append(_hook_ln_post(encoder, capture))
            handles.append(_hook_batch_first_output(encoder, capture, "proj:out"))
            for index, block in enumerate(encoder.transformer.resblocks):
                p = f"transformer.resblocks.{index}"
                handles.append(hook_output(block.ln_1, capture, f"{p}.ln_1:out"))
                handles.append(hook_output(block.ln_2, capture, f"{p}.ln_2:out"))
                handles.append(hook_output(block.mlp.c_fc, capture, f"{p}.mlp.c_fc:out"))
                handles.append(hook_input(block.mlp.c_proj, capture, f"{p}.mlp.c_proj:in"))
                handles.append(hook_output(block.mlp.c_proj, capture, f"{p}.mlp.c_proj:out"))
                handles.append(hook_output(block.ls_1, capture, f"{p}.ls_1:out"))
                handles.append(hook_output(block.ls_2, capture, f"{p}.ls_2:out"))
                # always swapped, wanted or not: every calibration pass then computes bitwise the
                # same activations, whichever capture points it keeps (memory-budget groups)
                swapped.append((block, block.attn))
                block.attn = CapturingAttention(block.attn, capture, f"{p}.attn")
            yield capture
        finally:
            for handle in handles:
                handle.remove()
            for block, attention in swapped:
                block.attn = attention
            capture.clear()

    def forward(self, encoder: nn.Module, batch: Any) -> None:
        """Run the tower on a batch of preprocessed images (B x 3 x H x W)."""
        if isinstance(batch, dict):
            batch = batch.get("image", batch.get("pixel_values"))
        encoder(batch)


def _hook_batch_first_input(module: nn.Module, capture: Capture, space: str) -> torch.utils.hooks.RemovableHandle:
    def hook(_module: nn.Module, inputs: Any, _output: Any) -> None:
        capture.put(space, inputs[0], sequence_first=False)

    return module.register_forward_hook(hook)


def _hook_batch_first_output(module: nn.Module, capture: Capture, space: str) -> torch.utils.hooks.RemovableHandle:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        capture.put(space, output[0] if isinstance(output, tuple) else output, sequence_first=False)

    return module.register_forward_hook(hook)


def _hook_ln_post(encoder: nn.Module, capture: Capture) -> torch.utils.hooks.RemovableHandle:
    # `proj:tokens` is every token's projection (ln_post output @ proj): it gives the rank-aware mode
    # a full-rank estimate of the embedding space, where the pooled output has one row per image
    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        capture.put("ln_post:out", output, sequence_first=False)
        if capture.wants("proj:tokens") and encoder.proj is not None:
            capture.put("proj:tokens", output @ encoder.proj, sequence_first=False)

    return encoder.ln_post.register_forward_hook(hook)


def load_openclip(
    model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Callable, Callable, Callable]:
    """Load an OpenCLIP model with its train/eval preprocessing and tokenizer.

    Names of the offline family (`theseus-tiny-*`) come from the project's zoo; real names take a
    pretrained tag (e.g. `laion2b_s34b_b88k`) or a local checkpoint path.
    """
    import open_clip

    if model_name.startswith("theseus-"):
        from ..zoo import family

        family.register_family_configs()
        if pretrained in (None, "", "zoo"):
            # one factory call gives both transforms: a second, weightless model made only for its
            # transforms had OpenCLIP log "initialized randomly" about a member that was loaded
            return family.load_member_with_transforms(model_name, device=device)
    # hub and local-directory names are resolved by OpenCLIP itself; a built-in name must be known
    if not model_name.startswith(("hf-hub:", "local-dir:")) and model_name not in open_clip.list_models():
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
        raise UnknownNameError(
            f"no OpenCLIP model config named {model_name!r}" + (f"; did you mean {close}?" if close else
                                                                 " (open_clip.list_models() lists them)")
        )
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device
        )
    except (OSError, RuntimeError, ValueError) as error:
        message = str(error).lower()
        if "not a known tag" in message:
            tags = [tag for name, tag in open_clip.list_pretrained() if name == model_name]
            raise UnknownNameError(
                f"{pretrained!r} is neither a pretrained tag of OpenCLIP {model_name!r} nor a checkpoint file"
                + (f"; its tags: {tags}" if tags else "")
            ) from error
        if any(word in message for word in ("offline", "connect", "resolve", "download", "hub", "internet", "not found")):
            raise OfflineError(
                f"could not load OpenCLIP {model_name!r} with pretrained={pretrained!r}: the weights must be "
                f"downloaded. On a machine with network run `python -c \"import open_clip; "
                f"open_clip.create_model_and_transforms('{model_name}', pretrained='{pretrained}')\"` and copy "
                f"the Hugging Face cache (HF_HOME), or pass a local checkpoint path as pretrained. Cause: {error}"
            ) from error
        raise
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(model_name)
