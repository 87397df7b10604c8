"""Bi-WKV: PyTorch O(T*C) path and Triton kernels (interpreted on CPU) against the dense float64 reference.

Errors are norm-wise: max|x - ref| / max|ref| (forward <= 1e-5, gradients <= 1e-4 in fp32). Gradients that are
exactly zero in exact arithmetic (dw at T <= 2; dw, du, dk at T = 1) are measured against their natural scale
max|dL/dy| * max(1, max|v|) times 1e-2 instead of their own (zero) maximum.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_inputs

from backbones.kernels import bi_wkv, bi_wkv_reference, bi_wkv_torch, resolve_impl, wkv_torch
from backbones.kernels.wkv_torch import default_chunk
from backbones.opcount import OP_MACS

REPO = Path(__file__).resolve().parents[1]
FWD_TOL, GRAD_TOL = 1e-5, 1e-4




def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    return ((x.double() - ref.double()).abs().max() / max(ref.double().abs().max().item(), floor)).item()


def check_against_reference(fn, T, B, C, kind, seed=0):
    """(forward error, [errors of dw, du, dk, dv]) of fn (fp32) against the float64 reference."""
    w, u, k, v = make_inputs(T, B, C, kind, seed)
    gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed + 1))
    xs = [x.clone().requires_grad_() for x in (w, u, k, v)]
    y = fn(*xs)
    grads = torch.autograd.grad(y, xs, gy)
    x64 = [x.double().requires_grad_() for x in (w, u, k, v)]
    y64 = bi_wkv_reference(*x64)
    grads64 = torch.autograd.grad(y64, x64, gy.double())
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    floor = 1e-2 * gy.abs().max().item() * max(1.0, v.abs().max().item())
    return rel_err(y, y64), [rel_err(g, r, floor) for g, r in zip(grads, grads64)]


# --------------------------------------------------------------------------------------------------------------
# Reference and PyTorch path
# --------------------------------------------------------------------------------------------------------------
def test_reference_matches_explicit_formula():
    """The dense reference is the paper formula, evaluated term by term in float64."""
    T, C = 5, 3
    w, u, k, v = (x.double() for x in make_inputs(T, 1, C))
    y = bi_wkv_reference(w, u, k, v)
    for c in range(C):
        for t in range(T):
            num = den = 0.0
            for i in range(T):
                e = torch.exp(u[c] + k[0, t, c]) if i == t else torch.exp(-(abs(t - i) - 1) * w[c] + k[0, i, c])
                num, den = num + e * v[0, i, c], den + e
            assert torch.allclose(y[0, t, c], num / den, rtol=1e-14, atol=0)


@pytest.mark.parametrize("T", [1, 2, 7, 64, 257, 1024])
@pytest.mark.parametrize("B,C", [(2, 5), (1, 16)])
@pytest.mark.parametrize("kind", ["normal", "large_k"])
def test_torch_path_matches_reference(T, B, C, kind):
    if T == 1024 and B * C > 5:
        C = 4  # keeps the dense float64 reference small
    fwd, grads = check_against_reference(lambda *a: bi_wkv(*a, impl="torch"), T, B, C, kind)
    assert fwd <= FWD_TOL, fwd
    assert max(grads) <= GRAD_TOL, grads


@pytest.mark.parametrize("chunk", [1, 3, 8, 40])
def test_torch_path_independent_of_chunking(chunk):
    """Carry across chunks (any chunk length, padded last chunk) gives the same result as one chunk."""
    w, u, k, v = make_inputs(37, 2, 6, "large_k")
    whole = bi_wkv_torch(w, u, k, v, chunk=37)
    assert rel_err(bi_wkv_torch(w, u, k, v, chunk=chunk), whole) <= 2e-6


def test_torch_path_strong_decay_limits_chunk():
    """|w| of order 1 (far from the model's w = D/T) shortens the chunks and stays exact, gradients included.
    (Exponents carry absolute-index terms j*w, so fp32 precision is ~eps * (max|k| + T max|w|): in the model
    T*|w| = |spatial_decay|, whatever T.)"""
    _, u, k, v = make_inputs(100, 1, 6)
    w = torch.tensor([3.0, -2.0, 0.5, -0.5, 1.5, -3.0])
    assert default_chunk(100, w) == 8
    gy = torch.randn_like(k)
    xs = [x.clone().requires_grad_() for x in (w, u, k, v)]
    x64 = [x.double().requires_grad_() for x in (w, u, k, v)]
    y, y64 = bi_wkv_torch(*xs), bi_wkv_reference(*x64)
    assert rel_err(y, y64) <= FWD_TOL
    for g, r in zip(torch.autograd.grad(y, xs, gy), torch.autograd.grad(y64, x64, gy.double())):
        assert rel_err(g, r) <= GRAD_TOL


def test_extreme_keys_stay_finite_and_shift_invariant():
    """|k| up to 1e4: no overflow or NaN, and adding a per-channel constant to k leaves y unchanged (up to the
    fp32 rounding of the shifted keys themselves)."""
    w, u, k, v = make_inputs(200, 2, 8)
    offset = torch.tensor([1e4, -1e4, 500.0, -500.0, 88.0, -88.0, 0.0, 3e3])
    y0 = bi_wkv(w, u, k, v, impl="torch")
    y1 = bi_wkv(w, u, k + offset, v, impl="torch")
    assert torch.isfinite(y1).all()
    assert rel_err(y1, y0) <= 5e-3  # k + 1e4 is only representable to ~1e-3 in fp32


def test_half_precision_accumulates_in_fp32():
    w, u, k, v = make_inputs(64, 2, 8)
    kb, vb = k.bfloat16(), v.bfloat16()
    y = bi_wkv(w, u, kb, vb, impl="torch")
    assert y.dtype == torch.bfloat16
    ref = bi_wkv_reference(w.double(), u.double(), kb.double(), vb.double())
    assert rel_err(y, ref) <= 8e-3  # bf16 rounding of the output only


def test_properties():
    w, u, k, v = make_inputs(50, 2, 4)
    # a convex combination of v: constant v is reproduced, T = 1 gives v
    assert torch.allclose(bi_wkv(w, u, k, torch.full_like(v, 2.5)), torch.full_like(v, 2.5), rtol=1e-6, atol=0)
    assert torch.allclose(bi_wkv(w, u, k[:, :1], v[:, :1]), v[:, :1], rtol=1e-6, atol=0)
    # bidirectional: reversing the sequence reverses the output
    assert rel_err(bi_wkv(w, u, k.flip(1), v.flip(1)).flip(1), bi_wkv(w, u, k, v)) <= 1e-6


def op_route(impl: str):
    """The custom-op route (taken under tracing and torch.compile): forward without graph, backward recomputes."""
    return lambda w, u, k, v: torch.ops.kernels.bi_wkv(w, u, k, v, impl)


def test_custom_op_route_equals_eager_route():
    w, u, k, v = make_inputs(33, 2, 6)
    gy = torch.randn_like(k)
    xs = [x.clone().requires_grad_() for x in (w, u, k, v)]
    y_op, y_eager = op_route("torch")(*xs), bi_wkv(*xs, impl="torch")
    assert torch.equal(y_op, y_eager)
    for a, b in zip(torch.autograd.grad(y_op, xs, gy), torch.autograd.grad(y_eager, xs, gy)):
        assert torch.equal(a, b)
    fwd, grads = check_against_reference(op_route("reference"), 9, 2, 3, "normal")
    assert fwd <= FWD_TOL and max(grads) <= GRAD_TOL  # the reference itself evaluated in fp32 here


def test_custom_op_registration():
    w, u, k, v = make_inputs(9, 2, 4)
    torch.library.opcheck(torch.ops.kernels.bi_wkv.default, (w, u, k, v, "torch"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_flop_count_of_the_op():
    """One fvcore node per call, 6.5 MACs per token and channel (13 FLOPs, Vision-RWKV Eq. 6)."""
    from bench.flops import gmacs_by_operator

    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(16))
            self.u = torch.nn.Parameter(torch.zeros(16))

        def forward(self, x, t, y):  # x (1, 1, 32, 16): T = 32 tokens, C = 16 channels
            s = x.flatten(1, 2)
            return bi_wkv(self.w, self.u, s, s).unsqueeze(1)

    assert "kernels::bi_wkv" in OP_MACS
    # gmacs_by_operator feeds x of shape (1, C_in, S, S): C_in = 2, S = 16 gives T = 32 tokens of C = 16 channels
    by_op = gmacs_by_operator(Mixer(), input_size=16, in_channels=2)
    assert by_op == {"bi_wkv": pytest.approx(6.5 * 32 * 16 / 1e9)}


def test_input_validation():
    w, u, k, v = make_inputs(8, 1, 4)
    with pytest.raises(ValueError, match="same shape"):
        bi_wkv(w, u, k, v[:, :4])
    with pytest.raises(ValueError, match=r"shape \(C,\)"):
        bi_wkv(w[:3], u, k, v)
    with pytest.raises(ValueError, match="unknown bi_wkv impl"):
        bi_wkv(w, u, k, v, impl="cuda")
    with pytest.raises(TypeError, match="floating-point"):
        bi_wkv(w, u, k.long(), v)


def test_auto_dispatch():
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("auto", torch.device("cuda")) == "triton"


# --------------------------------------------------------------------------------------------------------------
# Memory of the PyTorch path: it saves only w, u, k, v and its backward recomputes the scan per block of channels
# (wkv_torch._BLOCK_ELEMENTS elements at most). The "blocks" case forces blocks of 2 channels on small inputs (C = 5
# or 6: the last block narrower when C is odd).
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(params=["one_block", "blocks"])
def channel_blocks(request, monkeypatch):
    """Call with (B, T, C, S) before running the torch path: sets the block size (S: the chunk, T padded to it)."""

    def setup(B: int, T: int, C: int, S: int) -> None:
        if request.param == "blocks":
            monkeypatch.setattr(wkv_torch, "_BLOCK_ELEMENTS", 2 * B * (T + -T % S))
            assert len(wkv_torch._channel_blocks(B, T, C, S)) == (C + 1) // 2

    return setup


@pytest.mark.parametrize("T,chunk", [(1, None), (2, None), (7, 3), (100, 7), (257, None)])
def test_torch_float64_matches_reference_exactly(channel_blocks, T, chunk):
    """float64 values and all four gradients equal the dense reference's to rounding, with one or several channel
    blocks: T = 1, a partial last chunk (T = 7 with chunk 3; T = 100 with chunk 7; T = 257: chunk 17, 15 + 2),
    keys with per-channel offsets of +-100 and spikes of +30 (large_k: e^k overflows without max subtraction)."""
    B, C = 2, 5
    w, u, k, v = make_inputs(T, B, C, "large_k", seed=3, dtype=torch.float64)
    gy = torch.randn(B, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    channel_blocks(B, T, C, chunk or default_chunk(T, w))
    xs = [x.clone().requires_grad_() for x in (w, u, k, v)]
    y = bi_wkv(*xs, impl="torch") if chunk is None else bi_wkv_torch(*xs, chunk=chunk)
    grads = torch.autograd.grad(y, xs, gy)
    refs = [x.clone().requires_grad_() for x in (w, u, k, v)]
    y_ref = bi_wkv_reference(*refs)
    grads_ref = torch.autograd.grad(y_ref, refs, gy)
    floor = 1e-2 * gy.abs().max().item() * max(1.0, v.abs().max().item())  # for gradients that are exactly 0
    assert rel_err(y, y_ref) <= 1e-13
    errors = [rel_err(g, r, floor) for g, r in zip(grads, grads_ref)]
    assert max(errors) <= 1e-12, errors


def test_torch_gradients_of_a_subset_of_inputs(channel_blocks):
    """Only k requiring grad (w, u, v constants): the backward skips the other gradients, dk is unchanged."""
    w, u, k, v = make_inputs(40, 2, 6, "large_k", dtype=torch.float64)
    channel_blocks(2, 40, 6, default_chunk(40, w))
    gy = torch.randn_like(k)
    xs = [x.clone().requires_grad_() for x in (w, u, k, v)]
    dk_all = torch.autograd.grad(bi_wkv(*xs, impl="torch"), xs, gy)[2]
    kk = k.clone().requires_grad_()
    (dk,) = torch.autograd.grad(bi_wkv(w, u, kk, v, impl="torch"), kk, gy)
    assert rel_err(dk, dk_all) <= 1e-14


def test_torch_half_inputs_blocks(channel_blocks):
    """bf16 k, v with fp32 w, u (as under autocast): gradients in the inputs' dtypes and equal to fp32's on the same
    rounded values up to the bf16 rounding of dk, dv."""
    w, u, k, v = make_inputs(64, 2, 8)
    channel_blocks(2, 64, 8, default_chunk(64, w))
    gy = torch.randn(2, 64, 8).bfloat16()
    xs = [w.clone().requires_grad_(), u.clone().requires_grad_(), k.bfloat16().requires_grad_(),
          v.bfloat16().requires_grad_()]
    grads = torch.autograd.grad(bi_wkv(*xs, impl="torch"), xs, gy)
    assert [g.dtype for g in grads] == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    x32 = [x.detach().float().requires_grad_() for x in xs]
    for g, r in zip(grads, torch.autograd.grad(bi_wkv(*x32, impl="torch"), x32, gy.float())):
        assert rel_err(g, r) <= 8e-3


def saved_bytes(fn, *xs) -> int:
    """Bytes of the distinct storages autograd saves for the backward of fn(*xs) (saved_tensors_hooks)."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*xs)
    return sum(storages.values())


def test_torch_path_saves_only_its_inputs(monkeypatch):
    """T = 4096 (4 channel blocks): what the forward keeps for the backward is w, u, k, v themselves, nothing of
    size T * C more (autograd through the scan's operations would keep some fourteen tensors of k's size)."""
    B, T, C = 1, 4096, 32
    monkeypatch.setattr(wkv_torch, "_BLOCK_ELEMENTS", B * T * C // 4)
    xs = [x.requires_grad_() for x in make_inputs(T, B, C)]
    assert len(wkv_torch._channel_blocks(B, T, C, default_chunk(T, xs[0]))) == 4
    assert saved_bytes(lambda *a: bi_wkv(*a, impl="torch"), *xs) <= sum(x.nbytes for x in xs)


class _WKVOnly(torch.nn.Module):
    """bi_wkv alone as a bench.tokens mixer: k = v = x."""

    def __init__(self, width: int, grid_h: int, grid_w: int):
        super().__init__()
        w, u, _, _ = make_inputs(grid_h * grid_w, 1, width)
        self.w, self.u = torch.nn.Parameter(w), torch.nn.Parameter(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bi_wkv(self.w, self.u, x, x, impl="torch")


def test_torch_path_peak_memory_is_per_block(monkeypatch):
    """Peak extra memory of forward + backward by bench.tokens' own method, with 4 channel blocks: about 9 times
    x's size (y, dk, dv, the gradients' sum and one block's recomputed graph); without blocks (or with autograd
    through the whole scan) about 20."""
    from bench.tokens import Point

    T, C = 64, 32
    monkeypatch.setattr(wkv_torch, "_BLOCK_ELEMENTS", T * C // 4)
    point = Point(_WKVOnly, T, C, 1, torch.device("cpu"))
    mb, method = point.peak_memory_mb()
    if not method.startswith("torch_profiler"):
        pytest.skip(f"no CPU memory measure: {method}")
    ratio = mb * 2**20 / point.x.nbytes
    assert ratio <= 12, ratio


def test_torch_path_is_once_differentiable():
    """Double backward is not supported: it raises instead of silently returning wrong second derivatives."""
    xs = [x.requires_grad_() for x in make_inputs(9, 1, 3)]
    (gk,) = torch.autograd.grad(bi_wkv(*xs, impl="torch").square().sum(), xs[2], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gk.sum().backward()


# --------------------------------------------------------------------------------------------------------------
# Triton kernels, interpreted on CPU. TRITON_INTERPRET is read when @triton.jit decorates the kernels (Triton 3.8,
# triton/runtime/jit.py), i.e. when backbones.kernels.wkv_triton is first imported; a subprocess keeps that switch
# out of this test session.
# --------------------------------------------------------------------------------------------------------------
_TRITON_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
from test_bi_wkv import check_against_reference, make_inputs, op_route, rel_err
from backbones.kernels import bi_wkv, bi_wkv_reference
out = {{}}
for T, B, C, kind in json.loads(sys.argv[1]):
    if kind == "op":  # custom-op route: forward kernel, then forward + backward kernels in the op's backward
        out[f"{{T}}-{{B}}-{{C}}-{{kind}}"] = check_against_reference(op_route("triton"), T, B, C, "normal")
    elif kind == "bf16":
        w, u, k, v = make_inputs(T, B, C)
        kb, vb = k.bfloat16(), v.bfloat16()
        y = bi_wkv(w, u, kb, vb, impl="triton")
        ref = bi_wkv_reference(w.double(), u.double(), kb.double(), vb.double())
        out[f"{{T}}-{{B}}-{{C}}-{{kind}}"] = [str(y.dtype), rel_err(y, ref)]
    else:
        fwd, grads = check_against_reference(lambda *a: bi_wkv(*a, impl="triton"), T, B, C, kind)
        out[f"{{T}}-{{B}}-{{C}}-{{kind}}"] = [fwd, grads]
print("RESULT" + json.dumps(out))
"""

FAST_TRITON_CASES = [(1, 3, 5, "normal"), (2, 2, 33, "normal"), (7, 2, 40, "normal"), (7, 2, 5, "large_k"),
                     (64, 2, 6, "normal"), (64, 1, 8, "large_k"), (257, 1, 8, "normal"), (257, 1, 8, "large_k"),
                     (64, 1, 8, "bf16"), (7, 2, 5, "op")]
SLOW_TRITON_CASES = [(1024, 1, 4, "normal"), (1024, 1, 4, "large_k"), (1024, 2, 40, "normal")]


def run_triton_cases(cases) -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT.format(tests=str(REPO / "tests")),
                           json.dumps(cases)], env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module")
def triton_fast_results():
    return run_triton_cases(FAST_TRITON_CASES)


@pytest.mark.parametrize("case", FAST_TRITON_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_kernels_interpreted(triton_fast_results, case):
    T, B, C, kind = case
    result = triton_fast_results[f"{T}-{B}-{C}-{kind}"]
    if kind == "bf16":
        assert result[0] == "torch.bfloat16" and result[1] <= 8e-3, result
        return
    fwd, grads = result
    assert fwd <= FWD_TOL, fwd
    assert max(grads) <= GRAD_TOL, grads


@pytest.mark.slow
def test_triton_kernels_interpreted_long_sequences():
    results = run_triton_cases(SLOW_TRITON_CASES)
    for (T, B, C, kind), (fwd, grads) in zip(SLOW_TRITON_CASES, results.values()):
        assert fwd <= FWD_TOL, (T, B, C, kind, fwd)
        assert max(grads) <= GRAD_TOL, (T, B, C, kind, grads)
