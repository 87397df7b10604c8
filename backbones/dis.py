"""DiS: Scalable Diffusion Models with State Space Backbone (Fei et al., 2024, arXiv 2402.05608).

Faithful to the official feizc/DiS ``models_dis.py`` (``DisModel``, read at commit 3da562e) with its bundled
``mamba/mamba_ssm`` (``Mamba`` with ``bimamba_type="v2"``, the fast path its defaults take):

- tokens = [label, time, patches] (unconditional: [time, patches]); time token = Linear(D, 4D)-SiLU-Linear(4D, D) of
  the D-dimensional sinusoidal embedding; a LEARNED positional embedding over all tokens, left at zero (the official
  ``_init_weights`` never touches it);
- U-ViT skeleton: depth//2 in-blocks, one mid block, depth//2 out-blocks (so 2*(depth//2)+1 blocks: DiS-S/2's
  "depth 24" runs 25); out-block j first fuses Linear(2D -> D) of cat([its input, the output of in-block
  depth//2-1-j]); the long skips carry the MIXER outputs, not the residual stream;
- Vim/Mamba pre-norm blocks, "add -> RMSNorm -> mixer": ``residual = residual + drop_path(h)`` kept in fp32
  (``residual_in_fp32``), ``h = mixer(RMSNorm(residual))``; the head is ``norm_f(residual + drop_path(h))`` with the
  model-level drop path at the full ``drop_path_rate``, then the DiT final layer (adaLN from time + label token
  embeddings; unconditional: no adaLN) and unpatchify. Block i drops paths at rate 0 (i = 0) or
  drop_path_rate * (i-1)/(depth-1) (the official ``[0.0] + linspace(0, rate, depth)``);
- the mixer :class:`BiMamba` (Vim's bidirectional Mamba v2): in_proj -> (x, z); per direction its own causal
  depthwise conv (d_conv 4) + SiLU, x_proj -> (dt, B, C), dt_proj, A = -exp(A_log), D and the selective scan gated by
  SiLU(z); the backward direction scans the flipped sequence and its output is flipped back; the two are SUMMED
  (DiS's Mamba has no ``if_divide_out``; Vim's defaults to False too) before out_proj. d_state 16, expand 2,
  dt_rank ceil(D/16), no in_proj / out_proj biases, conv biases;
- official init: PyTorch defaults everywhere, then every nn.Linear bias zeroed except dt_proj(_b) (inverse softplus
  of dt ~ logU[1e-3, 1e-1] floored at 1e-4; weights U(+-dt_rank^-0.5)), embeddings N(0, 0.02), A_log = log(1..N),
  D = 1, and out_proj re-drawn kaiming-uniform(a=sqrt 5) / sqrt(depth) (GPT-2 rescale, n_residuals_per_layer 1,
  n_layer = the depth ARGUMENT, 24 for S/B). The final layer is NOT zero-initialised (unlike DiT).

Parameter names are the official ones, so an official state_dict loads unchanged (:func:`load_official_checkpoint`).
Parameters at ImageNet-256 latents (32x32x4, 1000 classes, learn_sigma), from the formula in tests/test_dis.py and
equal to the official structure's count (and to issue 15's): S/2 29,132,752, B/2 121,163,552, M/2 231,414,560,
L/2 407,249,952, H/2 906,966,560. Per block 6 D^2 + 2 E (2 R + 3 N + W + 3) + D (E = 2D, R = dt_rank,
N = d_state, W = d_conv).

GMACs (``bench.flops``: batch 1, one evaluation), with S = T + extras tokens (extras 2 conditional, 1 not),
K = 2 (depth//2) + 1 blocks, asserted term by term in tests/test_dis.py:
    K S (6 D^2 + 4 E (R + N))            linear: in_proj, out_proj; x_proj, dt_proj of both directions
  + (depth//2) S 2 D^2                   linear: long-skip fusions
  + T p^2 C_out D + 8 D^2 (+ 2 D^2)      linear: final projection (patch tokens), time MLP (, final adaLN)
  + T p^2 C_in D                         conv: patch embedding
  + K S 2 E W                            causal_conv1d, both directions (kernels::causal_conv1d: B D L W)
  + K S 2 E (4 N + 3)                    selective_scan, both directions (kernels::selective_scan: 4 MACs per
                                         state and token, dt u, D u and the z gate)
  + 4 T D                                the final non-affine LayerNorm (fvcore's count), plus unpatchify's einsum
RMSNorm, SiLU, softplus, exp and the flips are free under the convention. DiS-S/2 at 32x32x4: 7.50 GMACs.

Deviations: the final layer runs on the patch tokens only (the official runs it on all tokens and drops the extras:
same output, 2-token cheaper). Label dropout is the trainer's (shared ``LabelEmbedder``). The official CFG guides the
first 3 channels; the shared ``forward_with_cfg`` guides all ``in_channels`` unless ``guided_channels=3``.
``no_weight_decay`` adds A_log / A_b_log (Mamba's ``_no_weight_decay``; the official trainer uses no decay at all).
Where the official code casts with ``.float()`` (A_log, D, dt bias, the fp32 residual and RMSNorm) a float64 model
stays float64 (:func:`fp32`), so the tests can compare it with float64 transcriptions of the official code.
No official checkpoint is published in the repository (its README table links none), so none was run here.
"""

