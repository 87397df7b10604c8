"""Multiply-accumulate formulas for the project's custom operators, keyed by their torch op name.

A custom op (``torch.library.custom_op``) registers its MAC count here next to its definition, so the FLOP
counter in ``bench.flops`` never drops it silently. Each formula receives the input and output shapes
(lists of tuples; ``None`` for non-tensor arguments) and returns multiply-accumulates.
"""

from __future__ import annotations

from typing import Callable, Sequence

Shape = tuple[int, ...] | None
MacFormula = Callable[[Sequence[Shape], Sequence[Shape]], float]

OP_MACS: dict[str, MacFormula] = {}


def register_macs(op_name: str) -> Callable[[MacFormula], MacFormula]:
    """Decorator: ``op_name`` is the qualified name as traced, e.g. ``"kernels::bi_wkv"``."""

    def decorator(fn: MacFormula) -> MacFormula:
        OP_MACS[op_name] = fn
        return fn

    return decorator
