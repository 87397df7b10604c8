"""Bi-WKV ``variant="official"``: the official Diffusion-RWKV / Vision-RWKV CUDA kernel's arithmetic.

Three layers of checks: the vectorised PyTorch path against float64 transcriptions of the two CUDA kernels
(``bi_wkv_official_reference`` / ``_backward``); both against the closed form derived from the kernel (a dense
table of the weights it uses, with its EPS set to 0), which pins down how the official variant differs from the
paper formula; and the plumbing (``bi_wkv(variant=...)``, the custom op, ``rwkv(wkv_variant=...)``, FLOPs).
Errors are norm-wise, max|x - ref| / max|ref|, as in test_bi_wkv.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_inputs as _make_inputs

import backbones.rwkv as rwkv_module
from backbones import build
from backbones.kernels import bi_wkv, bi_wkv_official, bi_wkv_reference, bi_wkv_torch, wkv_official
from backbones.kernels.wkv_official import (
    bi_wkv_official_reference,
    bi_wkv_official_reference_backward,
    chunk_length,
)
from bench.flops import gmacs_by_operator

FAST_T = [1, 5, 16, 32, 33, 64, 100, 256]




def make_inputs(T: int, B: int, C: int, kind: str = "normal", seed: int = 0, dtype=torch.float64):
    return _make_inputs(T, B, C, kind, seed, dtype)


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    return ((x.double() - ref.double()).abs().max() / max(ref.double().abs().max().item(), floor)).item()


def grads_of(fn, xs, gy):
    xs = [x.clone().requires_grad_() for x in xs]
    return torch.autograd.grad(fn(*xs), xs, gy)


# --------------------------------------------------------------------------------------------------------------
# Closed form derived from the kernel source (see backbones/kernels/wkv_official.py), dense, float64
# --------------------------------------------------------------------------------------------------------------
def official_weights(w: torch.Tensor, u: torch.Tensor, T: int) -> torch.Tensor:
    """(C, T, T): the weight W[c, t, j] (times e^{k_j}) the official kernel gives token j in output t."""
    L = chunk_length(T)
    t = torch.arange(T).view(T, 1)
    j = torch.arange(T).view(1, T)
    s = (t // L) * L                                          # first token of t's chunk
    w_, u_ = w.view(-1, 1, 1), u.view(-1, 1, 1)
    dist = (t - j).abs().to(w.dtype)
    g = 1 - torch.exp(w_)
    W = torch.exp(-w_ * dist)                                 # j < s and j > t: distance |t - j|
    in_left = (j >= s) & (j < t)
    W = torch.where(in_left, torch.exp(-w_ * (dist - 1)) + (j > s) * g * torch.exp(w_ * dist), W)
    return torch.where(t == j, torch.exp(u_) + (t > s) * g, W)


def paper_weights(w: torch.Tensor, u: torch.Tensor, T: int) -> torch.Tensor:
    t, j = torch.arange(T).view(T, 1), torch.arange(T).view(1, T)
    dist = (t - j).abs().to(w.dtype)
    return torch.where(t == j, torch.exp(u.view(-1, 1, 1)), torch.exp(-w.view(-1, 1, 1) * (dist - 1)))


def dense_forward(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """y, and the denominator D scaled by e^{-max k} per (b, c): y_t = sum_j W_tj e^{k_j} v_j / D_t."""
    ek = torch.exp(k - k.amax(1, keepdim=True)).permute(0, 2, 1)          # (B, C, T)
    den = torch.einsum("ctj,bcj->bct", W, ek)
    num = torch.einsum("ctj,bcj->bct", W, ek * v.permute(0, 2, 1))
    return (num / den).permute(0, 2, 1), den.permute(0, 2, 1), ek.permute(0, 2, 1)


# --------------------------------------------------------------------------------------------------------------
# Vectorised path == float64 transcriptions of the CUDA kernels
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", FAST_T)
@pytest.mark.parametrize("kind", ["normal", "large_k"])
def test_forward_matches_kernel_transcription(T, kind):
    w, u, k, v = make_inputs(T, 2, 5, kind)
    ref = bi_wkv_official_reference(w, u, k, v)
    assert rel_err(bi_wkv_official(w, u, k, v), ref) <= 1e-12
    y32 = bi_wkv_official(*(x.float() for x in (w, u, k, v)))
    assert y32.dtype == torch.float32 and rel_err(y32, ref) <= 1e-5


@pytest.mark.parametrize("T", FAST_T)
@pytest.mark.parametrize("kind", ["normal", "large_k"])
def test_backward_matches_kernel_transcription(T, kind):
    """gw, gu (summed over the batch, as models_drwkv.WKV.backward does), gk, gv. Gradients that are ~0 (T = 1:
    gw exactly, gu and gk up to EPS) are measured against max|gy| * max|v| * 1e-2."""
    w, u, k, v = make_inputs(T, 2, 5, kind)
    gy = torch.randn(k.shape, generator=torch.Generator().manual_seed(1), dtype=k.dtype)
    ref = bi_wkv_official_reference_backward(w, u, k, v, gy)
    floor = 1e-2 * gy.abs().max().item() * v.abs().max().item()
    for g, r in zip(grads_of(bi_wkv_official, (w, u, k, v), gy), ref):
        assert rel_err(g, r, floor) <= 1e-10
    g32 = grads_of(bi_wkv_official, [x.float() for x in (w, u, k, v)], gy.float())
    for g, r in zip(g32, ref):
        assert g.dtype == torch.float32 and rel_err(g, r, floor) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("T", [255, 1000, 1024])
def test_long_sequences_match_kernel_transcription(T):
    w, u, k, v = make_inputs(T, 1, 3, "large_k")
    gy = torch.randn_like(k)
    assert rel_err(bi_wkv_official(w, u, k, v), bi_wkv_official_reference(w, u, k, v)) <= 1e-12
    for g, r in zip(grads_of(bi_wkv_official, (w, u, k, v), gy), bi_wkv_official_reference_backward(w, u, k, v, gy)):
        assert rel_err(g, r) <= 1e-10


def test_eps_term_is_reproduced():
    """The kernel's EPS (1e-6 in max-scaled units) moves y by ~1e-7 relative: far above the 1e-12 agreement, so
    the running-max exponent it is scaled by is reproduced too."""
    w, u, k, v = make_inputs(100, 2, 5, "large_k")
    ref = bi_wkv_official_reference(w, u, k, v)
    y = bi_wkv_official(w, u, k, v)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wkv_official, "EPS", 0.0)
        y_no_eps = bi_wkv_official(w, u, k, v)
    assert rel_err(y, ref) <= 1e-12 < 1e-9 <= rel_err(y_no_eps, ref)


def test_extreme_keys_stay_finite():
    w, u, k, v = make_inputs(200, 2, 8, dtype=torch.float32)
    offset = torch.tensor([1e4, -1e4, 500.0, -500.0, 88.0, -88.0, 0.0, 3e3])
    xs = [x.clone().requires_grad_() for x in (w, u, k + offset, v)]
    y = bi_wkv_official(*xs)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and all(torch.isfinite(x.grad).all() for x in xs)
    assert rel_err(y, bi_wkv_official(w, u, k, v)) <= 5e-3  # k + 1e4 is only representable to ~1e-3 in fp32


def test_half_precision_accumulates_in_fp32():
    w, u, k, v = make_inputs(64, 2, 8, dtype=torch.float32)
    kb, vb = k.bfloat16(), v.bfloat16()
    y = bi_wkv(w, u, kb, vb, variant="official")
    assert y.dtype == torch.bfloat16
    assert rel_err(y, bi_wkv_official_reference(w, u, kb, vb)) <= 8e-3


# --------------------------------------------------------------------------------------------------------------
# What the kernel computes, in closed form (EPS set to 0), and how that differs from the paper formula
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [5, 16, 32, 33, 64, 100])
def test_forward_is_the_derived_closed_form(T, monkeypatch):
    """Weights: distance |t-j| across chunks and for every j > t; paper distance inside the chunk for j < t plus
    (1 - e^w) e^{w (t-j)} for s < j <= t (s = chunk start), bonus e^u on the diagonal."""
    monkeypatch.setattr(wkv_official, "EPS", 0.0)
    w, u, k, v = make_inputs(T, 2, 4)
    y, _, _ = dense_forward(official_weights(w, u, T), k, v)
    assert rel_err(bi_wkv_official_reference(w, u, k, v), y) <= 1e-12
    assert rel_err(bi_wkv_official(w, u, k, v), y) <= 1e-12


@pytest.mark.parametrize("T", [1, 5, 32])
def test_up_to_32_tokens_every_pair_uses_distance_abs(T, monkeypatch):
    """T <= 32: one token per chunk, so the kernel is the paper formula with |t-i| instead of |t-i| - 1 for every
    pair, i.e. the paper formula with the bonus u + w."""
    monkeypatch.setattr(wkv_official, "EPS", 0.0)
    w, u, k, v = make_inputs(T, 2, 4)
    assert rel_err(bi_wkv_official(w, u, k, v), bi_wkv_reference(w, u + w, k, v)) <= 1e-12


def test_beyond_32_tokens_the_chunks_matter(monkeypatch):
    """T = 33: the paper-with-|t-i| form no longer holds (chunks of 2), nor does the paper formula; with w = 0
    every distance convention agrees and the residuals (1 - e^0) vanish, so the variants coincide."""
    monkeypatch.setattr(wkv_official, "EPS", 0.0)
    w, u, k, v = make_inputs(33, 2, 4)
    y = bi_wkv_official(w, u, k, v)
    assert rel_err(y, bi_wkv_reference(w, u + w, k, v)) > 1e-4
    assert rel_err(y, bi_wkv_reference(w, u, k, v)) > 1e-4
    zero = torch.zeros_like(w)
    assert rel_err(bi_wkv_official(zero, u, k, v), bi_wkv_reference(zero, u, k, v)) <= 1e-12


@pytest.mark.parametrize("T", [5, 33, 100])
def test_backward_is_the_derived_closed_form(T, monkeypatch):
    """gw, gu: exact gradients of the official forward. gk, gv: the paper weights P (e^{-w(|t-j|-1)}, e^u on
    the diagonal) with the official y_t and denominators: gv_j = sum_t P_tj e^{k_j} g_t / D_t,
    gk_j = sum_t P_tj e^{k_j} (v_j - y_t) g_t / D_t. These differ from the exact gk, gv."""
    monkeypatch.setattr(wkv_official, "EPS", 0.0)
    w, u, k, v = make_inputs(T, 2, 4)
    gy = torch.randn(k.shape, generator=torch.Generator().manual_seed(3), dtype=k.dtype)
    gw, gu, gk, gv = grads_of(bi_wkv_official, (w, u, k, v), gy)

    def exact(w, u, k, v):
        return dense_forward(official_weights(w, u, T), k, v)[0]

    ex = grads_of(exact, (w, u, k, v), gy)
    assert rel_err(gw, ex[0]) <= 1e-12 and rel_err(gu, ex[1]) <= 1e-12
    y, den, ek = dense_forward(official_weights(w, u, T), k, v)
    G = (gy / den).permute(0, 2, 1)                                      # (B, C, T) over t
    P = paper_weights(w, u, T)
    gv_ref = ek * torch.einsum("ctj,bct->bjc", P, G)
    gk_ref = ek * (v * torch.einsum("ctj,bct->bjc", P, G) - torch.einsum("ctj,bct->bjc", P, G * y.permute(0, 2, 1)))
    assert rel_err(gv, gv_ref) <= 1e-12 and rel_err(gk, gk_ref) <= 1e-12
    assert rel_err(gv, ex[3]) > 1e-3 and rel_err(gk, ex[2]) > 1e-3
    # the transcription of the CUDA backward agrees (EPS = 0 there too)
    for g, r in zip((gw, gu, gk, gv), bi_wkv_official_reference_backward(w, u, k, v, gy)):
        assert rel_err(g, r) <= 1e-10


# --------------------------------------------------------------------------------------------------------------
# bi_wkv(variant=...), custom op, FLOPs, rwkv(wkv_variant=...)
# --------------------------------------------------------------------------------------------------------------
def test_variant_dispatch():
    w, u, k, v = make_inputs(40, 2, 6, dtype=torch.float32)
    off = bi_wkv_official(w, u, k, v)
    for impl in ("auto", "torch", "reference", "triton"):  # one official implementation for every impl
        assert torch.equal(bi_wkv(w, u, k, v, impl=impl, variant="official"), off)
    assert torch.equal(bi_wkv(w, u, k, v, variant="paper"), bi_wkv_torch(w, u, k, v))
    assert torch.equal(bi_wkv(w, u, k, v), bi_wkv_torch(w, u, k, v))
    assert rel_err(off, bi_wkv_torch(w, u, k, v)) > 1e-4
    with pytest.raises(ValueError, match="unknown bi_wkv variant"):
        bi_wkv(w, u, k, v, variant="cuda")
    with pytest.raises(ValueError, match="unknown bi_wkv impl"):
        bi_wkv(w, u, k, v, impl="cuda", variant="official")


def test_custom_op_route_carries_the_variant():
    w, u, k, v = make_inputs(37, 2, 6, dtype=torch.float32)
    gy = torch.randn_like(k)
    xs = [x.clone().requires_grad_() for x in (w, u, k, v)]
    y_op, y_eager = torch.ops.kernels.bi_wkv(*xs, "torch", "official"), bi_wkv(*xs, variant="official")
    assert torch.equal(y_op, y_eager)
    for a, b in zip(torch.autograd.grad(y_op, xs, gy), torch.autograd.grad(y_eager, xs, gy)):
        assert torch.equal(a, b)
    torch.library.opcheck(torch.ops.kernels.bi_wkv.default, (w, u, k, v, "torch", "official"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


class _Mixer(torch.nn.Module):
    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.w = torch.nn.Parameter(torch.linspace(-0.1, 0.1, 16))
        self.u = torch.nn.Parameter(torch.zeros(16))

    def forward(self, x, t, y):  # x (1, 2, 16, 16): T = 32 tokens of C = 16 channels
        s = x.flatten(1, 2)
        return bi_wkv(self.w, self.u, s, s.sin(), variant=self.variant).unsqueeze(1)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traced_graph_computes_the_variant():
    x = torch.randn(1, 2, 16, 16)
    args = (x, torch.zeros(1), torch.zeros(1))
    for variant in ("paper", "official"):
        mixer = _Mixer(variant)
        traced = torch.jit.trace(mixer, args)
        assert "kernels::bi_wkv" in str(traced.graph)
        assert torch.equal(traced(*args), mixer(*args))
    assert not torch.equal(_Mixer("official")(*args), _Mixer("paper")(*args))


def tiny_rwkv(**kw):
    cfg = dict(size="S", depth=3, hidden_size=32, patch_size=2, input_size=8, in_channels=3, num_classes=10)
    return build("rwkv", **{**cfg, **kw})


def test_rwkv_official_variant(monkeypatch):
    torch.manual_seed(0)
    paper = tiny_rwkv()
    official = tiny_rwkv(wkv_variant="official")
    official.load_state_dict(paper.state_dict())
    for m in (paper, official):
        for blk in m.all_blocks():
            torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1, generator=torch.Generator().manual_seed(1))
        torch.nn.init.normal_(m.final_layer.linear.weight, std=0.1, generator=torch.Generator().manual_seed(2))
    assert paper.wkv_variant == "paper" and official.wkv_variant == "official"
    seen = []
    spy = lambda *a, **kw: seen.append(kw.get("variant")) or bi_wkv(*a, **kw)  # noqa: E731
    monkeypatch.setattr(rwkv_module, "bi_wkv", spy)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 4])
    out = official(x, t, y)
    assert seen == ["official"] * 3
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in official.parameters() if p.grad is not None)
    assert official.mid_block.att.spatial_decay.grad.abs().sum() > 0
    out_paper = paper(x, t, y)
    assert torch.isfinite(out).all() and not torch.allclose(out, out_paper, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown wkv_variant 'cuda'"):
        tiny_rwkv(wkv_variant="cuda")


def test_rwkv_official_variant_flops_equal_paper():
    torch.manual_seed(0)
    by_op = gmacs_by_operator(tiny_rwkv(wkv_variant="official"), 8, 3)
    assert by_op == gmacs_by_operator(tiny_rwkv(), 8, 3)
    T, D, L = 16, 32, 3
    assert by_op["bi_wkv"] == pytest.approx(6.5 * T * D * L / 1e9, rel=1e-12)


@pytest.mark.parametrize("T, side, batch, model_band, iid_band", [
    (16, 8, 8, (0.023, 0.031), (0.07, 0.11)),
    pytest.param(64, 16, 8, (0.0030, 0.0056), (0.016, 0.025), marks=pytest.mark.slow),
    pytest.param(256, 32, 4, (0.00030, 0.00044), (0.0055, 0.0085), marks=pytest.mark.slow),
])
def test_documented_deviation_from_the_paper(T, side, batch, model_band, iid_band, monkeypatch):
    """The figures of backbones.kernels' docstring: max|y_official - y_paper| / max|y_paper| over the 13 blocks of
    a freshly initialised DRWKV-S/2 (seed 0; the docstring's ranges span seeds 0-2), on its own k, v and on i.i.d.
    N(0, 1) k, v with the same w, u."""
    model_devs, iid_devs = [], []

    def spy(w, u, k, v, **kw):
        w64, u64, k64, v64 = (t.detach().double() for t in (w, u, k, v))
        model_devs.append(rel_err(bi_wkv(w64, u64, k64, v64, variant="official"), bi_wkv(w64, u64, k64, v64)))
        g = torch.Generator().manual_seed(len(model_devs))
        k2, v2 = (torch.randn(k64.shape, generator=g, dtype=torch.float64) for _ in range(2))
        iid_devs.append(rel_err(bi_wkv(w64, u64, k2, v2, variant="official"), bi_wkv(w64, u64, k2, v2)))
        return bi_wkv(w, u, k, v, **kw)

    torch.manual_seed(0)
    model = build("rwkv", size="S", patch_size=2, input_size=side, in_channels=4, num_classes=1000)
    monkeypatch.setattr(rwkv_module, "bi_wkv", spy)
    with torch.no_grad():
        model(torch.randn(batch, 4, side, side), torch.randint(0, 1000, (batch,)), torch.randint(0, 1000, (batch,)))
    assert len(model_devs) == 13
    assert model_band[0] <= max(model_devs) <= model_band[1]
    assert iid_band[0] <= max(iid_devs) <= iid_band[1]


@pytest.mark.parametrize("T", [16, 64, 256])
def test_documented_gradient_deviation(T):
    """The official gk, gv differ from the exact gradients of the official forward by 1 - e^{-5/T} (worst channel,
    the one with spatial_decay = -5): the factor e^w between the paper's and the kernel's weights."""
    C = 8
    w = torch.linspace(-5, 3, C, dtype=torch.float64) / T
    u = torch.full((C,), -1.2, dtype=torch.float64) / T
    g = torch.Generator().manual_seed(0)
    k, v, gy = (torch.randn(2, T, C, generator=g, dtype=torch.float64) for _ in range(3))
    official = grads_of(bi_wkv_official, (w, u, k, v), gy)
    exact = grads_of(lambda w, u, k, v: dense_forward(official_weights(w, u, T), k, v)[0], (w, u, k, v), gy)
    for i in (2, 3):  # gk, gv
        worst = max(rel_err(official[i][..., c], exact[i][..., c]) for c in range(C))
        assert worst == pytest.approx(1 - math.exp(-5 / T), rel=0.01)
