"""Diffusion-RWKV (Fei et al., 2024, arXiv 2404.04478): RWKV-like diffusion backbone with a linear-time Bi-WKV.

Faithful to the official feizc/Diffusion-RWKV ``models_drwkv.py`` (DiffRWKVModel, default path): patch embedding
plus a LEARNED positional embedding initialised with the 2-D sin-cos table; L Bi-RWKV blocks arranged U-ViT style
(L//2 in-blocks, one mid block, L//2 out-blocks; out-block j fuses the output of in-block L//2-1-j through
Linear(2D -> D) on cat([deep, shallow])); each block is pre-LN spatial mix (q_shift token shift, key / value /
receptance projections, Bi-WKV, sigmoid(r) gate, output projection) and channel mix (squared-ReLU FFN gated by
sigmoid(receptance)), both with adaLN-Zero (shift, scale, gate) and stochastic depth; head = affine LayerNorm,
then the DiT final layer (second, non-affine LayerNorm with adaLN) and unpatchify. Parameter names follow the
official module names (patch_embed, time_embed, label_emb, in_blocks, mid_block, out_blocks, att, ffn, ...).

Bi-WKV computes the paper's formula exactly (see ``backbones.kernels``) by default; ``wkv_variant="official"``
reproduces the official CUDA kernel's arithmetic instead (its 32-chunk distance convention and its backward, see
``backbones.kernels.wkv_official``), for weights trained with that kernel. w = spatial_decay / T and
u = spatial_first / T with T the current token count.

Per block: 19 D^2 + 17 D parameters and 13 D^2 MACs per token (4 D^2 spatial mix, 9 D^2 channel mix); each
out-block adds its skip Linear (2 D^2 + D parameters, 2 D^2 MACs per token). DRWKV-H/2 at 32x32x4 latents with
1000 classes has 780,313,632 parameters (the ~779M quoted for DRWKV-H/2).

Not reproduced (dead or crashing options of the official code): key_norm, post_norm, layer_scale=False, with_cp,
init modes other than 'fancy'. The official CFG guides only the first 3 channels; the shared
``DiffusionBackbone.forward_with_cfg`` guides all ``in_channels`` unless ``guided_channels=3`` is passed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register, register_token_mixer
from .kernels import BI_WKV_VARIANTS, bi_wkv
from .layers import (
    DiffusionBackbone,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    adaln_modulation,
    drop_path,
    get_2d_sincos_pos_embed,
    init_embedders,
    init_patch_embed,
    modulate,
    resolve_preset,
    unpatchify,
    xavier_init_linears,
    zero_module,
)

DRWKV_PRESETS = {
    "S": dict(depth=13, hidden_size=384),
    "B": dict(depth=25, hidden_size=384),
    "M": dict(depth=25, hidden_size=512),
    "L": dict(depth=37, hidden_size=768),
    "H": dict(depth=37, hidden_size=1024),
    "cpu": dict(depth=5, hidden_size=128),  # ours: CPU-sized (about 1.7M params)
}


def q_shift(x: torch.Tensor, grid_h: int, grid_w: int, shift: int = 1, gamma: float = 0.25) -> torch.Tensor:
    """Shift four channel groups of (B, T, C) raster tokens by ``shift`` pixels from the left, right, top and bottom
    neighbour (zero borders); channels from int(4 C gamma) on are kept. Same result as the official channels-first
    version, computed channels-last with split / pad / cat (no transposed copies, no zero-filled slice gradients)."""
    B, T, C = x.shape
    if T != grid_h * grid_w:
        raise ValueError(f"q_shift got {T} tokens for a {grid_h}x{grid_w} grid; build the module for this grid")
    g = [int(C * gamma * i) for i in range(5)]
    left, right, up, down, rest = x.reshape(B, grid_h, grid_w, C).split(
        [g[1] - g[0], g[2] - g[1], g[3] - g[2], g[4] - g[3], C - g[4]], dim=-1)
    s_w, s_h = min(shift, grid_w), min(shift, grid_h)
    out = torch.cat([
        F.pad(left[:, :, : grid_w - s_w], (0, 0, s_w, 0)),     # token (h, w) takes its left neighbour (h, w - s)
        F.pad(right[:, :, s_w:], (0, 0, 0, s_w)),              # right neighbour (h, w + s)
        F.pad(up[:, : grid_h - s_h], (0, 0, 0, 0, s_h, 0)),    # neighbour above (h - s, w)
        F.pad(down[:, s_h:], (0, 0, 0, 0, 0, s_h)),            # neighbour below (h + s, w)
        rest,
    ], dim=-1)
    return out.reshape(B, T, C)


def check_wkv_variant(variant: str) -> str:
    """``variant`` if it names a Bi-WKV arithmetic ("paper" or "official"), else a ValueError saying so."""
    if variant not in BI_WKV_VARIANTS:
        raise ValueError(f"unknown wkv_variant {variant!r}; choose one of {', '.join(map(repr, BI_WKV_VARIANTS))} "
                         f"(the paper's Bi-WKV formula, or the official CUDA kernel's arithmetic)")
    return variant


def mix_shifted(x: torch.Tensor, xx: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """x * mix + xx * (1 - mix), as one fused lerp in the activations' dtype (bf16 under autocast)."""
    return torch.lerp(xx, x, mix.to(x.dtype))


