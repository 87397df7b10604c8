"""Selective scan (Mamba's S6 recurrence), entry point :func:`selective_scan`.

Semantics of mamba_ssm 1.x ``selective_scan_fn`` / ``selective_scan_ref`` (as vendored by hustvl/Vim), real A and
variable B, C. Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L) or (B, G, N, L) with G groups of D/G
channels (B and C must have the same G; (B, N, L) is G = 1); D, delta_bias (D,). Per (b, d, l, n)::

    dt      = softplus(delta + delta_bias)    (softplus only if delta_softplus)
    h_l     = exp(dt_l A) h_{l-1} + dt_l B_l u_l,   h_{-1} = 0
    y_l     = sum_n C_l h_l  +  D u_l,            then y *= silu(z) if z is given

Returns y in u's dtype and, with ``return_last_state``, also h_{L-1} (B, D, N) in the accumulation dtype (fp32, or
fp64 for fp64 inputs), as mamba_ssm does (its CUDA path does not back-propagate into the last state; ours do).
Every path accumulates in fp32 (fp64) whatever the input dtype, also under autocast.

Implementations (``impl``):
    "reference"  the recurrence token by token in fp32/fp64 (tests only; the ground truth).
    "torch"      chunked parallel scan in blocks of (batch x channels), O(L) work, no Python loop over tokens, with
                 a hand-written backward (design below; once differentiable). Memory: autograd keeps only the
                 inputs; forward and backward add the outputs (gradients) and O(block) transients (two resp. four
                 buffers of about ``BLOCK_ELEMS`` elements), never a B*D*L*N tensor.
    "triton"     Triton kernels (``selective_scan_triton``): forward = one program per (batch, group, block of
                 channels), sequential over L with the (channels x N) state in registers, fp32 accumulation;
                 backward = a Triton reverse scan (recomputes the states into a transient fp32 (B, D, L, N)
                 buffer, then runs the adjoint recurrence backwards). CUDA, or CPU under TRITON_INTERPRET=1.
    "cuda"       mamba_ssm's ``selective_scan_fn`` (imported lazily; CUDA tensors; no fp64).
    "auto"       "cuda" when mamba_ssm is importable and the tensors are on CUDA (not fp64), else "triton" on CUDA,
                 else "torch".

Chunked scan ("torch"). The recurrence is the composition of affine maps h -> a_l h + x_l with a_l = exp(dt_l A)
in (0, 1] (A < 0 as in Mamba) and x_l = dt_l B_l u_l. The sequence is cut into chunks of ``chunk`` tokens (by
default DEFAULT_CHUNK, doubled while there are more than MAX_CHUNKS chunks; the last chunk padded with identity maps
a = 1, x = 0). Inside every chunk a Hillis-Steele scan composes the maps in log2(chunk) vectorised steps
(x_l += a_l x_{l-k}, a_l *= a_{l-k} for k = 1, 2, 4, ...), giving each token's state from a zero start and its
in-chunk decay product; a short Python loop over the L/chunk chunks then carries the state across chunk boundaries
(h = x + a * h_start). Stability: only products of factors in [0, 1] and sums appear, never exp(-cumsum(dt A)) or
a division, so nothing overflows for any dt (dt A = -1e4 underflows the decay to an exact 0 and the state simply
restarts, as in the recurrence); rounding error grows like log2(chunk) products, not with the span of the decays
(the cumsum form exp(s_l) * cumsum(exp(-s_j) x_j) overflows as soon as one chunk decays by more than ~88 in fp32,
e.g. two steps of dt A = -50).

Blocks and backward ("torch"). The (batch, channel) pairs are processed in blocks of at most ``BLOCK_ELEMS`` state
elements (block batch x block channels x (L + 1) x N; a block's channels lie in one group of B/C), laid out token
major, (L, batch, N, channels), so that every scan step works on slices along the outer axis; the scan runs in place
in buffers allocated once per call (views and calls built once per block shape). The forward runs without autograd.
The backward recomputes each block's states and applies the adjoint by hand: with gy' = gy silu(z), the states'
cotangent gh_l = C_l gy'_l + a_{l+1} gh_{l+1} (plus the last state's cotangent at l = L - 1) is the same chunked
scan run backwards with the decays shifted by one token (again only products of decays and sums); then
d(dt A)_l = gh_l a_l h_{l-1}, dA = sum dt d(dt A), d dt = sum_n A d(dt A) + u sum_n B gh, du = dt sum_n B gh + D gy',
dB = sum dt u gh and dC = sum gy' h over the group's channels (batched matmuls), and the chain rule through softplus,
delta_bias, D and z.

FLOPs: the op is the custom operator ``kernels::selective_scan`` (one node under torch.jit.trace, as fvcore traces
it, or torch.compile), counted as B * D * L * (4 N + 1 + [D given] + [z given]) MACs: per (b, d, l, n) the decay
argument dt * A (1), the input (dt u) * B (1), the update a h + x (1) and the readout C h (1); per (b, d, l) the
product dt * u (1), the skip D u (1) and the gate y * silu(z) (1). exp, softplus, silu and the bias add are free,
as elementwise ops are under ``bench.flops``' convention. Eagerly the implementation is called directly. The custom
op's backward is, for impl "torch", the opaque op ``kernels::selective_scan_torch_backward`` (the recompute and
adjoint above as one node under torch.compile); for the other implementations it recomputes the implementation
under autograd (activation checkpointing of the op).
"""

