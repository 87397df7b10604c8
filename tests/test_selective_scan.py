"""Selective scan (backbones.kernels.selective_scan): the chunked PyTorch scan and the Triton kernels (interpreted
on CPU) against the token-by-token float64 reference, forward (y and last state) and gradients of every input.

Errors are norm-wise, max|x - ref| / max|ref| (a gradient that is exactly 0 in exact arithmetic, e.g. dA at L = 1,
is measured against 1e-6 instead). The torch path in float64 must agree to 1e-10; fp32 paths (inputs rounded to
fp32, the reference in float64 on the same values) to 1e-5 forward and 1e-4 for gradients and the last state. The
CUDA paths (mamba_ssm, Triton on CUDA) are compared with the reference in tests/test_gpu.py. The torch path's
blocks (batch x channels) and its hand-written backward are tested with tiny blocks (a monkeypatched BLOCK_ELEMS).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones.kernels import selective_scan
from backbones.kernels.selective_scan import (
    DEFAULT_CHUNK,
    resolve_scan_impl,
    selective_scan_reference,
    selective_scan_torch,
)
from bench.flops import gmacs_by_operator

REPO = Path(__file__).resolve().parents[1]
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
F64_TOL = 1e-10
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_inputs(batch: int, Dm: int, N: int, L: int, groups: int = 0, kind: str = "normal", use: str = "Dzb",
                softplus: bool = True, seed: int = 0) -> list[torch.Tensor | None]:
    """fp32 [u, delta, A, B, C, D, z, delta_bias] as Mamba/Vim feed them, None for the optional inputs not named in
    ``use`` ("D", "z", "b" = delta_bias). A = -(1..N) times a per-channel factor in [0.5, 1.5] (S4D-real init);
    delta_bias from dt0 in [1e-3, 0.1] (log-uniform, Mamba's dt init). ``groups`` 0: B, C (batch, N, L), else
    (batch, groups, N, L). ``kind`` sets dt (the step after bias and softplus):
      normal  model-like: raw delta ~ N(0, 0.25) through softplus (without softplus: |N(0, 0.01)| + dt0)
      tiny    dt in [1e-6, 1e-4] (log-uniform): decays ~ 1, the state integrates the whole sequence
      huge    dt in [10, 1e3]: dt A in [-2.4e4, -5], decays underflow to 0 or nearly
      mixed   dt in [1e-6, 1e3] per token: both regimes interleaved (dt A < -50 on many tokens)
    For the extreme kinds with ``softplus`` the raw delta is softplus^-1(dt) (down to -13.8; dt itself above 20)
    and delta_bias is 0."""
    g = torch.Generator().manual_seed(seed)
    A = -torch.arange(1, N + 1, dtype=torch.float32) * (0.5 + torch.rand(Dm, 1, generator=g))
    shape = (batch, N, L) if groups == 0 else (batch, groups, N, L)
    u = torch.randn(batch, Dm, L, generator=g)
    B, C = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    D, z = torch.randn(Dm, generator=g), torch.randn(batch, Dm, L, generator=g)
    dt0 = torch.exp(torch.empty(Dm).uniform_(math.log(1e-3), math.log(0.1), generator=g))
    r = torch.rand(batch, Dm, L, generator=g, dtype=torch.float64)
    if kind == "normal" and softplus:
        delta, bias = torch.randn(batch, Dm, L, generator=g) * 0.5, dt0 + torch.log(-torch.expm1(-dt0))
    elif kind == "normal":
        delta, bias = (torch.randn(batch, Dm, L, generator=g) * 0.1).abs(), dt0
    else:
        lo, hi = {"tiny": (-6, -4), "huge": (1, 3), "mixed": (-6, 3)}[kind]
        dt = 10 ** (lo + (hi - lo) * r)
        delta = (torch.where(dt > 20, dt, torch.log(torch.expm1(dt))) if softplus else dt).float()
        bias = torch.zeros(Dm)
    keep = {"D": "D" in use, "z": "z" in use, "delta_bias": "b" in use}
    return [x if keep.get(name, True) else None for name, x in zip(NAMES, [u, delta, A, B, C, D, z, bias])]


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 1e-6) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).abs().max() / max(ref.abs().max().item(), floor)).item()


def run_scan(fn, xs: list, softplus: bool, gy: torch.Tensor, glast: torch.Tensor | None):
    """(y, last state, {input name: gradient}) of fn on leaf copies of xs, cotangents gy (and glast)."""
    ins = [None if x is None else x.detach().clone().requires_grad_() for x in xs]
    y, last = fn(*ins, delta_softplus=softplus, return_last_state=True)
    live = [(name, t) for name, t in zip(NAMES, ins) if t is not None]
    outs, cots = [y], [gy.to(y.dtype)]
    if glast is not None:
        outs.append(last)
        cots.append(glast.to(last.dtype))
    grads = torch.autograd.grad(outs, [t for _, t in live], cots)
    return y, last, {name: gr for (name, _), gr in zip(live, grads)}


def reference(*args, **kw):
    return selective_scan(*args, **kw, impl="reference")


def compare(fn, xs: list, softplus: bool = True, dtype: torch.dtype = torch.float32, last_grad: bool = True,
            seed: int = 1) -> tuple[float, float, dict]:
    """(y error, last-state error, {input: gradient error}) of fn on xs in ``dtype`` against the float64 reference
    of the same (rounded) values on the same device; also checks that fn's outputs and gradients are finite, shaped
    and typed right."""
    batch, Dm, L = xs[0].shape
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(batch, Dm, L, generator=g).to(xs[0].device)
    glast = torch.randn(batch, Dm, xs[2].shape[1], generator=g).to(xs[0].device) if last_grad else None
    xs = [None if x is None else x.to(dtype) for x in xs]
    y, last, grads = run_scan(fn, xs, softplus, gy, glast)
    y64, last64, grads64 = run_scan(reference, [None if x is None else x.double() for x in xs], softplus, gy, glast)
    assert y.dtype == dtype and y.shape == xs[0].shape and last.shape == (batch, Dm, xs[2].shape[1])
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    for name, gr in grads.items():
        assert torch.isfinite(gr).all() and gr.shape == xs[NAMES.index(name)].shape, name
    assert torch.isfinite(y64).all() and all(torch.isfinite(gr).all() for gr in grads64.values())
    return rel_err(y, y64), rel_err(last, last64), {name: rel_err(grads[name], grads64[name]) for name in grads}


def torch_path(*args, **kw):
    return selective_scan(*args, **kw, impl="torch")


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------
def assert_torch_path_matches_reference(xs, softplus: bool) -> None:
    """y, last state and gradients of the torch path against the float64 reference: in float64 and in float32."""
    fwd, last, grads = compare(torch_path, xs, softplus, dtype=torch.float64)
    assert max(fwd, last, *grads.values()) <= F64_TOL, (fwd, last, grads)
    fwd, last, grads = compare(torch_path, xs, softplus)
    assert fwd <= FWD_TOL, fwd
    assert max(last, *grads.values()) <= GRAD_TOL, (last, grads)


def test_reference_matches_scalar_recurrence():
    """The reference is the recurrence of mamba_ssm's selective_scan_ref, evaluated scalar by scalar in float64."""
    batch, Dm, N, L, G = 2, 4, 3, 5, 2
    u, delta, A, B, C, D, z, bias = (x.double() for x in scan_inputs(batch, Dm, N, L, groups=G))
    y, last = selective_scan_reference(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True)
    for b in range(batch):
        for d in range(Dm):
            g = d // (Dm // G)
            h = [0.0] * N
            for t in range(L):
                dt = math.log1p(math.exp(float(delta[b, d, t] + bias[d])))
                h = [math.exp(dt * float(A[d, n])) * h[n] + dt * float(B[b, g, n, t]) * float(u[b, d, t])
                     for n in range(N)]
                out = sum(float(C[b, g, n, t]) * h[n] for n in range(N)) + float(D[d]) * float(u[b, d, t])
                zt = float(z[b, d, t])
                out *= zt / (1 + math.exp(-zt))
                assert abs(float(y[b, d, t]) - out) <= 1e-13 * max(1.0, abs(out))
            assert max(abs(float(last[b, d, n]) - h[n]) for n in range(N)) <= 1e-13


# --------------------------------------------------------------------------------------------------------------
# PyTorch chunked scan
# --------------------------------------------------------------------------------------------------------------
# (batch, D, N, L, groups, use, softplus): L = 1, L < chunk, L = 300 (not a multiple of the chunk 32), groups of B/C,
# every combination of D / z / delta_bias present or not, with and without softplus.
TORCH_CASES = [(2, 3, 4, 1, 0, "Dzb", True), (2, 4, 3, 7, 2, "", False), (1, 5, 4, 300, 0, "Dzb", True),
               (2, 6, 5, 64, 3, "D", True), (1, 4, 16, 33, 0, "zb", False), (2, 2, 1, 45, 1, "Db", True),
               (1, 3, 2, 97, 0, "z", False)]


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: "-".join(map(str, c)))
def test_torch_path_float64_matches_reference(case):
    batch, Dm, N, L, groups, use, softplus = case
    xs = scan_inputs(batch, Dm, N, L, groups, use=use, softplus=softplus)
    fwd, last, grads = compare(torch_path, xs, softplus, dtype=torch.float64)
    assert max(fwd, last, *grads.values()) <= F64_TOL, (fwd, last, grads)
    assert set(grads) == {"u", "delta", "A", "B", "C"} | {n for c, n in zip("Dzb", NAMES[5:]) if c in use}


