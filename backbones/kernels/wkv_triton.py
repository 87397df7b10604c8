"""Bi-WKV Triton kernels (forward and backward) and their autograd.Function.

One program per (batch element, block of BLOCK_C channels) walks the sequence twice: a left-to-right pass and a
right-to-left pass, each an RWKV-4 style recurrence over one scalar state per channel (no limit on T). States are
stabilised with a running maximum taken over ABSOLUTE-index log-weights: the left state at t holds
sum_{j<t} e^{a_j - m} {v_j, 1} with a_j = k_j + j*w and m = max_{j<t} a_j, its value being that mantissa times
e^{m - (t-1) w} (right state: b_j = k_j - j*w, value factor e^{m + (t+1) w}). The maximum is never decayed step by
step, so no rounding error accumulates along T, and every exponential is of a non-positive number: nothing
overflows for any k, w. Loads are converted to fp32 and everything accumulates in fp32 (bf16/fp16 inputs).

Forward: pass 1 stores the left mean and left log-denominator per (t, c) into the output buffers, pass 2 adds the
right sum and the bonus term and writes y and lse_t = log(denominator) (both fp32, kept for the backward).

Backward, with P_tj = W_tj / D_t the normalised weights (y_t = sum_j P_tj v_j) and g = dL/dy:
    dv_j = sum_t g_t P_tj,   dk_j = sum_t g_t P_tj (v_j - y_t),   du = sum_t g_t P_tt (v_t - y_t),
    dw   = -sum_t g_t sum_{j!=t} (|t-j| - 1) P_tj (v_j - y_t).
sum_t g_t P_tj for t < j is a left scan of g_t e^{t w - lse_t} (running max again), for t > j a right scan of
g_t e^{-t w - lse_t}; the (|t-j| - 1)-weighted sums of dw come from derivative states A <- e^{-w}(A + L) carried
next to the forward states (no cancellation). Pass 1 writes the left parts of dk, dv, pass 2 adds the right parts.
dw, du are reduced per program over T and summed over the batch on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _channel_block(w_ptr, u_ptr, T, C, BLOCK_C: tl.constexpr):
    """This program's channel block: column indices, mask, w and u in fp32, offset of token 0 of its batch row."""
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    base = tl.program_id(0).to(tl.int64) * T * C + cols
    return cols, cmask, w, u, base


@triton.jit
def _rescale(running_max, new_log):
    """Stable log-space accumulation: the new maximum and the factors for the old state and the new term."""
    mn = tl.maximum(running_max, new_log)
    return mn, tl.exp(running_max - mn), tl.exp(new_log - mn)


