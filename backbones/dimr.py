"""DiMR: multi-resolution diffusion with Time-Dependent LayerNorm (Liu et al., NeurIPS 2024, arXiv 2406.09416).

Follows the official qihao067/DiMR ``libs/core/blocks.py`` (``MRModel``/``Stage``) and the released 2R configs:

* R branches ("stages") from the lowest to the highest resolution; every branch reads the same noisy input
  through its own strided-conv patchify (patch 2^l for a branch at input/2^l) and a learned absolute
  positional embedding. The lowest branch runs Transformer blocks with an in-context class token (the null
  class ``num_classes`` for CFG); higher branches run ConvNeXt blocks (x + DWConv7x7(x), then the gated MLP).
* U-ViT long skips inside each branch: ``depth // 2 * 2 + 1`` blocks; before each out-block
  ``x = Linear(2D -> D)(cat(x, skip))``.
* Cascade: a branch hands up its embedded input and EVERY block output, concatenated on channels; the next
  branch applies TD-LayerNorm -> Linear pixel-shuffle x2 -> TD-LayerNorm and adds the result to its embedded
  input. Gradients flow into the lower branch (official ``block_grad_to_lowres=False``).
* Every branch ends in TD-LayerNorm -> Conv3x3 predicting epsilon at its own resolution; ``forward`` returns the
  highest-resolution prediction; :meth:`DiMR.training_losses` uses all of them (the multi-scale loss).
* Time enters only through the time-dependent norms (``TDRMSNorm`` pre-norms in the blocks, ``TDLayerNorm`` in
  the cascade and heads; see backbones/layers.py). There is no timestep embedding or MLP anywhere.

Presets. ``XL/2R`` and ``G/2R`` are the released ImageNet-256 configs (latent 32x32: Transformer on 16x16
tokens, ConvNeXt at 32x32): 505.05M / 160 GMACs and 1,056.35M / 331 GMACs with ``learn_sigma=False``. Every
preset is (depth, hidden_size, num_heads) of the Transformer branch; the ConvNeXt branches follow the rule that
reproduces both released configs exactly: branch k (k = 1 above the lowest) has width hidden_size / 2^k, GLU
hidden 2x width, ``ceil(depth / 2)`` configured blocks (XL: 39 -> 20, built as 21; G: 57 -> 29) and kernel 7.
``S/2R`` and ``B/2R`` are ours (same structure at DiT-S/B widths, depth 13) for sweeps and CPU runs. The 3R
presets are ours as well: the paper's DiMR-XL/3R (ImageNet-512, 525M / 206 GFLOPs) and the ImageNet-64 M/3R and
L/3R configs are unpublished, so ``*/3R`` give the 3-branch structure (Transformer at input/4, ConvNeXt at
input/2 and input) under the same width/depth rule without claiming those numbers, and their multi-scale loss
weights [1/16, 1/4, 1] are our extrapolation of the released [1/4, 1]. (Consistency only: our XL/3R at 64x64
latents has 525.03M params and 206.1 GMACs, in line with the paper's 525M / 206 GFLOPs, but its exact
patchify, widths and depths remain unconfirmed.)

Deviations, all documented: ``learn_sigma=True`` doubles only the highest-resolution head's channels so DiMR can
train under the shared hybrid loss (official DiMR is ``learn_sigma=False``, epsilon only, fixed variance); the
official per-block ``torch.utils.checkpoint`` is opt-in (``grad_checkpoint=True``; memory only, same maths);
q/k/v are not cast to float32 before attention (the shared ``attention`` runs SDPA/flash-attn in the input dtype;
under the official fp16 autocast SDPA is recast to half anyway).

``arch['patch']`` is the highest-resolution branch's patch size (always 1: DiMR's finest output is per latent
pixel); ``arch['depth']``/``['width']``/``['heads']`` describe the Transformer branch and ``arch['branches']`` R.

Official checkpoints (:data:`OFFICIAL_CHECKPOINTS`: DiMR-XL/2R and DiMR-G/2R, bare state_dicts of ``MRModel``)
load strictly with :func:`load_official_checkpoint` into a model built with ``learn_sigma=False``. Our module names
differ from the official ones (``branches.k`` = ``stages.k``, ``x_embedder.proj`` = ``input_layer.1``, ...) and
the official position table is (H*W, D) where ours is (1, H*W, D): :func:`from_official_state_dict` and
:func:`to_official_state_dict` map one tensor onto one tensor, and fail on any key they do not know.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

if TYPE_CHECKING:
    from diffusion.gaussian_diffusion import GaussianDiffusion

from . import register
from .dit import load_official_checkpoint as _load_official
from .layers import (
    Attention,
    DiffusionBackbone,
    LabelEmbedder,
    PatchEmbed,
    TDLayerNorm,
    TDRMSNorm,
    resolve_preset,
    td_time_condition,
)

DIMR_PRESETS = {
    # ours (same structure, smaller): DiT-S / DiT-B widths, U-ViT-S depth
    "S/2R": dict(branches=2, depth=13, hidden_size=384, num_heads=6),
    "B/2R": dict(branches=2, depth=13, hidden_size=768, num_heads=12),
    # released: configs/DiMR-XL-2R_imagenet256.py and configs/DiMR-G-2R_imagenet256.py
    "XL/2R": dict(branches=2, depth=39, hidden_size=960, num_heads=16),
    "G/2R": dict(branches=2, depth=57, hidden_size=1152, num_heads=16),
    # ours: 3-branch structure; the paper's 3R configs are unpublished (no official numbers claimed)
    "S/3R": dict(branches=3, depth=13, hidden_size=384, num_heads=6),
    "B/3R": dict(branches=3, depth=13, hidden_size=768, num_heads=12),
    "XL/3R": dict(branches=3, depth=39, hidden_size=960, num_heads=16),
    # ours: CPU-sized (about 0.2M params)
    "cpu/2R": dict(branches=2, depth=3, hidden_size=64, num_heads=4),
}

# Multi-scale loss weights, lowest resolution first (official ``config.loss_coeffs``); 3R is our extrapolation.
DIMR_LOSS_COEFFS = {2: (1 / 4, 1.0), 3: (1 / 16, 1 / 4, 1.0)}


def _trunc_normal_linears(module: nn.Module) -> None:
    """Official init of every Linear (common_layers.Linear): trunc-normal(0.02) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class GLUMlp(nn.Module):
    """Pre-norm gated MLP of both block types: w2(GELU(w0 n(x)) * w1 n(x)), n = TDRMSNorm (official MLPBlock)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.norm = TDRMSNorm(dim)
        self.w0 = nn.Linear(dim, hidden_dim)
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()  # exact GELU, as official

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        x = self.norm(x, time)
        return self.w2(self.act(self.w0(x)) * self.w1(x))


class TransformerBlock(nn.Module):
    """x + Attn(TDRMSNorm(x)); x + GLU(TDRMSNorm(x)). qkv without bias, output projection with bias; no adaLN."""

    def __init__(self, dim: int, hidden_dim: int, num_heads: int):
        super().__init__()
        self.norm1 = TDRMSNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=False)
        self.mlp = GLUMlp(dim, hidden_dim)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x, time))
        return x + self.mlp(x, time)


class ConvNeXtBlock(nn.Module):
    """x + DWConv(x) (no norm before it, as released); x + GLU(TDRMSNorm(x)). Channel-last (B, H, W, C)."""

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int = 7):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.mlp = GLUMlp(dim, hidden_dim)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        x = x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x, time)


class CascadeUpsample(nn.Module):
    """TD-LayerNorm(C_low) -> Linear(C_low -> r*r*C) -> pixel shuffle -> TD-LayerNorm(C), channel-last.

    Pixel shuffle as official: Linear output channel ``(a * r + b) * C + c`` lands at pixel (r*i + a, r*j + b).
    """

    def __init__(self, lowres_dim: int, dim: int, ratio: int = 2):
        super().__init__()
        self.ratio = ratio
        self.norm_in = TDLayerNorm(lowres_dim)
        self.proj = nn.Linear(lowres_dim, dim * ratio * ratio)
        self.norm_out = TDLayerNorm(dim)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.norm_in(x, time))
        B, H, W, C = x.shape
        r = self.ratio
        x = x.reshape(B, H, W, r, r, C // (r * r)).transpose(2, 3).reshape(B, H * r, W * r, C // (r * r))
        return self.norm_out(x, time)


class DiMRBranch(nn.Module):
    """One resolution branch (official ``Stage``): patchify + APE, optional cascade input, U-ViT blocks, head."""

    def __init__(self, block_type: str, input_size: int, patch_size: int, in_channels: int, out_channels: int,
                 dim: int, hidden_dim: int, num_blocks: int, num_heads: int | None = None,
                 num_classes: int | None = None, class_dropout_prob: float = 0.0, lowres_dim: int | None = None,
                 kernel_size: int = 7, final_kernel_size: int = 3):
        super().__init__()
        self.block_type = block_type
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, dim, bias=True)
        self.grid_size = self.x_embedder.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, dim))  # learned APE
        # In-context class token (Transformer branch only); the table's last row is the CFG null class.
        self.y_embedder = LabelEmbedder(num_classes, dim, class_dropout_prob) if num_classes is not None else None
        self.upsample = CascadeUpsample(lowres_dim, dim) if lowres_dim is not None else None
        n = num_blocks // 2 * 2 + 1  # official rounding: an even count gains one block (XL ConvNeXt: 20 -> 21)
        if block_type == "transformer":
            self.blocks = nn.ModuleList([TransformerBlock(dim, hidden_dim, num_heads) for _ in range(n)])
        elif block_type == "convnext":
            self.blocks = nn.ModuleList([ConvNeXtBlock(dim, hidden_dim, kernel_size) for _ in range(n)])
        else:
            raise ValueError(f"unknown DiMR block type {block_type!r}; use 'transformer' or 'convnext'")
        self.skip_linears = nn.ModuleList([nn.Linear(2 * dim, dim) for _ in range(n // 2)])
        self.final_norm = TDLayerNorm(dim)
        self.final_conv = nn.Conv2d(dim, out_channels, final_kernel_size, padding=final_kernel_size // 2)
        self.grad_checkpoint = False

    def _block(self, block: nn.Module, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, time, use_reentrant=False)
        return block(x, time)

    def forward(self, img: torch.Tensor, time: torch.Tensor, y: torch.Tensor | None,
                lowres: torch.Tensor | None, return_cascade: bool, head: bool = True
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """img (B, C, H, W) -> (eps at this branch's grid (B, C_out, g, g) or None without ``head``,
        cascade features (B, g, g, C') or None)."""
        B, g = img.shape[0], self.grid_size
        x = (self.x_embedder(img) + self.pos_embed).reshape(B, g, g, -1)
        if self.upsample is not None:
            x = x + self.upsample(lowres, time)
        if self.block_type == "transformer":
            x = x.reshape(B, g * g, -1)
        n_ctx = 0
        if self.y_embedder is not None:
            x = torch.cat([self.y_embedder(y).unsqueeze(1).to(x.dtype), x], dim=1)
            n_ctx = 1
        cascade, skips = [x], []
        half = len(self.blocks) // 2
        for block in self.blocks[:half]:
            x = self._block(block, x, time)
            cascade.append(x)
            skips.append(x)
        x = self._block(self.blocks[half], x, time)
        cascade.append(x)
        for linear, block in zip(self.skip_linears, self.blocks[half + 1:]):
            x = self._block(block, linear(torch.cat([x, skips.pop()], dim=-1)), time)
            cascade.append(x)
        out = None
        if head:
            x = x[:, n_ctx:].reshape(B, g, g, -1)
            out = self.final_conv(self.final_norm(x, time).permute(0, 3, 1, 2))
        if not return_cascade:
            return out, None
        return out, torch.cat([c[:, n_ctx:].reshape(B, g, g, -1) for c in cascade], dim=-1)


@register("dimr")
class DiMR(DiffusionBackbone):
    """DiMR multi-resolution cascade. ``size`` in S/2R, B/2R, XL/2R, G/2R (2R) or S/3R, B/3R, XL/3R (ours).

    ``depth``, ``hidden_size``, ``num_heads`` override the Transformer branch; the ConvNeXt branches follow
    (width hidden_size / 2^k, ceil(depth / 2) blocks). ``loss_coeffs`` (lowest resolution first, last = 1)
    weight the multi-scale loss; default [1/4, 1] for 2R (official), [1/16, 1/4, 1] for 3R (ours).
    """

    presets = DIMR_PRESETS

    def __init__(self, size: str = "XL/2R", input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                 learn_sigma: bool = True, class_dropout_prob: float = 0.1, depth: int | None = None,
                 hidden_size: int | None = None, num_heads: int | None = None,
                 loss_coeffs: Sequence[float] | None = None, grad_checkpoint: bool = False,
                 num_timesteps: int = 1000):
        super().__init__()
        cfg = resolve_preset(self.presets, size, dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads))
        R, D, depth = cfg["branches"], cfg["hidden_size"], cfg["depth"]
        lowest = 2 ** (R - 1)
        if input_size % lowest or input_size < lowest:
            raise ValueError(f"DiMR-{size} has {R} branches down to input/{lowest}, so input_size must be a positive "
                             f"multiple of {lowest}; got {input_size}. Pad/resize the data or use a 2R preset")
        if D % lowest:
            raise ValueError(f"hidden_size {D} must be divisible by {lowest} (ConvNeXt branch k has width "
                             f"hidden_size / 2^k); choose a multiple of {lowest}")
        self.loss_coeffs = tuple(DIMR_LOSS_COEFFS.get(R, ()) if loss_coeffs is None else loss_coeffs)
        if len(self.loss_coeffs) != R or self.loss_coeffs[-1] != 1:
            raise ValueError(f"loss_coeffs must give one weight per branch ({R}), lowest resolution first, ending in "
                             f"1 (the trainer's main loss trains the highest branch); got {list(self.loss_coeffs)}")
        self.set_data_shape(input_size, in_channels, num_classes, learn_sigma)
        self.num_branches = R
        self.num_timesteps = int(num_timesteps)  # T of the trained diffusion: the TD norms' time input is t / T

        branches, lowres_dim = [], None
        for k in range(R):
            level = R - 1 - k  # branch k works at input / 2^level; k = 0 is the lowest resolution
            transformer = k == 0
            dim = D // 2 ** k
            blocks = depth if transformer else math.ceil(depth / 2)
            branches.append(DiMRBranch(
                "transformer" if transformer else "convnext", input_size, 2 ** level, in_channels,
                self.out_channels if level == 0 else in_channels, dim, 2 * dim, blocks,
                num_heads=cfg["num_heads"] if transformer else None,
                num_classes=num_classes if transformer else None, class_dropout_prob=class_dropout_prob,
                lowres_dim=lowres_dim))
            lowres_dim = dim * (len(branches[-1].blocks) + 1)  # embedded input + every block output
        self.branches = nn.ModuleList(branches)
        self.set_grad_checkpointing(grad_checkpoint)
        top = self.branches[0]
        self.arch = dict(size=size, patch=1, depth=len(top.blocks), width=D, heads=cfg["num_heads"], branches=R)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official init: Linears and embeddings trunc-normal(0.02), zero biases; convs (patchify, DWConv, heads)
        keep PyTorch's default init (heads are NOT zero-initialised); TD params p1 = p2 = 1 (scales) / 0 (shifts)."""
        _trunc_normal_linears(self)
        for branch in self.branches:
            nn.init.trunc_normal_(branch.pos_embed, std=0.02)
            if branch.y_embedder is not None:
                nn.init.trunc_normal_(branch.y_embedder.embedding_table.weight, std=0.02)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Per-block activation checkpointing in training (the official code always checkpoints)."""
        for branch in self.branches:
            branch.grad_checkpoint = enabled

    def no_weight_decay(self) -> set[str]:
        """The time-dependent norms' sigmoid slope and offset (``nodecay_weight``/``nodecay_bias``), as official
        ``utils.trainable_parameters``; the interpolated endpoints p1/p2 are decayed like every other weight."""
        return {n for n, _ in self.named_parameters() if n.endswith((".nodecay_weight", ".nodecay_bias"))}

    def forward_all(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, lowres_heads: bool = True
                    ) -> list[torch.Tensor | None]:
        """Epsilon predictions of every branch, lowest resolution first (the official model output).

        ``lowres_heads=False`` skips the lower branches' heads (None in their place): they only feed the training
        loss. The official code always runs them (+0.009 GMACs for XL/2R, outside our sampling-time count)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, {self.input_size}, {self.input_size}), "
                             f"got {tuple(x.shape)}")
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must hold one timestep per sample ({x.shape[0]}), got shape {tuple(t.shape)}")
        time = td_time_condition(t, self.num_timesteps)
        # Labels arrive already dropped (trainer). Only the Transformer branch embeds them (class token); ConvNeXt
        # branches see the class through the cascade, as official.
        outputs, lowres = [], None
        for k, branch in enumerate(self.branches):
            last = k == len(self.branches) - 1
            out, lowres = branch(x, time, y, lowres, return_cascade=not last, head=last or lowres_heads)
            outputs.append(out)
        return outputs

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Highest-resolution epsilon (plus variance channels when learn_sigma); the lower heads are skipped."""
        return self.forward_all(x, t, y, lowres_heads=False)[-1]

    def training_losses(self, diffusion: GaussianDiffusion, x_start: torch.Tensor, t: torch.Tensor,
                        y: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """DiMR's multi-scale loss from ONE cascade pass: the diffusion's terms on the highest-resolution output
        plus ``aux``, the lower-branch part per sample (B,), which is also added into ``loss``.

        Official loss = sum over ALL branches l of coeff_l * mean((eps_hat_l - target_l)^2), target_l =
        avg_pool(noise, 2^l) * 2^l (unit variance; l = 0 is the highest resolution, target = noise) and coeffs
        [1/4, 1] for 2R. The l = 0 term (coeff 1) is the diffusion's own epsilon MSE on the top output (plus its
        vb term with learn_sigma), so ``aux`` holds only the l >= 1 terms. The other keys (loss, mse, vb,
        model_output, x_t) are the diffusion's, as in the default hook.
        """
        runs: list[list[torch.Tensor | None]] = []

        def top_output(x_t: torch.Tensor, t_model: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            # The diffusion noises x_start and maps t (respacing) itself; run the whole cascade on exactly that
            # input and hand back the top head, keeping the lower heads in this call's local list only.
            outs = self.forward_all(x_t, t_model, y, lowres_heads=True)
            runs.append(outs)
            return outs[-1]

        terms = diffusion.training_losses(top_output, x_start, t, dict(y=y), noise=noise)
        if len(runs) != 1:
            raise RuntimeError(f"diffusion.training_losses ran the model {len(runs)} times; DiMR's multi-scale loss "
                               f"needs exactly one pass whose lower heads match the main output")
        R = self.num_branches
        aux = noise.new_zeros(noise.shape[0], dtype=torch.float32)
        for k, pred in enumerate(runs[0][:-1]):
            r = 2 ** (R - 1 - k)  # branch k (lowest first) predicts at input / 2^(R-1-k)
            target = F.avg_pool2d(noise.float(), r) * r
            aux = aux + self.loss_coeffs[k] * (pred.float() - target).pow(2).flatten(1).mean(1)
        terms["aux"] = aux
        terms["loss"] = terms["loss"] + aux
        return terms


# ------------------------------------------------------------------------------------------------------------------
# Official checkpoints (qihao067/DiMR: libs/core/blocks.py MRModel; README "Pretrained Models")
# ------------------------------------------------------------------------------------------------------------------
# Released on https://huggingface.co/QHL067/DiMR: bare state_dicts of MRModel (eval.py loads them with
# ``load_state_dict(torch.load(path))``; train.py's TrainState saves ``nnet_ema.pth`` the same way), ImageNet 256x256
# on SD-VAE latents (32x32x4), classes 0..999 plus the CFG null class 1000 (official ``num_classes=1001`` rows),
# epsilon prediction only (4 output channels per branch).
_OFFICIAL_DATA = dict(input_size=32, in_channels=4, num_classes=1000, learn_sigma=False, class_dropout_prob=0.1)
OFFICIAL_CHECKPOINTS = {
    "DiMR-XL_2R_800epochs.pth": dict(size="XL/2R", **_OFFICIAL_DATA),
    "DiMR-G_2R_800epochs.pth": dict(size="G/2R", **_OFFICIAL_DATA),
}

# (our prefix, official prefix) inside one branch (official ``Stage``) ...
_BRANCH_PREFIXES = (
    ("x_embedder.proj.", "input_layer.1."),            # Sequential(EvenDownInterpolate, Conv2d, ChannelLast, APE)
    ("y_embedder.embedding_table.", "class_embeds."),  # in-context class token table (Transformer branch)
    ("upsample.norm_in.", "upsample.0."),              # Sequential(TD-LayerNorm, PixelShuffleUpsample, TD-LayerNorm)
    ("upsample.proj.", "upsample.1.kernel."),
    ("upsample.norm_out.", "upsample.2."),
    ("skip_linears.", "skip_denses."),
    ("final_norm.", "output_layer.0."),                # Sequential(TD-LayerNorm, ChannelFirst, Conv2d)
    ("final_conv.", "output_layer.2."),
)
# ... and inside ``blocks.<i>.`` (official TransformerBlock / ConvNeXtBlock: block1 = mixer, block2 = MLPBlock).
_BLOCK_PREFIXES = (
    ("norm1.", "block1.norm."),
    ("attn.qkv.", "block1.query_key_value."),  # same row layout: [q | k | v], head-major
    ("attn.proj.", "block1.dense."),
    ("dwconv.", "block1.1."),                  # Sequential(ChannelFirst, Conv2d depthwise, ChannelLast)
    ("mlp.", "block2."),
)
_POS_KEYS = ("pos_embed", "input_layer.3.position_embeddings.weight")  # (1, H*W, D) ours, (H*W, D) official


def _rename_key(key: str, to_official: bool) -> str:
    src, dst = (0, 1) if to_official else (1, 0)
    top = ("branches.", "stages.")
    m = re.fullmatch(rf"{re.escape(top[src])}(\d+)\.(.+)", key)
    if m is not None:
        branch, rest = m.groups()
        if rest == _POS_KEYS[src]:
            return f"{top[dst]}{branch}.{_POS_KEYS[dst]}"
        block = re.fullmatch(r"(blocks\.\d+\.)(.+)", rest)
        head, rest, table = (block[1], block[2], _BLOCK_PREFIXES) if block else ("", rest, _BRANCH_PREFIXES)
        for pair in table:
            if rest.startswith(pair[src]):
                return f"{top[dst]}{branch}.{head}{pair[dst]}{rest[len(pair[src]):]}"
    side = "our" if to_official else "official"
    raise KeyError(f"{key!r} is not a DiMR parameter name of the {side} model; nothing maps it (is this a DiMR "
                   f"state_dict of the released APE/TDRMSN configs?)")


def _convert(state: dict[str, torch.Tensor], to_official: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = _rename_key(key, to_official)
        if new in out:
            raise KeyError(f"two keys map onto {new!r}")
        if new.endswith(_POS_KEYS[0]):
            value = value.unsqueeze(0)  # official Embedding(H*W, D), indexed h * W + w: our raster order
        elif new.endswith(_POS_KEYS[1]):
            value = value.squeeze(0)
        out[new] = value
    return out


def from_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``MRModel`` state_dict -> ours, one tensor per tensor (position tables reshaped (N, D) -> (1, N, D)).
    Raises KeyError on a key the mapping does not know (nothing is dropped silently)."""
    return _convert(state, to_official=False)


def to_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our DiMR state_dict -> the official ``MRModel`` names and layouts (inverse of
    :func:`from_official_state_dict`)."""
    return _convert(state, to_official=True)


def load_official_checkpoint(model: DiMR, source, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Load an official DiMR checkpoint (file, or a state_dict) strictly into ``model``, built with the file's
    config, e.g. ``build("dimr", **OFFICIAL_CHECKPOINTS["DiMR-XL_2R_800epochs.pth"])``. Returns the converted
    state_dict.

    The released models predict epsilon only (fixed variance), so ``model`` must have ``learn_sigma=False``. They
    were trained and sampled with the SD "scaled linear" beta schedule and a time input ``log_snr = n/1000*8 - 4``
    for step n = t + 1 (our :func:`~backbones.layers.td_time_condition`); a sampler must use that schedule.
    """
    if not isinstance(model, DiMR):
        raise TypeError(f"expected a DiMR model, got {type(model).__name__}")
    if model.learn_sigma:
        raise ValueError("official DiMR checkpoints predict epsilon only (4 output channels per branch): build the "
                         "model with learn_sigma=False")
    return _load_official(model, source, prefer_ema, convert=from_official_state_dict)
