"""LiT: a Simple Linear Diffusion Transformer (Wang et al., ICCV 2025, arXiv 2501.12976).

DiT with every softmax self-attention replaced by few-head ReLU linear attention plus a 5x5 depth-wise
convolution on V. Everything else (patch embedding, sin-cos positions, adaLN-Zero blocks, MLP, final layer,
initialisation) is DiT's own code from ``backbones/dit.py``, so every non-attention parameter name equals DiT's
and a trained DiT initialises a LiT with :func:`inherit_from_dit` (``init_from=`` in the constructor):
every parameter except the attention ones is loaded, as the official class-to-image code does.

Parameters and forward GMACs (batch 1, 32x32x4 latent; computed, not published, see lit.md section 2):
LiT-S/2 33.02M / 5.95, B/2 130.59M / 23.09, L/2 458.26M / 80.91, XL/2 675.34M / 119.43; XL/2 at 64x64x4
676.22M / 477.05 (DiT-XL/2: 524.8).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from runio.files import read_state_dict

from . import register, register_token_mixer
from .dit import DIT_PRESETS, DiT, DiTBlock

log = logging.getLogger(__name__)

# Few heads is LiT's guideline 2 ("free lunch"): S 2, L/XL 4 (paper); B 3 (figure, not stated in the text).
LIT_HEADS = {"S": 2, "B": 3, "L": 4, "XL": 4, "cpu": 2}
LIT_PRESETS = {name: dict(cfg, num_heads=LIT_HEADS[name]) for name, cfg in DIT_PRESETS.items()}


class LinearAttention(nn.Module):
    """LiT's simplified linear attention on a (B, T, D) token sequence laid out row-major on a grid_h x grid_w grid.

    Per head i (head dim d = D / h), with phi(x) = ReLU(x) + eps applied after the projections:

        O = phi(Q) (phi(K)^T V) / (phi(Q) sum_j phi(K_j)^T)  +  DWC(V),    out = O W_proj

    where DWC is a k x k depth-wise conv on V reshaped to the token grid, its d-channel weights shared by all heads.
    ``phi(K)^T V`` (d x d per head) is formed first, so no T x T matrix ever exists: O(T D d) time, O(T D) memory.
    Keys ``q``, ``kv``, ``dwc``, ``proj`` follow the official code.

    Forward multiply-accumulates, counted by fvcore from the matmuls and the conv below (T tokens, h heads):
        projections            T D (D + 2D + D) = 4 T D^2
        phi(Q) mean(phi(K))^T  h T d             = T D         (the normaliser; the mean over tokens is free)
        phi(K)^T V             h d T d           = T D d
        phi(Q) (phi(K)^T V)    h T d d           = T D d
        DWC                    h d T k^2         = k^2 T D
    i.e. 4 T D^2 + T D (2d + 1 + k^2), against 4 T D^2 + 2 T^2 D for softmax attention: cheaper once T > d + 13.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: int | tuple[int, int], kernel_size: int = 5,
                 qkv_bias: bool = True, eps: float = 1e-6, fp32_attention: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}; pick a head count "
                             f"that divides it (LiT uses S 2, B 3, L 4, XL 4)")
        if kernel_size % 2 == 0:
            raise ValueError(f"the depth-wise conv needs an odd kernel_size to keep the grid size, got {kernel_size}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.grid_size = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        self.eps = eps
        self.fp32_attention = fp32_attention
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2,
                             groups=self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def _linear_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, h, T, d) each -> (B, h, T, d). Token sums are taken as means (x 1/T) so they stay O(1) in size."""
        T = q.shape[-2]
        q = torch.relu(q) + self.eps
        k = torch.relu(k) + self.eps
        z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + self.eps)  # (B, h, T, 1)
        kv = (k.transpose(-2, -1) * T ** -0.5) @ (v * T ** -0.5)                    # (B, h, d, d) = phi(K)^T V / T
        return (q @ kv) * z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        gh, gw = self.grid_size
        if T != gh * gw:
            raise ValueError(f"LinearAttention was built for a {gh}x{gw} token grid ({gh * gw} tokens) but got {T} "
                             f"tokens; build the model with the input_size/patch_size of the data")
        h, d = self.num_heads, self.head_dim
        q = self.q(x).reshape(B, T, h, d).transpose(1, 2)
        k, v = self.kv(x).reshape(B, T, 2, h, d).permute(2, 0, 3, 1, 4)
        if self.fp32_attention and torch.is_autocast_enabled(x.device.type):
            # Sums over all tokens in half precision lose digits; the d x d core costs little next to the projections.
            with torch.autocast(x.device.type, enabled=False):
                out = self._linear_attention(q.float(), k.float(), v.float()).to(v.dtype)
        else:
            out = self._linear_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, T, D)
        # Depth-wise conv on V per head on the token grid; the same d-channel conv serves every head.
        v_img = v.reshape(B * h, gh, gw, d).permute(0, 3, 1, 2)
        local = self.dwc(v_img).reshape(B, h, d, T).permute(0, 3, 1, 2).reshape(B, T, D)
        return self.proj(out + local)


@register("lit")
class LiT(DiT):
    """Linear Diffusion Transformer: DiT's macro design with :class:`LinearAttention` in every block.

    ``size`` in S/B/L/XL (DiT's depth and width, LiT's head counts); ``depth``, ``hidden_size``, ``num_heads``
    override it. ``kernel_size`` is the DWC kernel (5). ``init_from`` (path to a DiT checkpoint, or a state_dict)
    loads every DiT parameter except attention after the fresh initialisation; the report is kept in
    ``self.init_report``.
    """

    presets = LIT_PRESETS

    def __init__(self, size: str = "XL", patch_size: int = 2, input_size: int = 32, in_channels: int = 4,
                 num_classes: int = 1000, learn_sigma: bool = True, class_dropout_prob: float = 0.1,
                 depth: int | None = None, hidden_size: int | None = None, num_heads: int | None = None,
                 mlp_ratio: float = 4.0, kernel_size: int = 5,
                 init_from: str | os.PathLike | Mapping[str, torch.Tensor] | None = None):
        self._kernel_size = kernel_size  # read by make_block during DiT.__init__
        super().__init__(size=size, patch_size=patch_size, input_size=input_size, in_channels=in_channels,
                         num_classes=num_classes, learn_sigma=learn_sigma, class_dropout_prob=class_dropout_prob,
                         depth=depth, hidden_size=hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.arch["kernel_size"] = kernel_size
        self.init_report = inherit_from_dit(self, init_from) if init_from is not None else None

    def make_block(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> nn.Module:
        attn = LinearAttention(hidden_size, num_heads, self.x_embedder.grid_size, kernel_size=self._kernel_size)
        return DiTBlock(hidden_size, num_heads, mlp_ratio, attn=attn)

    def inherit_weights(self, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict:
        """Trainer hook behind ``init_from=``: strict DiT -> LiT inheritance (see :func:`inherit_from_dit`)."""
        self.init_report = inherit_from_dit(self, source)
        return self.init_report

    # DiT.initialize_weights already gives the LiT recipe: xavier-uniform q/kv/proj (every nn.Linear), zero
    # biases, and the DWC keeps PyTorch's default conv initialisation.


def _is_attention_key(key: str) -> bool:
    """The official C2I loader drops every key containing ``attn``; in DiT those are exactly blocks.*.attn.*."""
    return ".attn." in key or key.startswith("attn.")


def inherit_from_dit(lit_model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
                     prefer_ema: bool = True) -> dict:
    """LiT guideline 4: load every parameter of a trained DiT except attention; attention keeps its fresh init.

    ``path_or_state_dict``: an official DiT file (a bare state_dict), one of our trainer's checkpoints
    (``{"model", "ema", ...}``; EMA weights preferred) or its run directory, or a state_dict. Loaded with
    ``weights_only=True``. Every non-attention tensor of the model must be present with the same shape (same
    size preset, patch size, input size, classes and learn_sigma), otherwise a ValueError lists the offending keys.

    Returns (and logs) a report: ``loaded`` (keys copied), ``skipped`` (checkpoint keys not used: attention),
    ``fresh`` (model keys left at initialisation: attention), ``loaded_params`` / ``fresh_params`` (counts).
    """
    source, name, _ = read_state_dict(path_or_state_dict, prefer_ema, what="DiT checkpoint")
    target = lit_model.state_dict()
    wanted = [k for k in target if not _is_attention_key(k)]
    missing = [k for k in wanted if k not in source]
    mismatched = [f"{k}: checkpoint {tuple(source[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in wanted if k in source and source[k].shape != target[k].shape]
    unexpected = [k for k in source if not _is_attention_key(k) and k not in target]
    if missing or mismatched or unexpected:
        raise ValueError(
            f"{name} does not match {type(lit_model).__name__}{getattr(lit_model, 'arch', '')} outside attention: "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"shape mismatches {mismatched[:6]}{' ...' if len(mismatched) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}; build the LiT with the DiT's "
            f"size, patch_size, input_size, in_channels, num_classes, learn_sigma and class_dropout_prob > 0")
    with torch.no_grad():
        for k in wanted:
            target[k].copy_(source[k].to(dtype=target[k].dtype))
    fresh = [k for k in target if _is_attention_key(k)]
    report = {
        "source": name,
        "loaded": wanted,
        "skipped": sorted(k for k in source if _is_attention_key(k)),
        "fresh": fresh,
        "loaded_params": sum(target[k].numel() for k in wanted),
        "fresh_params": sum(target[k].numel() for k in fresh),
    }
    log.info("LiT init from %s: loaded %d tensors (%d params); kept fresh %d attention tensors (%d params); "
             "skipped %d checkpoint attention tensors", name, len(report["loaded"]), report["loaded_params"],
             len(fresh), report["fresh_params"], len(report["skipped"]))
    return report


@register_token_mixer("linear_attention")
def _linear_attention_mixer(width: int, grid_h: int, grid_w: int) -> nn.Module:
    """LiT's mixer with LiT-S's head count (2 heads: head dim 192 at width 384)."""
    return LinearAttention(width, 2, (grid_h, grid_w))
