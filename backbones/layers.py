"""Layers shared by every backbone: embedders, patchify, positional embeddings, adaLN, attention, base class.

Module and parameter names follow the official DiT code (facebookresearch/DiT, models.py) so that official
state_dicts load unchanged into any backbone built from these pieces. One behavioural deviation: classifier-free
label dropout is the trainer's job (:func:`drop_labels`, once per batch), never done inside a backbone forward.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

if TYPE_CHECKING:
    from diffusion.gaussian_diffusion import GaussianDiffusion


# --------------------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------------------
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of token features ``x`` (B, T, D) by per-sample (B, D) shift and scale (note 1 + scale)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM/GLIDE sinusoidal embedding of (possibly fractional) timesteps, cos first, always float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency embedding of t followed by Linear-SiLU-Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


def drop_labels(labels: torch.Tensor, dropout_prob: float, null_class: int,
                force_drop_ids: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Classifier-free-guidance label dropout: replace labels by ``null_class`` with probability ``dropout_prob``.

    The trainer calls this once per batch, before the model and any distillation teacher, so every label table
    of a backbone and the teacher see the same labels; no backbone forward drops labels itself. The mask is drawn
    on the CPU (from ``generator`` when given) and then moved to ``labels.device``, so a seed gives the same
    mask on every device. ``force_drop_ids`` (1 = drop) replaces the random draw.
    """
    if force_drop_ids is None:
        drop_ids = torch.rand(labels.shape[0], generator=generator) < dropout_prob
    else:
        drop_ids = force_drop_ids == 1
    drop_ids = drop_ids.to(labels.device)
    return torch.where(drop_ids, torch.full_like(labels, null_class), labels)


class LabelEmbedder(nn.Module):
    """Class-label table; the extra row ``num_classes`` is the CFG null class (present when dropout_prob > 0).

    Unlike official DiT, ``forward`` never drops labels at random: the trainer does it once per batch with
    :func:`drop_labels`. ``dropout_prob`` only decides whether the null row exists (official table size, so
    official state_dicts load unchanged).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None:
            labels = drop_labels(labels, 0.0, self.num_classes, force_drop_ids)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------------------------------
# Patchify and positional embeddings
# --------------------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (row-major), as a strided conv (timm-compatible key ``proj``)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, bias: bool = True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}; "
                             f"choose a patch size that divides the input side")
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"expected input of spatial size {self.input_size}x{self.input_size}, "
                             f"got {tuple(x.shape[-2:])}; build the model with input_size={x.shape[-1]}")
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x: torch.Tensor, patch_size: int, out_channels: int, grid_h: int, grid_w: int | None = None
               ) -> torch.Tensor:
    """(B, T, p*p*C) tokens with per-token layout (p_row, p_col, C) -> (B, C, H, W) image."""
    grid_w = grid_h if grid_w is None else grid_w
    p, c = patch_size, out_channels
    x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, grid_h * p, grid_w * p)


def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE-style 1-D embedding: [sin(pos*w), cos(pos*w)], w_k = 1/10000^(k/(D/2)), float64."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos positional embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | Sequence[int]) -> np.ndarray:
    """(H*W, D) fixed 2-D sin-cos embedding; the first D/2 channels encode the column index (official order)."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos positional embedding needs a dimension divisible by 4, got {embed_dim}")
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, grid_w)
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, grid_h)
    return np.concatenate([emb_w, emb_h], axis=1)


# --------------------------------------------------------------------------------------------------------------
# Token mixers and MLP
# --------------------------------------------------------------------------------------------------------------
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # optional CUDA extra
    except ImportError:
        return None
    return flash_attn_func


# Opt-in (train.flash_attn): whether flash-attn runs must not depend on what happens to be installed, since it
# rounds differently from SDPA and the run key records the choice
_use_flash_attn = False


