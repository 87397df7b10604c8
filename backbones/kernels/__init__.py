"""Custom operators of the backbones. Entry point: :func:`bi_wkv`, the bidirectional WKV of (Diffusion-/Vision-)RWKV.

Per batch element and channel, with k, v of shape (B, T, C) and w, u of shape (C,) (already divided by T)::

            sum_{i != t} exp(-(|t-i| - 1) w + k_i) v_i  +  exp(u + k_t) v_t
    y_t  =  ----------------------------------------------------------------
            sum_{i != t} exp(-(|t-i| - 1) w + k_i)      +  exp(u + k_t)

This is the PAPER's formula (``variant="paper"``, the default), implemented exactly. The official CUDA kernel
(Vision-RWKV ``wkv_cuda.cu``, copied byte for byte by Diffusion-RWKV) deviates from it; ``variant="official"``
reproduces its arithmetic (``wkv_official.py``: table of the weights it uses, float64 transcriptions of both
kernels). It splits the tokens into 32 chunks of ceil(T/32): pairs across chunks and all pairs with i > t use the
distance |t-i| instead of |t-i| - 1, pairs inside a chunk with i <= t get extra terms (1 - e^w) e^{w (t-i)}, and
for T <= 32 (one token per chunk) every pair uses |t-i|. Its gw, gu are the gradients of its forward; its gk, gv
are computed with the paper's weights, so they are not. Measured on the 13 blocks of a freshly initialised
DRWKV-S/2 (official init: spatial_decay in [-5, 3], spatial_first ~ ln 0.3; k, v the projections of N(0, 1)
latents; batch 8/8/4/2; seeds 0-2), max|y_official - y_paper| / max|y_paper| (worst block) is 2.3-3.1% at T = 16,
0.34-0.51% at T = 64, 0.033-0.040% at T = 256 and 0.003% at T = 1024; with the same w, u and i.i.d. N(0, 1) k, v
it is 8.8%, 2.0%, 0.68% and 0.083% (tests/test_bi_wkv_official.py::test_documented_deviation_from_the_paper). The
official gk, gv differ from the exact gradients of the official forward by up to 27%, 7.5%, 1.9% and 0.48% (max-norm
relative, worst channel), 1 - e^{-5/T}: the factor e^{w} between the paper's and the kernel's weights on the
channels with spatial_decay = -5.

Implementations (``impl``) of the paper variant:
    "reference"  dense O(B T^2 C) softmax over log-weights; exact in float64; tests only.
    "torch"      O(B T C) chunked scan in PyTorch, stable for any k (max-subtracted exponentials), CPU default. It
                 saves only w, u, k, v for the backward, which recomputes the scan with autograd per block of
                 channels (``wkv_torch._BiWKVScan``, at most 2^19 elements a block): bench.tokens' bi_wkv mixer at
                 T = 16384, width 384 peaks at 313 MB instead of 625 MB (linear attention 337 MB), for one extra
                 forward of the scan (mixer time +12% at T = 1024, +22% at 16384, measured under load).
    "triton"     Triton forward and backward kernels (sequential scans with running maxima, fp32 accumulation,
                 no limit on T); CUDA default; runs on CPU tensors under TRITON_INTERPRET=1.
    "auto"       "triton" for CUDA tensors when Triton is importable, else "torch".
The official variant has one implementation, vectorised PyTorch (CPU and CUDA): every ``impl`` is validated as
above and then runs it (there is no Triton version of it; "triton" and "reference" fall back to it silently).

FLOPs: the op is the custom operator ``kernels::bi_wkv`` (one node in fvcore's trace, whichever variant: the
variant is its last, string argument), counted as 6.5 MACs per token and channel: the 13 FLOPs per token and
channel of Vision-RWKV Eq. 6 (two decayed state updates with 2 multiply-adds each, the bonus term and the
normalisation), at 1 MAC = 2 FLOPs as for the matmuls; the official variant is counted the same.

Dispatch: in eager mode :func:`bi_wkv` calls the chosen implementation directly (autograd of the PyTorch ops for
the reference and the official variant, the scan's autograd.Function that keeps only the inputs for "torch", the
Triton autograd.Function that keeps y and the log-denominators for its backward kernel). Under tracing
(``torch.jit.trace``, as fvcore does) or ``torch.compile`` it goes through the custom op instead, so the graph holds
one ``kernels::bi_wkv`` node. The custom op's autograd keeps only its inputs; its backward recomputes the chosen
implementation with autograd enabled and differentiates it (activation checkpointing of the op). Both routes give
identical values and gradients. Double backward is not supported by the Triton and "torch" implementations.
"""

from __future__ import annotations

import torch