from __future__ import annotations

import math
import os
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register, register_token_mixer
from .kernels.causal_conv1d import causal_conv1d
from .kernels.selective_scan import selective_scan
from .layers import (
    DiffusionBackbone,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    drop_path,
    resolve_preset,
    timestep_embedding,
    unpatchify,
)

DIS_PRESETS = {
    "S": dict(depth=24, hidden_size=368),
    "B": dict(depth=24, hidden_size=768),
    "M": dict(depth=48, hidden_size=768),
    "L": dict(depth=48, hidden_size=1024),
    "H": dict(depth=48, hidden_size=1536),
    "cpu": dict(depth=4, hidden_size=128),  # ours: CPU-sized (5 blocks, about 0.9M params on 16x16x1, 10 classes)
}


def fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32: what mamba_ssm's ``.float()`` does to half precision, without demoting fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * (1 / sqrt(mean(x^2) + eps)) * weight in (at least) fp32, mamba_ssm's rms_norm_ref; elementwise ops
    only, so free under the MAC convention."""
    xf = fp32(x)
    rstd = (xf.square().mean(dim=-1, keepdim=True) + eps).sqrt().reciprocal()
    return xf * rstd * fp32(weight)


class RMSNorm(nn.Module):
    """mamba_ssm's RMSNorm (weight only, key ``weight``); returns (at least) fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class BiMamba(nn.Module):
    """Vim's bidirectional Mamba (``bimamba_type="v2"``): a shared in_proj / out_proj around two selective SSMs, the
    second on the reversed sequence. (B, L, D) -> (B, L, D). Official names (``conv1d``, ``x_proj``, ``dt_proj``,
    ``A_log``, ``D`` and their ``_b`` twins) and the official per-module init (dt, A, D; not the out_proj rescale,
    which is the model's :func:`init_dis_mixer`)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False, divide_out: bool = False):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.divide_out = divide_out  # Vim's if_divide_out: halve the summed directions (DiS: never)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        for suffix in ("", "_b"):
            conv = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                             bias=conv_bias)  # only its parameters are used (the causal kernel runs it)
            x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            self._init_dt(dt_proj, dt_min, dt_max, dt_init, dt_scale, dt_init_floor)
            A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)  # S4D-real: A_n = n
            setattr(self, "conv1d" + suffix, conv)
            setattr(self, "x_proj" + suffix, x_proj)
            setattr(self, "dt_proj" + suffix, dt_proj)
            setattr(self, "A" + suffix + "_log", nn.Parameter(torch.log(A)))
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(self.d_inner)))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _init_dt(self, dt_proj: nn.Linear, dt_min: float, dt_max: float, dt_init: str, dt_scale: float,
                 floor: float) -> None:
        std = self.dt_rank ** -0.5 * dt_scale  # keeps the variance of dt_proj's output at init
        if dt_init == "constant":
            nn.init.constant_(dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(dt_proj.weight, -std, std)
        else:
            raise ValueError(f"unknown dt_init {dt_init!r}; choose 'random' or 'constant'")
        # softplus(bias) = dt, log-uniform in [dt_min, dt_max]; drawn on the CPU (a few ops, fast also for meta builds)
        dt = torch.exp(torch.rand(self.d_inner, device="cpu") * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min))
        with torch.no_grad():
            dt_proj.bias.copy_(_inverse_softplus(dt.clamp(min=floor)))

    def dt_projections(self) -> list[nn.Linear]:
        return [self.dt_proj, self.dt_proj_b]

    def _direction(self, xz: torch.Tensor, conv: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear,
                   A_log: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """One causal Mamba SSM on xz (B, 2E, L) -> y * SiLU(z) (B, E, L): mamba_inner_fn_no_out_proj."""
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d(x, conv.weight.squeeze(1), conv.bias, "silu")
        dt, B, C = F.linear(x.transpose(1, 2), x_proj.weight).split([self.dt_rank, self.d_state, self.d_state], -1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # dt_proj's bias goes in as delta_bias (fp32)
        A = -torch.exp(fp32(A_log))
        return selective_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), fp32(D), z, fp32(dt_proj.bias), True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2E, L): the layout of the official fused path
        y = self._direction(xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        y_b = self._direction(xz.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
        y = y + y_b.flip(-1)
        if self.divide_out:
            y = y / 2
        return self.out_proj(y.transpose(1, 2))


def init_dis_mixer(mixer: BiMamba, n_layer: int, n_residuals_per_layer: int = 1) -> None:
    """The official ``_init_weights`` on one mixer: zero its Linear biases except dt_proj's (``_no_reinit``) and
    re-draw out_proj kaiming-uniform(a=sqrt 5) / sqrt(n_residuals_per_layer * n_layer) (GPT-2 residual rescale)."""
    keep = {id(m) for m in mixer.dt_projections()}
    for m in mixer.modules():
        if isinstance(m, nn.Linear) and m.bias is not None and id(m) not in keep:
            nn.init.zeros_(m.bias)
    nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
    with torch.no_grad():
        mixer.out_proj.weight.div_(math.sqrt(n_residuals_per_layer * n_layer))


class DiSBlock(nn.Module):
    """Vim block "add -> RMSNorm -> mixer" returning (mixer output, fp32 residual); ``skip=True`` adds the U-ViT
    fusion Linear(2D -> D) applied to cat([h, skip]) before the add."""

    def __init__(self, dim: int, drop_path: float = 0.0, skip: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        self.mixer = BiMamba(dim)
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.drop_path = drop_path
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, skip: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_linear is not None:
            h = self.skip_linear(torch.cat([h, skip], dim=-1))
        if residual is None:  # first block: the residual stream starts at the embedded tokens (no drop path)
            residual = fp32(h)
        else:
            residual = residual + fp32(drop_path(h, self.drop_path, self.training))
        return self.mixer(self.norm(residual).to(h.dtype)), residual


class PlainFinalLayer(nn.Module):
    """The official unconditional final layer: non-affine LayerNorm then Linear (no adaLN)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(self.norm_final(x))


