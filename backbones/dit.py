"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, ICCV 2023).

Faithful to facebookresearch/DiT models.py: same modules, parameter names, initialisation and forward, so an
official checkpoint loads unchanged with :func:`load_official_checkpoint`. Except: in training mode the
official ``LabelEmbedder`` drops labels itself; here the trainer drops them once per batch before the forward
(``backbones.layers.drop_labels``), so the forward is deterministic in both modes.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Mapping

import torch
import torch.nn as nn

from runio.files import read_state_dict

from . import register, register_token_mixer
from .layers import (
    Attention,
    DiffusionBackbone,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    adaln_modulation,
    get_2d_sincos_pos_embed,
    init_embedders,
    init_patch_embed,
    modulate,
    resolve_preset,
    unpatchify,
    xavier_init_linears,
    zero_module,
)

DIT_PRESETS = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    # ours: the CPU-calibrated size (1.3M params at patch 2; recognisable 16x16 Fashion-MNIST in ~5 CPU minutes)
    "cpu": dict(depth=4, hidden_size=128, num_heads=4),
}


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero; ``attn`` may be any (B, T, D) -> (B, T, D) token mixer (LiT swaps it)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, attn: nn.Module | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = attn if attn is not None else Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = adaln_modulation(hidden_size, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


@register("dit")
class DiT(DiffusionBackbone):
    """Diffusion Transformer. ``size`` in S/B/L/XL; ``depth``, ``hidden_size``, ``num_heads`` override it."""

    presets = DIT_PRESETS

    def __init__(self, size: str = "XL", patch_size: int = 2, input_size: int = 32, in_channels: int = 4,
                 num_classes: int = 1000, learn_sigma: bool = True, class_dropout_prob: float = 0.1,
                 depth: int | None = None, hidden_size: int | None = None, num_heads: int | None = None,
                 mlp_ratio: float = 4.0):
        super().__init__()
        cfg = resolve_preset(self.presets, size,
                             dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads))
        self.set_data_shape(input_size, in_channels, num_classes, learn_sigma)
        self.patch_size = patch_size
        self.num_heads = cfg["num_heads"]
        hidden = cfg["hidden_size"]
        self.arch = dict(size=size, patch=patch_size, depth=cfg["depth"], width=hidden, heads=cfg["num_heads"])

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden, bias=True)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden, class_dropout_prob)
        # Fixed sin-cos embedding kept as a frozen parameter so it appears in the state_dict as officially.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden), requires_grad=False)
        self.blocks = nn.ModuleList([self.make_block(hidden, cfg["num_heads"], mlp_ratio)
                                     for _ in range(cfg["depth"])])
        self.final_layer = FinalLayer(hidden, patch_size, self.out_channels)
        self.initialize_weights()

    def make_block(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> nn.Module:
        return DiTBlock(hidden_size, num_heads, mlp_ratio)

    def initialize_weights(self) -> None:
        xavier_init_linears(self)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        init_patch_embed(self.x_embedder.proj)
        init_embedders([self.t_embedder], [self.y_embedder])
        for block in self.blocks:
            zero_module(block.adaLN_modulation[-1])
        zero_module(self.final_layer.adaLN_modulation[-1])
        zero_module(self.final_layer.linear)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        g = self.x_embedder.grid_size
        return unpatchify(x, self.patch_size, self.out_channels, g)


def read_official_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor], prefer_ema: bool = True,
                             what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, name) of an official weights file, weights only: a bare state_dict (DiT, DiMR releases) or a
    DiT-style training checkpoint ``{"model", "ema", "opt", "args"}`` (DiCo, Diffusion-RWKV; the EMA weights when
    ``prefer_ema``), or an in-memory state_dict. Those training checkpoints pickle ``args`` as an
    ``argparse.Namespace``, which ``torch.load(weights_only=True)`` refuses; it is allowlisted here (a plain
    attribute container whose values go through the same restricted unpickler). Nothing else is."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        state, name, _ = read_state_dict(source, prefer_ema, what=what)
    return state, name


def load_official_checkpoint(model: nn.Module, path: str | os.PathLike | Mapping[str, torch.Tensor],
                             prefer_ema: bool = True,
                             convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
                             ) -> dict:
    """Load an official checkpoint (e.g. ``DiT-XL-2-256x256.pt``, a bare state_dict; see
    :func:`read_official_state_dict` for the other layouts) or one of our training checkpoints / run directories
    into ``model``, strictly: every tensor of the file must land in the model and every model tensor must come from
    the file. ``convert`` maps official key names (and layouts) onto ours, one tensor for one tensor (the DiMR
    mapping, ``backbones.dimr.from_official_state_dict``); DiT's names need none. Returns the loaded state_dict.

    Loaded with ``weights_only=True``: no code from the file is executed.
    """
    state, name = read_official_state_dict(path, prefer_ema, what=f"{type(model).__name__} checkpoint")
    if convert is not None:
        converted = convert(state)
        if len(converted) != len(state):
            raise RuntimeError(f"converting checkpoint {name} turned {len(state)} tensors into {len(converted)}: the "
                               f"key mapping must be one-to-one (no tensor dropped or merged)")
        state = converted
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} in the file vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise RuntimeError(f"checkpoint {name} does not match {type(model).__name__}: {len(wrong)} tensor shape(s) "
                           f"differ, e.g. {'; '.join(wrong[:3])}; build the model with the config the checkpoint was "
                           f"trained with (size, patch_size, input_size, num_classes)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {name} does not match {type(model).__name__}: missing keys "
                           f"{sorted(missing)[:8]}, unexpected keys {sorted(unexpected)[:8]}; build the model "
                           f"with the config the checkpoint was trained with (size, patch_size, input_size)")
    return state


@register_token_mixer("softmax_attention")
def _attention_mixer(width: int, grid_h: int, grid_w: int) -> nn.Module:
    """DiT's mixer: multi-head softmax attention (head dim 64) through SDPA."""
    return Attention(width, max(1, width // 64), qkv_bias=True)
