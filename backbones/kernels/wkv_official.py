"""Bi-WKV as the official CUDA kernel computes it (``variant="official"`` of ``backbones.kernels.bi_wkv``).

The kernel is Vision-RWKV's ``wkv_cuda.cu`` (classification/mmcls_custom), which Diffusion-RWKV copies byte for
byte as ``cuda/wkv_cuda.cu`` (feizc/Diffusion-RWKV d1b43f2, blob 8d178b6); ``models_drwkv.py`` calls it with
w = spatial_decay / T and u = spatial_first / T (no -exp reparameterisation), in fp32, and sums the kernel's
per-batch gw, gu (B, C) over the batch.

What the forward computes. The T tokens are split into 32 chunks of L = ceil(T / 32) tokens (one thread each; the
chunks past the end are empty). For output t in the chunk that starts at s, token j gets the weight (times e^{k_j})

    j < s  (earlier chunks)      e^{-w (t - j)}                              paper: e^{-w (t - j - 1)}
    j = s < t                    e^{-w (t - j - 1)}                          (= paper)
    s < j < t                    e^{-w (t - j - 1)} + (1 - e^w) e^{w (t - j)}
    j = t                        e^{u} + (1 - e^w) [t > s]                   paper: e^{u}
    j > t  (any chunk)           e^{-w (j - t)}                              paper: e^{-w (j - t - 1)}

and y_t = sum_j W_tj e^{k_j} v_j / (sum_j W_tj e^{k_j} + 1e-6 e^{no_t}), no_t being the kernel's running-max
exponent at t (EPS is added in max-scaled units). The chunk start states are formed with distance |t - j| while
the in-chunk sweep steps the left state with the paper's RWKV-4 recurrence; the right state is the whole suffix
sum, down-dated per step by e^{k_{t+1} + w} where e^{k_{t+1}} would remove token t+1 exactly, which leaves the
(1 - e^w) residuals. For T <= 32 (L = 1, one token per chunk) every pair uses the distance |t - j|.

What the backward computes. gw and gu are the exact gradients of that forward (with e^{no_t} of the EPS term held
constant). gk and gv are not: the kernel's scans for them use the PAPER weights,
    gv_j = e^{k_j} sum_t P_tj g_t / D_t,  gk_j = e^{k_j} sum_t P_tj (v_j - y_t) g_t / D_t,
    P_tj = e^{-w (|t - j| - 1)} (j != t), P_tt = e^{u},
with the kernel's own y_t and denominators D_t (EPS included).

Contents:
    bi_wkv_official_reference / _backward   float64 numpy transcriptions of the two kernels (thread by thread,
                                            phase by phase, with the running-max exponents); slow, tests only.
    bi_wkv_official                         vectorised PyTorch version (torch.autograd.Function), CPU and CUDA.

The vectorised version evaluates the table above in closed form (no down-dating subtraction): per chunk, exclusive
or inclusive cumulative sums of max-subtracted exponentials of absolute-index log-weights k_j +- j w (one maximum
per chunk), and the 32 chunk totals carried across chunks with a running maximum, as the kernel does. Nothing
overflows for any k. Within a chunk, a term more than ~87 (fp32) below its chunk maximum is flushed; it is then
below e^(2 L |w| - 87) relative to the output it enters, negligible while L |w| = |spatial_decay| / 32 stays far
below ~40. The kernel's EPS exponents no_t are reproduced with cumulative maxima.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .wkv_torch import compute_dtype

TOKEN_SPLIT = 32    # token chunks (threads along T) of the kernel: TOKEN_SPLIT = 512 / CHANNEL_SPLIT
EPS = 1e-6          # added to the max-scaled denominator
MIN_VALUE = -1e38   # the kernel's initial running maximum

__all__ = ["bi_wkv_official", "bi_wkv_official_reference", "bi_wkv_official_reference_backward", "chunk_length"]


def chunk_length(T: int) -> int:
    """Tokens per kernel chunk, L = ceil(T / 32)."""
    return -(-T // TOKEN_SPLIT)


# --------------------------------------------------------------------------------------------------------------
# float64 transcriptions of kernel_forward / kernel_backward (numpy, vectorised over (b, c) only)
# --------------------------------------------------------------------------------------------------------------
def _np64(*xs: torch.Tensor) -> list[np.ndarray]:
    return [x.detach().to(torch.float64).cpu().numpy() for x in xs]


def _threads(T: int) -> list[tuple[int, int]]:
    """(first token _t, _tokenLength) of each of the 32 threads along T; the length is <= 0 for empty chunks."""
    L = chunk_length(T)
    return [(L * tid, min(T - L * tid, L)) for tid in range(TOKEN_SPLIT)]


def _chunk_init(w, k, v, T):
    """Phases 1-3 of both kernels for every thread: the left state (a, b, o2) and the right state (c, d, o1) at the
    chunk start, after the own-token subtraction, and their w-derivatives (backward kernel). Each state is a
    list over threads of (B, C) arrays."""
    B, _, C = k.shape
    L = chunk_length(T)
    thr = _threads(T)
    zeros = lambda: np.zeros((B, C))  # noqa: E731
    mins = lambda: np.full((B, C), MIN_VALUE)  # noqa: E731
    S = {name: [] for name in ("a", "b", "c", "d", "o1", "o2", "dadw", "dbdw", "dcdw", "dddw")}
    # phase 1: local sums of the thread's chunk
    for s, n in thr:
        a, b, c, d, dadw, dbdw, dcdw, dddw = (zeros() for _ in range(8))
        o1, o2 = mins(), mins()
        for i in range(s, s + n):
            no = np.maximum(o1, k[:, i] - w * (i - s))
            e1 = np.exp(o1 - no)
            e3 = np.exp(k[:, i] - w * (i - s) - no)
            dcdw = dcdw * e1 - (i - s) * e3 * v[:, i]
            dddw = dddw * e1 - (i - s) * e3
            c = e1 * c + e3 * v[:, i]
            d = e1 * d + e3
            o1 = no
            ni = 2 * s + n - 1 - i
            exp_w = s + n - ni
            no = np.maximum(o2, k[:, ni] - w * exp_w)
            e2 = np.exp(o2 - no)
            e3 = np.exp(k[:, ni] - w * exp_w - no)
            dadw = dadw * e2 - exp_w * e3 * v[:, ni]
            dbdw = dbdw * e2 - exp_w * e3
            a = e2 * a + e3 * v[:, ni]
            b = e2 * b + e3
            o2 = no
        for name, val in zip(S, (a, b, c, d, o1, o2, dadw, dbdw, dcdw, dddw)):
            S[name].append(val)
    out = {name: [] for name in S}
    for tid, (s, n) in enumerate(thr):
        # phase 2: left state at the chunk start from the earlier chunks' (a, b, o2)
        a, b, dadw, dbdw, o2 = zeros(), zeros(), zeros(), zeros(), mins()
        for i in range(tid):
            exp_w = (tid - i - 1) * L
            no = np.maximum(S["o2"][i] - w * exp_w, o2)
            f_old, f_new = np.exp(o2 - no), np.exp(S["o2"][i] - w * exp_w - no)
            a = a * f_old + S["a"][i] * f_new
            b = b * f_old + S["b"][i] * f_new
            dadw = dadw * f_old + (S["dadw"][i] - exp_w * S["a"][i]) * f_new
            dbdw = dbdw * f_old + (S["dbdw"][i] - exp_w * S["b"][i]) * f_new
            o2 = no
        # phase 3: right state at the chunk start from this and the later chunks' (c, d, o1)
        c, d, dcdw, dddw, o1 = zeros(), zeros(), zeros(), zeros(), mins()
        for i in range(tid, TOKEN_SPLIT):
            exp_w = (i - tid) * L
            no = np.maximum(S["o1"][i] - w * exp_w, o1)
            f_old, f_new = np.exp(o1 - no), np.exp(S["o1"][i] - w * exp_w - no)
            c = c * f_old + S["c"][i] * f_new
            d = d * f_old + S["d"][i] * f_new
            dcdw = dcdw * f_old + (S["dcdw"][i] - exp_w * S["c"][i]) * f_new
            dddw = dddw * f_old + (S["dddw"][i] - exp_w * S["d"][i]) * f_new
            o1 = no
        if n > 0:  # an empty chunk reads k[_t * C] past its row here (unused result); skipped
            c = c - np.exp(k[:, s] - o1) * v[:, s]
            d = d - np.exp(k[:, s] - o1)
        for name, val in zip(out, (a, b, c, d, o1, o2, dadw, dbdw, dcdw, dddw)):
            out[name].append(val)
    return thr, out


def bi_wkv_official_reference(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float64 transcription of ``kernel_forward`` (threads, phases and running maxima as in the source); k, v
    (B, T, C), w, u (C,) as passed to the kernel (spatial_decay / T, spatial_first / T). Slow; tests only."""
    w, u, k, v = _np64(w, u, k, v)
    B, T, C = k.shape
    y = np.zeros((B, T, C))
    thr, st = _chunk_init(w, k, v, T)
    for tid, (s, n) in enumerate(thr):
        a, b, c, d, o1, o2 = (st[name][tid] for name in ("a", "b", "c", "d", "o1", "o2"))
        for i in range(s, s + n):  # phase 4: in-chunk sweep
            no = np.maximum(np.maximum(o1, u + k[:, i]), o2)
            e1, e2, e3 = np.exp(o1 - no), np.exp(o2 - no), np.exp(u + k[:, i] - no)
            y[:, i] = (c * e1 + a * e2 + e3 * v[:, i]) / (d * e1 + b * e2 + e3 + EPS)
            i2 = (i + 1) % T
            no = np.maximum(o2 - w, k[:, i])
            e2, e3 = np.exp(o2 - w - no), np.exp(k[:, i] - no)
            a = e2 * a + e3 * v[:, i]
            b = e2 * b + e3
            o2 = no
            no = np.maximum(o1 + w, k[:, i2] + w)
            e1, e3 = np.exp(o1 + w - no), np.exp(k[:, i2] + w - no)
            c = e1 * c - e3 * v[:, i2]
            d = e1 * d - e3
            o1 = no
    return torch.from_numpy(y)


