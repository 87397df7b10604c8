"""Depthwise causal 1-D convolution, the short convolution of a Mamba block: entry point :func:`causal_conv1d`.

Semantics of ``causal_conv1d_fn`` of the ``causal_conv1d`` package (as Vim / mamba_ssm call it): x (B, D, L),
weight (D, W), bias (D,) or None; every channel is convolved with its own filter over a left zero padding of W - 1,
so out[..., t] = bias + sum_{k<W} weight[:, k] * x[..., t - (W-1) + k] depends on x[..., <= t] only; then the
optional activation ("silu" / "swish", the same function).

Implementations (``impl``):
    "torch"  ``F.conv1d(groups=D, padding=W-1)`` cut to the first L outputs (+ SiLU): exact, any device/dtype/W.
    "cuda"   the ``causal_conv1d`` package's CUDA kernel (imported lazily; CUDA tensors, W in 2..4, fp32/fp16/bf16).
    "auto"   "cuda" when the package is importable and the call is one it supports, else "torch".

FLOPs: B * D * L * W MACs (one multiply-add per filter tap and output; bias and activation are free under
``bench.flops``' convention). Under ``torch.jit.trace`` (fvcore) or ``torch.compile`` the call goes through the
custom op ``kernels::causal_conv1d`` (one graph node carrying that formula); eagerly it calls the implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..opcount import register_macs

__all__ = ["causal_conv1d", "causal_conv1d_reference", "causal_conv1d_torch", "resolve_conv_impl", "CONV_IMPLS"]

CONV_IMPLS = ("auto", "torch", "cuda")
ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            activation: str | None = None) -> torch.Tensor:
    """Explicit tap-by-tap sum over shifted copies of x (tests only; exact in float64)."""
    L, W = x.shape[-1], weight.shape[-1]
    out = torch.zeros_like(x) if bias is None else bias[:, None].to(x.dtype).expand_as(x).clone()
    for k in range(W):
        shift = W - 1 - k  # tap k reads x[t - shift]
        if shift < L:
            out[..., shift:] = out[..., shift:] + weight[:, k, None] * x[..., : L - shift]
    return F.silu(out) if activation is not None else out


def causal_conv1d_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        activation: str | None = None) -> torch.Tensor:
    """Grouped ``F.conv1d`` with W-1 zeros on both sides, keeping the first L outputs (the causal ones)."""
    D, W = weight.shape
    out = F.conv1d(x, weight.to(x.dtype)[:, None, :], None if bias is None else bias.to(x.dtype), padding=W - 1,
                   groups=D)[..., : x.shape[-1]]
    return F.silu(out) if activation is not None else out


def _cuda_package():
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        return None
    return causal_conv1d_fn


def causal_conv1d_cuda(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       activation: str | None = None) -> torch.Tensor:
    """The ``causal_conv1d`` package's kernel (raises if it is missing or x is not on CUDA)."""
    fn = _cuda_package()
    if fn is None:
        raise RuntimeError("causal_conv1d impl='cuda' needs the causal_conv1d package (pip install causal-conv1d); "
                           "use impl='torch' or 'auto'")
    if x.device.type != "cuda":
        raise ValueError(f"causal_conv1d impl='cuda' needs CUDA tensors; x is on {x.device}")
    # the kernel wants contiguous time (stride(-1) == 1) and weights in x's dtype
    return fn(x.contiguous(), weight.to(x.dtype).contiguous(), bias=None if bias is None else bias.to(x.dtype),
              activation=activation)


def resolve_conv_impl(impl: str, x: torch.Tensor, weight: torch.Tensor) -> str:
    """The concrete implementation ``impl`` stands for on these inputs."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown causal_conv1d impl {impl!r}; choose one of {', '.join(CONV_IMPLS)}")
    if impl != "auto":
        return impl
    supported = (x.device.type == "cuda" and 2 <= weight.shape[-1] <= 4
                 and x.dtype in (torch.float32, torch.float16, torch.bfloat16))
    return "cuda" if supported and _cuda_package() is not None else "torch"


_IMPL_FNS = {"torch": causal_conv1d_torch, "cuda": causal_conv1d_cuda}


@torch.library.custom_op("kernels::causal_conv1d", mutates_args=())
def _causal_conv1d_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
                      impl: str) -> torch.Tensor:
    # activation "" stands for None (kept a plain str in the schema)
    return _IMPL_FNS[impl](x, weight, bias, activation or None).contiguous()


@_causal_conv1d_op.register_fake
def _causal_conv1d_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
                        impl: str) -> torch.Tensor:
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, activation, impl = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.activation, ctx.impl = activation, impl


def _backward(ctx, gout: torch.Tensor):
    # recompute the implementation under autograd and differentiate it (activation checkpointing of the op)
    saved = ctx.saved_tensors
    inputs = [None if t is None else t.detach().requires_grad_(True) for t in saved]
    live = [t for t in inputs if t is not None]
    with torch.enable_grad():
        out = _IMPL_FNS[ctx.impl](inputs[0], inputs[1], inputs[2], ctx.activation or None)
        grads = iter(torch.autograd.grad(out, live, gout, allow_unused=True))
    gx, gw, gb = (None if t is None else next(grads) for t in inputs)
    return gx, gw, gb, None, None


_causal_conv1d_op.register_autograd(_backward, setup_context=_setup_context)


@register_macs("kernels::causal_conv1d")
def _causal_conv1d_macs(input_shapes, output_shapes) -> float:
    B, D, L = input_shapes[0]
    return B * D * L * input_shapes[1][-1]


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None) -> None:
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d expects x (B, D, L) and weight (D, W); got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if weight.shape[1] < 1:
        raise ValueError("causal_conv1d needs a filter width W >= 1")
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"causal_conv1d expects bias of shape (D,) = ({x.shape[1]},); got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d activation must be None, 'silu' or 'swish'; got {activation!r}")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, impl: str = "auto") -> torch.Tensor:
    """Depthwise causal convolution (see the module docstring): x (B, D, L), weight (D, W), bias (D,) or None,
    activation None / "silu" / "swish"; returns (B, D, L) in x's dtype."""
    _check(x, weight, bias, activation)
    impl = resolve_conv_impl(impl, x, weight)
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return torch.ops.kernels.causal_conv1d(x, weight, bias, activation or "", impl)
    return _IMPL_FNS[impl](x, weight, bias, activation)