from __future__ import annotations

import contextlib
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..opcount import register_macs

__all__ = ["selective_scan", "selective_scan_reference", "selective_scan_torch", "resolve_scan_impl", "SCAN_IMPLS"]

SCAN_IMPLS = ("auto", "reference", "torch", "triton", "cuda")
Tensor = torch.Tensor
ScanOut = Tensor | tuple[Tensor, Tensor]
DEFAULT_CHUNK = 4  # the torch path's chunk, fastest on CPU in our measurements (L ~ 64)
MAX_CHUNKS = 64  # longer sequences get chunks of 2^k DEFAULT_CHUNK tokens: at most MAX_CHUNKS carry steps per scan
BLOCK_ELEMS = 1 << 19  # working set of one block of the torch path: batch x channels x (L + 1) x N elements


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Inputs in the accumulation dtype, dt = softplus(delta + bias), B and C as (batch, G, N, L)."""
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C = (t.to(cdt) for t in (u, delta, A, B, C))
    dt = delta if delta_bias is None else delta + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    return cdt, u, dt, A, B, C


def _finish(y, u, D, z, dtype):
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype)


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                             z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                             return_last_state: bool = False) -> ScanOut:
    """The recurrence token by token (mamba_ssm's ``selective_scan_ref``, fp64-capable; tests only)."""
    cdt, uc, dt, A, B, C = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    heads = A.shape[0] // B.shape[1]
    B, C = B.repeat_interleave(heads, dim=1), C.repeat_interleave(heads, dim=1)   # (batch, D, N, L)
    dA = torch.exp(dt[:, :, None, :] * A[None, :, :, None])                       # (batch, D, N, L)
    dBu = (dt * uc)[:, :, None, :] * B
    h = uc.new_zeros(uc.shape[0], A.shape[0], A.shape[1])
    ys = []
    for i in range(uc.shape[-1]):
        h = dA[..., i] * h + dBu[..., i]
        ys.append((h * C[..., i]).sum(-1))
    y = _finish(torch.stack(ys, dim=-1), uc, D, z, u.dtype)
    return (y, h) if return_last_state else y


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()


@lru_cache(maxsize=None)
def _hs_slices(chunk: int, reverse: bool) -> tuple:
    """The Hillis-Steele steps on a chunk as ((destination rows, source rows), ...) per shift k = 1, 2, 4, ...:
    rows are updated in place in slices of at most k rows, ordered (descending forwards, ascending in reverse) so
    that every slice reads rows its step has not updated yet."""
    steps, k = [], 1
    while k < chunk:
        pairs = []
        if reverse:
            s = 0
            while s < chunk - k:
                e = min(s + k, chunk - k)
                pairs.append((slice(s, e), slice(s + k, e + k)))
                s = e
        else:
            e = chunk
            while e > k:
                s = max(k, e - k)
                pairs.append((slice(s, e), slice(s - k, e - k)))
                e = s
        steps.append(tuple(pairs))
        k *= 2
    return tuple(steps)


def _scan_ops(a: Tensor, x: Tensor, chunk: int, starts: Tensor, reverse: bool = False,
              a_out: Tensor | None = None) -> list:
    """The calls (on views built once) of the chunked scan, in place on (Lp, R) x, Lp a multiple of ``chunk``: x
    becomes the states of h_l = a_l h_{l-1} + x_l from h_{-1} = 0 (``reverse``: of g_l = a_l g_{l+1} + x_l from
    g_{Lp} = 0). Inside every chunk a Hillis-Steele scan leaves x_l = the state from a zero start at the chunk's
    edge and a_l = the product of the chunk's decays up to l; a loop over the chunks carries the state across them
    (``starts`` (Lp / chunk, R) is scratch) and one pass adds a_l h_start. The decay products overwrite ``a``, or,
    with ``a_out`` (same shape), go there (the first step computes them out of place) and ``a`` stays intact."""
    nc = a.shape[0] // chunk
    a3, x3 = a.view(nc, chunk, -1), x.view(nc, chunk, -1)
    o3 = a3 if a_out is None or chunk == 1 else a_out.view(nc, chunk, -1)
    ops = []
    for pairs in _hs_slices(chunk, reverse):
        ops += [partial(x3[:, dst].addcmul_, a3[:, dst], x3[:, src]) for dst, src in pairs]
        if o3 is a3:
            ops += [partial(a3[:, dst].mul_, a3[:, src]) for dst, src in pairs]
        else:
            lo, hi, edge = (slice(0, -1), slice(1, None), -1) if reverse else (slice(1, None), slice(0, -1), 0)
            ops += [partial(torch.mul, a3[:, lo], a3[:, hi], out=o3[:, lo]), partial(o3[:, edge].copy_, a3[:, edge])]
            a3 = o3
    if nc > 1:
        edge, first, step = (0, nc - 1, 1) if reverse else (chunk - 1, 0, -1)
        start, ends_x, ends_a = starts.unbind(0), x3[:, edge].unbind(0), o3[:, edge].unbind(0)
        ops.append(start[first].zero_)
        ops += [partial(torch.addcmul, ends_x[c + step], ends_a[c + step], start[c + step], out=start[c])
                for c in (range(nc - 2, -1, -1) if reverse else range(1, nc))]
        rows = slice(0, -1) if reverse else slice(1, None)
        ops.append(partial(x3[rows].addcmul_, o3[rows], starts[rows, None]))
    return ops


def _softplus(s: Tensor) -> Tensor:
    """F.softplus (threshold 20). In fp32 as vectorised ops (PyTorch's CPU kernel runs a scalar log1p, ~4x slower):
    log1p(t), t = exp(s), as the compensated log(w) - ((w - 1) - t) / w with w = 1 + t (within ~3 ulp)."""
    if s.dtype != torch.float32:
        return F.softplus(s)
    t = torch.clamp(s, max=20.0).exp_()
    w = t + 1.0
    out = torch.log(w)
    out.sub_(w.sub_(1.0).sub_(t).div_(t.add_(1.0)))
    return torch.where(s > 20.0, s, out, out=out)


def _tm(t: Tensor, cdt: torch.dtype) -> Tensor:
    """A block (bb, X, L) of an input -> a contiguous token-major copy (L, bb, X) in ``cdt``."""
    return torch.empty(t.shape[2], t.shape[0], t.shape[1], dtype=cdt, device=t.device).copy_(t.permute(2, 0, 1))


def _default_chunk(L: int) -> int:
    """DEFAULT_CHUNK, doubled while the sequence has more than MAX_CHUNKS chunks (the carry loop's Python calls,
    per block, would outweigh the log2(chunk) passes of the Hillis-Steele steps)."""
    chunk = DEFAULT_CHUNK
    while chunk * MAX_CHUNKS < L:
        chunk *= 2
    return chunk


def _blocks(batch: int, Dm: int, G: int, per: int, max_elems: int) -> list[tuple[int, int, int, int, int]]:
    """(b0, b1, group, c0, c1) blocks of batch x channels, (b1 - b0) (c1 - c0) per <= max_elems (or a single
    (batch, channel) pair), channels inside one group of B/C, sizes balanced."""
    H = Dm // G
    cap = max(1, max_elems // per)
    nh = -(-H // cap)
    hb = -(-H // nh)
    nb = -(-batch // max(1, cap // hb))
    bb = -(-batch // nb)
    return [(b0, min(b0 + bb, batch), g, c0, min(c0 + hb, (g + 1) * H))
            for b0 in range(0, batch, bb) for g in range(G) for c0 in range(g * H, (g + 1) * H, hb)]


class _Frame:
    """Workspace views for blocks of one shape (bb, hb), as (rows, bb, N, hb), and the scans' calls on them (the
    workspace is shared, so a frame is valid for the call that built it): a0 the decays (one row more, of 1, so
    that a0[1:] are the decays a_{l+1} of the reverse scan), hfull = [0, h_0, ..., h_{Lp-1}]; for the backward
    also a1 (decay products) and gh (the states' adjoint)."""

    def __init__(self, ws: list[Tensor], starts: Tensor, L: int, Lp: int, N: int, bb: int, hb: int, chunk: int,
                 backward: bool):
        R = bb * N * hb
        self.a0, self.hfull = (t[:(Lp + 1) * R].view(Lp + 1, bb, N, hb) for t in ws[:2])
        self.x = self.hfull[1:]
        self.h, self.hprev = self.x[:L], self.hfull[:L]
        starts = starts[:Lp // chunk * R].view(Lp // chunk, R)
        if backward:
            self.a1, self.gh = (t[:Lp * R].view(Lp, bb, N, hb) for t in ws[2:4])
            self.fwd = _scan_ops(self.a0[:Lp].view(Lp, R), self.x.reshape(Lp, R), chunk, starts,
                                 a_out=self.a1.view(Lp, R))
            self.rev = _scan_ops(self.a0[1:].view(Lp, R), self.gh.view(Lp, R), chunk, starts, reverse=True,
                                 a_out=self.a1.view(Lp, R))
        else:
            self.fwd = _scan_ops(self.a0[:Lp].view(Lp, R), self.x.reshape(Lp, R), chunk, starts)


class _Blocked:
    """One call of the blocked scan: inputs, accumulation dtype, blocks, workspace (``nbuf`` flat buffers of the
    largest block), and per block the token-major (L, bb, ...) inputs and the recomputed states."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, softplus: bool, chunk: int | None, block: int,
                 nbuf: int):
        self.cdt = cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        self.batch, self.Dm, self.L = u.shape
        self.N = A.shape[1]
        self.chunk = chunk = _default_chunk(self.L) if chunk is None else max(1, int(chunk))
        self.Lp = -(-self.L // chunk) * chunk
        self.u, self.delta, self.z, self.softplus = u, delta, z, softplus
        self.B, self.C = (t.unsqueeze(1) if t.dim() == 3 else t for t in (B, C))
        self.At = A.to(cdt).t().contiguous()                                      # (N, D)
        self.D, self.bias = (None if t is None else t.to(cdt) for t in (D, delta_bias))
        empty = not (self.batch and self.Dm and self.L)
        self.blocks = [] if empty else _blocks(self.batch, self.Dm, self.B.shape[1], (self.Lp + 1) * self.N, block)
        pairs = max(((b1 - b0) * (c1 - c0) for b0, b1, _, c0, c1 in self.blocks), default=0)
        size = (self.Lp + 1) * pairs * self.N
        self.ws = [torch.empty(size, dtype=cdt, device=u.device) for _ in range(nbuf)]
        self.starts = torch.empty(size // chunk, dtype=cdt, device=u.device)
        self.frames: dict[tuple[int, int], _Frame] = {}

    def load(self, blk) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The block's u, s = delta + bias, dt = softplus(s) (or s), dt u (L, bb, hb), B and C (L, bb, N)."""
        b0, b1, g, c0, c1 = blk
        u, s = _tm(self.u[b0:b1, c0:c1], self.cdt), _tm(self.delta[b0:b1, c0:c1], self.cdt)
        if self.bias is not None:
            s += self.bias[c0:c1]
        dt = _softplus(s) if self.softplus else s
        return u, s, dt, dt * u, _tm(self.B[b0:b1, g], self.cdt), _tm(self.C[b0:b1, g], self.cdt)

    def states(self, blk, dt: Tensor, dtu: Tensor, Bb: Tensor, backward: bool) -> _Frame:
        """Recompute the block's states into its frame (fr.h); fr.a0 holds the decays exp(dt A) (the forward's
        scan clobbers them), 1 on the padding rows."""
        b0, b1, g, c0, c1 = blk
        key = (b1 - b0, c1 - c0)
        if key not in self.frames:
            self.frames[key] = _Frame(self.ws, self.starts, self.L, self.Lp, self.N, *key, self.chunk, backward)
        fr, L = self.frames[key], self.L
        torch.mul(dt[:, :, None], self.At[:, c0:c1], out=fr.a0[:L])
        fr.a0[:L].exp_()
        fr.a0[L:].fill_(1.0)
        fr.hfull[0].zero_()
        torch.mul(Bb[..., None], dtu[:, :, None], out=fr.h)
        fr.x[L:].zero_()
        for op in fr.fwd:
            op()
        return fr


def _bmm(t: Tensor, h: Tensor, transpose: bool = False) -> Tensor:
    """Per token and batch element: t (L, bb, N) times h (L, bb, N, hb) -> (L, bb, hb); ``transpose``: t (L, bb,
    hb) times h^T -> (L, bb, N). One batched matmul."""
    L, bb, N, hb = h.shape
    hm = h.reshape(L * bb, N, hb)
    if transpose:
        return torch.bmm(t.reshape(L * bb, 1, hb), hm.transpose(1, 2)).view(L, bb, N)
    return torch.bmm(t.reshape(L * bb, 1, N), hm).view(L, bb, hb)


class _SelectiveScanTorch(torch.autograd.Function):
    """The blocked chunked scan (module docstring): forward without autograd; backward recomputes each block's
    states and runs the hand-written adjoint. Saves only the inputs."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool, chunk: int | None, block: int):
        with torch.no_grad(), _no_autocast(u.device):
            sc = _Blocked(u, delta, A, B, C, D, z, delta_bias, softplus, chunk, block, nbuf=2)
            y = torch.empty_like(u, memory_format=torch.contiguous_format)
            last = torch.zeros(sc.batch, sc.Dm, sc.N, dtype=sc.cdt, device=u.device)
            for blk in sc.blocks:
                b0, b1, g, c0, c1 = blk
                ub, _, dtb, dtub, Bb, Cb = sc.load(blk)
                h = sc.states(blk, dtb, dtub, Bb, backward=False).h
                yb = _bmm(Cb, h)
                if D is not None:
                    yb.addcmul_(ub, sc.D[c0:c1])
                if z is not None:
                    yb.mul_(F.silu(_tm(z[b0:b1, c0:c1], sc.cdt)))
                y[b0:b1, c0:c1].permute(2, 0, 1).copy_(yb)
                last[b0:b1, c0:c1] = h[-1].transpose(1, 2)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.softplus, ctx.chunk, ctx.block = softplus, chunk, block
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, glast):
        grads = _torch_grads(ctx.saved_tensors, ctx.softplus, ctx.chunk, ctx.block, gy, glast)
        return (*(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad)), None, None, None)


def _torch_grads(inputs, softplus: bool, chunk: int | None, block: int, gy: Tensor | None,
                 glast: Tensor | None) -> list:
    """The gradients of the inputs (u, delta, A, B, C, D, z, delta_bias) in their shapes and dtypes, None for an
    absent one."""
    with torch.no_grad(), _no_autocast(inputs[0].device):
        grads = _scan_backward(*inputs, softplus, chunk, block, gy, glast)
    return [None if gr is None or t is None else gr.reshape(t.shape).to(t.dtype) for gr, t in zip(grads, inputs)]


def _scan_backward(u, delta, A, B, C, D, z, delta_bias, softplus, chunk, block, gy, glast) -> list:
    """Gradients of u, delta, A, B, C (B and C as (batch, G, N, L)), D, z, delta_bias (u, delta, z in their input
    dtypes, the rest in the accumulation dtype) for the cotangents gy of y and glast of the last state (either may
    be None: zero)."""
    sc = _Blocked(u, delta, A, B, C, D, z, delta_bias, softplus, chunk, block, nbuf=4)
    L, N, cdt, dev = sc.L, sc.N, sc.cdt, u.device
    # every (batch, channel, token) belongs to one block: du, ddelta, dz are written once, block by block
    du = torch.empty_like(u, memory_format=torch.contiguous_format)
    ddelta = torch.empty_like(delta, memory_format=torch.contiguous_format)
    dz = None if z is None else torch.empty_like(z, memory_format=torch.contiguous_format)
    dA = torch.zeros(sc.Dm, N, dtype=cdt, device=dev)
    dB, dC = (torch.zeros(t.shape, dtype=cdt, device=dev) for t in (sc.B, sc.C))
    dD = None if D is None else torch.zeros(sc.Dm, dtype=cdt, device=dev)
    dbias = None if delta_bias is None else torch.zeros(sc.Dm, dtype=cdt, device=dev)
    for blk in sc.blocks:
        b0, b1, g, c0, c1 = blk
        ub, sb, dtb, dtub, Bb, Cb = sc.load(blk)
        gyb = _tm(gy[b0:b1, c0:c1], cdt) if gy is not None else torch.zeros_like(ub)
        fr = sc.states(blk, dtb, dtub, Bb, backward=True)
        h = fr.h
        gyp = gyb           # the cotangent of the scan's readout sum_n C h + D u
        if z is not None:   # y = (readout) silu(z): dz = gy readout sig(z) (1 + z (1 - sig(z))), gyp = gy silu(z)
            zb = _tm(z[b0:b1, c0:c1], cdt)
            sz = torch.sigmoid(zb)
            gyp = zb * sz
            gyp.mul_(gyb)
            yb = _bmm(Cb, h)
            if D is not None:
                yb.addcmul_(ub, sc.D[c0:c1])
            yb.mul_(gyb).mul_(sz).mul_((1.0 - sz).mul_(zb).add_(1.0))
            dz[b0:b1, c0:c1].permute(2, 0, 1).copy_(yb)
        dC[b0:b1, g].permute(2, 0, 1).add_(_bmm(gyp, h, transpose=True))
        # the states' adjoint: gh_l = C_l gyp_l + a_{l+1} gh_{l+1} (+ glast at l = L - 1), a reverse scan
        gh = fr.gh
        torch.mul(Cb[..., None], gyp[:, :, None], out=gh[:L])
        gh[L:].zero_()
        if glast is not None:
            gh[L - 1] += glast[b0:b1, c0:c1].transpose(1, 2)
        for op in fr.rev:
            op()
        gh = gh[:L]
        # x_l = (dt u)_l B_l: dB = sum_h gh dt u, d(dt u) = sum_n gh B
        dB[b0:b1, g].permute(2, 0, 1).add_(_bmm(dtub, gh, transpose=True))
        gdtu = _bmm(Bb, gh)
        # a_l = exp(dt_l A): d(dt A)_l = gh_l a_l h_{l-1}; d dt gets sum_n A of it, dA sum_{batch, l} dt of it
        garg = gh.mul_(fr.a0[:L]).mul_(fr.hprev)
        ds = torch.mul(garg, sc.At[:, c0:c1], out=fr.a1[:L]).sum(2).addcmul_(gdtu, ub)
        dA[c0:c1] += garg.mul_(dtb[:, :, None]).sum((0, 1)).t()
        gdtu.mul_(dtb)
        if D is not None:
            gdtu.addcmul_(gyp, sc.D[c0:c1])
            dD[c0:c1] += (gyp * ub).sum((0, 1))
        du[b0:b1, c0:c1].permute(2, 0, 1).copy_(gdtu)
        if softplus:   # softplus' derivative; 1 above its threshold, where it is the identity
            ds.mul_(torch.sigmoid(sb).masked_fill_(sb > 20.0, 1.0))
        if dbias is not None:
            dbias[c0:c1] += ds.sum((0, 1))
        ddelta[b0:b1, c0:c1].permute(2, 0, 1).copy_(ds)
    return [du, ddelta, dA, dB, dC, dD, dz, dbias]


def selective_scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                         z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                         return_last_state: bool = False, chunk: int | None = None) -> ScanOut:
    """Blocked chunked parallel scan with a hand-written backward (module docstring); ``chunk`` None: DEFAULT_CHUNK
    tokens, more for sequences longer than MAX_CHUNKS * DEFAULT_CHUNK."""
    y, last = _SelectiveScanTorch.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, BLOCK_ELEMS)
    return (y, last) if return_last_state else y


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                          return_last_state: bool = False) -> ScanOut:
    """Triton kernels (imported lazily: TRITON_INTERPRET is read when the kernels are defined)."""
    from .selective_scan_triton import selective_scan_triton as run

    y, last = run(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (y, last) if return_last_state else y


def _mamba_ssm():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def selective_scan_cuda(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                        z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                        return_last_state: bool = False) -> ScanOut:
    """mamba_ssm's CUDA kernel (its backward ignores the gradient of the last state)."""
    fn = _mamba_ssm()
    if fn is None:
        raise RuntimeError("selective_scan impl='cuda' needs the mamba_ssm package (pip install mamba-ssm); use "
                           "impl='triton', 'torch' or 'auto'")
    if u.device.type != "cuda":
        raise ValueError(f"selective_scan impl='cuda' needs CUDA tensors; u is on {u.device}")
    # its kernel wants fp32 A, D, delta_bias and delta, B, C, z in u's dtype
    A, D, delta_bias = (None if t is None else t.float() for t in (A, D, delta_bias))
    delta, B, C, z = (None if t is None else t.to(u.dtype) for t in (delta, B, C, z))
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_scan_impl(impl: str, u: torch.Tensor) -> str:
    """The concrete implementation ``impl`` stands for on ``u``'s device and dtype."""
    if impl not in SCAN_IMPLS:
        raise ValueError(f"unknown selective_scan impl {impl!r}; choose one of {', '.join(SCAN_IMPLS)}")
    if impl != "auto":
        return impl
    if u.device.type != "cuda":
        return "torch"
    if u.dtype != torch.float64 and _mamba_ssm() is not None:
        return "cuda"
    return "triton" if _triton_available() else "torch"


_IMPL_FNS = {"reference": selective_scan_reference, "torch": selective_scan_torch, "triton": selective_scan_triton,
             "cuda": selective_scan_cuda}


@torch.library.custom_op("kernels::selective_scan", mutates_args=())
def _selective_scan_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                       delta_softplus: bool, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    y, last = _IMPL_FNS[impl](u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)
    return y.contiguous(), last.contiguous()


@_selective_scan_op.register_fake
def _selective_scan_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, impl):
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    return u.new_empty(u.shape), u.new_empty(u.shape[0], A.shape[0], A.shape[1], dtype=cdt)


@torch.library.custom_op("kernels::selective_scan_torch_backward", mutates_args=())
def _selective_scan_torch_backward_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                                      C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
                                      delta_bias: torch.Tensor | None, gy: torch.Tensor | None,
                                      glast: torch.Tensor | None, delta_softplus: bool) -> list[torch.Tensor]:
    """The torch path's backward (recompute + hand-written adjoint) as one opaque op: the custom op's backward for
    impl "torch", so that torch.compile records one node instead of tracing every block. Gradients of the eight
    inputs in their shapes and dtypes, an empty tensor for an absent input."""
    grads = _torch_grads((u, delta, A, B, C, D, z, delta_bias), delta_softplus, None, BLOCK_ELEMS, gy, glast)
    return [u.new_empty(0) if gr is None else gr for gr in grads]


@_selective_scan_torch_backward_op.register_fake
def _selective_scan_torch_backward_fake(u, delta, A, B, C, D, z, delta_bias, gy, glast, delta_softplus):
    return [u.new_empty(0) if t is None else t.new_empty(t.shape) for t in (u, delta, A, B, C, D, z, delta_bias)]


def _setup_context(ctx, inputs, output) -> None:
    *tensors, delta_softplus, impl = inputs
    ctx.save_for_backward(*tensors)
    ctx.delta_softplus, ctx.impl = delta_softplus, impl


def _backward(ctx, gy: torch.Tensor, glast: torch.Tensor | None):
    if ctx.impl == "torch":
        grads = torch.ops.kernels.selective_scan_torch_backward(*ctx.saved_tensors, gy, glast, ctx.delta_softplus)
        return (*(None if t is None else gr for gr, t in zip(grads, ctx.saved_tensors)), None, None)
    inputs = [None if t is None else t.detach().requires_grad_(True) for t in ctx.saved_tensors]
    live = [t for t in inputs if t is not None]
    with torch.enable_grad():
        y, last = _IMPL_FNS[ctx.impl](*inputs, ctx.delta_softplus, True)
        outs, cots = [y], [gy]
        if glast is not None:
            outs.append(last)
            cots.append(glast)
        grads = iter(torch.autograd.grad(outs, live, cots, allow_unused=True))
    return (*(None if t is None else next(grads) for t in inputs), None, None)


_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


@register_macs("kernels::selective_scan")
def _selective_scan_macs(input_shapes, output_shapes) -> float:
    batch, Dm, L = input_shapes[0]
    N = input_shapes[2][1]
    extra = (input_shapes[5] is not None) + (input_shapes[6] is not None)   # D skip, z gate
    return batch * Dm * L * (4 * N + 1 + extra)


def _check(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3 or delta.shape != u.shape or A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"selective_scan expects u, delta (B, D, L) and A (D, N); got u {tuple(u.shape)}, "
                         f"delta {tuple(delta.shape)}, A {tuple(A.shape)}")
    batch, Dm, L = u.shape
    N = A.shape[1]
    groups = []
    for name, t in (("B", B), ("C", C)):
        ok = t.dim() in (3, 4) and t.shape[0] == batch and tuple(t.shape[-2:]) == (N, L)
        if not ok or (t.dim() == 4 and Dm % t.shape[1] != 0):
            raise ValueError(f"selective_scan expects {name} of shape (B, N, L) or (B, G, N, L) with G dividing "
                             f"D = {Dm} (batch {batch}, N {N}, L {L}); got {tuple(t.shape)}")
        groups.append(1 if t.dim() == 3 else t.shape[1])
    if groups[0] != groups[1]:
        raise ValueError(f"selective_scan expects B and C with the same number of groups; got {groups}")
    for name, t, shape in (("D", D, (Dm,)), ("z", z, tuple(u.shape)), ("delta_bias", delta_bias, (Dm,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_scan expects {name} of shape {shape}; got {tuple(t.shape)}")
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"selective_scan input {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"selective_scan inputs must share one device: {name} is on {t.device}, u on {u.device}")


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, impl: str = "auto"
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective scan (see the module docstring): y (B, D, L) in u's dtype, or (y, last_state (B, D, N))
    with ``return_last_state``."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    impl = resolve_scan_impl(impl, u)
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        y, last = torch.ops.kernels.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, impl)
        return (y, last) if return_last_state else y
    return _IMPL_FNS[impl](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
