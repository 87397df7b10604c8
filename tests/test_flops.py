"""The FLOP counter reproduces DiT's published GFLOPs (forward GMACs, batch 1) and refuses unknown operators."""

import pytest
import torch
import torch.nn as nn

from bench.flops import build_for_counting, count_params, forward_gmacs, gmacs_by_operator

# DiT paper Table 4 (GMACs at 32x32x4; XL/2 also at 64x64x4).
DIT_GMACS = {("S", 8, 32): 0.36, ("S", 4, 32): 1.41, ("S", 2, 32): 6.06, ("B", 8, 32): 1.42, ("B", 4, 32): 5.56,
             ("B", 2, 32): 23.01, ("L", 8, 32): 5.01, ("L", 4, 32): 19.70, ("L", 2, 32): 80.71,
             ("XL", 8, 32): 7.39, ("XL", 4, 32): 29.05, ("XL", 2, 32): 118.64, ("XL", 2, 64): 524.60}
FAST = {k for k in DIT_GMACS if k[0] in ("S", "B")}


def _check(size, patch, input_size):
    model = build_for_counting("dit", size=size, patch_size=patch, input_size=input_size)
    gmacs = forward_gmacs(model, input_size, 4)
    assert gmacs == pytest.approx(DIT_GMACS[(size, patch, input_size)], rel=5e-3)


@pytest.mark.parametrize("size,patch,input_size", sorted(FAST))
def test_dit_published_gmacs_small(size, patch, input_size):
    _check(size, patch, input_size)


@pytest.mark.slow
@pytest.mark.parametrize("size,patch,input_size", sorted(set(DIT_GMACS) - FAST))
def test_dit_published_gmacs_large(size, patch, input_size):
    _check(size, patch, input_size)


def test_attention_matmuls_are_counted():
    model = build_for_counting("dit", size="S", patch_size=2)
    by_op = gmacs_by_operator(model, 32, 4)
    # 12 blocks x 6 heads x (QK^T + AV) = 12 * 6 * 256 * 256 * (64 + 64)
    assert by_op["scaled_dot_product_attention"] * 1e9 == 12 * 6 * 256 * 256 * 128
    assert count_params(model) == {"params": 32_963_360, "trainable_params": 32_865_056}


class _UnknownOp(nn.Module):
    in_channels = 1

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, t, y):
        return torch.fft.fft2(self.lin(x)).real


def test_unknown_operator_is_an_error_naming_it():
    with pytest.raises(RuntimeError, match="fft"):
        forward_gmacs(_UnknownOp(), 4, 1)
