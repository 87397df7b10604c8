"""Bi-WKV in plain PyTorch: a dense O(T^2) reference and the O(T*C) scan used on CPU.

Both evaluate the paper's formula (Vision-RWKV / Diffusion-RWKV, see ``backbones.kernels.bi_wkv``)

    y_t = [sum_{i!=t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t] / [same with v := 1]

per batch element and channel, and are differentiable through ordinary autograd.
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

    A loop of S adds over dim-2 slices, each written straight into its slot of the result: on CPU this beats
    torch.cumsum along a middle dimension by ~2.5x at large sizes and needs no shift (pad + slice) to be exclusive.
    """
    S = x.shape[2]
    order = list(range(S - 1, -1, -1)) if reverse else list(range(S))
    out = torch.empty_like(x)
    out[:, :, order[0]].zero_()
    for prev, i in zip(order, order[1:]):
        torch.add(out[:, :, prev], x[:, :, prev], out=out[:, :, i])
    return out, out[:, :, order[-1]] + x[:, :, order[-1]]


def _contract(weights: torch.Tensor, xs: list[torch.Tensor], transpose: bool = False) -> list[torch.Tensor]:
    """sum_{c'} weights[b, C, c, c'] x[b, c', C] (or sum_c weights[b, C, c, c'] x[b, c, C]) for every x in xs:
    one batched matmul over (b, C) with the x's as columns (an elementwise product and sum would materialise
    a (B, n, n, C) tensor; einsum would become B*C tiny strided matmuls)."""
    wt = weights.transpose(-1, -2) if transpose else weights
    out = torch.matmul(wt, torch.stack(xs, dim=-1).transpose(1, 2))         # (B, C, n, V)
    return list(out.transpose(1, 2).unbind(dim=-1))                         # V x (B, n, C)


def _exclusive_sums(k: torch.Tensor, values: list[torch.Tensor | None], w: torch.Tensor, S: int, right: bool,
                    keep: bool = False):
    """For every t the strictly-left sums  sum_{j<t} e^{k_j - (t-1-j) w} x_j  (or the strictly-right sums
    sum_{j>t} e^{k_j - (j-t-1) w} x_j), one per x in ``values`` (None: x = 1), as mantissas sharing one log-scale:
    value = mantissa * e^scale. Returns (mantissas, scale, state); ``state`` (None unless ``keep``) feeds
    :func:`_exclusive_sums_adjoint`.

    k, values: (B, n*S, C), padded at the end with keys -inf (zero weight). Log-weights use the absolute index,
    a_j = k_j + s j w with s = +1 (left) or -1 (right), so that the value at t is e^{-s (t - s) w} times a sum of
    e^{a_j}. They are stabilised per chunk of S tokens by the chunk maximum m_c (in-chunk exclusive scans), and
    across chunks by the running maximum sigma_c over the chunks that feed chunk c (carry as a small triangular
    (n x n) contraction per channel). Every exponential is of a non-positive number, so nothing overflows for any
    k. The value is the same function of (k, x, w) whatever constants m and sigma are, so the adjoint treats them
    (and the weights built from them) as constants.
    """
    B, L, C = k.shape
    n = L // S
    sgn = -1.0 if right else 1.0
    pos = torch.arange(L, device=k.device, dtype=k.dtype).view(n, S, 1)
    a = k.view(B, n, S, C) + (sgn * pos) * w                                # (B, n, S, C)
    m = a.amax(dim=2)                                                       # (B, n, C) chunk maxima
    p = a.sub_(m.unsqueeze(2)).exp_()
    # sigma_c = max of m over the chunks feeding chunk c (earlier ones for left sums, later ones for right)
    sigma = m.flip(1).cummax(dim=1).values.flip(1) if right else m.cummax(dim=1).values
    idx = torch.arange(n, device=k.device)
    feeds = (idx[None, :] > idx[:, None]) if right else (idx[None, :] < idx[:, None])  # [c, c']: c' feeds c
    mt, st = m.transpose(1, 2), sigma.transpose(1, 2)                       # (B, C, n)
    carry_w = (mt[:, :, None, :] - st[:, :, :, None]).masked_fill_(~feeds, float("-inf")).exp_()  # (B, C, c, c')
    in_w = torch.exp(m - sigma).unsqueeze(2)                                # (B, n, 1, C), <= 1
    scans = [_exclusive_scan(p if x is None else p * x.view(B, n, S, C), right) for x in values]
    carries = _contract(carry_w, [tot for _, tot in scans])
    out = [ex.mul_(in_w).add_(carry.unsqueeze(2)).view(B, L, C) for (ex, _), carry in zip(scans, carries)]
    scale = (sigma.unsqueeze(2) - (sgn * (pos - sgn)) * w).view(B, L, C)
    return out, scale, ((p, in_w, carry_w, right) if keep else None)