@pytest.mark.parametrize("case", TORCH_CASES[:4], ids=lambda c: "-".join(map(str, c)))
def test_torch_path_fp32_matches_reference(case):
    batch, Dm, N, L, groups, use, softplus = case
    fwd, last, grads = compare(torch_path, scan_inputs(batch, Dm, N, L, groups, use=use, softplus=softplus), softplus)
    assert fwd <= FWD_TOL, fwd
    assert max(last, *grads.values()) <= GRAD_TOL, (last, grads)


@pytest.mark.parametrize("chunk", [1, 3, 8, 32, 64, 512])
def test_torch_path_independent_of_chunking(chunk):
    """Any chunk length (padded last chunk, one chunk longer than L, chunks of one token) gives the same scan."""
    xs = [x.double() for x in scan_inputs(2, 3, 4, 100, kind="mixed")]
    y, last = selective_scan_torch(*xs, delta_softplus=True, return_last_state=True, chunk=chunk)
    y_ref, last_ref = selective_scan_reference(*xs, delta_softplus=True, return_last_state=True)
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(last, last_ref) <= 1e-12


@pytest.mark.parametrize("kind", ["tiny", "huge", "mixed"])
@pytest.mark.parametrize("softplus", [False, True])
def test_torch_path_extreme_dt(kind, softplus):
    """dt from 1e-6 to 1e3 (dt A down to -2.4e4 per step): finite, and equal to the reference in fp64 and fp32."""
    xs = scan_inputs(1, 3, 4, 300, kind=kind, softplus=softplus)
    dt = torch.nn.functional.softplus(xs[1]) if softplus else xs[1]
    dtA = dt[..., None] * xs[2][None, :, None, :]                 # (batch, D, L, N)
    if kind != "tiny":  # the naive in-chunk cumsum form exp(-cumsum(dt A)) would overflow fp32 within one chunk
        assert dtA.min() < -50 and torch.isinf(torch.exp(-dtA[:, :, :DEFAULT_CHUNK].cumsum(2))).any()
    assert_torch_path_matches_reference(xs, softplus)