from ..opcount import register_macs
from .causal_conv1d import causal_conv1d  # Mamba (DiS) kernels: causal_conv1d.py, selective_scan.py
from .selective_scan import selective_scan
from .wkv_official import bi_wkv_official
from .wkv_torch import bi_wkv_reference, bi_wkv_torch

__all__ = ["bi_wkv", "bi_wkv_official", "bi_wkv_reference", "bi_wkv_torch", "bi_wkv_triton", "resolve_impl",
           "BI_WKV_IMPLS", "BI_WKV_VARIANTS"]
__all__ += ["causal_conv1d", "selective_scan"]

BI_WKV_IMPLS = ("auto", "reference", "torch", "triton")
BI_WKV_VARIANTS = ("paper", "official")
MACS_PER_TOKEN_CHANNEL = 6.5


def bi_wkv_triton(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Differentiable Triton Bi-WKV (imported lazily: TRITON_INTERPRET is read when the kernels are defined)."""
    from .wkv_triton import bi_wkv_triton as run

    return run(w, u, k, v)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    """The concrete implementation ``impl`` stands for on ``device``."""
    if impl not in BI_WKV_IMPLS:
        raise ValueError(f"unknown bi_wkv impl {impl!r}; choose one of {', '.join(BI_WKV_IMPLS)}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    return impl


_IMPL_FNS = {"reference": bi_wkv_reference, "torch": bi_wkv_torch, "triton": bi_wkv_triton}


def _impl_fn(impl: str, variant: str):
    """The function computing ``variant`` for a resolved ``impl`` (the official variant has one implementation)."""
    return bi_wkv_official if variant == "official" else _IMPL_FNS[impl]


@torch.library.custom_op("kernels::bi_wkv", mutates_args=())
def _bi_wkv_op(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str,
               variant: str = "paper") -> torch.Tensor:
    return _impl_fn(impl, variant)(w, u, k, v)


@_bi_wkv_op.register_fake
def _bi_wkv_fake(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str,
                 variant: str = "paper") -> torch.Tensor:
    return torch.empty_like(k)


def _setup_context(ctx, inputs, output) -> None:
    w, u, k, v, impl, variant = inputs
    ctx.save_for_backward(w, u, k, v)
    ctx.impl, ctx.variant = impl, variant


def _backward(ctx, gy: torch.Tensor):
    inputs = [x.detach().requires_grad_(True) for x in ctx.saved_tensors]
    with torch.enable_grad():
        y = _impl_fn(ctx.impl, ctx.variant)(*inputs)
        grads = torch.autograd.grad(y, inputs, gy)
    return (*grads, None, None)


_bi_wkv_op.register_autograd(_backward, setup_context=_setup_context)


@register_macs("kernels::bi_wkv")
def _bi_wkv_macs(input_shapes, output_shapes) -> float:
    B, T, C = input_shapes[2]
    return MACS_PER_TOKEN_CHANNEL * B * T * C


def _check(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dim() != 3 or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"bi_wkv expects k and v of the same shape (B, T, C); got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[1] < 1 or k.shape[2] < 1:
        raise ValueError(f"bi_wkv needs at least one token and one channel; got k of shape {tuple(k.shape)}")
    C = k.shape[-1]
    if tuple(w.shape) != (C,) or tuple(u.shape) != (C,):
        raise ValueError(f"bi_wkv expects w and u of shape (C,) = ({C},) (per-channel decay and bonus, already "
                         f"divided by T); got w {tuple(w.shape)}, u {tuple(u.shape)}")
    for name, x in (("w", w), ("u", u), ("k", k), ("v", v)):
        if not x.is_floating_point():
            raise TypeError(f"bi_wkv input {name} must be a floating-point tensor, got {x.dtype}")
        if x.device != k.device:
            raise ValueError(f"bi_wkv inputs must share one device: {name} is on {x.device}, k on {k.device}")


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto",
           variant: str = "paper") -> torch.Tensor:
    """Bidirectional WKV (see the module docstring): k, v (B, T, C); w, u (C,); returns (B, T, C) in k's dtype
    (accumulation in fp32, or fp64 for fp64 inputs on the PyTorch paths). ``variant``: "paper" (the paper's
    formula) or "official" (the official CUDA kernel's arithmetic, forward and backward)."""
    _check(w, u, k, v)
    if variant not in BI_WKV_VARIANTS:
        raise ValueError(f"unknown bi_wkv variant {variant!r}; choose one of {', '.join(BI_WKV_VARIANTS)}")
    impl = resolve_impl(impl, k.device)
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return torch.ops.kernels.bi_wkv(w, u, k, v, impl, variant)
    return _impl_fn(impl, variant)(w, u, k, v)
