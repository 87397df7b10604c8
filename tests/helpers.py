"""Shared test helpers: compose the real Hydra config of the trainer with overrides."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import backbones
from backbones.dit import DiT

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

TINY_DIT = ["backbone=dit", "backbone.depth=2", "backbone.hidden_size=64", "backbone.num_heads=4"]

# Constructor overrides for a tiny instance of every registered backbone (a few thousand to ~100k parameters),
# used by the registry-wide training smoke tests.
SMOKE_KWARGS = {
    "dit": dict(size="S", depth=2, hidden_size=64, num_heads=4),
    "lit": dict(size="S", depth=2, hidden_size=64, num_heads=4),
    "rwkv": dict(size="S", depth=3, hidden_size=32),
    "dico": dict(size="S", hidden_size=16, depth=5),
    "dimr": dict(size="S/2R", depth=3, hidden_size=32, num_heads=2),  # ~55k params on digits
    "dis": dict(size="S", depth=2, hidden_size=32),  # 3 blocks, ~55k params on digits
}


def train_config(run_dir, overrides: list[str] = (), backbone: dict | None = None):
    """conf/train.yaml with test-friendly defaults (digits, few steps, no progress bar, no end samples);
    ``backbone`` replaces the whole backbone group (name + constructor keywords). One torch thread: the tiny models
    run several times faster than with two, and `make test` runs one xdist worker per core."""
    base = [f"run_dir={run_dir}", "progress=false", "dataset=digits", "train.batch_size=16", "train.steps=4",
            "train.log_every=2", "train.ckpt_every=2", "sample.per_class=0", "threads=1"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=base + list(overrides))
    if backbone is not None:
        cfg.backbone = backbone
    return cfg


@backbones.register("test_diverging")
class DivergingDiT(DiT):
    """A DiT whose output turns NaN from the 3rd training forward on (to test divergence handling); with the
    environment variable NAN_ONLY_ON_RANK set, only on that torchrun rank."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = 0

    def forward(self, x, t, y):
        out = super().forward(x, t, y)
        if self.training:
            self.calls += 1
            only = os.environ.get("NAN_ONLY_ON_RANK")
            if self.calls >= 3 and (only is None or os.environ.get("RANK") == only):
                out = out * float("nan")
        return out


TINY_EXTRACTOR = "tiny-test-extractor"


def register_tiny_extractor() -> str:
    """Register (once) and name a tiny stand-in feature extractor with torch-fidelity, for the metric tests that run
    without Inception weights: 4x4 average-pooled pixels (48 features, every metric's layer "feat") and a fixed
    linear projection of them as "logits" (the Inception Score's layer)."""
    import torch
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if TINY_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY:
        return TINY_EXTRACTOR

    class Tiny(torch_fidelity.FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.proj = torch.nn.Linear(48, 10)
            with torch.no_grad():
                self.proj.weight.copy_(torch.linspace(-1, 1, 480).reshape(10, 48))
                self.proj.bias.zero_()

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            f = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
            out = {"feat": f, "logits": self.proj(f)}
            return tuple(out[k] for k in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return "feat", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits"}.get(metric, "feat")

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    torch_fidelity.register_feature_extractor(TINY_EXTRACTOR, Tiny)
    return TINY_EXTRACTOR


def make_inputs(T: int, B: int, C: int, kind: str = "normal", seed: int = 0, dtype=None):
    """Bi-WKV inputs: w, u as in the model (spatial_decay / T with spatial_decay in [-5, 3], spatial_first / T); k, v
    standard normal. kind="large_k": per-channel key offsets in [-100, 100] plus 2% spikes of +30 (e^k overflows
    fp32 naively). ``dtype`` None keeps float32."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g) * 8 - 5) / T
    u = (torch.randn(C, generator=g) - 1.2) / T
    k = torch.randn(B, T, C, generator=g)
    v = torch.randn(B, T, C, generator=g)
    if kind == "large_k":
        k = 2 * k + (torch.rand(C, generator=g) * 200 - 100) + 30 * (torch.rand(B, T, C, generator=g) < 0.02)
    return tuple(x.to(dtype) for x in (w, u, k, v)) if dtype is not None else (w, u, k, v)


class UInt8Images(torch.utils.data.Dataset):
    """A map-style dataset of uint8 (3, H, W) tensors: torch-fidelity's ``input1``/``input2`` form."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]