def _exclusive_sums_adjoint(state, values: list[torch.Tensor | None], grads: list[torch.Tensor]
                            ) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """Reverse mode of :func:`_exclusive_sums` for given gradients of its mantissas (same order as ``values``):
    (gradients of the values (None for x = 1), gradient of the log-weights a = k + s j w), (B, n*S, C) each.
    Consumes ``grads`` (overwritten)."""
    p, in_w, carry_w, right = state
    B, n, S, C = p.shape
    # mantissa = carry_c + in_w_c * exscan(q)_j, carry = carry_w @ tot: the adjoint scan runs the other way, its
    # totals are the gradients of the carries, pulled back to the chunk totals by the transposed contraction
    scans = []
    for i in range(len(grads)):
        scans.append(_exclusive_scan(grads[i].view(B, n, S, C), not right))
        grads[i] = None
    g_tots = _contract(carry_w, [g_carry for _, g_carry in scans], transpose=True)
    gx, gp = [], None
    for x, (gq, _), g_tot in zip(values, scans, g_tots):
        gq = gq.mul_(in_w).add_(g_tot.unsqueeze(2))                         # d q_j, q = p * x
        if x is None:
            gx.append(None)
            gp = gq if gp is None else gp.add_(gq)
        else:
            xv = x.view(B, n, S, C)
            gx.append((gq * p).view(B, n * S, C))
            gp = gq.mul_(xv) if gp is None else gp.addcmul_(gq, xv)
    return gx, gp.mul_(p).view(B, n * S, C)


def _pad(x: torch.Tensor, pad: int, value: float = 0.0) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, pad), value=value) if pad else x


def _scan_both(w, u, k, v, S, keep: bool):
    """Left and right sums of contiguous (B, T, C) blocks, combined under one per-(t, c) maximum top:
    (y, den, [left, right], eb, states), left = [ln, ld, el] (num and den mantissas, e^{scale - top}), right
    likewise, eb = e^{u + k - top}, states of the two sums (None unless ``keep``)."""
    T = k.shape[1]
    pad = -T % S
    kp, vp = _pad(k, pad, float("-inf")), _pad(v, pad)
    (ln, ld), ls, state_l = _exclusive_sums(kp, [vp, None], w, S, right=False, keep=keep)
    (rn, rd), rs, state_r = _exclusive_sums(kp, [vp, None], w, S, right=True, keep=keep)
    ln, ld, ls, rn, rd, rs = (x[:, :T] for x in (ln, ld, ls, rn, rd, rs))
    eb = u + k
    top = torch.maximum(torch.maximum(ls, rs), eb)              # per-(t, c) maximum of the three scales
    el, er, eb = ls.sub_(top).exp_(), rs.sub_(top).exp_(), eb.sub_(top).exp_()
    del top
    den = (ld * el).add_(rd * er).add_(eb)
    y = (ln * el).add_(rn * er).addcmul_(v, eb).div_(den)
    return y, den, [[ln, ld, el], [rn, rd, er]], eb, [state_l, state_r]