@triton.jit
def _bi_wkv_fwd_kernel(w_ptr, u_ptr, k_ptr, v_ptr, y_ptr, lse_ptr, T, C, BLOCK_C: tl.constexpr):
    cols, cmask, w, u, base = _channel_block(w_ptr, u_ptr, T, C, BLOCK_C)

    # pass 1, left to right: store the mean and log-denominator of the strictly-left sum of every token
    num = tl.zeros([BLOCK_C], dtype=tl.float32)
    den = tl.zeros([BLOCK_C], dtype=tl.float32)
    mx = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    for t in range(0, T):
        offs = base + t * C
        kt = tl.load(k_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
        # den is 0 (empty sum) or >= 1 (its maximal term has mantissa 1), so max(den, 1) is a safe divisor
        tl.store(y_ptr + offs, num / tl.maximum(den, 1.0), mask=cmask)
        lse_left = tl.where(den > 0, mx - (t - 1) * w + tl.log(tl.maximum(den, 1.0)), float("-inf"))
        tl.store(lse_ptr + offs, lse_left, mask=cmask)
        at = kt + t * w
        mn, e1, e2 = _rescale(mx, at)
        num = e1 * num + e2 * vt
        den = e1 * den + e2
        mx = mn

    # pass 2, right to left: combine left sum, right sum and bonus term under one maximum
    num = tl.zeros([BLOCK_C], dtype=tl.float32)
    den = tl.zeros([BLOCK_C], dtype=tl.float32)
    mx = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    for i in range(0, T):
        t = T - 1 - i
        offs = base + t * C
        kt = tl.load(k_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
        y_left = tl.load(y_ptr + offs, mask=cmask, other=0.0)
        lse_left = tl.load(lse_ptr + offs, mask=cmask, other=float("-inf"))
        lse_right = tl.where(den > 0, mx + (t + 1) * w + tl.log(tl.maximum(den, 1.0)), float("-inf"))
        y_right = num / tl.maximum(den, 1.0)
        lse_bonus = u + kt
        top = tl.maximum(tl.maximum(lse_left, lse_right), lse_bonus)
        el = tl.exp(lse_left - top)
        er = tl.exp(lse_right - top)
        eb = tl.exp(lse_bonus - top)
        d = el + er + eb
        tl.store(y_ptr + offs, (y_left * el + y_right * er + vt * eb) / d, mask=cmask)
        tl.store(lse_ptr + offs, top + tl.log(d), mask=cmask)
        bt = kt - t * w
        mn, e1, e2 = _rescale(mx, bt)
        num = e1 * num + e2 * vt
        den = e1 * den + e2
        mx = mn


@triton.jit
def _bi_wkv_bwd_kernel(w_ptr, u_ptr, k_ptr, v_ptr, y_ptr, lse_ptr, gy_ptr, gk_ptr, gv_ptr, gw_ptr, gu_ptr,
                       T, C, BLOCK_C: tl.constexpr):
    cols, cmask, w, u, base = _channel_block(w_ptr, u_ptr, T, C, BLOCK_C)
    gw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    gu_acc = tl.zeros([BLOCK_C], dtype=tl.float32)

    # pass 1, left to right. Forward-left state (fn, fd; derivative fa, fb; max fm) and cotangent-left state
    # (cg, ch; max cm) hold sums over tokens strictly before t.
    fn = tl.zeros([BLOCK_C], dtype=tl.float32)
    fd = tl.zeros([BLOCK_C], dtype=tl.float32)
    fa = tl.zeros([BLOCK_C], dtype=tl.float32)
    fb = tl.zeros([BLOCK_C], dtype=tl.float32)
    fm = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    cg = tl.zeros([BLOCK_C], dtype=tl.float32)
    ch = tl.zeros([BLOCK_C], dtype=tl.float32)
    cm = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    for t in range(0, T):
        offs = base + t * C
        kt = tl.load(k_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
        yt = tl.load(y_ptr + offs, mask=cmask, other=0.0)
        lt = tl.load(lse_ptr + offs, mask=cmask, other=0.0)
        gt = tl.load(gy_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
        # dw, left part: -g_t / D_t * (A_t - y_t B_t), with e^{fm - (t-1) w - lse_t} <= 1
        gw_acc -= gt * tl.exp(fm - (t - 1) * w - lt) * (fa - yt * fb)
        # diagonal (bonus) term
        pd = gt * tl.exp(u + kt - lt)
        gu_acc += pd * (vt - yt)
        # contributions of outputs t' < t to token t; exponent is log P_{t't} <= 0 for the maximal t'
        ec = tl.exp(kt - (t - 1) * w + cm)
        tl.store(gv_ptr + offs, pd + ec * cg, mask=cmask)
        tl.store(gk_ptr + offs, pd * (vt - yt) + ec * (cg * vt - ch), mask=cmask)
        # advance the forward-left state (derivative states first: they use the old fn, fd)
        at = kt + t * w
        mn, e1, e2 = _rescale(fm, at)
        fa = e1 * (fa + fn)
        fb = e1 * (fb + fd)
        fn = e1 * fn + e2 * vt
        fd = e1 * fd + e2
        fm = mn
        # advance the cotangent-left state with g_t e^{t w - lse_t}
        ct = t * w - lt
        cmn, c1, c2 = _rescale(cm, ct)
        cg = c1 * cg + c2 * gt
        ch = c1 * ch + c2 * gt * yt
        cm = cmn

    # pass 2, right to left: mirrored states over tokens strictly after t
    fn = tl.zeros([BLOCK_C], dtype=tl.float32)
    fd = tl.zeros([BLOCK_C], dtype=tl.float32)
    fa = tl.zeros([BLOCK_C], dtype=tl.float32)
    fb = tl.zeros([BLOCK_C], dtype=tl.float32)
    fm = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    cg = tl.zeros([BLOCK_C], dtype=tl.float32)
    ch = tl.zeros([BLOCK_C], dtype=tl.float32)
    cm = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    for i in range(0, T):
        t = T - 1 - i
        offs = base + t * C
        kt = tl.load(k_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
        yt = tl.load(y_ptr + offs, mask=cmask, other=0.0)
        lt = tl.load(lse_ptr + offs, mask=cmask, other=0.0)
        gt = tl.load(gy_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
        gw_acc -= gt * tl.exp(fm + (t + 1) * w - lt) * (fa - yt * fb)
        ec = tl.exp(kt + (t + 1) * w + cm)
        gv_old = tl.load(gv_ptr + offs, mask=cmask, other=0.0)
        gk_old = tl.load(gk_ptr + offs, mask=cmask, other=0.0)
        tl.store(gv_ptr + offs, gv_old + ec * cg, mask=cmask)
        tl.store(gk_ptr + offs, gk_old + ec * (cg * vt - ch), mask=cmask)
        bt = kt - t * w
        mn, e1, e2 = _rescale(fm, bt)
        fa = e1 * (fa + fn)
        fb = e1 * (fb + fd)
        fn = e1 * fn + e2 * vt
        fd = e1 * fd + e2
        fm = mn
        ct = -t * w - lt
        cmn, c1, c2 = _rescale(cm, ct)
        cg = c1 * cg + c2 * gt
        ch = c1 * ch + c2 * gt * yt
        cm = cmn

    out = tl.program_id(0).to(tl.int64) * C + cols
    tl.store(gw_ptr + out, gw_acc, mask=cmask)
    tl.store(gu_ptr + out, gu_acc, mask=cmask)


def _block_c(C: int) -> int:
    # one warp of 32 lanes per program: parallelism is B * C / 32 programs, each sequential over T
    return 32 if C > 16 else max(1, triton.next_power_of_2(C))


def bi_wkv_triton_forward(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: returns y and lse, both fp32 (B, T, C)."""
    B, T, C = k.shape
    w, u, k, v = (x.contiguous() for x in (w, u, k, v))
    y = torch.empty(B, T, C, device=k.device, dtype=torch.float32)
    lse = torch.empty_like(y)
    if y.numel():
        block = _block_c(C)
        _bi_wkv_fwd_kernel[(B, triton.cdiv(C, block))](w, u, k, v, y, lse, T, C, BLOCK_C=block, num_warps=1)
    return y, lse


def bi_wkv_triton_backward(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, y: torch.Tensor,
                           lse: torch.Tensor, gy: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: fp32 gradients (gw (C,), gu (C,), gk, gv (B, T, C))."""
    B, T, C = k.shape
    w, u, k, v, gy = (x.contiguous() for x in (w, u, k, v, gy))
    gk = torch.empty(B, T, C, device=k.device, dtype=torch.float32)
    gv = torch.empty_like(gk)
    gw = torch.zeros(B, C, device=k.device, dtype=torch.float32)
    gu = torch.zeros_like(gw)
    if gk.numel():
        block = _block_c(C)
        _bi_wkv_bwd_kernel[(B, triton.cdiv(C, block))](w, u, k, v, y, lse, gy, gk, gv, gw, gu, T, C,
                                                       BLOCK_C=block, num_warps=1)
    return gw.sum(0), gu.sum(0), gk, gv


class BiWKVTriton(torch.autograd.Function):
    """Triton Bi-WKV with its Triton backward; y and lse of the forward are kept (fp32) for the backward."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        y, lse = bi_wkv_triton_forward(w, u, k, v)
        ctx.save_for_backward(w, u, k, v, y, lse)
        return y.to(k.dtype)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        w, u, k, v, y, lse = ctx.saved_tensors
        gw, gu, gk, gv = bi_wkv_triton_backward(w, u, k, v, y, lse, gy)
        return gw.to(w.dtype), gu.to(u.dtype), gk.to(k.dtype), gv.to(v.dtype)


def bi_wkv_triton(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Differentiable Triton Bi-WKV (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    return BiWKVTriton.apply(w, u, k, v)
