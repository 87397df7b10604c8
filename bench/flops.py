"""Forward multiply-accumulates of a backbone, DiT's convention.

GMACs = forward multiply-accumulates for ONE image (batch 1), one network evaluation (no CFG doubling), the
backbone only (no VAE). Linear/conv/matmul layers and attention matmuls (QK^T and AV) count; LayerNorm counts
as fvcore defines it; other elementwise operations (activations, additions, modulation) count zero. This is the
convention of the DiT paper (issue facebookresearch/DiT#14) and reproduces its table.

Counting uses fvcore's tracer with handles for ``scaled_dot_product_attention`` and for every custom op the
backbones register in ``backbones.opcount``. An operator that is neither counted nor known to be free raises an
error naming it: a silent zero would make a GMACs-vs-FID plot lie.
"""

from __future__ import annotations

import logging
from math import prod
from typing import Any

import torch
import torch.nn as nn

from backbones.layers import count_parameters
from backbones.opcount import OP_MACS

CONVENTION = "forward GMACs, batch 1, one network evaluation (no CFG doubling), backbone only"

# Ops that are free under the convention (elementwise, shape, indexing, reductions of O(size) work): exactly the
# ones the registered backbones use. A new operator fails loudly until it is counted or deliberately listed here.
ZERO_COST_OPS = {
    "aten::add", "aten::cos", "aten::div", "aten::embedding", "aten::exp", "aten::flip", "aten::gelu", "aten::lerp",
    "aten::mean", "aten::mul", "aten::neg", "aten::pad", "aten::pixel_shuffle", "aten::pixel_unshuffle", "aten::pow",
    "aten::reciprocal", "aten::sigmoid", "aten::silu", "aten::sin", "aten::sqrt", "aten::square", "aten::sub",
}


def _shapes(values: list) -> list:
    from fvcore.nn.jit_handles import get_shape

    out = []
    for v in values:
        try:
            out.append(tuple(get_shape(v)) if v.isCompleteTensor() else None)
        except Exception:  # non-tensor argument (scalar, list, None)
            out.append(None)
    return out


def sdpa_macs(input_shapes: list, output_shapes: list) -> float:
    """QK^T plus AV: batch * L * S * (E + Ev); softmax, scale and masks are free."""
    q, k, v = input_shapes[:3]
    *batch, L, E = q
    return prod(batch) * L * k[-2] * (E + v[-1])


def _handle(formula):
    def handle(inputs, outputs):
        return formula(_shapes(list(inputs)), _shapes(list(outputs)))

    return handle


def gmacs_by_operator(model: nn.Module, input_size: int, in_channels: int) -> dict[str, float]:
    """Per-operator forward GMACs at batch 1 (keys are fvcore operator names)."""
    from fvcore.nn import FlopCountAnalysis

    param = next(model.parameters())
    x = torch.randn(1, in_channels, input_size, input_size, device=param.device, dtype=param.dtype)
    t = torch.full((1,), 500, device=param.device, dtype=torch.long)
    y = torch.zeros(1, device=param.device, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        fca = FlopCountAnalysis(model, (x, t, y))
        fca.set_op_handle("aten::scaled_dot_product_attention", _handle(sdpa_macs))
        for name, formula in OP_MACS.items():
            fca.set_op_handle(name, _handle(formula))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        logging.getLogger("fvcore").setLevel(logging.ERROR)
        by_op = fca.by_operator()
        unknown = {op: n for op, n in fca.unsupported_ops().items() if op not in ZERO_COST_OPS}
    finally:
        model.train(was_training)
    if unknown:
        raise RuntimeError(
            f"the FLOP counter does not know operator(s) {sorted(unknown)} used by {type(model).__name__}; "
            f"register a MAC formula with backbones.opcount.register_macs (custom ops) or, if the op is "
            f"elementwise and free under the convention, add it to bench.flops.ZERO_COST_OPS")
    return {op: n / 1e9 for op, n in by_op.items()}


def forward_gmacs(model: nn.Module, input_size: int, in_channels: int) -> float:
    """Forward GMACs at batch 1 (see module docstring for the convention)."""
    return sum(gmacs_by_operator(model, input_size, in_channels).values())


def count_params(model: nn.Module) -> dict[str, Any]:
    """Total parameters (frozen pos_embed included, as DiT's train.py logs) and trainable parameters."""
    return {"params": count_parameters(model), "trainable_params": count_parameters(model, trainable_only=True)}


def build_for_counting(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone with uninitialised weights (no init cost): counts depend on shapes only."""
    import backbones

    with torch.device("meta"):
        model = backbones.build(name, **kwargs)
    return model.to_empty(device="cpu")
