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
    "torch"      chunked parallel scan, O(L) work, no Python loop over tokens (design below). Differentiable by
                 autograd; memory O(B D L N): autograd keeps about 3 log2(chunk) + 3 fp32 tensors of B*D*L*N
                 elements (12 at the default chunk of 8; the custom op's route keeps only the inputs).
    "triton"     Triton kernels (``selective_scan_triton``): forward = one program per (batch, group, block of
                 channels), sequential over L with the (channels x N) state in registers, fp32 accumulation;
                 backward = a Triton reverse scan (recomputes the states into a transient fp32 (B, D, L, N)
                 buffer, then runs the adjoint recurrence backwards). CUDA, or CPU under TRITON_INTERPRET=1.
    "cuda"       mamba_ssm's ``selective_scan_fn`` (imported lazily; CUDA tensors; no fp64).
    "auto"       "cuda" when mamba_ssm is importable and the tensors are on CUDA (not fp64), else "triton" on CUDA,
                 else "torch".

Chunked scan ("torch"). The recurrence is the composition of affine maps h -> a_l h + x_l with a_l = exp(dt_l A)
in (0, 1] (A < 0 as in Mamba) and x_l = dt_l B_l u_l. The sequence is cut into chunks of ``chunk`` tokens (the
last padded with identity maps a = 1, x = 0). Inside every chunk a Hillis-Steele scan composes the maps in
log2(chunk) vectorised steps (x_l += a_l x_{l-k}, a_l *= a_{l-k} for k = 1, 2, 4, ...), giving each token's state
from a zero start and its in-chunk decay product; a short Python loop over the L/chunk chunks then carries the
state across chunk boundaries (h = x + a * h_start). Stability: only products of factors in [0, 1] and sums appear,
never exp(-cumsum(dt A)) or a division, so nothing overflows for any dt (dt A = -1e4 underflows the decay to an
exact 0 and the state simply restarts, as in the recurrence); rounding error grows like log2(chunk) products, not
with the span of the decays (the cumsum form exp(s_l) * cumsum(exp(-s_j) x_j) overflows as soon as one chunk
decays by more than ~88 in fp32, e.g. two steps of dt A = -50).

FLOPs: the op is the custom operator ``kernels::selective_scan`` (one node under torch.jit.trace, as fvcore traces
it, or torch.compile), counted as B * D * L * (4 N + 1 + [D given] + [z given]) MACs: per (b, d, l, n) the decay
argument dt * A (1), the input (dt u) * B (1), the update a h + x (1) and the readout C h (1); per (b, d, l) the
product dt * u (1), the skip D u (1) and the gate y * silu(z) (1). exp, softplus, silu and the bias add are free,
as elementwise ops are under ``bench.flops``' convention. Eagerly the implementation is called directly; the custom
op's autograd recomputes the implementation in its backward (activation checkpointing of the op).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..opcount import register_macs

__all__ = ["selective_scan", "selective_scan_reference", "selective_scan_torch", "resolve_scan_impl", "SCAN_IMPLS"]

SCAN_IMPLS = ("auto", "reference", "torch", "triton", "cuda")
Tensor = torch.Tensor
ScanOut = Tensor | tuple[Tensor, Tensor]
DEFAULT_CHUNK = 8  # fastest on CPU in our measurements; saved memory grows with log2(chunk)


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


def _chunk_scan(a: torch.Tensor, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """States of h_l = a_l h_{l-1} + x_l (h_{-1} = 0) along the last axis, and the last state."""
    L = a.shape[-1]
    pad = -L % chunk
    if pad:  # identity maps: the padded tail leaves the state unchanged
        a, x = F.pad(a, (0, pad), value=1.0), F.pad(x, (0, pad))
    a = a.unflatten(-1, (-1, chunk))
    x = x.unflatten(-1, (-1, chunk))
    k = 1
    while k < chunk:  # Hillis-Steele: after the step of shift k, each token has composed the last 2k maps
        x = x + a * F.pad(x[..., :-k], (k, 0))
        a = a * F.pad(a[..., :-k], (k, 0), value=1.0)
        k *= 2
    h = x.new_zeros(x.shape[:-2])
    starts = []
    # carry across chunks: L / chunk small steps on (..., N) states; unbind once (indexing x[..., c, -1] in the
    # loop would make autograd materialise a full-size gradient per chunk)
    for x_end, a_end in zip(x[..., -1].unbind(-1), a[..., -1].unbind(-1)):
        starts.append(h)
        h = x_end + a_end * h
    states = x + a * torch.stack(starts, dim=-1)[..., None]
    return states.flatten(-2)[..., :L], h


def selective_scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                         z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                         return_last_state: bool = False, chunk: int = DEFAULT_CHUNK) -> ScanOut:
    """Chunked parallel scan (module docstring); differentiable by autograd."""
    cdt, uc, dt, A, B, C = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    batch, Dm, L = uc.shape
    G, N = B.shape[1], A.shape[1]
    # channels as (G, heads): B and C broadcast over the heads of their group without copies
    dt5 = dt.view(batch, G, Dm // G, 1, L)
    a = torch.exp(dt5 * A.view(1, G, Dm // G, N, 1))                          # (batch, G, H, N, L)
    x = (dt5 * uc.view(batch, G, Dm // G, 1, L)) * B[:, :, None]
    states, last = _chunk_scan(a, x, chunk)
    with _no_autocast(uc.device):  # autocast would run the readout's matmul in bf16/fp16
        y = torch.einsum("bghnl,bgnl->bghl", states, C).reshape(batch, Dm, L).contiguous()
    y = _finish(y, uc, D, z, u.dtype)
    return (y, last.reshape(batch, Dm, N)) if return_last_state else y


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


def _setup_context(ctx, inputs, output) -> None:
    *tensors, delta_softplus, impl = inputs
    ctx.save_for_backward(*tensors)
    ctx.delta_softplus, ctx.impl = delta_softplus, impl


def _backward(ctx, gy: torch.Tensor, glast: torch.Tensor | None):
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
