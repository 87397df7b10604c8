"""DiCo: Revitalizing ConvNets for Scalable and Efficient Diffusion Modeling (Ai et al., NeurIPS 2025).

Faithful to shallowdream204/DiCo ``dico_models.py`` (read at commit d3c0a3d): a fully convolutional U-shape
over three resolution levels with widths C, 2C, 4C (stem 3x3 conv, pixel-unshuffle down / pixel-shuffle up
samplers, skip fusion by 1x1 convs); decoder level 1 and the head run at 2C, conditioned on the level-2 vector c2.
DiCoBlock = LayerNorm2d + adaLN-Zero -> 1x1 conv -> 3x3 depthwise conv -> GELU -> compact channel attention
(GAP -> full CxC 1x1 conv -> sigmoid -> channel-wise product) -> 1x1 conv, gated residual; then a 1x1-GELU-1x1
feed-forward with its own modulation and gate. No patchify, no positional embedding: any H, W divisible by 4.

Module and parameter names are the official ones except the three label tables (the shared ``LabelEmbedder``,
as ``y_embedder_{1,2,3}``); a load_state_dict pre-hook renames the official ``y_embedder.embedding_table_{0,1,2}``
keys, so official state_dicts load unchanged. :func:`load_official_checkpoint` reads the released files
(:data:`OFFICIAL_CHECKPOINTS`: a bare state_dict or the official training checkpoint ``{"model", "ema", "opt",
"args"}``, EMA preferred) strictly; :func:`to_official_state_dict` is the inverse renaming.

Memory format: the model keeps its conv weights and activations in channels_last (NHWC; ``channels_last=False``
turns it off). LayerNorm2d then normalises a contiguous last dimension without permute copies and the 1x1 convs
are plain GEMMs over pixels. Measured on CPU (torch 2.14, 1 thread on a shared, loaded 2-core box, DiCo-S,
batch 4, 32x32x4, best of 10, interleaved): forward 0.361 s vs 0.402 s NCHW, forward+backward 1.19 s vs 1.31 s
(1.1x; medians 1.12-1.16x, an earlier run of 6 gave 1.17-1.18x). channels_last is also cuDNN's preferred
layout for tensor-core convs (not measured here: no GPU).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register, register_token_mixer
from .dit import load_official_checkpoint as _load_official
from .layers import (
    DiffusionBackbone,
    LabelEmbedder,
    TimestepEmbedder,
    adaln_modulation,
    init_embedders,
    init_patch_embed,
    resolve_preset,
    zero_module,
)

# Official configs (bottom of dico_models.py). depth = blocks per level [enc1, enc2, middle, dec2, dec1].
DICO_PRESETS = {
    "S": dict(hidden_size=128, depth=(5, 4, 4, 4, 4), mlp_ratio=2.0),
    "B": dict(hidden_size=256, depth=(5, 4, 4, 4, 4), mlp_ratio=2.0),
    "L": dict(hidden_size=352, depth=(9, 8, 9, 8, 9), mlp_ratio=2.0),
    "XL": dict(hidden_size=416, depth=(9, 9, 10, 9, 9), mlp_ratio=2.0),
    "H": dict(hidden_size=416, depth=(14, 12, 10, 12, 14), mlp_ratio=4.0),
    "cpu": dict(hidden_size=48, depth=(1, 1, 1, 1, 1), mlp_ratio=2.0),  # ours: CPU-sized (about 2M params)
}
DOWNSAMPLING = 4  # two pixel-unshuffle(2) steps: input sides must be divisible by this


def _layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Official LayerNorm2d (per-pixel LN over channels, no affine, eps 1e-6), then adaLN modulation
    x * (1 + scale) + shift with (B, C) shift/scale broadcast over H, W. Computed on the NHWC view, which is
    contiguous for channels_last input (no copies)."""
    h = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=1e-6)
    return (h * (1 + scale[:, None, None, :]) + shift[:, None, None, :]).permute(0, 3, 1, 2)