def bi_wkv_official_reference_backward(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                       gy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """float64 transcription of ``kernel_backward`` followed by ``models_drwkv.WKV.backward``'s sum of the
    per-batch gw, gu over the batch: returns (gw (C,), gu (C,), gk (B, T, C), gv (B, T, C)) with respect to the
    kernel's w, u (i.e. spatial_decay / T, spatial_first / T). Slow; tests only."""
    w, u, k, v, gy = _np64(w, u, k, v, gy)
    B, T, C = k.shape
    L = chunk_length(T)
    gk, gv = np.zeros((B, T, C)), np.zeros((B, T, C))
    gw_bc, gu_bc = np.zeros((B, C)), np.zeros((B, C))
    thr, st = _chunk_init(w, k, v, T)
    zeros = lambda: np.zeros((B, C))  # noqa: E731
    mins = lambda: np.full((B, C), MIN_VALUE)  # noqa: E731
    loc = []  # per thread: y, z, zexp (the kernel's per-thread local arrays), gc, gd, go1, ga, gb, go2
    for tid, (s, n) in enumerate(thr):
        a, b, c, d, o1, o2, dadw, dbdw, dcdw, dddw = (st[name][tid] for name in st)
        yl, zl, zexpl = {}, {}, {}
        gw, gu = zeros(), zeros()
        gc, gd, go1 = zeros(), zeros(), mins()
        for i in range(s, s + n):
            no = np.maximum(np.maximum(o1, u + k[:, i]), o2)
            e1, e2, e3 = np.exp(o1 - no), np.exp(o2 - no), np.exp(u + k[:, i] - no)
            num = c * e1 + a * e2 + e3 * v[:, i]
            iden = 1 / (d * e1 + b * e2 + e3 + EPS)
            yl[i], zl[i], zexpl[i] = num * iden, iden, -no
            gw = gw + gy[:, i] * (dadw - dbdw * yl[i]) * iden * e2
            gw = gw + gy[:, i] * (dcdw - dddw * yl[i]) * iden * e1
            gu = gu + gy[:, i] * (v[:, i] - yl[i]) * e3 * iden
            gk[:, i] = gy[:, i] * iden * (v[:, i] - yl[i]) * e3
            gv[:, i] = gy[:, i] * iden * e3
            gno = np.maximum(-w + go1, -no)
            e1 = np.exp(-w + go1 - gno)
            e3 = gy[:, i] * iden * np.exp(-no - gno)
            gc = e1 * gc + e3 * yl[i]
            gd = e1 * gd + e3
            go1 = gno
            i2 = (i + 1) % T
            no = np.maximum(o2 - w, k[:, i])
            e2, e3 = np.exp(o2 - w - no), np.exp(k[:, i] - no)
            dadw = e2 * (dadw - a)
            dbdw = e2 * (dbdw - b)
            a = e2 * a + e3 * v[:, i]
            b = e2 * b + e3
            o2 = no
            no = np.maximum(o1 + w, k[:, i2] + w)
            e1, e3 = np.exp(o1 + w - no), np.exp(k[:, i2] + w - no)
            dcdw = e1 * (c + dcdw) - e3 * v[:, i2]
            dddw = e1 * (d + dddw) - e3
            c = e1 * c - e3 * v[:, i2]
            d = e1 * d - e3
            o1 = no
        gw_bc += gw  # thread 0 adds every thread's share into _gw[b, c]
        gu_bc += gu
        ga, gb, go2 = zeros(), zeros(), mins()
        for i in range(s + n - 1, s - 1, -1):
            gno = np.maximum(-w + go2, zexpl[i])
            e2 = np.exp(-w + go2 - gno)
            e3 = gy[:, i] * zl[i] * np.exp(zexpl[i] - gno)
            ga = e2 * ga + e3 * yl[i]
            gb = e2 * gb + e3
            go2 = gno
        loc.append(dict(y=yl, z=zl, zexp=zexpl, gc=gc, gd=gd, go1=go1, ga=ga, gb=gb, go2=go2))
    for tid, (s, n) in enumerate(thr):
        gc, gd, go1 = zeros(), zeros(), mins()
        for i in range(tid):  # forward-direction sums of the earlier chunks
            exp_w = (tid - i - 1) * L
            gno = np.maximum(loc[i]["go1"] - w * exp_w, go1)
            f_old, f_new = np.exp(go1 - gno), np.exp(loc[i]["go1"] - w * exp_w - gno)
            gc = gc * f_old + loc[i]["gc"] * f_new
            gd = gd * f_old + loc[i]["gd"] * f_new
            go1 = gno
        ga, gb, go2 = zeros(), zeros(), mins()
        for i in range(tid + 1, TOKEN_SPLIT):  # backward-direction sums of the later chunks
            exp_w = (i - tid - 1) * L
            gno = np.maximum(loc[i]["go2"] - w * exp_w, go2)
            f_old, f_new = np.exp(go2 - gno), np.exp(loc[i]["go2"] - w * exp_w - gno)
            ga = ga * f_old + loc[i]["ga"] * f_new
            gb = gb * f_old + loc[i]["gb"] * f_new
            go2 = gno
        yl, zl, zexpl = loc[tid]["y"], loc[tid]["z"], loc[tid]["zexp"]
        for i in range(s, s + n):
            ni = 2 * s + n - 1 - i
            gk[:, i] += np.exp(k[:, i] + go1) * (gd * v[:, i] - gc)
            gk[:, ni] += np.exp(k[:, ni] + go2) * (gb * v[:, ni] - ga)
            gv[:, i] += np.exp(k[:, i] + go1) * gd
            gv[:, ni] += np.exp(k[:, ni] + go2) * gb
            gno = np.maximum(-w + go1, zexpl[i])
            e1 = np.exp(-w + go1 - gno)
            e3 = gy[:, i] * zl[i] * np.exp(zexpl[i] - gno)
            gc = e1 * gc + e3 * yl[i]
            gd = e1 * gd + e3
            go1 = gno
            gno = np.maximum(-w + go2, zexpl[ni])
            e2 = np.exp(-w + go2 - gno)
            e3 = gy[:, ni] * zl[ni] * np.exp(zexpl[ni] - gno)
            ga = e2 * ga + e3 * yl[ni]
            gb = e2 * gb + e3
            go2 = gno
    return (torch.from_numpy(gw_bc.sum(0)), torch.from_numpy(gu_bc.sum(0)), torch.from_numpy(gk),
            torch.from_numpy(gv))


# --------------------------------------------------------------------------------------------------------------
# Vectorised PyTorch version
# --------------------------------------------------------------------------------------------------------------
def _shift(x: torch.Tensor, reverse: bool, fill: float = 0.0) -> torch.Tensor:
    """x moved one step along dim 2 (later for a prefix, earlier for a suffix), ``fill`` entering at the edge."""
    if reverse:
        return F.pad(x[:, :, 1:], (0, 0, 0, 1), value=fill)
    return F.pad(x[:, :, :-1], (0, 0, 1, 0), value=fill)


def _excl_cumsum(x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Exclusive prefix (or suffix) sums along dim 2, without the cancellation of inclusive-minus-self."""
    if reverse:
        return _shift(x, True).flip(2).cumsum(2).flip(2)
    return _shift(x, False).cumsum(2)


def _carry(tots: list[torch.Tensor], m: torch.Tensor, reverse: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Cross-chunk sums: for chunk q, sum over the chunks before q (after q if ``reverse``) of tot e^{m}, as
    mantissas (B, n, C) and their running maximum sigma (B, n, C), -inf where no chunk feeds q. ``m`` (B, n, C) is
    detached and finite. A running-max scan over the <= 32 chunks, as the kernel's phases 2-3."""
    n = m.shape[1]
    acc = [torch.zeros_like(t[:, 0]) for t in tots]
    sig = torch.full_like(m[:, 0], float("-inf"))
    outs, sigs = [[None] * n for _ in tots], [None] * n
    for q in (range(n - 1, -1, -1) if reverse else range(n)):
        for o, a in zip(outs, acc):
            o[q] = a
        sigs[q] = sig
        new = torch.maximum(sig, m[:, q])
        f_old, f_new = torch.exp(sig - new), torch.exp(m[:, q] - new)
        acc = [a * f_old + t[:, q] * f_new for a, t in zip(acc, tots)]
        sig = new
    return [torch.stack(o, dim=1) for o in outs], torch.stack(sigs, dim=1)


def _layout(T: int, like: torch.Tensor) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """Chunk length L, number n of non-empty chunks, absolute positions j (n, L, 1) and the chunk-start mask."""
    L = chunk_length(T)
    n = -(-T // L)
    j = torch.arange(n * L, device=like.device, dtype=like.dtype).view(n, L, 1)
    first = torch.zeros(n, L, 1, dtype=torch.bool, device=like.device)
    first[:, 0] = True
    return L, n, j, first


def _chunked(x: torch.Tensor, n: int, L: int, fill: float) -> torch.Tensor:
    """(B, T, C) -> (B, n, L, C), padded at the end with ``fill``."""
    B, T, C = x.shape
    return F.pad(x, (0, 0, 0, n * L - T), value=fill).view(B, n, L, C)


def _forward_parts(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The official forward in compute precision: y (B, T, C), the per-token log-scale ``top`` (detached) and the
    denominator mantissa ``den`` (true denominator D_t = den e^{top}, EPS term included). Differentiable in all
    inputs through the mantissas (maxima detached)."""
    B, T, C = k.shape
    L, n, j, first = _layout(T, k)
    kc, vc = _chunked(k, n, L, float("-inf")), _chunked(v, n, L, 0.0)
    alpha, beta = kc + w * j, kc - w * j                     # absolute-index log-weights for left / right sums
    with torch.no_grad():
        m_a, m_b = alpha.amax(2, keepdim=True), beta.amax(2, keepdim=True)   # chunk maxima (finite)
    ea, eb = torch.exp(alpha - m_a), torch.exp(beta - m_b)
    eav, ebv = ea * vc, eb * vc
    # left, same chunk, paper distance t-1-j:   e^{-w(t-1)} sum_{s<=j<t} e^{alpha_j}
    lin_d, lin_n = _excl_cumsum(ea), _excl_cumsum(eav)
    # left, earlier chunks, distance t-j:       e^{-w t} sum_{j<s} e^{alpha_j}
    (lx_d, lx_n), sig = _carry([ea.sum(2), eav.sum(2)], m_a.squeeze(2), reverse=False)
    # right, same chunk, distance j-t:          e^{w t} sum_{t<j<s+L} e^{beta_j}
    # plus the down-dating residual (1 - e^w) e^{w t} sum_{s<j<=t} e^{beta_j}
    ebm, ebvm = eb.masked_fill(first, 0.0), ebv.masked_fill(first, 0.0)
    g = -torch.expm1(w)                                       # 1 - e^w
    rin_d = _excl_cumsum(eb, reverse=True) + g * ebm.cumsum(2)
    rin_n = _excl_cumsum(ebv, reverse=True) + g * ebvm.cumsum(2)
    # right, later chunks, distance j-t:        e^{w t} sum_{j>=s+L} e^{beta_j}
    (rx_d, rx_n), tau = _carry([eb.sum(2), ebv.sum(2)], m_b.squeeze(2), reverse=True)
    sig, tau, lx_d, lx_n, rx_d, rx_n = (x.unsqueeze(2) for x in (sig, tau, lx_d, lx_n, rx_d, rx_n))
    scales = [m_a - w * (j - 1), sig - w * j, m_b + w * j, tau + w * j]   # log-scales of the four sums
    with torch.no_grad():
        # the kernel's running maxima at each output: o2 (left state), o1 (right state); no = max(o1, u+k, o2)
        cmx_a = torch.cummax(_shift(alpha, False, float("-inf")), dim=2).values            # max_{s<=j<t} alpha
        cmx_b = torch.cummax(beta.masked_fill(first, float("-inf")), dim=2).values         # max_{s<j<=t} beta
        o2 = torch.maximum(sig - w * j, cmx_a - w * (j - 1))
        o1 = torch.maximum(torch.maximum(m_b, tau) + w * j, cmx_b + w * (j + 1))
    flat = lambda x: x.expand(B, n, L, C).reshape(B, n * L, C)[:, :T]  # noqa: E731
    dens = [flat(x) for x in (lin_d, lx_d, rin_d, rx_d)]
    nums = [flat(x) for x in (lin_n, lx_n, rin_n, rx_n)]
    scales = [flat(x) for x in scales]
    bonus = u + k
    with torch.no_grad():
        no = torch.maximum(torch.maximum(flat(o1), flat(o2)), bonus)
        top = no
        for s in scales:
            top = torch.maximum(top, s)
    num, den = v * torch.exp(bonus - top), torch.exp(bonus - top) + EPS * torch.exp(no - top)
    for nm, dn, s in zip(nums, dens, scales):
        f = torch.exp(s - top)
        num, den = num + nm * f, den + dn * f
    return num / den, top, den


def _official_kv_grads(w, u, k, v, y, top, den, gy):
    """The kernel's gk, gv: paper weights P_tj (e^{-w(|t-j|-1)}, e^{u} on the diagonal) against the official
    forward's y_t and D_t = den e^{top}. Symmetric scans of G_t = gy_t / D_t and G_t y_t, with keys -top_t."""
    B, T, C = k.shape
    L, n, j, _ = _layout(T, k)
    g1 = gy / den                                            # G_t e^{top_t}
    g2 = g1 * y
    key = _chunked(-top, n, L, float("-inf"))
    g1c, g2c, vc, kc = (_chunked(x, n, L, 0.0) for x in (g1, g2, v, k))
    alpha, beta = key + w * j, key - w * j
    m_a, m_b = alpha.amax(2, keepdim=True), beta.amax(2, keepdim=True)
    ea, eb = torch.exp(alpha - m_a), torch.exp(beta - m_b)
    terms = []  # (mantissa of sum G, mantissa of sum G y, log-scale)
    # t < j: e^{-w(j-1)} sum_{t<j} e^{key_t + w t} g_t   (same chunk, then earlier chunks)
    terms.append((_excl_cumsum(ea * g1c), _excl_cumsum(ea * g2c), m_a - w * (j - 1)))
    (x1, x2), sig = _carry([(ea * g1c).sum(2), (ea * g2c).sum(2)], m_a.squeeze(2), reverse=False)
    terms.append((x1.unsqueeze(2), x2.unsqueeze(2), sig.unsqueeze(2) - w * (j - 1)))
    # t > j: e^{w(j+1)} sum_{t>j} e^{key_t - w t} g_t
    terms.append((_excl_cumsum(eb * g1c, True), _excl_cumsum(eb * g2c, True), m_b + w * (j + 1)))
    (x1, x2), tau = _carry([(eb * g1c).sum(2), (eb * g2c).sum(2)], m_b.squeeze(2), reverse=True)
    terms.append((x1.unsqueeze(2), x2.unsqueeze(2), tau.unsqueeze(2) + w * (j + 1)))
    diag = g1 * torch.exp(u + k - top)                       # G_j e^{u + k_j}
    gv, gk = diag, diag * (v - y)
    gv_c, gk_c = 0.0, 0.0
    for s1, s2, scale in terms:
        f = torch.exp(kc + scale)
        gv_c = gv_c + s1 * f
        gk_c = gk_c + (s1 * vc - s2) * f
    unchunk = lambda x: x.reshape(B, n * L, C)[:, :T]  # noqa: E731
    return gk + unchunk(gk_c), gv + unchunk(gv_c)


class _BiWKVOfficial(torch.autograd.Function):
    """Forward: the official kernel's forward. Backward: the official kernel's backward (gw, gu exact, gk, gv with
    paper weights). Saves only the inputs and recomputes the forward in the backward (w, u gradients by autograd
    of the recomputation). Not twice differentiable."""

    @staticmethod
    def forward(ctx, w, u, k, v):
        dt = compute_dtype(w, u, k, v)
        ctx.save_for_backward(w, u, k, v)
        y, _, _ = _forward_parts(*(x.detach().to(dt) for x in (w, u, k, v)))
        return y.to(k.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        w0, u0, k0, v0 = ctx.saved_tensors
        dt = compute_dtype(w0, u0, k0, v0)
        w, u, k, v = (x.detach().to(dt) for x in (w0, u0, k0, v0))
        gy = gy.to(dt)
        need_w, need_u, need_k, need_v = ctx.needs_input_grad
        gw = gu = gk = gv = None
        if need_w or need_u:
            with torch.enable_grad():
                wg, ug = w.requires_grad_(), u.requires_grad_()
                y, top, den = _forward_parts(wg, ug, k, v)
                gw, gu = torch.autograd.grad(y, (wg, ug), gy)
            y, w, u = y.detach(), w.detach(), u.detach()
        else:
            with torch.no_grad():
                y, top, den = _forward_parts(w, u, k, v)
        if need_k or need_v:
            with torch.no_grad():
                gk, gv = _official_kv_grads(w, u, k, v, y, top, den.detach(), gy)
        cast = lambda g, x: None if g is None else g.to(x.dtype)  # noqa: E731
        return cast(gw, w0), cast(gu, u0), cast(gk, k0), cast(gv, v0)


def bi_wkv_official(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bi-WKV as computed by the official Diffusion-RWKV / Vision-RWKV CUDA kernel (forward and backward, see the
    module docstring), vectorised in PyTorch: k, v (B, T, C), w, u (C,) already divided by T. Accumulates in
    fp32 (fp64 for fp64 inputs); returns k's dtype."""
    return _BiWKVOfficial.apply(w, u, k, v)

