"""Every registered backbone trains through the shared trainer, resumes, samples with CFG, and is counted."""

import pytest
import torch
from helpers import SMOKE_KWARGS, train_config

import backbones
from bench.flops import forward_gmacs
from diffusion.sampling import sample_images
from diffusion.trainer import build_from_checkpoint, load_checkpoint, train

NAMES = [n for n in backbones.available() if not n.startswith("test_")]


def tiny(name):
    kw = SMOKE_KWARGS.get(name)
    assert kw, f"add a tiny configuration for backbone {name} to tests/helpers.py SMOKE_KWARGS"
    return {"name": name, **kw}


@pytest.mark.parametrize("name", NAMES)
def test_backbone_trains_on_digits_and_samples_with_cfg(name, tmp_path):
    summary = train(train_config(tmp_path, ["train.steps=3", "train.ckpt_every=3"], tiny(name)))
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["final_loss"]))
    model = build_from_checkpoint(load_checkpoint(tmp_path))
    trained = load_checkpoint(tmp_path)["model"]
    kwargs = load_checkpoint(tmp_path)["config"]["backbone_kwargs"]
    torch.manual_seed(0)  # the trainer seeds with cfg.seed (0) before building: this is the run's exact init
    initial = backbones.build(name, **kwargs).state_dict()
    changed = [k for k in initial if initial[k].is_floating_point() and not torch.equal(trained[k], initial[k])]
    assert len(changed) > len(initial) // 2, f"only {len(changed)} of {len(initial)} tensors moved in training"
    x = sample_images(model, torch.tensor([0, 5]), steps=3, cfg_scale=2.0, seed=0)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    assert forward_gmacs(model, 8, 1) > 0


@pytest.mark.parametrize("name", NAMES)
def test_backbone_trains_at_32x32(name, tmp_path):
    summary = train(train_config(tmp_path, ["dataset.image_size=32", "train.steps=2", "train.batch_size=4"],
                                 tiny(name)))
    assert summary["steps"] == 2
    assert build_from_checkpoint(load_checkpoint(tmp_path)).input_size == 32


def test_dimr_official_fixed_variance_form_with_multiscale_loss(tmp_path):
    """learn_sigma=false (official DiMR): loss = mse + multi-scale auxiliary loss, no vb term."""
    import csv

    train(train_config(tmp_path, ["diffusion.learn_sigma=false", "train.steps=2"], tiny("dimr")))
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        assert float(r["vb"]) == 0 and float(r["aux"]) > 0
        assert float(r["loss"]) == pytest.approx(float(r["mse"]) + float(r["aux"]), rel=1e-4)
    assert build_from_checkpoint(load_checkpoint(tmp_path)).out_channels == 1
