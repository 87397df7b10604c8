"""A sweep point on a latent store: trained on posterior samples, its evaluation samples decoded through the VAE and
scored with Inception FID against a statistics file (random Inception weights: the code path, not a real score)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from fakedata import fake_latent_store, random_inception_weights, tiny_vae
from omegaconf import OmegaConf

from bench import sweep
from bench.metrics import write_statistics
from diffusion.config import ConfigError, compose


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("latent_sweep")
    vae = tiny_vae(base / "vae")
    return {"store": fake_latent_store(base / "store", vae), "inception": random_inception_weights(base / "inc.pth"),
            "ref": write_statistics(base / "ref.npz", np.zeros(2048), np.eye(2048)), "base": base}


def latent_sweep(files, tmp_path, *extra):
    cfg = compose("bench", [f"results_dir={tmp_path / 'results'}", f"runs_root={tmp_path / 'runs'}",
                            f"cache_dir={tmp_path / 'cache'}", "dataset=latents", f"dataset.root={files['store']}",
                            "dataset.image_size=null",
                            "train.steps=2", "train.batch_size=4", "eval.num_samples=4", "eval.steps=2",
                            "eval.batch_size=4", "progress=false", "threads=1", *extra])
    cfg.sweep.points = OmegaConf.create({"dit": [{"size": "cpu", "patch_size": 2}]})
    return cfg


def test_latent_point_is_decoded_and_scored_with_fid(files, tmp_path):
    cfg = latent_sweep(files, tmp_path, "eval.metric=fid", f"eval.reference={files['ref']}",
                       f"eval.inception_weights={files['inception']}")
    sweep.run_sweep(cfg)
    with open(tmp_path / "results" / "latents" / "runs.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "ok", row["error"]
    assert row["metric_name"] == "fid" and float(row["metric_value"]) > 0
    assert row["image_size"] == "8" and row["channels"] == "4"  # the backbone works on 8x8x4 latents
    assert float(row["vae_gmacs"]) > 0 and float(row["gmacs"]) > 0
    # evaluation grid of decoded 16x16 RGB samples (2 classes, 4 samples: 2 rows of 2 tiles of 64 px + gaps)
    from PIL import Image

    grid = Image.open(next((tmp_path / "runs").rglob("eval_samples.png")))
    assert grid.mode == "RGB" and grid.size[0] == 2 * 64 + 3 * 2


def test_classifier_metric_on_latents_is_refused_with_the_fix(files, tmp_path):
    with pytest.raises(ConfigError, match="eval.metric=fid"):
        sweep.make_scorer(latent_sweep(files, tmp_path))
