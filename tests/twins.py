"""Builders of tiny models and their exact twins, shared by the tests."""

from __future__ import annotations

import copy

import torch
from open_clip.transformer import VisionTransformer
from torch import nn


def tiny_vit(width: int = 32, layers: int = 2, heads: int = 4, image_size: int = 16, patch_size: int = 4, output_dim: int = 16, seed: int = 0) -> VisionTransformer:
    """A tiny OpenCLIP VisionTransformer with random weights (LayerNorm params randomised too)."""
    torch.manual_seed(seed)
    vit = VisionTransformer(image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads, mlp_ratio=4.0, output_dim=output_dim)
    with torch.no_grad():
        for name, parameter in vit.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.copy_(0.1 * torch.randn_like(parameter))
    return vit.eval()


def permuted_twin(vit: VisionTransformer, seed: int = 1) -> tuple[VisionTransformer, dict[str, torch.Tensor]]:
    """An exact functional twin of `vit` with permuted residual channels, heads, head dims, MLP units and embedding."""
    generator = torch.Generator().manual_seed(seed)
    width = vit.transformer.width
    heads = vit.transformer.resblocks[0].attn.num_heads
    head_dim = width // heads
    hidden = vit.transformer.resblocks[0].mlp.c_fc.out_features
    embed = vit.proj.shape[1]
    residual = torch.randperm(width, generator=generator)
    embedding = torch.randperm(embed, generator=generator)
    twin = copy.deepcopy(vit)
    state = vit.state_dict()
    new = {}

    def head_permutations() -> tuple[torch.Tensor, torch.Tensor]:
        # one head order for q, k and v (head h attends with q_h, k_h over v_h); dims inside a
        # head may be permuted jointly for q and k, and separately for v
        order = torch.randperm(heads, generator=generator)
        inner_qk = torch.randperm(head_dim, generator=generator)
        inner_v = torch.randperm(head_dim, generator=generator)
        return torch.cat([h * head_dim + inner_qk for h in order]), torch.cat([h * head_dim + inner_v for h in order])

    for key, value in state.items():
        if key in ("conv1.weight", "class_embedding") or key.startswith(("ln_pre.", "ln_post.")) or key.endswith(("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")):
            new[key] = value[residual]
        elif key == "positional_embedding":
            new[key] = value[:, residual]
        elif key == "proj":
            new[key] = value[residual][:, embedding]
    for index in range(len(vit.transformer.resblocks)):
        p = f"transformer.resblocks.{index}"
        qk, v = head_permutations()
        rows = torch.cat([qk, qk + width, v + 2 * width])
        mlp = torch.randperm(hidden, generator=generator)
        new[f"{p}.attn.in_proj_weight"] = state[f"{p}.attn.in_proj_weight"][rows][:, residual]
        new[f"{p}.attn.in_proj_bias"] = state[f"{p}.attn.in_proj_bias"][rows]
        new[f"{p}.attn.out_proj.weight"] = state[f"{p}.attn.out_proj.weight"][residual][:, v]
        new[f"{p}.attn.out_proj.bias"] = state[f"{p}.attn.out_proj.bias"][residual]
        new[f"{p}.mlp.c_fc.weight"] = state[f"{p}.mlp.c_fc.weight"][mlp][:, residual]
        new[f"{p}.mlp.c_fc.bias"] = state[f"{p}.mlp.c_fc.bias"][mlp]
        new[f"{p}.mlp.c_proj.weight"] = state[f"{p}.mlp.c_proj.weight"][residual][:, mlp]
        new[f"{p}.mlp.c_proj.bias"] = state[f"{p}.mlp.c_proj.bias"][residual]
    missing = set(state) - set(new)
    assert not missing, missing
    twin.load_state_dict(new)
    return twin.eval(), {"embedding": embedding}


def random_task_vector(model: nn.Module, keys_filter, scale: float = 0.02, seed: int = 2) -> dict[str, torch.Tensor]:
    """A random update of the parameters selected by `keys_filter`, relative in size to each parameter."""
    generator = torch.Generator().manual_seed(seed)
    vector = {}
    first_name: dict[int, str] = {}  # a tied parameter (T5's shared / embed_tokens) moves once, as in a fine-tune
    for key, value in model.state_dict().items():
        if value.is_floating_point() and keys_filter(key):
            noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
            first = first_name.setdefault(value.untyped_storage().data_ptr(), key)
            vector[key] = vector[first].clone() if first != key else scale * noise * value.abs().mean().clamp_min(1e-3)
    return vector