def _backward_block(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, S: int
                    ) -> tuple[torch.Tensor, ...]:
    """(dw, du, dk, dv) of one channel block (contiguous, compute dtype): the forward recomputed, then its exact
    reverse mode (the gradient of the computed function, as autograd of the same operations gives). Temporaries
    are dropped as soon as they are used: the peak is some twenty block-sized tensors."""
    B, T, C = k.shape
    pad = -T % S
    vp = _pad(v, pad)
    y, den, sides, eb, states = _scan_both(w, u, k, v, S, keep=True)
    g_num = g / den                                             # d y / d num
    del den
    g_den = (g_num * y).neg_()                                  # d y / d den
    dk = (v - y).mul_(g_num).mul_(eb)                           # through e^{u + k - top}
    del y
    du = dk.sum((0, 1))
    dv = g_num * eb
    del eb
    # a = k + s j w, scale = sigma - s (j - s) w; indices centred (the value is invariant to shifting them)
    pos = torch.arange(T + pad, device=k.device, dtype=k.dtype).sub_((T - 1) / 2)
    dw = torch.zeros_like(w)
    for sgn in (1.0, -1.0):
        mn, md, e = sides.pop(0)
        g_scale = (g_num * mn).add_(g_den * md).mul_(e)         # d y / d (log-scale of this side)
        dw -= sgn * torch.matmul(pos[:T] - sgn, g_scale).sum(0)
        del g_scale, mn, md
        grads = [_pad(g_num * e, pad), _pad(g_den * e, pad)]
        del e
        (dvs, _), da = _exclusive_sums_adjoint(states.pop(0), [vp, None], grads)
        dv += dvs[:, :T]
        del dvs
        dk += da[:, :T]
        dw += sgn * torch.matmul(pos, da).sum(0)
        del da
    return dw, du, dk, dv


# Channels are independent: the scan runs on blocks of channels of at most this many (B, T, channel) elements, so
# that its block-sized temporaries (some twenty at the peak of the backward) stay a small fraction of one (B, T, C)
# tensor at large T.
_BLOCK_ELEMENTS = 1 << 19


def _channel_blocks(B: int, T: int, C: int) -> list[tuple[int, int]]:
    width = max(1, min(C, _BLOCK_ELEMENTS // max(1, B * T)))
    return [(c, min(C, c + width)) for c in range(0, C, width)]


def _block(x: torch.Tensor, c0: int, c1: int, dt: torch.dtype) -> torch.Tensor:
    """Channels c0:c1 of x, contiguous in the compute dtype (no copy when x already is)."""
    return x[..., c0:c1].to(dt).contiguous()


class _BiWKVTorch(torch.autograd.Function):
    """Bi-WKV with a recomputing backward: only the inputs are saved; the backward recomputes the forward per
    channel block and runs its reverse mode by hand. Not differentiable twice."""

    @staticmethod
    def forward(ctx, w, u, k, v, S):
        dt = compute_dtype(w, u, k, v)
        blocks = _channel_blocks(k.shape[0], k.shape[1] - k.shape[1] % -S, k.shape[2])
        if len(blocks) == 1:
            y = _scan_both(w.to(dt), u.to(dt), k.to(dt), v.to(dt), S, keep=False)[0].to(k.dtype)
        else:
            y = torch.empty_like(k)
            for c0, c1 in blocks:
                y[..., c0:c1] = _scan_both(w[c0:c1].to(dt), u[c0:c1].to(dt), _block(k, c0, c1, dt),
                                           _block(v, c0, c1, dt), S, keep=False)[0]
        ctx.save_for_backward(w, u, k, v)
        ctx.S = S
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        w, u, k, v = ctx.saved_tensors
        S = ctx.S
        dt = compute_dtype(w, u, k, v)
        blocks = _channel_blocks(k.shape[0], k.shape[1] - k.shape[1] % -S, k.shape[2])
        if len(blocks) == 1:
            dw, du, dk, dv = _backward_block(w.to(dt), u.to(dt), k.to(dt), v.to(dt), gy.to(dt), S)
        else:
            dw, du = torch.empty(w.shape, dtype=dt, device=k.device), torch.empty(u.shape, dtype=dt, device=k.device)
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            for c0, c1 in blocks:
                dw[c0:c1], du[c0:c1], dk[..., c0:c1], dv[..., c0:c1] = _backward_block(
                    w[c0:c1].to(dt), u[c0:c1].to(dt), _block(k, c0, c1, dt), _block(v, c0, c1, dt),
                    _block(gy, c0, c1, dt), S)
        return dw.to(w.dtype), du.to(u.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def bi_wkv_torch(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 chunk: int | None = None) -> torch.Tensor:
    """O(T*C) Bi-WKV: strictly-left and strictly-right sums plus the bonus term, combined under one per-(t, c)
    maximum; fp32 accumulation for half inputs. Differentiable (once) through a recomputing O(T*C) backward that
    saves only the inputs: the forward is recomputed per channel block and differentiated by hand."""
    T = k.shape[1]
    S = default_chunk(T, w.to(compute_dtype(w, u, k, v))) if chunk is None else chunk
    return _BiWKVTorch.apply(w, u, k, v, S)