def test_return_last_state_and_dtypes():
    xs = scan_inputs(2, 4, 3, 40)
    y_only = selective_scan(*xs, delta_softplus=True)
    y, last = selective_scan(*xs, delta_softplus=True, return_last_state=True)
    assert isinstance(y_only, torch.Tensor) and torch.equal(y_only, y)
    assert y.dtype == torch.float32 and last.dtype == torch.float32 and last.shape == (2, 4, 3)
    # bf16 activations (A, D, delta_bias fp32, as Vim passes them under autocast): y in bf16, state in fp32
    xb = [x.bfloat16() if name in ("u", "delta", "B", "C", "z") else x for name, x in zip(NAMES, xs)]
    yb, lastb = selective_scan(*xb, delta_softplus=True, return_last_state=True)
    y64 = selective_scan_reference(*(x.double() for x in xb), delta_softplus=True)
    assert yb.dtype == torch.bfloat16 and lastb.dtype == torch.float32
    assert rel_err(yb, y64) <= 8e-3


def test_torch_path_ignores_autocast():
    """Under (CPU) bf16 autocast the scan still accumulates in fp32: same result as without autocast."""
    xs = scan_inputs(2, 4, 3, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan(*xs, delta_softplus=True)
    assert y.dtype == torch.float32 and torch.equal(y, selective_scan(*xs, delta_softplus=True))


def test_variable_bc_forms_agree():
    """B, C (batch, N, L) == (batch, 1, N, L) == G groups holding identical copies; gradients keep their shape."""
    u, delta, A, B, C, D, z, bias = scan_inputs(2, 6, 3, 20)
    y3 = selective_scan(u, delta, A, B, C, D, z, bias, True)
    y4 = selective_scan(u, delta, A, B[:, None], C[:, None], D, z, bias, True)
    yg = selective_scan(u, delta, A, B[:, None].expand(2, 3, 3, 20), C[:, None].expand(2, 3, 3, 20), D, z, bias, True)
    assert torch.equal(y3, y4) and rel_err(yg, y3) <= 1e-6
    Bl = B.clone().requires_grad_()
    selective_scan(u, delta, A, Bl, C, D, z, bias, True).sum().backward()
    assert Bl.grad.shape == B.shape


def test_dispatch_and_errors():
    xs = scan_inputs(1, 4, 3, 8)
    assert resolve_scan_impl("auto", xs[0]) == "torch"
    assert torch.equal(selective_scan(*xs, delta_softplus=True), selective_scan(*xs, delta_softplus=True, impl="torch"))
    with pytest.raises(ValueError, match="unknown selective_scan impl"):
        selective_scan(*xs, impl="fast")
    with pytest.raises((RuntimeError, ValueError), match="mamba_ssm|CUDA tensors"):
        selective_scan(*xs, impl="cuda")  # no package here, or not a CUDA tensor
    u, delta, A, B, C, D, z, bias = xs
    with pytest.raises(ValueError, match="same number of groups"):
        selective_scan(u, delta, A, B[:, None].expand(1, 2, 3, 8), C)
    with pytest.raises(ValueError, match="G dividing"):
        selective_scan(u, delta, A, B[:, None].expand(1, 3, 3, 8), C[:, None].expand(1, 3, 3, 8))
    with pytest.raises(ValueError, match="of shape \\(B, N, L\\)"):
        selective_scan(u, delta, A, B[..., :4], C)
    with pytest.raises(ValueError, match="delta_bias"):
        selective_scan(u, delta, A, B, C, delta_bias=bias[:2])
    with pytest.raises(TypeError, match="floating-point"):
        selective_scan(u, delta, A, B.long(), C)


# --------------------------------------------------------------------------------------------------------------
# The torch path's blocks and hand-written backward. Tiny blocks (a few (batch, channel) pairs) exercise batch and
# channel blocking, ragged last blocks and blocks inside the groups of B/C.
# --------------------------------------------------------------------------------------------------------------
SCAN_MODULE = sys.modules[selective_scan_torch.__module__]


def set_block_pairs(monkeypatch, pairs: int, N: int, L: int, chunk: int = DEFAULT_CHUNK) -> None:
    """Blocks of at most ``pairs`` (batch element, channel) pairs for sequences of L tokens."""
    rows = -(-L // chunk) * chunk + 1
    monkeypatch.setattr(SCAN_MODULE, "BLOCK_ELEMS", pairs * rows * N)


def block_count(batch: int, Dm: int, G: int, N: int, L: int) -> int:
    return len(SCAN_MODULE._blocks(batch, Dm, G, (-(-L // DEFAULT_CHUNK) * DEFAULT_CHUNK + 1) * N,
                                   SCAN_MODULE.BLOCK_ELEMS))


# (batch, D, N, L, groups, use, softplus, pairs): blocks of 1 x 2 channels in 2 groups (12 blocks; L = 13, not a
# multiple of the chunk); batch blocks of 2, 2 and 1 in 3 groups, no option; L = 1, channel blocks of 3 and 2; one
# pair per block in 4 groups; blocks of 2 batch elements x 6 channels.
BLOCKED_CASES = [(3, 8, 4, 13, 2, "Dzb", True, 2), (5, 6, 3, 9, 3, "", False, 4), (2, 5, 4, 1, 0, "Db", True, 3),
                 (4, 12, 5, 21, 4, "z", False, 1), (4, 6, 2, 30, 0, "Dzb", False, 12)]


@pytest.mark.parametrize("case", BLOCKED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_torch_path_blocks_match_reference(monkeypatch, case):
    """y, the last state and the gradients of all inputs (with a cotangent on the last state) equal the float64
    reference's, in float64 to 1e-10 and in fp32 to the fp32 tolerances."""
    batch, Dm, N, L, groups, use, softplus, pairs = case
    set_block_pairs(monkeypatch, pairs, N, L)
    assert block_count(batch, Dm, max(groups, 1), N, L) > max(groups, 1)
    xs = scan_inputs(batch, Dm, N, L, groups, use=use, softplus=softplus)
    fwd, last, grads = compare(torch_path, xs, softplus, dtype=torch.float64)
    assert max(fwd, last, *grads.values()) <= F64_TOL, (fwd, last, grads)
    assert set(grads) == {"u", "delta", "A", "B", "C"} | {n for c, n in zip("Dzb", NAMES[5:]) if c in use}
    fwd, last, grads = compare(torch_path, xs, softplus)
    assert fwd <= FWD_TOL, fwd
    assert max(last, *grads.values()) <= GRAD_TOL, (last, grads)


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_torch_path_backward_independent_of_chunking(monkeypatch, chunk):
    """Forward and backward with chunks of one token, of 3 (not a power of 2: uneven Hillis-Steele slices), 8 and
    one chunk longer than L, in blocks, against the reference."""
    set_block_pairs(monkeypatch, 3, 4, 50, chunk)
    xs = scan_inputs(2, 4, 4, 50, groups=2, kind="mixed")

    def fn(*a, **kw):
        return selective_scan_torch(*a, **kw, chunk=chunk)

    fwd, last, grads = compare(fn, xs, True, dtype=torch.float64)
    assert max(fwd, last, *grads.values()) <= F64_TOL, (fwd, last, grads)


@pytest.mark.parametrize("kind", ["tiny", "huge", "mixed"])
def test_torch_path_blocks_extreme_dt(monkeypatch, kind):
    """dt from 1e-6 to 1e3 (dt A below -1e4) in blocks of one (batch, channel) pair: the adjoint's reverse scan
    multiplies only decays in [0, 1] too, so the gradients stay finite and exact."""
    set_block_pairs(monkeypatch, 1, 16, 200)
    xs = scan_inputs(2, 2, 16, 200, kind=kind)
    dt = torch.nn.functional.softplus(xs[1])
    dtA = dt[..., None] * xs[2][None, :, None, :]
    assert dtA.min() < -1e4 if kind != "tiny" else dt.max() < 1e-3
    assert_torch_path_matches_reference(xs, True)


def test_torch_path_gradient_dtypes_and_missing_cotangents():
    """bf16 activations: gradients in each input's dtype, close to the float64 reference of the same values; only
    y or only the last state used: the other cotangent counts as zero."""
    xs = scan_inputs(2, 4, 3, 20)
    xb = [x.bfloat16() if name in ("u", "delta", "B", "C", "z") else x for name, x in zip(NAMES, xs)]
    ins = [x.clone().requires_grad_() for x in xb]
    gy = torch.randn(2, 4, 20, generator=torch.Generator().manual_seed(2))
    torch.autograd.backward(selective_scan(*ins, delta_softplus=True, impl="torch"), gy.bfloat16())
    ref = [x.double().requires_grad_() for x in xb]
    torch.autograd.backward(selective_scan_reference(*ref, delta_softplus=True), gy.double())
    for name, x, r in zip(NAMES, ins, ref):
        assert x.grad.dtype == x.dtype and rel_err(x.grad, r.grad) <= 1e-2, name
    # the last state alone: equal to the gradient of (y, last) with a zero cotangent on y, and vice versa
    xs64 = [x.double() for x in xs]
    glast = torch.randn(2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for outs_used in ("last", "y"):
        a = [x.clone().requires_grad_() for x in xs64]
        y, last = selective_scan_torch(*a, delta_softplus=True, return_last_state=True)
        out, cot = (last, glast) if outs_used == "last" else (y, gy.double())
        got = torch.autograd.grad(out, a, cot)
        full = torch.autograd.grad(selective_scan_torch(*a, delta_softplus=True, return_last_state=True),
                                   a, [cot if outs_used == "y" else torch.zeros_like(y),
                                       cot if outs_used == "last" else torch.zeros_like(last)])
        assert all(torch.equal(g, f) for g, f in zip(got, full)), outs_used


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_torch_path_saves_only_its_inputs(impl):
    """Autograd keeps only the inputs for the torch path's backward (the states are recomputed block by block);
    the reference, differentiated by autograd, keeps (batch, D, L, N) tensors: far more than its inputs."""
    xs = scan_inputs(4, 8, 16, 40)
    ins = [x.clone().requires_grad_() for x in xs]
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, last = selective_scan(*ins, delta_softplus=True, return_last_state=True, impl=impl)
    input_bytes = sum(x.numel() * x.element_size() for x in ins)
    if impl == "torch":
        assert 0 < sum(saved) <= input_bytes, (saved, input_bytes)
    else:
        assert sum(saved) > 4 * input_bytes
    (y.sum() + last.sum()).backward()
    assert all(x.grad is not None for x in ins)


# --------------------------------------------------------------------------------------------------------------
# Custom op: values, gradients (incl. the last state's), tracing and the MAC count
# --------------------------------------------------------------------------------------------------------------
def test_custom_op_matches_eager():
    xs = [x.double() for x in scan_inputs(2, 4, 3, 37, use="Dzb")]
    g = torch.Generator().manual_seed(3)
    gy, glast = torch.randn(2, 4, 37, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, generator=g,
                                                                                      dtype=torch.float64)

    def op(*a, delta_softplus, return_last_state):
        return torch.ops.kernels.selective_scan(*a, delta_softplus, "torch")

    y_op, last_op, g_op = run_scan(op, xs, True, gy, glast)
    y, last, g_eager = run_scan(torch_path, xs, True, gy, glast)
    assert torch.equal(y_op, y) and torch.equal(last_op, last)
    assert all(torch.equal(g_op[n], g_eager[n]) for n in g_eager)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    leaves = [x.clone().requires_grad_() for x in xs]
    torch.library.opcheck(torch.ops.kernels.selective_scan.default, (*leaves, True, "torch"), test_utils=checks)
    torch.library.opcheck(torch.ops.kernels.selective_scan.default, (*leaves[:5], None, None, None, False, "torch"),
                          test_utils=checks)


def test_custom_op_torch_backward_op_and_compile():
    """For impl "torch" the custom op's backward is one opaque op, kernels::selective_scan_torch_backward (torch.compile
    records one node instead of tracing every block); its schema and fake tensors check out, and gradients through
    torch.compile equal the eager ones."""
    xs = [x.double() for x in scan_inputs(2, 4, 3, 21, groups=2)]
    g = torch.Generator().manual_seed(4)
    gy = torch.randn(2, 4, 21, generator=g, dtype=torch.float64)
    glast = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    bwd = torch.ops.kernels.selective_scan_torch_backward.default
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(bwd, (*xs, gy, glast, True), test_utils=checks)
    torch.library.opcheck(bwd, (*xs[:5], None, None, None, gy, None, False), test_utils=checks)

    def loss(*a):
        y, last = selective_scan(*a, delta_softplus=True, return_last_state=True)
        return (y * gy).sum() + (last * glast).sum()

    ins = [x.clone().requires_grad_() for x in xs]
    eager = torch.autograd.grad(loss(*ins), ins)
    compiled = torch.autograd.grad(torch.compile(loss, backend="aot_eager")(*ins), ins)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))


class _ScanMixer(torch.nn.Module):
    """x (1, 2, 8, 8) -> D = 8 channels of L = 16 tokens through a selective scan with N = 5 (B, C from x)."""

    def __init__(self, with_D: bool, with_z: bool):
        super().__init__()
        self.A = torch.nn.Parameter(-torch.rand(8, 5) - 0.5)
        self.D = torch.nn.Parameter(torch.ones(8)) if with_D else None
        self.with_z = with_z

    def forward(self, x, t, y):
        s = x.reshape(1, 8, 16)
        out = selective_scan(s, s.sigmoid(), self.A, s[:, :5], s[:, 3:], self.D, s.cos() if self.with_z else None,
                             delta_softplus=True)
        return out.reshape(1, 2, 8, 8)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("with_D,with_z", [(True, True), (False, False), (True, False)])
def test_flops_formula(with_D, with_z):
    """One ``kernels::selective_scan`` node in the traced graph, counted as B * D * L * (4 N + 1 + [D] + [z])."""
    mixer = _ScanMixer(with_D, with_z)
    args = (torch.randn(1, 2, 8, 8), torch.zeros(1), torch.zeros(1))
    traced = torch.jit.trace(mixer, args)
    assert "kernels::selective_scan" in str(traced.graph)
    assert torch.equal(traced(*args), mixer(*args))
    by_op = gmacs_by_operator(mixer, 8, 2)
    assert by_op == {"selective_scan": pytest.approx(1 * 8 * 16 * (4 * 5 + 1 + with_D + with_z) / 1e9, rel=1e-12)}


# --------------------------------------------------------------------------------------------------------------
# Long sequences
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["normal", "tiny", "mixed"])
def test_torch_path_long_sequence(kind):
    xs = scan_inputs(1, 3, 4, 4096, kind=kind)
    fwd, last, grads = compare(torch_path, xs, dtype=torch.float64)
    assert max(fwd, last, *grads.values()) <= F64_TOL, (fwd, last, grads)
    fwd, last, grads = compare(torch_path, xs)
    assert fwd <= FWD_TOL, fwd
    assert max(last, *grads.values()) <= GRAD_TOL, (last, grads)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels, interpreted on CPU. TRITON_INTERPRET is read when @triton.jit decorates the kernels, i.e. when
# backbones.kernels.selective_scan_triton is first imported; a subprocess keeps that switch out of this session.
# --------------------------------------------------------------------------------------------------------------
_TRITON_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
from test_selective_scan import NAMES, compare, rel_err, scan_inputs
from backbones.kernels import selective_scan
from backbones.kernels.selective_scan import selective_scan_reference
def triton_path(*a, **kw):
    return selective_scan(*a, **kw, impl="triton")
def op_route(*a, delta_softplus, return_last_state):  # op forward, then the op's backward recomputing the kernels
    return torch.ops.kernels.selective_scan(*a, delta_softplus, "triton")
out = {{}}
for batch, Dm, N, L, groups, kind, use, softplus, route in json.loads(sys.argv[1]):
    key = "-".join(map(str, (batch, Dm, N, L, groups, kind, use, softplus, route)))
    xs = scan_inputs(batch, Dm, N, L, groups, kind, use, softplus)
    if route == "bf16":
        xb = [x if x is None or name in ("A", "D", "delta_bias") else x.bfloat16() for name, x in zip(NAMES, xs)]
        y, last = triton_path(*xb, delta_softplus=softplus, return_last_state=True)
        y64, last64 = selective_scan_reference(*(x if x is None else x.double() for x in xb),
                                               delta_softplus=softplus, return_last_state=True)
        out[key] = [str(y.dtype), str(last.dtype), rel_err(y, y64), rel_err(last, last64)]
        continue
    fn = op_route if route == "op" else triton_path
    out[key] = compare(fn, xs, softplus, last_grad=route != "nolast")
print("RESULT" + json.dumps(out))
"""

# (batch, D, N, L, groups, kind, use, softplus, route): every option, groups (3 groups of 2 channels: 6 programs per
# batch element), N not a power of 2, 40 channels (two blocks of 32, the second masked), extreme dt with and without
# softplus, the custom-op route, no cotangent on the last state, bf16 activations.
FAST_TRITON_CASES = [(1, 6, 5, 17, 0, "normal", "Dzb", True, "fn"), (1, 6, 3, 9, 3, "normal", "", False, "fn"),
                     (1, 40, 16, 4, 0, "normal", "Dzb", True, "nolast"), (1, 3, 4, 100, 0, "mixed", "D", False, "fn"),
                     (1, 2, 4, 16, 0, "mixed", "zb", True, "fn"), (1, 2, 3, 12, 0, "huge", "z", True, "fn"),
                     (1, 2, 3, 12, 0, "tiny", "b", False, "fn"), (1, 4, 3, 6, 2, "normal", "Dz", True, "op"),
                     (1, 4, 4, 16, 0, "normal", "Dzb", True, "bf16")]
SLOW_TRITON_CASES = [(1, 3, 4, 300, 0, "normal", "Dzb", True, "fn"), (1, 2, 4, 300, 0, "mixed", "Dzb", True, "fn"),
                     (1, 2, 4, 1024, 0, "tiny", "D", False, "fn"), (2, 64, 16, 64, 2, "normal", "Dzb", True, "fn")]


def run_triton_cases(cases) -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _TRITON_SCRIPT.format(tests=str(REPO / "tests")),
                           json.dumps(cases)], env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def case_key(case) -> str:
    return "-".join(map(str, case))


@pytest.fixture(scope="module")
def triton_fast_results():
    return run_triton_cases(FAST_TRITON_CASES)


def check_triton_result(case, result) -> None:
    if case[-1] == "bf16":
        y_dtype, last_dtype, fwd, last = result
        assert (y_dtype, last_dtype) == ("torch.bfloat16", "torch.float32")
        assert fwd <= 8e-3 and last <= GRAD_TOL, (fwd, last)
        return
    fwd, last, grads = result
    use = case[6]
    assert set(grads) == {"u", "delta", "A", "B", "C"} | {n for c, n in zip("Dzb", NAMES[5:]) if c in use}
    assert fwd <= FWD_TOL, fwd
    assert max(last, *grads.values()) <= GRAD_TOL, (last, grads)


@pytest.mark.parametrize("case", FAST_TRITON_CASES, ids=case_key)
def test_triton_kernels_interpreted(triton_fast_results, case):
    check_triton_result(case, triton_fast_results[case_key(case)])


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from backbones.kernels import selective_scan_triton as m
for fn in (m._selective_scan_fwd_kernel, m._selective_scan_bwd_kernel):
    for on in (True, False):
        consts = dict(HAS_D=on, HAS_Z=on, HAS_BIAS=on, SOFTPLUS=on, HAS_GLAST=on, BLOCK_H=32, BLOCK_N=16)
        consts = {{k: v for k, v in consts.items() if k in fn.arg_names}}
        act = "*bf16" if on else "*fp32"  # bf16 activations, fp32 parameters and outputs
        sig = {{a: "constexpr" if a in consts else ("i32" if not a.endswith("_ptr") else
               act if a in ("u_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr") else "*fp32") for a in fn.arg_names}}
        src = ASTSource(fn=fn, signature=sig, constexprs={{(fn.arg_names.index(k),): v for k, v in consts.items()}})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={{"num_warps": 4}})
        assert ".local" not in kernel.asm["ptx"], "register spills"
print("COMPILED")
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_cuda(tmp_path):
    """Without a GPU: the kernels lower through Triton and ptxas to sm_90 code (the interpreter checks no typing or
    layout rules of the compiler), with and without every optional input, without spilling registers."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO), TRITON_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT.format()], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0 and "COMPILED" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_triton_kernels_interpreted_long_sequences():
    results = run_triton_cases(SLOW_TRITON_CASES)
    for case in SLOW_TRITON_CASES:
        check_triton_result(case, results[case_key(case)])


def test_chunk_grows_with_the_sequence_to_bound_the_carry_loop():
    """The README's reading of the bi_mamba token row: 16-token chunks at T = 1024, 256 at 16384 (log2(chunk)
    Hillis-Steele passes: 4 and 8), never more than MAX_CHUNKS chunks."""
    from backbones.kernels.selective_scan import MAX_CHUNKS, _default_chunk

    assert [_default_chunk(L) for L in (64, 256, 1024, 4096, 16384)] == [4, 4, 16, 64, 256]
    assert all(-(-L // _default_chunk(L)) <= MAX_CHUNKS for L in range(1, 20000, 37))