def _layer_ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    ratio_0_to_1 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - layer_id / n_layer
    return ratio_0_to_1, ratio_1_to_almost0


def _channel_ramp(dim: int) -> torch.Tensor:
    return torch.arange(dim, dtype=torch.float64).div(dim).view(1, 1, dim)  # i / D


class SpatialMix(nn.Module):
    """Bi-WKV token mixer: q_shift interpolation, k/v/r projections, Bi-WKV, sigmoid(r) gate, output projection."""

    def __init__(self, dim: int, n_layer: int, layer_id: int, grid_size: tuple[int, int], shift_pixel: int = 1,
                 channel_gamma: float = 0.25, wkv_variant: str = "paper"):
        super().__init__()
        if channel_gamma > 0.25:
            raise ValueError(f"channel_gamma must be <= 1/4 (four shifted groups), got {channel_gamma}")
        self.wkv_variant = check_wkv_variant(wkv_variant)
        self.grid_size = tuple(grid_size)
        self.shift_pixel = shift_pixel
        self.channel_gamma = channel_gamma
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)
        # official "fancy" init (RWKV-4): decay in [-5, 3] ramped over channels, zigzag bonus, mixing ramps
        r01, r10 = _layer_ratios(layer_id, n_layer)
        h = torch.arange(dim, dtype=torch.float64)
        decay = -5 + 8 * (h / max(dim - 1, 1)) ** (0.7 + 1.3 * r01)
        first = math.log(0.3) + 0.5 * ((h + 1) % 3 - 1)
        ramp = _channel_ramp(dim)
        self.spatial_decay = nn.Parameter(decay.float())
        self.spatial_first = nn.Parameter(first.float())
        self.spatial_mix_k = nn.Parameter(ramp.pow(r10).float())
        self.spatial_mix_v = nn.Parameter((ramp.pow(r10) + 0.3 * r01).float())
        self.spatial_mix_r = nn.Parameter(ramp.pow(0.5 * r10).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if self.shift_pixel > 0:
            xx = q_shift(x, *self.grid_size, self.shift_pixel, self.channel_gamma)
            xk, xv, xr = (mix_shifted(x, xx, m) for m in (self.spatial_mix_k, self.spatial_mix_v, self.spatial_mix_r))
        else:
            xk = xv = xr = x
        k, v, r = self.key(xk), self.value(xv), self.receptance(xr)
        y = bi_wkv(self.spatial_decay / T, self.spatial_first / T, k, v, variant=self.wkv_variant)
        return self.output(torch.sigmoid(r) * y)


class ChannelMix(nn.Module):
    """RWKV FFN: q_shift interpolation, sigmoid(receptance) * value(relu(key)^2), hidden 4D, no biases."""

    def __init__(self, dim: int, n_layer: int, layer_id: int, grid_size: tuple[int, int], shift_pixel: int = 1,
                 channel_gamma: float = 0.25, hidden_rate: int = 4):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.shift_pixel = shift_pixel
        self.channel_gamma = channel_gamma
        self.key = nn.Linear(dim, hidden_rate * dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(hidden_rate * dim, dim, bias=False)
        _, r10 = _layer_ratios(layer_id, n_layer)
        ramp = _channel_ramp(dim).pow(r10).float()
        self.spatial_mix_k = nn.Parameter(ramp.clone())
        self.spatial_mix_r = nn.Parameter(ramp.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift_pixel > 0:
            xx = q_shift(x, *self.grid_size, self.shift_pixel, self.channel_gamma)
            xk, xr = mix_shifted(x, xx, self.spatial_mix_k), mix_shifted(x, xx, self.spatial_mix_r)
        else:
            xk = xr = x
        k = torch.square(torch.relu(self.key(xk)))
        return torch.sigmoid(self.receptance(xr)) * self.value(k)


class DRWKVBlock(nn.Module):
    """Bi-RWKV block with adaLN-Zero; ``skip=True`` adds the U-ViT long-skip fusion Linear(2D -> D)."""

    def __init__(self, dim: int, n_layer: int, layer_id: int, grid_size: tuple[int, int], drop_path: float = 0.0,
                 hidden_rate: int = 4, shift_pixel: int = 1, channel_gamma: float = 0.25, skip: bool = False,
                 wkv_variant: str = "paper"):
        super().__init__()
        self.layer_id = layer_id
        self.drop_path = drop_path
        if layer_id == 0:  # RWKV convention: one extra LayerNorm on the input of the very first block
            self.ln0 = nn.LayerNorm(dim)
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.att = SpatialMix(dim, n_layer, layer_id, grid_size, shift_pixel, channel_gamma, wkv_variant)
        self.ffn = ChannelMix(dim, n_layer, layer_id, grid_size, shift_pixel, channel_gamma, hidden_rate)
        self.adaLN_modulation = adaln_modulation(dim, 6)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # [deep, shallow], as the official code
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if self.layer_id == 0:
            x = self.ln0(x)
        x = x + drop_path(gate_msa.unsqueeze(1) * self.att(modulate(self.ln1(x), shift_msa, scale_msa)),
                          self.drop_path, self.training)
        x = x + drop_path(gate_mlp.unsqueeze(1) * self.ffn(modulate(self.ln2(x), shift_mlp, scale_mlp)),
                          self.drop_path, self.training)
        return x


@register("rwkv")
class DiffusionRWKV(DiffusionBackbone):
    """Diffusion-RWKV. ``size`` in S/B/M/L/H; ``depth`` (odd) and ``hidden_size`` override it; ``num_classes=0``
    builds the unconditional model (no label table, y ignored). ``wkv_variant``: "paper" (default, the paper's
    Bi-WKV formula) or "official" (the official CUDA kernel's arithmetic, for weights trained with it)."""

    presets = DRWKV_PRESETS

    def __init__(self, size: str = "H", patch_size: int = 2, input_size: int = 32, in_channels: int = 4,
                 num_classes: int = 1000, learn_sigma: bool = True, class_dropout_prob: float = 0.1,
                 depth: int | None = None, hidden_size: int | None = None, num_heads: int | None = None,
                 drop_path_rate: float = 0.1, hidden_rate: int = 4, shift_pixel: int = 1,
                 channel_gamma: float = 0.25, wkv_variant: str = "paper"):
        super().__init__()
        self.wkv_variant = check_wkv_variant(wkv_variant)
        if num_heads is not None:
            raise ValueError("Diffusion-RWKV has no attention heads (Bi-WKV mixes each channel separately); "
                             "leave num_heads unset")
        cfg = resolve_preset(self.presets, size, dict(depth=depth, hidden_size=hidden_size))
        depth, hidden = cfg["depth"], cfg["hidden_size"]
        if depth < 1 or depth % 2 == 0:
            raise ValueError(f"Diffusion-RWKV needs an odd depth (depth//2 in-blocks, one mid block, depth//2 "
                             f"out-blocks), got {depth}")
        self.set_data_shape(input_size, in_channels, num_classes, learn_sigma)
        self.patch_size = patch_size
        self.arch = dict(size=size, patch=patch_size, depth=depth, width=hidden, heads=None)

        self.patch_embed = PatchEmbed(input_size, patch_size, in_channels, hidden, bias=True)
        grid = (self.patch_embed.grid_size, self.patch_embed.grid_size)
        self.time_embed = TimestepEmbedder(hidden)
        self.label_emb = LabelEmbedder(num_classes, hidden, class_dropout_prob) if num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, hidden))  # learned

        dpr = np.linspace(0, drop_path_rate, depth + 1).tolist()  # official stochastic-depth rule (L + 1 rates)
        half = depth // 2

        def block(layer_id: int, skip: bool = False) -> DRWKVBlock:
            return DRWKVBlock(hidden, depth, layer_id, grid, dpr[layer_id], hidden_rate, shift_pixel,
                              channel_gamma, skip=skip, wkv_variant=wkv_variant)

        self.in_blocks = nn.ModuleList([block(i) for i in range(half)])
        self.mid_block = block(half)
        self.out_blocks = nn.ModuleList([block(half + 1 + i, skip=True) for i in range(half)])
        self.norm_f = nn.LayerNorm(hidden, eps=1e-5)
        self.final_layer = FinalLayer(hidden, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        xavier_init_linears(self)  # every Linear, RWKV projections and skip fusions included (official)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.patch_embed.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        init_patch_embed(self.patch_embed.proj)
        init_embedders([self.time_embed], [self.label_emb] if self.label_emb is not None else [])
        for blk in self.all_blocks():
            zero_module(blk.adaLN_modulation[-1])
        zero_module(self.final_layer.adaLN_modulation[-1])
        zero_module(self.final_layer.linear)

    def all_blocks(self) -> list[DRWKVBlock]:
        """All blocks in execution order."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        c = self.time_embed(t)
        if self.label_emb is not None:
            c = c + self.label_emb(y)
        skips = []
        for blk in self.in_blocks:
            x = blk(x, c)
            skips.append(x)
        x = self.mid_block(x, c)
        for blk in self.out_blocks:
            x = blk(x, c, skips.pop())
        x = self.final_layer(self.norm_f(x), c)
        return unpatchify(x, self.patch_size, self.out_channels, self.patch_embed.grid_size)


@register_token_mixer("bi_wkv")
def _bi_wkv_mixer(width: int, grid_h: int, grid_w: int) -> nn.Module:
    """Diffusion-RWKV's mixer: the spatial mix (q_shift, k/v/r projections, Bi-WKV, gate, output projection) with
    the fancy init of the first block of DRWKV-S; Bi-WKV through the default implementation for the device."""
    return SpatialMix(width, n_layer=13, layer_id=0, grid_size=(grid_h, grid_w))


# ------------------------------------------------------------------------------------------------------------------
# Official checkpoints (feizc/Diffusion-RWKV models_drwkv.py; weights on https://huggingface.co/feizhengcong/Diffusion-RWKV)
# ------------------------------------------------------------------------------------------------------------------
# Our parameter names and shapes are the official ones (DiffRWKVModel), so official state_dicts load unchanged. The
# only released file, ``l-2-uncond.pt`` (7.03 GB: the official training checkpoint {"model", "ema", "opt", "args"}),
# is misnamed (feizc/Diffusion-RWKV#1): its tensors (pos_embed (1, 1024, 768), patch_embed.proj.weight
# (768, 3, 2, 2), final_layer.linear.weight (24, 768), 18 in- and 18 out-blocks, no label_emb) are DRWKV-L/2 on
# 64x64 RGB pixels (CelebA-64), unconditional (official num_classes=-1: no label table; ours num_classes=0),
# learned sigma. It was trained through the official CUDA Bi-WKV kernel, whose arithmetic differs from the paper
# formula at its 32-token chunk boundaries: evaluate it with the backbone's ``wkv_variant="official"``.
OFFICIAL_CHECKPOINTS = {
    "l-2-uncond.pt": dict(size="L", patch_size=2, input_size=64, in_channels=3, num_classes=0, learn_sigma=True),
}


def official_build_kwargs(name: str = "l-2-uncond.pt") -> dict:
    """``build("rwkv", **official_build_kwargs(name))`` builds the model an official file was trained as, with the
    official kernel arithmetic (``wkv_variant="official"``)."""
    if name not in OFFICIAL_CHECKPOINTS:
        raise KeyError(f"unknown official Diffusion-RWKV checkpoint {name!r}; known: {sorted(OFFICIAL_CHECKPOINTS)}")
    return dict(OFFICIAL_CHECKPOINTS[name], wkv_variant="official")


def from_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``DiffRWKVModel`` state_dict -> ours: the names and shapes are the same (a new dict, same tensors)."""
    return dict(state)


def to_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state_dict -> the official names (identical; inverse of :func:`from_official_state_dict`)."""
    return dict(state)


def load_official_checkpoint(model: DiffusionRWKV, source, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Load an official Diffusion-RWKV checkpoint (file, run directory or state_dict) strictly into ``model``, built
    as ``build("rwkv", **official_build_kwargs(name))``. The official training checkpoint gives its EMA weights
    (as the official sample.py does). Warns when ``model`` computes Bi-WKV other than the official kernel's way."""
    import warnings

    from .dit import load_official_checkpoint as load
    from .dit import read_official_state_dict

    if not isinstance(model, DiffusionRWKV):
        raise TypeError(f"expected a DiffusionRWKV model, got {type(model).__name__}")
    state, name = read_official_state_dict(source, prefer_ema, what="Diffusion-RWKV checkpoint")
    has_labels = "label_emb.embedding_table.weight" in state
    if has_labels != (model.label_emb is not None):
        raise ValueError(f"checkpoint {name} is {'class-conditional' if has_labels else 'unconditional'} but the "
                         f"model was built with num_classes={model.num_classes}; build it with "
                         + ("num_classes = the table's rows - 1" if has_labels else "num_classes=0 (no label table)"))
    loaded = load(model, state, convert=from_official_state_dict)
    if model.wkv_variant != "official":
        warnings.warn(f"official Diffusion-RWKV weights were trained with the official CUDA Bi-WKV kernel; this "
                      f"model computes wkv_variant={model.wkv_variant!r}. Build it with wkv_variant='official' to "
                      f"reproduce the official outputs", stacklevel=2)
    return loaded
