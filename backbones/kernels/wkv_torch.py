"""Bi-WKV in plain PyTorch: a dense O(T^2) reference and the O(T*C) scan used on CPU.

Both evaluate the paper's formula (Vision-RWKV / Diffusion-RWKV, see ``backbones.kernels.bi_wkv``)

    y_t = [sum_{i!=t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t] / [same with v := 1]

per batch element and channel. The reference is differentiable through ordinary autograd. The scan is an
autograd.Function (:class:`_BiWKVScan`, differentiable once) with activation checkpointing per block of channels:
its forward runs without graph, on blocks of at most _BLOCK_ELEMENTS elements, and saves only w, u, k, v (no
per-chunk state: channels are independent, so nothing is carried between blocks); its backward recomputes each
block's forward with autograd enabled and differentiates it, so only one block's intermediates (some fourteen
tensors of the block's size saved by autograd, plus the backward's temporaries) are alive at a time. Values and
gradients are exactly those of autograd through the scan's operations. Through autograd alone, all fourteen would
be saved for the whole (B, T, C): in ``python -m bench.tokens`` (the bi_wkv mixer, width 384, batch 1, 1 thread,
T = 16384) the peak was 625 MB; with the blocks it is 313 MB (linear attention: 337 MB; 289 MB with a stand-in op
that saves just k and v, i.e. the rest of the mixer), for one extra forward of the scan: time(16384)/time(1024) =
17.8 (linear attention 20.0), mixer CPU time +12% at T = 1024 and +22% at T = 16384 (measured under load).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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


def _exclusive_scan(x: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exclusive prefix (or suffix) sums along dim 2 of (B, n, S, C), and the totals (B, n, C).

    A loop of S adds over unbind() slices: on CPU this beats torch.cumsum along a middle dimension by ~2.5x at
    large sizes, needs no shift (pad + slice) to be exclusive, and its backward allocates no zero-filled tensors.
    """
    parts = x.unbind(dim=2)
    order = range(len(parts) - 1, -1, -1) if reverse else range(len(parts))
    acc = torch.zeros_like(parts[0])
    out = [None] * len(parts)
    for i in order:
        out[i] = acc
        acc = acc + parts[i]
    return torch.stack(out, dim=2), acc