@register("dis")
class DiS(DiffusionBackbone):
    """DiS. ``size`` in S/B/M/L/H (or ``cpu``, ours); ``depth`` (the official argument: 2*(depth//2)+1 blocks) and
    ``hidden_size`` override it; ``num_classes=0`` builds the unconditional model ([time, patches] tokens, no label
    table, no adaLN in the final layer; y ignored)."""

    presets = DIS_PRESETS

    def __init__(self, size: str = "H", patch_size: int = 2, input_size: int = 32, in_channels: int = 4,
                 num_classes: int = 1000, learn_sigma: bool = True, class_dropout_prob: float = 0.1,
                 depth: int | None = None, hidden_size: int | None = None, num_heads: int | None = None,
                 drop_path_rate: float = 0.1):
        super().__init__()
        if num_heads is not None:
            raise ValueError("DiS has no attention heads (its Mamba mixer scans each channel separately); leave "
                             "num_heads unset")
        cfg = resolve_preset(self.presets, size, dict(depth=depth, hidden_size=hidden_size))
        depth, hidden = cfg["depth"], cfg["hidden_size"]
        if depth < 1:
            raise ValueError(f"DiS needs depth >= 1, got {depth}")
        self.set_data_shape(input_size, in_channels, num_classes, learn_sigma)
        self.patch_size = patch_size
        self.depth = depth
        self.drop_path_rate = drop_path_rate
        self.arch = dict(size=size, patch=patch_size, depth=depth, width=hidden, heads=None)

        self.patch_embed = PatchEmbed(input_size, patch_size, in_channels, hidden, bias=True)
        self.time_embed = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.SiLU(), nn.Linear(4 * hidden, hidden))
        self.label_emb = LabelEmbedder(num_classes, hidden, class_dropout_prob) if num_classes > 0 else None
        self.extras = 2 if num_classes > 0 else 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + self.patch_embed.num_patches, hidden))

        half = depth // 2
        rates = [0.0] + [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.in_blocks = nn.ModuleList([DiSBlock(hidden, rates[i]) for i in range(half)])
        self.mid_block = DiSBlock(hidden, rates[half])
        self.out_blocks = nn.ModuleList([DiSBlock(hidden, rates[half + 1 + i], skip=True) for i in range(half)])
        self.norm_f = RMSNorm(hidden, eps=1e-5)
        head = FinalLayer if num_classes > 0 else PlainFinalLayer
        self.final_layer = head(hidden, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official ``self.apply(partial(_init_weights, n_layer=depth))`` on top of PyTorch's default init."""
        dt_projs = {id(m) for blk in self.all_blocks() for m in blk.mixer.dt_projections()}
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None and id(m) not in dt_projs:
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for blk in self.all_blocks():
            init_dis_mixer(blk.mixer, self.depth)

    def all_blocks(self) -> list[DiSBlock]:
        """All blocks in execution order."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def no_weight_decay(self) -> set[str]:
        names = {n for n, _ in self.named_parameters() if n.endswith(("A_log", "A_b_log"))}
        return {"pos_embed"} | names

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(x)
        time = self.time_embed(timestep_embedding(t, x.shape[-1]).to(self.time_embed[0].weight.dtype))
        tokens, c = [time.unsqueeze(1), x], time
        if self.label_emb is not None:
            if y is None:
                raise ValueError("this DiS is class-conditional (num_classes > 0): pass labels y")
            label = self.label_emb(y)
            tokens.insert(0, label.unsqueeze(1))
            c = c + label
        h = torch.cat(tokens, dim=1) + self.pos_embed
        residual, skips = None, []
        for blk in self.in_blocks:
            h, residual = blk(h, residual)
            skips.append(h)
        h, residual = self.mid_block(h, residual)
        for blk in self.out_blocks:
            h, residual = blk(h, residual, skips.pop())
        h = self.norm_f(residual + fp32(drop_path(h, self.drop_path_rate, self.training))).to(h.dtype)
        out = self.final_layer(h[:, self.extras:], c)
        return unpatchify(out, self.patch_size, self.out_channels, self.patch_embed.grid_size)


@register_token_mixer("bi_mamba")
def _bi_mamba_mixer(width: int, grid_h: int, grid_w: int) -> nn.Module:
    """DiS's mixer: Vim's bidirectional Mamba v2 over the raster token sequence, with the official init of a DiS-S
    block (out_proj rescaled by 1/sqrt(24)); conv and scan through the default kernels for the device."""
    mixer = BiMamba(width)
    init_dis_mixer(mixer, n_layer=DIS_PRESETS["S"]["depth"])
    return mixer


# ------------------------------------------------------------------------------------------------------------------
# Official checkpoints (feizc/DiS models_dis.py)
# ------------------------------------------------------------------------------------------------------------------
# Our names and shapes are the official DisModel's (official num_classes=-1, unconditional, is our num_classes=0).
def from_official_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``DisModel`` state_dict -> ours: the names and shapes are the same (a new dict, same tensors)."""
    return dict(state)


def to_official_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state_dict -> the official names (identical; inverse of :func:`from_official_state_dict`)."""
    return dict(state)


def load_official_checkpoint(model: DiS, source: str | os.PathLike | Mapping[str, torch.Tensor],
                             prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Load an official DiS checkpoint (a bare state_dict, the official training checkpoint ``{"model", "ema",
    "opt", "args"}`` (EMA preferred, as the official sample.py), a run directory or an in-memory state_dict) strictly
    into ``model``, built with the official size / patch / image size / num_classes (0 for the official -1)."""
    from .dit import load_official_checkpoint as load
    from .dit import read_official_state_dict

    if not isinstance(model, DiS):
        raise TypeError(f"expected a DiS model, got {type(model).__name__}")
    state, name = read_official_state_dict(source, prefer_ema, what="DiS checkpoint")
    has_labels = "label_emb.embedding_table.weight" in state
    if has_labels != (model.label_emb is not None):
        raise ValueError(f"checkpoint {name} is {'class-conditional' if has_labels else 'unconditional'} but the "
                         f"model was built with num_classes={model.num_classes}; build it with "
                         + ("num_classes = the table's rows - 1" if has_labels else "num_classes=0 (no label table)"))
    return load(model, state, convert=from_official_state_dict)
