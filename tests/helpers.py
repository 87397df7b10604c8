"""Shared test helpers: compose the real Hydra config of the trainer with overrides."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

TINY_DIT = ["backbone=dit", "backbone.depth=2", "backbone.hidden_size=64", "backbone.num_heads=4"]


def train_config(run_dir, overrides: list[str] = (), backbone: dict | None = None):
    """conf/train.yaml with test-friendly defaults (digits, few steps, no progress bar, no end samples);
    ``backbone`` replaces the whole backbone group (name + constructor keywords)."""
    base = [f"run_dir={run_dir}", "progress=false", "dataset=digits", "train.batch_size=16", "train.steps=4",
            "train.log_every=2", "train.ckpt_every=2", "sample.per_class=0", "threads=2"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=base + list(overrides))
    if backbone is not None:
        cfg.backbone = backbone
    return cfg
