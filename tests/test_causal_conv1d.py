"""Depthwise causal conv1d (backbones.kernels.causal_conv1d): the PyTorch path against an explicit float64 loop,
causality, dispatch and errors, the custom op under tracing and its MAC count. The CUDA package's kernel is
compared with the reference in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backbones.kernels import causal_conv1d
from backbones.kernels.causal_conv1d import causal_conv1d_reference, resolve_conv_impl
from bench.flops import gmacs_by_operator


def conv_inputs(batch: int, D: int, L: int, W: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, D, L, generator=g, dtype=dtype)
    return x, torch.randn(D, W, generator=g, dtype=dtype), torch.randn(D, generator=g, dtype=dtype)


def explicit_loop(x, weight, bias, activation):
    """out[b, d, t] = bias[d] + sum_k weight[d, k] x[b, d, t - (W-1) + k] (zero before t = 0), scalar by scalar."""
    batch, D, L = x.shape
    W = weight.shape[1]
    out = torch.zeros(batch, D, L, dtype=torch.float64)
    for b in range(batch):
        for d in range(D):
            for t in range(L):
                acc = 0.0 if bias is None else float(bias[d])
                for k in range(W):
                    s = t - (W - 1) + k
                    if s >= 0:
                        acc += float(weight[d, k]) * float(x[b, d, s])
                out[b, d, t] = acc
    return F.silu(out) if activation else out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("W", [1, 2, 4, 5])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
def test_reference_matches_explicit_loop(W, activation):
    x, w, b = conv_inputs(2, 3, 6, W)
    for bias in (None, b):
        ref = explicit_loop(x, w, bias, activation)
        assert rel_err(causal_conv1d_reference(x, w, bias, activation), ref) <= 1e-14


@pytest.mark.parametrize("W,L", [(4, 1), (4, 3), (4, 50), (2, 17), (3, 8), (1, 9), (7, 5), (7, 30)])
def test_torch_path_matches_reference_float64(W, L):
    """Values and gradients (x, weight, bias), with and without bias and activation, L < W included."""
    x, w, b = conv_inputs(2, 5, L, W, seed=W * 100 + L)
    gy = torch.randn(2, 5, L, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for activation in (None, "silu"):
        for bias in (None, b):
            outs = {}
            for impl in ("reference", "torch"):
                xs = [t.clone().requires_grad_() for t in (x, w) + ((bias,) if bias is not None else ())]
                args = (xs[0], xs[1], xs[2] if bias is not None else None, activation)
                y = causal_conv1d_reference(*args) if impl == "reference" else causal_conv1d(*args, impl="torch")
                outs[impl] = (y, torch.autograd.grad(y, xs, gy))
            (y, grads), (y_ref, grads_ref) = outs["torch"], outs["reference"]
            assert y.dtype == torch.float64 and y.shape == x.shape
            assert rel_err(y, y_ref) <= 1e-13
            for g, r in zip(grads, grads_ref):
                assert rel_err(g, r) <= 1e-13


def test_torch_path_fp32_and_bf16():
    x, w, b = conv_inputs(2, 8, 64, 4)
    ref = causal_conv1d_reference(x, w, b, "silu")
    y32 = causal_conv1d(x.float(), w.float(), b.float(), "silu", impl="torch")
    assert y32.dtype == torch.float32 and rel_err(y32, ref) <= 1e-6
    xb = x.bfloat16()
    yb = causal_conv1d(xb, w.float(), b.float(), "silu", impl="torch")  # weights follow x's dtype
    assert yb.dtype == torch.bfloat16 and rel_err(yb, causal_conv1d_reference(xb.double(), w, b, "silu")) <= 3e-2


@pytest.mark.parametrize("W", [2, 4, 6])
def test_causality(W):
    """Changing x[..., t+1:] leaves out[..., :t+1] unchanged, and changing x[..., t] changes out[..., t]."""
    x, w, b = conv_inputs(1, 4, 20, W)
    y = causal_conv1d(x, w, b, "silu", impl="torch")
    for t in (0, 5, 18):
        x2 = x.clone()
        x2[..., t + 1:] = torch.randn_like(x2[..., t + 1:]) * 10
        y2 = causal_conv1d(x2, w, b, "silu", impl="torch")
        assert torch.equal(y2[..., : t + 1], y[..., : t + 1])
        x3 = x.clone()
        x3[..., t] += 1.0
        assert (causal_conv1d(x3, w, b, "silu", impl="torch")[..., t] != y[..., t]).all()
    # the gradient of out[t] reaches exactly x[t-W+1 .. t]
    xg = x.clone().requires_grad_()
    causal_conv1d(xg, w, b, impl="torch")[..., 10].sum().backward()
    nz = xg.grad[0, 0].nonzero().flatten().tolist()
    assert nz == list(range(10 - W + 1, 11))


def test_dispatch_and_errors():
    x, w, b = conv_inputs(1, 4, 8, 4)
    assert resolve_conv_impl("auto", x, w) == "torch"
    assert torch.equal(causal_conv1d(x, w, b), causal_conv1d(x, w, b, impl="torch"))
    with pytest.raises(ValueError, match="unknown causal_conv1d impl"):
        causal_conv1d(x, w, impl="triton")
    with pytest.raises((RuntimeError, ValueError), match="causal_conv1d package|CUDA tensors"):
        causal_conv1d(x.float(), w.float(), impl="cuda")  # no package here, or not a CUDA tensor
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="relu")
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, w[:3])
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d(x, w, b[:2])


def test_custom_op_matches_eager():
    x, w, b = conv_inputs(2, 4, 9, 4)
    gy = torch.randn(2, 4, 9, dtype=torch.float64)
    xs = [t.clone().requires_grad_() for t in (x, w, b)]
    y_op = torch.ops.kernels.causal_conv1d(*xs, "silu", "torch")
    g_op = torch.autograd.grad(y_op, xs, gy)
    ys = [t.clone().requires_grad_() for t in (x, w, b)]
    y = causal_conv1d(*ys, "silu")
    assert torch.equal(y_op, y)
    for a, r in zip(g_op, torch.autograd.grad(y, ys, gy)):
        assert rel_err(a, r) <= 1e-14
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.kernels.causal_conv1d.default, (*xs, "", "torch"), test_utils=checks)
    torch.library.opcheck(torch.ops.kernels.causal_conv1d.default, (xs[0], xs[1], None, "silu", "torch"),
                          test_utils=checks)


class _ConvMixer(torch.nn.Module):
    """x (1, 2, 8, 8) -> D = 8 channels of L = 16 tokens through the causal conv (width W)."""

    def __init__(self, W: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, W))
        self.bias = torch.nn.Parameter(torch.zeros(8))

    def forward(self, x, t, y):
        s = x.reshape(1, 8, 16)
        return causal_conv1d(s, self.weight, self.bias, "silu").reshape(1, 2, 8, 8)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("W", [2, 4])
def test_flops_are_batch_channels_tokens_width(W):
    """One ``kernels::causal_conv1d`` node in the traced graph, counted as B * D * L * W MACs."""
    mixer = _ConvMixer(W)
    args = (torch.randn(1, 2, 8, 8), torch.zeros(1), torch.zeros(1))
    traced = torch.jit.trace(mixer, args)
    assert "kernels::causal_conv1d" in str(traced.graph)
    assert torch.equal(traced(*args), mixer(*args))
    by_op = gmacs_by_operator(mixer, 8, 2)
    assert by_op == {"causal_conv1d": pytest.approx(1 * 8 * 16 * W / 1e9, rel=1e-12)}