@contextlib.contextmanager
def flash_attention(enabled: bool = True) -> Iterator[None]:
    """Within the block, :func:`attention` on CUDA half-precision inputs goes through flash-attn (installed: the
    trainer checks ``train.flash_attn`` first); elsewhere, and outside the block, through SDPA."""
    global _use_flash_attn
    previous, _use_flash_attn = _use_flash_attn, enabled
    try:
        yield
    finally:
        _use_flash_attn = previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention on (B, heads, T, head_dim): SDPA, or flash-attn inside :func:`flash_attention`."""
    if _use_flash_attn and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        flash = _flash_attn_func()
        if flash is not None:
            return flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout: rows q | k | v, head-major)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        # unbind, not qkv[0], qkv[1], qkv[2]: its backward stacks the three gradients once, where three selects
        # each zero-fill and copy into a full-size qkv gradient and add them (same values, ~3x the memory traffic)
        out = attention(*qkv.unbind(0))
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 (timm key names); tanh-GELU by default as in DiT."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 act_layer: type[nn.Module] | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer() if act_layer is not None else nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def adaln_modulation(hidden_size: int, n_vectors: int) -> nn.Sequential:
    """SiLU -> Linear(D, n*D): the adaLN(-Zero) regressor (key ``adaLN_modulation.1``)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_vectors * hidden_size, bias=True))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map of each token to a p x p x C patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = adaln_modulation(hidden_size, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------------------------
# Initialisation helpers (official DiT scheme)
# --------------------------------------------------------------------------------------------------------------
def xavier_init_linears(module: nn.Module) -> None:
    """xavier_uniform weights and zero biases for every nn.Linear below ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_patch_embed(conv: nn.Conv2d) -> None:
    """Patch-embed conv initialised like an nn.Linear on the flattened patch (xavier on w.view(D, -1))."""
    nn.init.xavier_uniform_(conv.weight.data.view(conv.weight.shape[0], -1))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def init_embedders(t_embedders: Iterable[TimestepEmbedder], y_embedders: Iterable[LabelEmbedder]) -> None:
    """N(0, 0.02) for label tables and the timestep-MLP weights (biases stay 0)."""
    for y in y_embedders:
        nn.init.normal_(y.embedding_table.weight, std=0.02)
    for t in t_embedders:
        nn.init.normal_(t.mlp[0].weight, std=0.02)
        nn.init.normal_(t.mlp[2].weight, std=0.02)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (adaLN-Zero regressors, output heads)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# --------------------------------------------------------------------------------------------------------------
# Base class shared by every backbone
# --------------------------------------------------------------------------------------------------------------
class DiffusionBackbone(nn.Module):
    """What the trainer, samplers and harness rely on, and nothing more (EDM style).

    Subclasses set ``in_channels``, ``out_channels``, ``num_classes``, ``learn_sigma``, ``input_size`` and
    ``arch`` (a dict with the sweep coordinates: size, patch, depth, width; ``None`` where not meaningful) and
    implement ``forward(x, t, y) -> (B, out_channels, H, W)``.
    """

    in_channels: int
    out_channels: int
    num_classes: int
    learn_sigma: bool
    input_size: int
    arch: dict

    def set_data_shape(self, input_size: int, in_channels: int, num_classes: int, learn_sigma: bool) -> None:
        """Record the data interface; ``out_channels`` doubles with a learned variance (epsilon + v)."""
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance on a 2B batch whose second half carries the null label ``num_classes``.

        Only the first half of ``x`` is used (both halves are the same latent). By default all
        ``in_channels`` epsilon channels are guided; ``guided_channels=3`` reproduces DiT's published variant.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self(combined, t, y)
        n_guided = self.in_channels if guided_channels is None else guided_channels
        eps, rest = model_out[:, :n_guided], model_out[:, n_guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    def training_losses(self, diffusion: GaussianDiffusion, x_start: torch.Tensor, t: torch.Tensor,
                        y: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample (B,) training terms for one step; the trainer minimises ``terms["loss"].mean()``.

        ``y`` holds labels the trainer already dropped (:func:`drop_labels`). The default is the diffusion's own
        loss (keys loss, mse, vb, plus model_output and x_t for distillation). Backbones with auxiliary outputs
        override it, keep those keys and add their extra per-sample terms into ``loss`` (e.g. DiMR's ``aux``).
        """
        return diffusion.training_losses(self, x_start, t, dict(y=y), noise=noise)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (timm convention)."""
        return set()

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The blocks ``train.grad_checkpoint`` recomputes in the backward: ``all_blocks()`` when the backbone
        defines it, else its ``blocks`` list."""
        if hasattr(self, "all_blocks"):
            return list(self.all_blocks())
        if isinstance(getattr(self, "blocks", None), nn.ModuleList):
            return list(self.blocks)
        raise NotImplementedError(f"{type(self).__name__} names no blocks for gradient checkpointing: define "
                                  f"all_blocks() (or override set_grad_checkpointing)")

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Per-block activation checkpointing in training (``torch.utils.checkpoint``, non-reentrant, RNG state
        preserved: the same numbers as without it, less memory, one more forward per block). Parameter names
        and the state_dict are unchanged (the block's forward is wrapped on the instance)."""
        for block in self.checkpoint_blocks():
            block.__dict__.pop("forward", None)
            if enabled:
                block.forward = _CheckpointedForward(block.forward)


class _CheckpointedForward:
    """A block's bound forward, run under ``torch.utils.checkpoint`` when it trains with gradients."""

    def __init__(self, forward: Any):
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.forward.__self__.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.forward, *args, use_reentrant=False, **kwargs)
        return self.forward(*args, **kwargs)


def resolve_preset(presets: dict[str, dict], size: str, overrides: dict) -> dict:
    """Merge a named preset with explicit (non-None) overrides; unknown sizes list the valid ones."""
    if size not in presets:
        raise ValueError(f"unknown size preset {size!r}; choose one of {', '.join(presets)}")
    cfg = dict(presets[size])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (frozen ones such as a fixed pos_embed included unless trainable_only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------------------------
# Time-dependent normalisation (DiMR, Liu et al. NeurIPS 2024; official qihao067/DiMR libs/core/sigmoid)
# --------------------------------------------------------------------------------------------------------------
def td_time_condition(t: torch.Tensor, num_timesteps: int = 1000) -> torch.Tensor:
    """Map integer DDPM indices t in [0, num_timesteps - 1] to DiMR's time input in (-1, 1], float32.

    Official DiMR trains on discrete steps n in {1..1000} whose noise level is alphas_cumprod[n - 1] of the ADM
    indexing (its ``cum_alphas`` is prefixed by 1 for n = 0), so n = t + 1. It feeds ``log_snr = n/1000*8 - 4``
    (a linear map of the step, not the true log-SNR) and the norms see ``log_snr / 4``. Same op order as official.
    """
    n = t.float() + 1
    log_snr = (n / num_timesteps) * 8 - 4
    return log_snr / 4.0


class TimeDependentParameter(nn.Module):
    """theta(t) = p2 + sigmoid(t * (w + 1) + b) * (p1 - p2), elementwise, one row per sample: (B, *shape).

    Official names: ``param0`` = p1, ``param1`` = p2, ``nodecay_weight`` = w (stored minus 1, so w = 1 at init),
    ``nodecay_bias`` = b. Init p1 = p2 = ``init_value`` (so theta is exactly time independent at init), w = b = 0.
    The official trainer exempts only ``nodecay_*`` from weight decay.
    """

    def __init__(self, shape: Sequence[int], init_value: float):
        super().__init__()
        self.param0 = nn.Parameter(torch.full(tuple(shape), float(init_value)))
        self.param1 = nn.Parameter(torch.full(tuple(shape), float(init_value)))
        self.nodecay_weight = nn.Parameter(torch.zeros(tuple(shape)))
        self.nodecay_bias = nn.Parameter(torch.zeros(tuple(shape)))

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        time = time.reshape(-1, *([1] * self.param0.dim())).to(self.param0.dtype)
        s = torch.sigmoid(time * (self.nodecay_weight + 1) + self.nodecay_bias)
        return self.param1 + s * (self.param0 - self.param1)


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B, D) per-sample channel vector -> (B, 1, ..., 1, D) broadcastable against a channel-last ``ndim`` tensor."""
    return v.reshape(v.shape[0], *([1] * (ndim - 2)), v.shape[-1])


class TDLayerNorm(nn.Module):
    """LayerNorm over the last dim with time-dependent gamma(t), beta(t) (each its own TimeDependentParameter).

    ``forward(x, time)``: x channel-last (B, ..., D); time (B,) or (1,) from :func:`td_time_condition`.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = TimeDependentParameter((dim,), 1.0)
        self.bias = TimeDependentParameter((dim,), 0.0)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x, (self.dim,), eps=self.eps)
        out = out * _per_sample(self.weight(time), x.dim()) + _per_sample(self.bias(time), x.dim())
        return out.to(x.dtype)


class TDRMSNorm(nn.Module):
    """RMSNorm with a time-dependent scale (no shift): x / (rms(x) + eps) * gamma(t); eps is added to the RMS."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.scale = TimeDependentParameter((dim,), 1.0)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        rms = xf.pow(2).mean(dim=-1, keepdim=True).sqrt()  # pow/mean/sqrt: free under the MAC convention
        return (xf / (rms + self.eps) * _per_sample(self.scale(time), x.dim())).to(x.dtype)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability p (survivors scaled 1/(1-p))."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)