def _exclusive_sums(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, S: int, right: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every t the strictly-left sum  sum_{j<t} e^{k_j - (t-1-j) w} {v_j, 1}  (or the strictly-right sum
    sum_{j>t} e^{k_j - (j-t-1) w} {v_j, 1}) as (num, den, log_scale) mantissas: value = mantissa * e^scale.

    k, v: (B, n*S, C), padded at the end with keys -inf (zero weight). Log-weights use the absolute index,
    a_j = k_j + s j w with s = +1 (left) or -1 (right), so that the value at t is e^{-s (t - s) w} times a sum of
    e^{a_j}. They are stabilised per chunk of S tokens by the chunk maximum m_c (in-chunk exclusive scans), and
    across chunks by the running maximum sigma_c over the chunks that feed chunk c (carry as a small triangular
    (n x n) contraction per channel). Every exponential is of a non-positive number, so nothing overflows for any
    k. Scales are detached: the value is the same function of (k, v, w) whatever constant they take, so autograd
    through the mantissas and the w-dependent part of the scale is exact.
    """
    B, L, C = k.shape
    n = L // S
    sgn = -1.0 if right else 1.0
    pos = torch.arange(L, device=k.device, dtype=k.dtype).view(n, S, 1)
    a = k.view(B, n, S, C) + (sgn * pos) * w                                # (B, n, S, C)
    m = a.detach().amax(dim=2)                                              # (B, n, C) chunk maxima
    p = torch.exp(a - m.unsqueeze(2))
    ex_den, tot_den = _exclusive_scan(p, right)
    ex_num, tot_num = _exclusive_scan(p * v.view(B, n, S, C), right)
    with torch.no_grad():
        # sigma_c = max of m over the chunks feeding chunk c (earlier ones for left sums, later ones for right)
        sigma = m.flip(1).cummax(dim=1).values.flip(1) if right else m.cummax(dim=1).values
        idx = torch.arange(n, device=k.device)
        feeds = (idx[None, :] > idx[:, None]) if right else (idx[None, :] < idx[:, None])  # [c, c']: c' feeds c
        expo = m[:, None, :, :] - sigma[:, :, None, :]                     # (B, c, c', C)
        carry_w = torch.exp(torch.where(feeds[None, :, :, None], expo, torch.full_like(expo, float("-inf"))))
        in_w = torch.exp(m - sigma).unsqueeze(2)                            # (B, n, 1, C), <= 1
    # elementwise product and sum: einsum would become B*C tiny strided matmuls (slow on CPU)
    carry_num = (carry_w * tot_num[:, None]).sum(dim=2)
    carry_den = (carry_w * tot_den[:, None]).sum(dim=2)
    num = (carry_num.unsqueeze(2) + ex_num * in_w).view(B, L, C)
    den = (carry_den.unsqueeze(2) + ex_den * in_w).view(B, L, C)
    scale = (sigma.unsqueeze(2) - (sgn * (pos - sgn)) * w).view(B, L, C)
    return num, den, scale


def _scan(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: int) -> torch.Tensor:
    """The scan on inputs already in the compute dtype, differentiable through ordinary autograd (which saves some
    fourteen (B, T, C) intermediates; :class:`_BiWKVScan` runs it on blocks of channels and recomputes it)."""
    T = k.shape[1]
    pad = -T % S
    kp, vp = (F.pad(k, (0, 0, 0, pad), value=float("-inf")), F.pad(v, (0, 0, 0, pad))) if pad else (k, v)
    ln, ld, ls = _exclusive_sums(kp, vp, w, S, right=False)
    rn, rd, rs = _exclusive_sums(kp, vp, w, S, right=True)
    if pad:
        ln, ld, ls, rn, rd, rs = (x[:, :T] for x in (ln, ld, ls, rn, rd, rs))
    bonus = u + k
    with torch.no_grad():
        top = torch.maximum(torch.maximum(ls, rs), bonus)
    el, er, eb = torch.exp(ls - top), torch.exp(rs - top), torch.exp(bonus - top)
    num = ln * el + rn * er + v * eb
    den = ld * el + rd * er + eb
    return num / den


# Channels are independent, so forward and backward run the scan on blocks of at most _BLOCK_ELEMENTS elements
# (B * T * width, T padded to whole chunks): its temporaries, and in the backward the intermediates autograd saves
# on the recomputed block, are then bounded by a few block sizes whatever B * T * C is. Smaller blocks save memory
# and cost Python overhead per block (the scan's loops over the S positions of a chunk run once per block).
_BLOCK_ELEMENTS = 1 << 19


def _channel_blocks(B: int, T: int, C: int, S: int) -> list[tuple[int, int]]:
    """(c0, c1) ranges of channels covering 0..C, each of at most _BLOCK_ELEMENTS elements (at least 1 channel)."""
    width = max(1, _BLOCK_ELEMENTS // max(1, B * (T + -T % S)))
    return [(c, min(C, c + width)) for c in range(0, C, width)]


def _block(x: torch.Tensor, c0: int, c1: int, dt: torch.dtype) -> torch.Tensor:
    """Channels c0:c1 of x (last dim), detached, contiguous, in the compute dtype (a copy unless x is already one
    contiguous block of that dtype)."""
    return x.detach()[..., c0:c1].to(dt).contiguous()


class _BiWKVScan(torch.autograd.Function):
    """The scan with activation checkpointing per channel block: the forward runs without graph and saves only
    w, u, k, v; the backward recomputes each block's forward with autograd enabled and differentiates it, so only
    one block's intermediates are alive at a time. Values and gradients are those of autograd through
    :func:`_scan` (the same operations). Not differentiable twice."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: int) -> torch.Tensor:
        ctx.S = S
        ctx.save_for_backward(w, u, k, v)
        dt = compute_dtype(w, u, k, v)
        blocks = _channel_blocks(*k.shape, S)
        if len(blocks) == 1:
            return _scan(*(_block(x, 0, k.shape[2], dt) for x in (w, u, k, v)), S).to(k.dtype)
        y = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        for c0, c1 in blocks:
            y[..., c0:c1] = _scan(*(_block(x, c0, c1, dt) for x in (w, u, k, v)), S)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: torch.Tensor):
        inputs = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        dt = compute_dtype(*inputs)
        blocks = _channel_blocks(*inputs[2].shape, ctx.S)
        grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) if n and len(blocks) > 1 else None
                 for x, n in zip(inputs, need)]
        for c0, c1 in blocks:
            xs = [_block(x, c0, c1, dt).requires_grad_(n) for x, n in zip(inputs, need)]
            with torch.enable_grad():
                y = _scan(*xs, ctx.S)
            block_grads = iter(torch.autograd.grad(y, [x for x, n in zip(xs, need) if n], _block(gy, c0, c1, dt)))
            del y  # frees this block's graph before the next block is recomputed
            for i, n in enumerate(need):
                if n and len(blocks) == 1:
                    grads[i] = next(block_grads).to(inputs[i].dtype)
                elif n:
                    grads[i][..., c0:c1] = next(block_grads)
        return (*grads, None)


def bi_wkv_torch(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 chunk: int | None = None) -> torch.Tensor:
    """O(T*C) Bi-WKV: strictly-left and strictly-right sums plus the bonus term, combined under one per-(t, c)
    maximum. fp32 accumulation for half inputs. Differentiable once (no double backward): only w, u, k, v are
    saved, and the backward recomputes the forward per block of channels (:class:`_BiWKVScan`)."""
    S = default_chunk(k.shape[1], w) if chunk is None else chunk
    return _BiWKVScan.apply(w, u, k, v, S)
