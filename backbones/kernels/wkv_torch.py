"""Bi-WKV in plain PyTorch: a dense O(T^2) reference and the O(T*C) scan used on CPU.

Both evaluate the paper's formula (Vision-RWKV / Diffusion-RWKV, see ``backbones.kernels.bi_wkv``)

    y_t = [sum_{i!=t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t] / [same with v := 1]

per batch element and channel, and are differentiable through ordinary autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Largest in-chunk decay span S*|w| of the scan. Terms smaller than e^-87 (fp32) relative to their chunk maximum
# are flushed; such a term is always below e^(2*S*|w| + |u| - 87) relative to the largest term of the same output,
# so 2 * 24 keeps the flushed mass below ~e^-39 for |u| < 1 (the model has |u| ~ 1/T).
_MAX_CHUNK_DECAY = 24.0


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 if any input is float64: accumulation precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def bi_wkv_reference(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense O(B*T^2*C) evaluation of the formula as a softmax over log-weights (exact in float64; tests only)."""
    B, T, C = k.shape
    dt = compute_dtype(w, u, k, v)
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))
    idx = torch.arange(T, device=k.device)
    dist = (idx[:, None] - idx[None, :]).abs().to(dt)                      # (T, T): |t - i|
    logits = k[:, None, :, :] - (dist - 1)[None, :, :, None] * w            # (B, t, i, C)
    eye = torch.eye(T, dtype=torch.bool, device=k.device)[None, :, :, None]
    logits = torch.where(eye, (u + k)[:, :, None, :], logits)              # bonus u on i == t
    y = (torch.softmax(logits, dim=2) * v[:, None, :, :]).sum(dim=2)
    return y.to(k.dtype)


def default_chunk(T: int, w: torch.Tensor) -> int:
    """Chunk length of the scan: sqrt(T) balances the O(T*S) in-chunk and O((T/S)^2) carry work; it is capped so
    that the decay across one chunk stays bounded (see _MAX_CHUNK_DECAY)."""
    s = max(1, math.isqrt(T - 1) + 1) if T > 1 else 1
    w_max = float(w.detach().abs().max()) if w.numel() else 0.0
    if w_max > 0:
        s = min(s, max(1, int(_MAX_CHUNK_DECAY / w_max)))
    return s


def _exclusive_left_sums(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, S: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every t: sum_{j<t} e^{k_j - (t-1-j) w} {v_j, 1} as (num, den, log_scale), value = mantissa * e^scale.

    Weights are written with an absolute index, e^{k_j + j w} * e^{-(t-1) w}, and stabilised per chunk of S tokens
    by the chunk maximum m_c of a_j = k_j + j w (in-chunk prefix sums by cumsum) and across chunks by the running
    maximum sigma_c = max_{c'<=c} m_c' (carry as a small lower-triangular (T/S)^2 contraction). Every exponential
    is of a non-positive number, so nothing overflows for any k. Scales are detached: the value is the same
    function of (k, v, w) whatever constant they take, so autograd through the mantissas and the w-dependent
    part of the scale is exact.
    """
    B, T, C = k.shape
    n = -(-T // S)
    pad = n * S - T
    if pad:  # padding at the end never enters a left sum of a real token; -inf keys give exactly zero weight
        k = F.pad(k, (0, 0, 0, pad), value=float("-inf"))
        v = F.pad(v, (0, 0, 0, pad))
    pos = torch.arange(n * S, device=k.device, dtype=k.dtype).view(n, S, 1)
    a = k.view(B, n, S, C) + pos * w                                        # (B, n, S, C)
    m = a.detach().amax(dim=2)                                              # (B, n, C) chunk maxima
    p = torch.exp(a - m.unsqueeze(2))
    pv = p * v.view(B, n, S, C)
    cden, cnum = p.cumsum(dim=2), pv.cumsum(dim=2)
    sigma = m.cummax(dim=1).values                                          # (B, n, C)
    with torch.no_grad():  # carry weights e^{m_c' - sigma_c} for c' < c, all <= 1
        lower = torch.ones(n, n, dtype=torch.bool, device=k.device).tril(-1)[None, :, :, None]
        expo = m[:, None, :, :] - sigma[:, :, None, :]                     # (B, c, c', C)
        carry_w = torch.exp(torch.where(lower, expo, torch.full_like(expo, float("-inf"))))
        in_w = torch.exp(m - sigma).unsqueeze(2)                            # (B, n, 1, C), <= 1
    # elementwise product and sum: einsum would become B*C tiny strided matmuls (slow on CPU)
    carry_num = (carry_w * cnum[:, None, :, -1]).sum(dim=2)
    carry_den = (carry_w * cden[:, None, :, -1]).sum(dim=2)
    # exclusive in-chunk prefix by shifting (not cumsum - x, which cancels catastrophically)
    num = carry_num.unsqueeze(2) + F.pad(cnum[:, :, :-1], (0, 0, 1, 0)) * in_w
    den = carry_den.unsqueeze(2) + F.pad(cden[:, :, :-1], (0, 0, 1, 0)) * in_w
    scale = sigma.unsqueeze(2) - (pos - 1) * w
    num, den, scale = (x.reshape(B, n * S, C) for x in (num, den, scale))
    if pad:
        num, den, scale = num[:, :T], den[:, :T], scale[:, :T]
    return num, den, scale


def bi_wkv_torch(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 chunk: int | None = None) -> torch.Tensor:
    """O(T*C) Bi-WKV: left and right exclusive sums (the right one on the flipped sequence) plus the bonus term,
    combined under one per-(t, c) maximum. fp32 accumulation for half inputs; autograd-differentiable."""
    dt = compute_dtype(w, u, k, v)
    out_dtype = k.dtype
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))
    S = default_chunk(k.shape[1], w) if chunk is None else chunk
    ln, ld, ls = _exclusive_left_sums(k, v, w, S)
    rn, rd, rs = (x.flip(1) for x in _exclusive_left_sums(k.flip(1), v.flip(1), w, S))
    bonus = u + k
    with torch.no_grad():
        top = torch.maximum(torch.maximum(ls, rs), bonus)
    el, er, eb = torch.exp(ls - top), torch.exp(rs - top), torch.exp(bonus - top)
    num = ln * el + rn * er + v * eb
    den = ld * el + rd * er + eb
    return (num / den).to(out_dtype)
