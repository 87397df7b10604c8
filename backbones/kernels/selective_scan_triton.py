"""Selective-scan Triton kernels (forward and backward) and their autograd.Function.

Layout: u, delta, z, y (batch, D, L); B, C (batch, G, N, L); A (D, N). One program per (batch element, group,
block of BLOCK_H channels of that group), so a program reads one (N,) vector of B and of C per token. It walks the
sequence once with its (BLOCK_H, N) state in registers; loads are converted to fp32 and everything accumulates in
fp32 (fp16 / bf16 / fp64 inputs too: fp64 is computed in fp32).

Forward: h = exp(dt A) h + (dt u) B, y = C.h + D u, y *= silu(z); writes y and the last state (fp32). Nothing else
is kept for the backward but the inputs.

Backward (a Triton reverse scan): pass 1 recomputes the states into a transient fp32 (batch, D, L, N) buffer
(freed when the backward returns); pass 2 runs from l = L-1 down to 0 with the adjoint state
g_l = dL/dh_l = exp(dt_{l+1} A) g_{l+1} + gy_l C_l (g_{L-1} starts from the last state's cotangent) and
    d(dt_l A) = g_l h_{l-1} exp(dt_l A)   ->  dA += . dt_l,  ddt_l += sum_n . A
    d(dt_l u_l B_l) = g_l                  ->  ddt_l, du_l, dB_l (sum over channels)
    dC_l = sum over channels of gy_l h_l,  dD = sum gy u,  dz = gout y_pre silu'(z),
then the softplus' derivative (sigmoid) and delta_bias' sum. dB, dC are written per channel block and summed over
blocks on the host (deterministic, no atomics); dA, dD, d(delta_bias) per batch element, summed on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .selective_scan import _compute_dtype

Tensor = torch.Tensor


@triton.jit
def _softplus(x):
    # torch's softplus (threshold 20) with log1p(e) = log(w) e / (w - 1), w = 1 + e: accurate for tiny e
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _program_block(A_ptr, Dm, N, G, H, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch element, channels, masks, A tile (fp32) and the offsets of B/C rows (b, g, n, 0)."""
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    hloc = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hloc < H
    ch = g * H + hloc
    ns = tl.arange(0, BLOCK_N)
    nmask = ns < N
    A = tl.load(A_ptr + ch[:, None] * N + ns[None, :], mask=hmask[:, None] & nmask[None, :], other=0.0)
    return b, ch, hmask, ns, nmask, A.to(tl.float32)