def split_depth(total: int, pattern: Sequence[int]) -> tuple[int, ...]:
    """Split ``total`` blocks over the five levels in proportion to a preset's pattern (largest remainder, at
    least one block per level); the preset's own total gives the preset back exactly."""
    n = len(pattern)
    if total < n:
        raise ValueError(f"DiCo depth {total} is too small: it needs at least one block per level ({n}); pass a "
                         f"larger total or a list of {n} per-level depths")
    quota = [total * p / sum(pattern) for p in pattern]
    counts = [max(1, math.floor(q)) for q in quota]
    while sum(counts) < total:
        counts[max(range(n), key=lambda i: quota[i] - counts[i])] += 1
    while sum(counts) > total:
        counts[max((i for i in range(n) if counts[i] > 1), key=lambda i: counts[i] - quota[i])] -= 1
    return tuple(counts)


class ConvMixer(nn.Module):
    """DiCo's spatial mixer: 1x1 conv -> 3x3 depthwise conv -> GELU -> compact channel attention -> 1x1 conv.

    Compact channel attention (``ca``) is GAP -> one full CxC 1x1 conv with bias -> sigmoid, multiplied
    channel-wise; no squeeze-excite bottleneck. Its cost per pixel does not depend on the resolution.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(hidden_size, hidden_size, kernel_size=1, bias=True)
        self.conv2 = nn.Conv2d(hidden_size, hidden_size, kernel_size=3, padding=1, groups=hidden_size, bias=True)
        self.conv3 = nn.Conv2d(hidden_size, hidden_size, kernel_size=1, bias=True)
        self.ca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden_size, hidden_size, kernel_size=1, bias=True),
                                nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(self.conv1(x)))
        return self.conv3(x * self.ca(x))


class DiCoBlock(ConvMixer):
    """ConvMixer with adaLN-Zero (gate 1) plus a 1x1-GELU-1x1 feed-forward (gate 2); flat official names."""

    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size)
        ffn_channels = int(mlp_ratio * hidden_size)
        self.conv4 = nn.Conv2d(hidden_size, ffn_channels, kernel_size=1, bias=True)
        self.conv5 = nn.Conv2d(ffn_channels, hidden_size, kernel_size=1, bias=True)
        self.adaLN_modulation = adaln_modulation(hidden_size, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, :, None, None] * super().forward(_layer_norm_modulate(x, shift1, scale1))
        h = self.conv5(F.gelu(self.conv4(_layer_norm_modulate(x, shift2, scale2))))
        return x + gate2[:, :, None, None] * h


class DiCoFinalLayer(nn.Module):
    """LayerNorm2d + adaLN modulation, then a 3x3 conv to the output channels (official ``out_proj``)."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.out_proj = nn.Conv2d(hidden_size, out_channels, kernel_size=3, padding=1, bias=True)
        self.adaLN_modulation = adaln_modulation(hidden_size, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.out_proj(_layer_norm_modulate(x, shift, scale))


class _Stem(nn.Module):
    """Official ``OverlapPatchEmbed``: a 3x3 stride-1 conv (key ``x_embedder.proj``)."""

    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _Resample(nn.Module):
    """3x3 conv (no bias) then PixelUnshuffle(2) (``down``: C -> C/2 -> 2C) or PixelShuffle(2) (``up``: C -> 2C
    -> C/2); key ``body.0`` as officially."""

    def __init__(self, channels: int, down: bool):
        super().__init__()
        conv = nn.Conv2d(channels, channels // 2 if down else channels * 2, kernel_size=3, padding=1, bias=False)
        self.body = nn.Sequential(conv, nn.PixelUnshuffle(2) if down else nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@register("dico")
class DiCo(DiffusionBackbone):
    """DiCo. ``size`` in S/B/L/XL/H; ``hidden_size`` (C), ``depth`` (total blocks, split like the preset, or five
    per-level depths) and ``mlp_ratio`` override it. No patch size: size, depth and width are the sweep axes."""

    presets = DICO_PRESETS

    def __init__(self, size: str = "XL", input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                 learn_sigma: bool = True, class_dropout_prob: float = 0.1,
                 depth: int | Sequence[int] | None = None, hidden_size: int | None = None,
                 mlp_ratio: float | None = None, patch_size: int | None = None,
                 channels_last: bool = True):
        super().__init__()
        if patch_size is not None:
            raise ValueError(f"DiCo has no patch size (got patch_size={patch_size}): it works on the full latent "
                             f"resolution; sweep size, depth or hidden_size instead")
        if input_size % DOWNSAMPLING:
            raise ValueError(f"DiCo needs input sides divisible by {DOWNSAMPLING} (two 2x down-samplings), got "
                             f"input_size={input_size}; pad the input")
        cfg = resolve_preset(self.presets, size, dict(depth=depth, hidden_size=hidden_size, mlp_ratio=mlp_ratio))
        C = cfg["hidden_size"]
        if C % 2:
            raise ValueError(f"DiCo hidden_size must be even (the down-sampler halves it), got {C}")
        depths = cfg["depth"]
        depths = split_depth(depths, self.presets[size]["depth"]) if isinstance(depths, int) else tuple(depths)
        if len(depths) != 5 or min(depths) < 0:
            raise ValueError(f"DiCo depth must be a total block count or five per-level depths [enc1, enc2, middle, "
                             f"dec2, dec1], got {cfg['depth']}")
        self.set_data_shape(input_size, in_channels, num_classes, learn_sigma)
        self.arch = dict(size=size, patch=None, depth=sum(depths), width=C, depths=list(depths),
                         mlp_ratio=cfg["mlp_ratio"])

        self.x_embedder = _Stem(in_channels, C)
        # One conditioning vector per level width (C, 2C, 4C); c_l = t_l + y_l.
        self.t_embedder_1, self.t_embedder_2, self.t_embedder_3 = (TimestepEmbedder(w) for w in (C, 2 * C, 4 * C))
        self.y_embedder_1, self.y_embedder_2, self.y_embedder_3 = (
            LabelEmbedder(num_classes, w, class_dropout_prob) for w in (C, 2 * C, 4 * C))

        def blocks(width: int, n: int) -> nn.ModuleList:
            return nn.ModuleList([DiCoBlock(width, cfg["mlp_ratio"]) for _ in range(n)])

        self.encoder_level_1 = blocks(C, depths[0])
        self.down1_2 = _Resample(C, down=True)
        self.encoder_level_2 = blocks(2 * C, depths[1])
        self.down2_3 = _Resample(2 * C, down=True)
        self.latent = blocks(4 * C, depths[2])
        self.up3_2 = _Resample(4 * C, down=False)
        self.reduce_chan_level2 = nn.Conv2d(4 * C, 2 * C, kernel_size=1, bias=True)
        self.decoder_level_2 = blocks(2 * C, depths[3])
        self.up2_1 = _Resample(2 * C, down=False)
        # Level-1 skip fusion keeps 2C channels: decoder level 1 and the head run at 2C (official design).
        self.reduce_chan_level1 = nn.Conv2d(2 * C, 2 * C, kernel_size=1, bias=True)
        self.decoder_level_1 = blocks(2 * C, depths[4])
        self.final_layer = DiCoFinalLayer(2 * C, self.out_channels)
        self.initialize_weights()

        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)
        self._register_load_state_dict_pre_hook(_rename_official_label_tables)

    def initialize_weights(self) -> None:
        for m in self.modules():  # xavier for every Linear and Conv2d (depthwise too), zero biases
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        init_patch_embed(self.x_embedder.proj)
        init_embedders([self.t_embedder_1, self.t_embedder_2, self.t_embedder_3],
                       [self.y_embedder_1, self.y_embedder_2, self.y_embedder_3])
        for block in self.all_blocks():
            zero_module(block.adaLN_modulation[-1])
        zero_module(self.final_layer.adaLN_modulation[-1])
        zero_module(self.final_layer.out_proj)

    def all_blocks(self) -> list[DiCoBlock]:
        return [*self.encoder_level_1, *self.encoder_level_2, *self.latent, *self.decoder_level_2,
                *self.decoder_level_1]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-2] % DOWNSAMPLING or x.shape[-1] % DOWNSAMPLING:
            raise ValueError(f"DiCo needs (B, C, H, W) input with H and W divisible by {DOWNSAMPLING}, got shape "
                             f"{tuple(x.shape)}; pad the input (e.g. 30x30 -> 32x32)")
        c1 = self.t_embedder_1(t) + self.y_embedder_1(y)
        c2 = self.t_embedder_2(t) + self.y_embedder_2(y)
        c3 = self.t_embedder_3(t) + self.y_embedder_3(y)

        enc1 = self.x_embedder(x.contiguous(memory_format=self.memory_format))
        for block in self.encoder_level_1:
            enc1 = block(enc1, c1)
        enc2 = self.down1_2(enc1)
        for block in self.encoder_level_2:
            enc2 = block(enc2, c2)
        h = self.down2_3(enc2)
        for block in self.latent:
            h = block(h, c3)
        h = self.reduce_chan_level2(torch.cat([self.up3_2(h), enc2], dim=1))
        for block in self.decoder_level_2:
            h = block(h, c2)
        h = self.reduce_chan_level1(torch.cat([self.up2_1(h), enc1], dim=1))
        for block in self.decoder_level_1:
            h = block(h, c2)
        return self.final_layer(h, c2).contiguous()


# Released weights (README of shallowdream204/DiCo; files on https://huggingface.co/shallowdream204/DiCo):
# class-conditional ImageNet 256x256 on SD-VAE latents (32x32x4), learned sigma. The official DiCo_* builders ignore
# their keyword arguments, so every release has 4 input channels, 1000 classes (+ the CFG null row), 8 outputs.
_OFFICIAL_DATA = dict(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, class_dropout_prob=0.1)
OFFICIAL_CHECKPOINTS = {
    "DiCo-S-400K-256x256.pt": dict(size="S", **_OFFICIAL_DATA),
    "DiCo-B-400K-256x256.pt": dict(size="B", **_OFFICIAL_DATA),
    "DiCo-L-400K-256x256.pt": dict(size="L", **_OFFICIAL_DATA),
    "DiCo-XL-400K-256x256.pt": dict(size="XL", **_OFFICIAL_DATA),
    "DiCo-XL-3750K-256x256.pt": dict(size="XL", **_OFFICIAL_DATA),
}
# (official key, our key): the only names that differ (official LabelEmbedder_3 holds three tables).
_LABEL_TABLE_KEYS = tuple((f"y_embedder.embedding_table_{i}.weight", f"y_embedder_{i + 1}.embedding_table.weight")
                          for i in range(3))


def _rename_official_label_tables(state_dict: dict, prefix: str, *args) -> None:
    """Map official ``y_embedder.embedding_table_{0,1,2}`` keys onto ``y_embedder_{1,2,3}.embedding_table``."""
    for official, ours in _LABEL_TABLE_KEYS:
        if prefix + official in state_dict:
            state_dict[prefix + ours] = state_dict.pop(prefix + official)


def from_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DiCo key names -> ours (a new dict, same tensors); only the three label tables differ."""
    out = dict(state)
    _rename_official_label_tables(out, "")
    return out


def to_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our key names -> the official ``dico_models.DiCo`` ones (inverse of :func:`from_official_state_dict`)."""
    renames = {ours: official for official, ours in _LABEL_TABLE_KEYS}
    return {renames.get(k, k): v for k, v in state.items()}


def load_official_checkpoint(model: DiCo, source, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Load an official DiCo checkpoint (file, run directory or state_dict) strictly into ``model``, built with the
    file's config (:data:`OFFICIAL_CHECKPOINTS`, e.g. ``build("dico", **OFFICIAL_CHECKPOINTS[name])``). Reads
    weights only; a training checkpoint ``{"model", "ema", "opt", "args"}`` gives its EMA weights."""
    if not isinstance(model, DiCo):
        raise TypeError(f"expected a DiCo model, got {type(model).__name__}")
    return _load_official(model, source, prefer_ema, convert=from_official_state_dict)


class _TokenConvMixer(nn.Module):
    """(B, T, width) tokens (row-major grid) -> grid -> DiCo ConvMixer -> tokens."""

    def __init__(self, width: int, grid_h: int, grid_w: int):
        super().__init__()
        self.grid_h, self.grid_w = grid_h, grid_w
        self.mixer = ConvMixer(width).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        if T != self.grid_h * self.grid_w:
            raise ValueError(f"expected {self.grid_h}x{self.grid_w}={self.grid_h * self.grid_w} tokens, got {T}")
        # (B, T, D) row-major is exactly an NHWC buffer: view it as a channels_last NCHW tensor, no copy.
        grid = x.reshape(B, self.grid_h, self.grid_w, D).permute(0, 3, 1, 2)
        return self.mixer(grid).permute(0, 2, 3, 1).reshape(B, T, D)


@register_token_mixer("dico_conv")
def _dico_conv_mixer(width: int, grid_h: int, grid_w: int) -> nn.Module:
    """DiCo's mixer: 1x1 conv, 3x3 depthwise conv, GELU, compact channel attention, 1x1 conv (constant cost per
    token)."""
    return _TokenConvMixer(width, grid_h, grid_w)
