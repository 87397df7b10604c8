"""Custom operators of the backbones. Entry point: :func:`bi_wkv`, the bidirectional WKV of (Diffusion-/Vision-)RWKV.

Per batch element and channel, with k, v of shape (B, T, C) and w, u of shape (C,) (already divided by T)::

            sum_{i != t} exp(-(|t-i| - 1) w + k_i) v_i  +  exp(u + k_t) v_t
    y_t  =  ----------------------------------------------------------------
            sum_{i != t} exp(-(|t-i| - 1) w + k_i)      +  exp(u + k_t)

This is the PAPER's formula, implemented exactly. The official CUDA kernel (Vision-RWKV ``wkv_cuda.cu``, copied by
Diffusion-RWKV) deviates from it: its 32 token chunks are initialised with distance |t-i| instead of |t-i| - 1,
so its output depends on chunk boundaries (up to ~1.5% relative at T = 256) and its k/v gradients are not the
gradients of its own forward. Nothing here reproduces that deviation.

Implementations (``impl``):
    "reference"  dense O(B T^2 C) softmax over log-weights; exact in float64; tests only.
    "torch"      O(B T C) chunked scan in PyTorch, stable for any k (max-subtracted exponentials), CPU default.
    "triton"     Triton forward and backward kernels (sequential scans with running maxima, fp32 accumulation,
                 no limit on T); CUDA default; runs on CPU tensors under TRITON_INTERPRET=1.
    "auto"       "triton" for CUDA tensors when Triton is importable, else "torch".

FLOPs: the op is the custom operator ``kernels::bi_wkv`` (one node in fvcore's trace), counted as 6.5 MACs per
token and channel: the 13 FLOPs per token and channel of Vision-RWKV Eq. 6 (two decayed state updates with 2
multiply-adds each, the bonus term and the normalisation), at 1 MAC = 2 FLOPs as for the matmuls.

Dispatch: in eager mode :func:`bi_wkv` calls the chosen implementation directly (autograd of the PyTorch ops, or
the Triton autograd.Function that keeps y and the log-denominators for its backward kernel). Under tracing
(``torch.jit.trace``, as fvcore does) or ``torch.compile`` it goes through the custom op instead, so the graph holds
one ``kernels::bi_wkv`` node. The custom op's autograd keeps only its inputs; its backward recomputes the chosen
implementation with autograd enabled and differentiates it (activation checkpointing of the op). Both routes give
identical values and gradients. Double backward is not supported by the Triton implementation.
"""

from __future__ import annotations

import torch

from ..opcount import register_macs
from .wkv_torch import bi_wkv_reference, bi_wkv_torch

__all__ = ["bi_wkv", "bi_wkv_reference", "bi_wkv_torch", "bi_wkv_triton", "resolve_impl", "BI_WKV_IMPLS"]

BI_WKV_IMPLS = ("auto", "reference", "torch", "triton")
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


@torch.library.custom_op("kernels::bi_wkv", mutates_args=())
def _bi_wkv_op(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    return _IMPL_FNS[impl](w, u, k, v)


@_bi_wkv_op.register_fake
def _bi_wkv_fake(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    return torch.empty_like(k)


def _setup_context(ctx, inputs, output) -> None:
    w, u, k, v, impl = inputs
    ctx.save_for_backward(w, u, k, v)
    ctx.impl = impl


def _backward(ctx, gy: torch.Tensor):
    inputs = [x.detach().requires_grad_(True) for x in ctx.saved_tensors]
    with torch.enable_grad():
        y = _IMPL_FNS[ctx.impl](*inputs)
        grads = torch.autograd.grad(y, inputs, gy)
    return (*grads, None)


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


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Bidirectional WKV (paper formula, see the module docstring): k, v (B, T, C); w, u (C,); returns (B, T, C)
    in k's dtype (accumulation in fp32, or fp64 for fp64 inputs on the PyTorch paths)."""
    _check(w, u, k, v)
    impl = resolve_impl(impl, k.device)
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return torch.ops.kernels.bi_wkv(w, u, k, v, impl)
    return _IMPL_FNS[impl](w, u, k, v)