@triton.jit
def _selective_scan_fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, last_ptr,
                               Dm, L, N, G, H, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                               SOFTPLUS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    b, ch, hmask, ns, nmask, A = _program_block(A_ptr, Dm, N, G, H, BLOCK_H, BLOCK_N)
    row = (b * Dm + ch).to(tl.int64) * L                      # (b, ch, 0) in (batch, D, L)
    bc = tl.program_id(0).to(tl.int64) * N * L + ns * L       # (b, g, n, 0) in (batch, G, N, L)
    if HAS_D:
        Dv = tl.load(D_ptr + ch, mask=hmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=hmask, other=0.0).to(tl.float32)
    h = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    for l in range(0, L):
        u = tl.load(u_ptr + row + l, mask=hmask, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + row + l, mask=hmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias
        if SOFTPLUS:
            dt = _softplus(dt)
        Bl = tl.load(B_ptr + bc + l, mask=nmask, other=0.0).to(tl.float32)
        Cl = tl.load(C_ptr + bc + l, mask=nmask, other=0.0).to(tl.float32)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bl[None, :]
        y = tl.sum(h * Cl[None, :], axis=1)
        if HAS_D:
            y += Dv * u
        if HAS_Z:
            z = tl.load(z_ptr + row + l, mask=hmask, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + row + l, y, mask=hmask)
    st = (b * Dm + ch).to(tl.int64)[:, None] * N + ns[None, :]
    tl.store(last_ptr + st, h, mask=hmask[:, None] & nmask[None, :])


@triton.jit
def _selective_scan_bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, gy_ptr, glast_ptr,
                               hs_ptr, du_ptr, ddt_ptr, dz_ptr, dBp_ptr, dCp_ptr, dA_ptr, dD_ptr, dbias_ptr,
                               Dm, L, N, G, H, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                               SOFTPLUS: tl.constexpr, HAS_GLAST: tl.constexpr, BLOCK_H: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    b, ch, hmask, ns, nmask, A = _program_block(A_ptr, Dm, N, G, H, BLOCK_H, BLOCK_N)
    tile = hmask[:, None] & nmask[None, :]
    row = (b * Dm + ch).to(tl.int64) * L
    bc = tl.program_id(0).to(tl.int64) * N * L + ns * L
    hrow = (b * Dm + ch).to(tl.int64)[:, None] * L * N + ns[None, :]     # (b, ch, 0, n) in (batch, D, L, N)
    part = (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * N * L + ns * L
    Dv = tl.zeros([BLOCK_H], dtype=tl.float32)
    bias = tl.zeros([BLOCK_H], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + ch, mask=hmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=hmask, other=0.0).to(tl.float32)

    # pass 1: the states h_l into the scratch buffer
    h = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    for l in range(0, L):
        u = tl.load(u_ptr + row + l, mask=hmask, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + row + l, mask=hmask, other=0.0).to(tl.float32) + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        Bl = tl.load(B_ptr + bc + l, mask=nmask, other=0.0).to(tl.float32)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bl[None, :]
        tl.store(hs_ptr + hrow + l * N, h, mask=tile)

    # pass 2: adjoint recurrence from the last token backwards
    gh = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    if HAS_GLAST:
        st = (b * Dm + ch).to(tl.int64)[:, None] * N + ns[None, :]
        gh = tl.load(glast_ptr + st, mask=tile, other=0.0).to(tl.float32)
    dA_acc = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for i in range(0, L):
        l = L - 1 - i
        u = tl.load(u_ptr + row + l, mask=hmask, other=0.0).to(tl.float32)
        dt_in = tl.load(dt_ptr + row + l, mask=hmask, other=0.0).to(tl.float32) + bias
        dt = dt_in
        if SOFTPLUS:
            dt = _softplus(dt_in)
        Bl = tl.load(B_ptr + bc + l, mask=nmask, other=0.0).to(tl.float32)
        Cl = tl.load(C_ptr + bc + l, mask=nmask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + row + l, mask=hmask, other=0.0).to(tl.float32)
        h_l = tl.load(hs_ptr + hrow + l * N, mask=tile, other=0.0)
        h_prev = tl.load(hs_ptr + hrow + (l - 1) * N, mask=tile & (l > 0), other=0.0)
        if HAS_Z:
            z = tl.load(z_ptr + row + l, mask=hmask, other=0.0).to(tl.float32)
            sz = tl.sigmoid(z)
            y_pre = tl.sum(h_l * Cl[None, :], axis=1) + Dv * u
            tl.store(dz_ptr + row + l, gy * y_pre * sz * (1.0 + z * (1.0 - sz)), mask=hmask)
            gy = gy * z * sz
        du = gy * Dv
        dD_acc += gy * u
        tl.store(dCp_ptr + part + l, tl.sum(gy[:, None] * h_l, axis=0), mask=nmask)
        gh += gy[:, None] * Cl[None, :]
        dA = tl.exp(dt[:, None] * A)
        garg = gh * h_prev * dA                                  # dL/d(dt A)
        gB = tl.sum(gh * Bl[None, :], axis=1)                     # dL/d(dt u)
        ddt = tl.sum(garg * A, axis=1) + gB * u
        du += gB * dt
        dA_acc += garg * dt[:, None]
        tl.store(dBp_ptr + part + l, tl.sum(gh * (dt * u)[:, None], axis=0), mask=nmask)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(dt_in)
        dbias_acc += ddt
        tl.store(du_ptr + row + l, du, mask=hmask)
        tl.store(ddt_ptr + row + l, ddt, mask=hmask)
        gh = gh * dA
    st = (b * Dm + ch).to(tl.int64)
    tl.store(dA_ptr + st[:, None] * N + ns[None, :], dA_acc, mask=tile)
    tl.store(dD_ptr + st, dD_acc, mask=hmask)
    tl.store(dbias_ptr + st, dbias_acc, mask=hmask)


def _blocks(H: int, N: int) -> tuple[int, int]:
    # up to 32 channels x N state entries per program; larger N gets fewer channels to bound the register tile
    block_n = triton.next_power_of_2(N)
    block_h = min(triton.next_power_of_2(H), max(1, 32 * 16 // block_n), 32)
    return block_h, block_n


def _canonical(u, delta, A, B, C, D, z, delta_bias) -> list[Tensor | None]:
    """Contiguous inputs with B and C as (batch, G, N, L)."""
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    return [None if t is None else t.contiguous() for t in (u, delta, A, B, C, D, z, delta_bias)]


def selective_scan_triton_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                                  z: Tensor | None, delta_bias: Tensor | None, softplus: bool
                                  ) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel: y (batch, D, L) and the last state (batch, D, N), both fp32."""
    u, delta, A, B, C, D, z, delta_bias = _canonical(u, delta, A, B, C, D, z, delta_bias)
    batch, Dm, L = u.shape
    G, N = B.shape[1], A.shape[1]
    y = torch.empty(batch, Dm, L, device=u.device, dtype=torch.float32)
    last = torch.zeros(batch, Dm, N, device=u.device, dtype=torch.float32)
    if y.numel():
        bh, bn = _blocks(Dm // G, N)
        _selective_scan_fwd_kernel[(batch * G, triton.cdiv(Dm // G, bh))](
            u, delta, A, B, C, u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
            y, last, Dm, L, N, G, Dm // G, HAS_D=D is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, BLOCK_H=bh, BLOCK_N=bn, num_warps=4)
    return y, last


def selective_scan_triton_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                                   z: Tensor | None, delta_bias: Tensor | None, softplus: bool, gy: Tensor,
                                   glast: Tensor | None) -> list[Tensor | None]:
    """Launch the backward kernel: fp32 gradients of (u, delta, A, B, C, D, z, delta_bias) (None where absent),
    B and C gradients in their (batch, G, N, L) form."""
    u, delta, A, B, C, D, z, delta_bias = _canonical(u, delta, A, B, C, D, z, delta_bias)
    batch, Dm, L = u.shape
    G, N = B.shape[1], A.shape[1]
    H = Dm // G
    bh, bn = _blocks(H, N)
    nblk = triton.cdiv(H, bh)
    dev, f32 = u.device, torch.float32
    du = torch.zeros(batch, Dm, L, device=dev, dtype=f32)
    ddt = torch.zeros_like(du)
    dz = torch.zeros_like(du) if z is not None else None
    dBp = torch.zeros(batch * G, nblk, N, L, device=dev, dtype=f32)
    dCp = torch.zeros_like(dBp)
    dA = torch.zeros(batch, Dm, N, device=dev, dtype=f32)
    dD = torch.zeros(batch, Dm, device=dev, dtype=f32)
    dbias = torch.zeros_like(dD)
    if du.numel():
        hs = torch.empty(batch, Dm, L, N, device=dev, dtype=f32)   # transient: the recomputed states
        _selective_scan_bwd_kernel[(batch * G, nblk)](
            u, delta, A, B, C, u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
            gy.contiguous(), dA if glast is None else glast.contiguous(), hs, du, ddt, du if dz is None else dz,
            dBp, dCp, dA, dD, dbias, Dm, L, N, G, H, HAS_D=D is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_GLAST=glast is not None, BLOCK_H=bh,
            BLOCK_N=bn, num_warps=4)
        del hs
    dB = dBp.sum(1).view(batch, G, N, L)
    dC = dCp.sum(1).view(batch, G, N, L)
    return [du, ddt, dA.sum(0), dB, dC, None if D is None else dD.sum(0), dz,
            None if delta_bias is None else dbias.sum(0)]


class SelectiveScanTriton(torch.autograd.Function):
    """Triton selective scan with its Triton backward; only the inputs are kept for the backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        y, last = selective_scan_triton_forward(u, delta, A, B, C, D, z, delta_bias, softplus)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.softplus = softplus
        return y.to(u.dtype), last.to(_compute_dtype(u, delta, A, B, C, D, z, delta_bias))

    @staticmethod
    def backward(ctx, gy, glast):
        inputs = ctx.saved_tensors
        grads = selective_scan_triton_backward(*inputs, ctx.softplus, gy, glast)
        out = []
        for g, t in zip(grads, inputs):
            if g is None or t is None:
                out.append(None)
                continue
            out.append(g.reshape(t.shape).to(t.dtype))  # (batch, 1, N, L) -> (batch, N, L) for 3-dim B, C
        return (*out, None)


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None, softplus: bool = False
                          ) -> tuple[Tensor, Tensor]:
    """Differentiable Triton selective scan: (y in u's dtype, last state (batch, D, N) in fp32 / fp64)."""
    return SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, softplus)
