"""Latent diffusion: encode -> store -> train -> sample -> decode through a tiny randomly initialised AutoencoderKL
(diffusers, saved with save_pretrained), on the digits (1 channel, 8x8 -> 4x4x4 latents)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import CONF_DIR, train_config
from hydra import compose, initialize_config_dir

from diffusion.data import DatasetError, load_dataset
from diffusion.extract_latents import extract
from diffusion.latents import LatentDataset, decode_latents, load_vae

TINY_DIT_P1 = {"name": "dit", "size": "S", "depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 1}


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=8)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    assert (path / "diffusion_pytorch_model.safetensors").is_file()
    return path


def extract_cfg(vae_dir, out, *extra):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="extract_latents",
                       overrides=["dataset=digits", f"vae={vae_dir}", f"out={out}", "chunk_size=500",
                                  "batch_size=128", "device=cpu", "progress=false", *extra])


@pytest.fixture(scope="module")
def store(vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "digits"
    extract(extract_cfg(vae_dir, out), rank=0, world_size=1)
    return out


def test_stored_posteriors_equal_a_direct_encode(store, vae_dir):
    images = load_dataset("digits", "train").images
    vae = load_vae(str(vae_dir))
    ds = LatentDataset(store)
    assert (len(ds), ds.channels, ds.image_size, ds.num_classes) == (1438, 4, 4, 10)
    assert ds.scale == pytest.approx(vae.config.scaling_factor)
    raw, labels = ds.fetch(torch.tensor([5, 0, 1000]))
    with torch.no_grad():
        for f, view in enumerate((images, images.flip(-1))):
            dist = vae.encode(view[[5, 0, 1000]]).latent_dist
            torch.testing.assert_close(raw[:, f, 0], dist.mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(raw[:, f, 1], dist.std, atol=1e-5, rtol=1e-5)
    assert labels.tolist() == load_dataset("digits", "train").labels[[5, 0, 1000]].tolist()
    meta = json.loads((store / "meta.json").read_text())
    assert meta["complete"] and meta["shape"] == [1438, 2, 2, 4, 4, 4]


def test_model_input_samples_the_posterior_of_the_chosen_flip(store):
    ds = LatentDataset(store)
    raw, _ = ds.fetch(torch.arange(4))
    noise = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    flip = torch.tensor([False, True, False, True])
    x = ds.model_input(raw, flip, noise)
    expect = torch.stack([(raw[i, int(flip[i]), 0] + raw[i, int(flip[i]), 1] * noise[i]) * ds.scale
                          for i in range(4)])
    torch.testing.assert_close(x, expect)
    assert not torch.allclose(x[1], ds.model_input(raw, torch.zeros(4, dtype=torch.bool), noise)[1])


def test_decode_is_the_vae_decoder_of_unscaled_latents(store, vae_dir):
    ds = LatentDataset(store)
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = load_vae(str(vae_dir)).decode(z / ds.scale).sample.clamp(-1, 1)
    torch.testing.assert_close(ds.decode(z), expect)
    torch.testing.assert_close(decode_latents(load_vae(str(vae_dir)), z, ds.scale, batch_size=2), expect)


def test_interrupted_and_sharded_extraction_resumes_to_the_same_store(vae_dir, store, tmp_path):
    out = tmp_path / "resumed"
    extract(extract_cfg(vae_dir, out, "flips=true"), rank=0, world_size=2, stop_after_chunks=0)
    with pytest.raises(DatasetError, match="incomplete.*rerun"):
        LatentDataset(out)
    extract(extract_cfg(vae_dir, out), rank=1, world_size=2)   # chunk 1 only
    assert not json.loads((out / "meta.json").read_text())["complete"]
    extract(extract_cfg(vae_dir, out), rank=0, world_size=1)   # resumed with another world size: chunks 0 and 2
    np.testing.assert_allclose(np.load(out / "posterior.npy"), np.load(store / "posterior.npy"), atol=1e-6)
    assert json.loads((out / "meta.json").read_text())["complete"]


def test_a_store_of_another_recipe_is_refused_and_left_unchanged(vae_dir, store):
    before = (store / "posterior.npy").stat().st_mtime_ns
    with pytest.raises(DatasetError, match="another recipe.*flips: True -> False"):
        extract(extract_cfg(vae_dir, store, "flips=false"), rank=0, world_size=1)
    assert (store / "posterior.npy").stat().st_mtime_ns == before


def test_missing_vae_names_the_routes(tmp_path):
    from diffusion.latents import VAEError

    (tmp_path / "novae").mkdir()
    with pytest.raises(VAEError, match="no config.json"):
        load_vae(str(tmp_path / "novae"))


def test_train_on_latents_then_sample_decodes_to_pixels(store, tmp_path):
    from diffusion.trainer import train

    cfg = train_config(tmp_path / "run", ["dataset=latents", f"dataset.root={store}", "dataset.random_flip=true",
                                          "train.steps=3", "sample.per_class=1", "sample.steps=2"],
                       backbone=dict(TINY_DIT_P1))
    summary = train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    kwargs = ckpt["config"]["backbone_kwargs"]
    assert (kwargs["input_size"], kwargs["in_channels"], kwargs["num_classes"]) == (4, 4, 10)
    assert ckpt["config"]["identity"]["dataset"]["latents"]["flips"] is True
    samples = np.load(tmp_path / "run" / "samples.npz")["arr_0"]
    assert samples.shape == (10, 8, 8, 1) and samples.dtype == np.uint8  # decoded: 8x8 pixels, not 4x4 latents
    assert summary["steps"] == 3


def test_latent_identity_enters_the_run_key(store, vae_dir, tmp_path):
    from diffusion.config import to_plain
    from diffusion.run import run_identity, run_key

    other = tmp_path / "noflip"
    extract(extract_cfg(vae_dir, other, "flips=false"), rank=0, world_size=1)
    cfg = to_plain(train_config(tmp_path / "x", ["dataset=latents"], backbone=dict(TINY_DIT_P1)))
    keys = {run_key(run_identity(cfg, {"input_size": 4}, "fp32", LatentDataset(s).identity())) for s in (store, other)}
    assert len(keys) == 2
    with pytest.raises(DatasetError, match="random_flip.*flips=true"):
        ds = LatentDataset(other)
        raw, _ = ds.fetch(torch.arange(2))
        ds.model_input(raw, torch.tensor([True, False]), torch.zeros(2, 4, 4, 4))


def test_sample_cli_decodes_a_latent_run(store, tmp_path):
    from diffusion import sample
    from diffusion.trainer import train

    train(train_config(tmp_path / "run", ["dataset=latents", f"dataset.root={store}", "train.steps=2"],
                       backbone=dict(TINY_DIT_P1)))
    out = tmp_path / "grid"
    assert sample.main([str(tmp_path / "run"), "--steps", "2", "--per-class", "1", "--out", str(out)]) == 0
    assert np.load(out.with_suffix(".npz"))["arr_0"].shape == (10, 8, 8, 1)  # pixels, x0 not clipped (latents)
    moved = tmp_path / "moved"
    store.rename(moved)
    try:
        assert sample.main([str(tmp_path / "run"), "--steps", "2", "--per-class", "1", "--out", str(out)]) == 2
    finally:
        moved.rename(store)
