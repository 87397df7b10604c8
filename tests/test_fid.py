"""bench.fid and the reference kinds of bench.metrics: ADM-format statistics, datasets streamed as references,
.npz sample batches, agreement with torch-fidelity, the Inception weights download, the eval.* protocol keys.

Offline throughout: the stand-in extractor of helpers replaces Inception, the downloader is replaced."""

from __future__ import annotations

import ast
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import UInt8Images, register_tiny_extractor
from test_commands import fake_fashion_mnist

from bench import fid, metrics, sweep
from bench.metrics import (
    INCEPTION_WEIGHTS_FILE,
    TORCH_FIDELITY_WEIGHTS_FILE,
    DatasetImages,
    InceptionMetric,
    NpzImages,
    ReferenceStatistics,
    read_statistics,
    resolve_inception_weights,
    to_uint8_rgb,
    write_statistics,
)
from diffusion.config import ConfigError, compose
from diffusion.data import Dataset, load_dataset, load_from_config
from diffusion.sampling import save_npz

REPO = Path(__file__).resolve().parents[1]


def _images(n, seed, c=3, size=16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, c, size, size, generator=g) * 2 - 1) * scale).clamp(-1, 1)


def _tiny(**kw):
    return dict(feature_extractor=register_tiny_extractor(), device="cpu", progress=False, **kw)




# --------------------------------------------------------------------------------------------------------------
# Agreement with torch-fidelity, ADM statistics, datasets as references
# --------------------------------------------------------------------------------------------------------------

def test_npz_batches_fid_equals_torch_fidelity(tmp_path, capsys):
    """FID of two ADM-layout .npz batches (score path and CLI) == torch-fidelity's calculate_metrics on the same
    images with the same extractor."""
    import torch_fidelity

    name = register_tiny_extractor()
    a, b = _images(70, 0, scale=0.8), _images(60, 1)
    save_npz(a, torch.zeros(70, dtype=torch.long), tmp_path / "samples.npz")
    save_npz(b, torch.zeros(60, dtype=torch.long), tmp_path / "ref.npz")
    ours = fid.score_npz(tmp_path / "samples.npz", tmp_path / "ref.npz", batch_size=16, **_tiny())
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(to_uint8_rgb(a)), input2=UInt8Images(to_uint8_rgb(b)), fid=True, cuda=False,
        cache=False, feature_extractor=name, batch_size=16, save_cpu_ram=True, verbose=False)
    assert theirs["frechet_inception_distance"] > 0.01
    assert ours["metric_value"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["num_samples"] == 70
    capsys.readouterr()
    rc = fid.main(["score", f"samples={tmp_path / 'samples.npz'}", f"ref={tmp_path / 'ref.npz'}",
                   f"feature_extractor={name}", "device=cpu", "progress=false", "batch_size=16"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[0].startswith(f"fd_{name}: ")
    assert float(out[0].split(": ")[1]) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz", "samples.npz"]  # score wrote nothing


def test_adm_statistics_give_the_fid_of_their_images(tmp_path):
    """Statistics exported to an ADM-format .npz and imported again give the FID of the images they came from;
    KID needs the file's arr_0 (an error says so without it)."""
    ref, samples = _images(80, 2), _images(50, 3, scale=0.7)
    direct = InceptionMetric(ref, None, kid=True, kid_subset_size=40, **_tiny())
    mu, sigma = direct.reference_statistics()
    write_statistics(tmp_path / "stats.npz", mu, sigma, num_images=np.int64(80))
    imported = InceptionMetric.from_statistics(tmp_path / "stats.npz", **_tiny())
    assert imported.reference is None and isinstance(imported.statistics, ReferenceStatistics)
    want = direct.score(samples)
    assert imported.score(samples)["metric_value"] == pytest.approx(want["metric_value"], rel=1e-12)
    with pytest.raises(ValueError, match="KID and precision/recall need per-sample reference features.*stats.npz"):
        InceptionMetric.from_statistics(tmp_path / "stats.npz", kid=True, **_tiny())
    # An ADM reference batch: statistics, spatial statistics (ignored) and images (for KID / precision-recall).
    adm = tmp_path / "VIRTUAL_tiny.npz"
    arr = to_uint8_rgb(ref).permute(0, 2, 3, 1).numpy()
    np.savez(adm, mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3), arr_0=arr)
    with_images = InceptionMetric.from_statistics(adm, tmp_path / "cache", kid=True, kid_subset_size=40, **_tiny())
    got = with_images.score(samples)
    assert got["metric_value"] == pytest.approx(want["metric_value"], rel=1e-12)
    kid = f"{register_tiny_extractor()}_kid_mean"
    assert got[kid] == pytest.approx(want[kid], rel=1e-9)
    assert with_images.reference_key.startswith("npz-arr_0-")
    with pytest.raises(ValueError, match="dimension 5"):
        InceptionMetric(ReferenceStatistics(np.zeros(5), np.eye(5)), None, **_tiny()).score(samples)


class _Counting(Dataset):
    """A dataset wrapper recording the size of every fetch (a reference must be streamed, never fetched whole)."""

    def __init__(self, inner, identity=None):
        self.inner, self.sizes, self._identity = inner, [], identity or {}
        self.name, self.num_classes, self.class_names = inner.name, inner.num_classes, inner.class_names
        self.channels, self.image_size = inner.channels, inner.image_size

    def __len__(self):
        return len(self.inner)

    def identity(self):
        return dict(self._identity)

    def fetch(self, idx):
        self.sizes.append(len(idx))
        return self.inner.fetch(idx)


def test_dataset_reference_equals_tensor_reference_and_is_streamed(tmp_path, monkeypatch):
    ds = load_dataset("digits", "train")
    counting = _Counting(ds)
    m = InceptionMetric(counting, tmp_path / "cache", split="train", batch_size=100, **_tiny())
    mu, sigma = m.reference_statistics()
    t_mu, t_sigma = InceptionMetric(ds.images, tmp_path / "cache", batch_size=100, **_tiny()).reference_statistics()
    assert np.array_equal(mu, t_mu) and np.array_equal(sigma, t_sigma)  # same images, same statistics
    assert max(counting.sizes) <= 100 and sum(counting.sizes) >= len(ds)
    key = m.reference_key
    assert key.startswith("ref-digits-train-") and key.endswith("-wnone")
    # The key is the dataset's identity: cached statistics are reused without extracting again ...
    monkeypatch.setattr(InceptionMetric, "_extract", lambda *a, **k: pytest.fail("extracted again"))
    again = InceptionMetric(_Counting(ds), tmp_path / "cache", split="train", batch_size=100, **_tiny())
    assert again.reference_key == key and np.array_equal(again.reference_statistics()[0], mu)
    monkeypatch.undo()
    # ... and never under another split, dataset recipe (identity), length or data.
    others = [InceptionMetric(_Counting(ds), None, split="test", **_tiny()),
              InceptionMetric(_Counting(ds, {"crop": "ddim"}), None, split="train", **_tiny()),
              InceptionMetric(DatasetImages(_Counting(ds), "train", limit=100), None, **_tiny()),
              InceptionMetric(_Counting(load_dataset("digits", "train", image_size=8)), None, split="train",
                              **_tiny())]
    keys = [o.reference_key for o in others]
    assert keys[3] == key and len({key, *keys[:3]}) == 4
    shifted = load_dataset("digits", "train")
    shifted.images = (shifted.images + 0.5).clamp(-1, 1)
    assert InceptionMetric(shifted, None, split="train", **_tiny()).reference_key != key
    with pytest.raises(ValueError, match="split='train' applies to a Dataset reference only"):
        InceptionMetric(ds.images, None, split="train", **_tiny())


def test_ref_command_writes_adm_statistics_of_a_dataset(tmp_path, capsys):
    name = register_tiny_extractor()
    out = tmp_path / "stats" / "digits_train.npz"
    args = ["ref", "dataset=digits", "split=train", f"out={out}", f"feature_extractor={name}", "device=cpu",
            "progress=false", "batch_size=100"]
    assert fid.main(args) == 0
    assert "wrote" in capsys.readouterr().out
    stats = read_statistics(out)
    ds = load_dataset("digits", "train")
    mu, sigma = InceptionMetric(ds.images, None, batch_size=100, **_tiny()).reference_statistics()
    assert np.array_equal(stats.mu, mu) and np.array_equal(stats.sigma, sigma) and stats.images is None
    with np.load(out, allow_pickle=False) as z:
        assert sorted(z.files) == ["mu", "num_images", "sigma"] and int(z["num_images"]) == len(ds)
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # atomic: no temporaries left
    assert fid.main(args[:3] + [f"out={tmp_path / 'first100.npz'}", "limit=100"] + args[4:]) == 0
    with np.load(tmp_path / "first100.npz", allow_pickle=False) as z:
        assert int(z["num_images"]) == 100
    # bad command lines: one line, exit 2
    for bad, msg in ((["ref", "split=train", f"out={out}"], "ref needs dataset="),
                     (["ref", "dataset=digits"], "ref needs out="),
                     (["ref", "dataset=digits", f"out={out}", "limit=0"], "limit='0' must be an integer >= 1"),
                     (["score", "samples=a.npz", "ref=b.npz", "dataset=digits"], "unknown key 'dataset'"),
                     (["score", "samples", "ref=b.npz"], "arguments are key=value"),
                     (["nope"], "unknown command 'nope'")):
        capsys.readouterr()
        assert fid.main(bad) == 2, bad
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_latent_datasets_are_refused_as_image_references():
    class Latents(_Counting):
        pixel_space = False

    with pytest.raises(ValueError, match="holds VAE latents.*eval.reference"):
        InceptionMetric(Latents(load_dataset("digits", "test")), None, **_tiny())


# --------------------------------------------------------------------------------------------------------------
# Reading .npz files: validation, no unpickling, streaming
# --------------------------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.mkdir, (self.sentinel,)


def test_read_statistics_validation(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz: no such file; expected an FID statistics .npz"):
        read_statistics(tmp_path / "nope.npz")
    cases = {
        "keys.npz": (dict(m=np.zeros(3), s=np.eye(3)), r"keys.npz has no mu or sigma \(it holds m, s\); expected "
                                                       r"an FID statistics .npz holding mu \(D,\) and sigma \(D, D\)"),
        "shape.npz": (dict(mu=np.zeros(3), sigma=np.eye(4)), r"shape.npz: mu \(3,\) and sigma \(4, 4\) do not fit"),
        "ndim.npz": (dict(mu=np.zeros((3, 1)), sigma=np.eye(3)), r"ndim.npz: mu is a float64 array of shape"),
        "int.npz": (dict(mu=np.zeros(3, np.int64), sigma=np.eye(3)), "int.npz: mu is a int64 array"),
        "nan.npz": (dict(mu=np.full(3, np.nan), sigma=np.eye(3)), "nan.npz: mu or sigma contains NaN"),
    }
    for name, (arrays, msg) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=msg):
            read_statistics(tmp_path / name)
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single.npy holds a single array, not an .npz archive"):
        read_statistics(tmp_path / "single.npy")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="text.npz cannot be read"):
        read_statistics(tmp_path / "text.npz")


def test_pickled_npz_files_are_refused_without_unpickling(tmp_path):
    sentinel = tmp_path / "sentinel"
    obj = np.array([_Payload(sentinel)], dtype=object)
    np.savez(tmp_path / "stats.npz", mu=obj, sigma=obj)
    np.savez(tmp_path / "samples.npz", arr_0=obj)
    with pytest.raises(ValueError, match="stats.npz: Object arrays cannot be loaded"):
        read_statistics(tmp_path / "stats.npz")
    with pytest.raises(ValueError, match="stats.npz: Object arrays cannot be loaded"):
        fid.load_reference(tmp_path / "stats.npz")
    with pytest.raises(ValueError, match=r"samples.npz: arr_0 is a object array of shape \(1,\); expected uint8"):
        NpzImages(tmp_path / "samples.npz")
    with pytest.raises(ValueError, match="samples.npz: arr_0 is a object array"):
        fid.load_reference(tmp_path / "samples.npz")
    assert not sentinel.exists()
    with np.load(tmp_path / "samples.npz", allow_pickle=True) as z:  # the payload is live: an unsafe load runs it
        z["arr_0"]
    assert sentinel.exists()


def test_npz_images_validate_and_stream(tmp_path, capsys):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (37, 12, 10, 3), dtype=np.uint8)
    np.savez(tmp_path / "ok.npz", arr_0=arr, labels=np.arange(37))
    src = NpzImages(tmp_path / "ok.npz")
    assert len(src) == 37 and src.image_shape == (3, 12, 10)
    got = torch.cat(list(src.batches(8)))
    assert torch.equal(got, torch.from_numpy(arr).permute(0, 3, 1, 2))
    gray = rng.integers(0, 256, (5, 6, 6, 1), dtype=np.uint8)
    np.savez_compressed(tmp_path / "gray.npz", arr_0=gray)  # deflated members stream too
    assert torch.equal(torch.cat(list(NpzImages(tmp_path / "gray.npz").batches(2))),
                       torch.from_numpy(gray).permute(0, 3, 1, 2).repeat(1, 3, 1, 1))
    bad = {"float.npz": (arr.astype(np.float32), r"arr_0 is a float32 array of shape \(37, 12, 10, 3\)"),
           "nchw.npz": (arr.transpose(0, 3, 1, 2).copy(), r"arr_0 is a uint8 array of shape \(37, 3, 12, 10\)"),
           "flat.npz": (arr.reshape(37, -1), r"arr_0 is a uint8 array of shape \(37, 360\)")}
    for name, (a, msg) in bad.items():
        np.savez(tmp_path / name, arr_0=a)
        with pytest.raises(ValueError, match=f"{name}: {msg}; expected uint8 images \\(N, H, W, 3\\) under arr_0"):
            NpzImages(tmp_path / name)
    np.savez(tmp_path / "other.npz", images=arr)
    with pytest.raises(ValueError, match=r"other.npz has no arr_0 array \(it holds images\)"):
        NpzImages(tmp_path / "other.npz")
    rc = fid.main(["score", f"samples={tmp_path / 'float.npz'}", f"ref={tmp_path / 'ok.npz'}", "progress=false",
                   f"feature_extractor={register_tiny_extractor()}"])
    err = capsys.readouterr().err
    assert rc == 2 and "float.npz: arr_0 is a float32 array" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="neither FID statistics nor images"):
        fid.load_reference(tmp_path / "other.npz")


# --------------------------------------------------------------------------------------------------------------
# Inception weights: local caches first, then torch-fidelity's download (never in tests unless simulated)
# --------------------------------------------------------------------------------------------------------------

def test_inception_weights_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    hub = tmp_path / "home" / "hub" / "checkpoints"
    calls = []

    def offline(url, dst, progress=True):
        calls.append(url)
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(metrics, "_download_url", offline)
    # The suite runs with BENCH_OFFLINE=1: no attempt at all.
    with pytest.raises(FileNotFoundError, match="download is disabled by BENCH_OFFLINE=1"):
        resolve_inception_weights(None)
    assert calls == []
    monkeypatch.delenv("BENCH_OFFLINE")
    with pytest.raises(FileNotFoundError) as e:
        resolve_inception_weights(None)
    msg = str(e.value)
    assert calls == [metrics.INCEPTION_WEIGHTS_URLS[1]] and "Name or service not known" in msg
    assert f"eval.inception_weights=/path/to/{INCEPTION_WEIGHTS_FILE}" in msg  # both routes named
    assert str(hub / TORCH_FIDELITY_WEIGHTS_FILE) in msg
    assert not list(hub.iterdir())  # nothing left behind

    def foreign(url, dst, progress=True):  # e.g. a proxy's HTML page
        Path(dst).write_text("<html>")

    monkeypatch.setattr(metrics, "_download_url", foreign)
    with pytest.raises(FileNotFoundError, match="not a tensor-only state dict"):
        resolve_inception_weights(None)
    assert not list(hub.iterdir())

    def stand_in(url, dst, progress=True):
        calls.append(url)
        torch.save({"fc.weight": torch.zeros(1008, 2048)}, dst)

    monkeypatch.setattr(metrics, "_download_url", stand_in)
    calls.clear()
    assert resolve_inception_weights(None) == hub / TORCH_FIDELITY_WEIGHTS_FILE
    assert resolve_inception_weights(None) == hub / TORCH_FIDELITY_WEIGHTS_FILE  # found where the loader looks
    assert calls == [metrics.INCEPTION_WEIGHTS_URLS[1]] and sorted(p.name for p in hub.iterdir()) == [
        TORCH_FIDELITY_WEIGHTS_FILE]


# --------------------------------------------------------------------------------------------------------------
# eval.* protocol keys: labels, reference; published point keys unchanged
# --------------------------------------------------------------------------------------------------------------

def test_published_point_keys_are_unchanged(tmp_path):
    """Every row of results/published/fashion_mnist/runs.csv keeps its keys (computed from its grid point on a
    stand-in copy of Fashion-MNIST: the keys depend on the data's shape, not its pixels)."""
    root = tmp_path / "fmnist"
    root.mkdir()
    fake_fashion_mnist(root)
    cfg = compose("bench", [f"dataset.root={root}", "device=cpu"])
    dataset = load_from_config(cfg.dataset, "train")
    with open(REPO / "results" / "published" / "fashion_mnist" / "runs.csv") as f:
        published = list(csv.DictReader(f))
    # backbones added after the published run (dis) have grid points but no published rows yet
    published_backbones = {row["backbone"] for row in published}
    points = [(n, dict(p)) for n in cfg.sweep.points if n in published_backbones for p in cfg.sweep.points[n]]
    assert len(points) == len(published) == 10
    for (name, overrides), row in zip(points, published):
        keys = sweep.point_keys(sweep.point_config(cfg, name, overrides), dataset)
        assert {k: keys[k] for k in ("point_key", "run_key", "recipe_key")} == \
            {k: row[k] for k in ("point_key", "run_key", "recipe_key")}, (name, overrides)
    name, overrides = points[0]

    def keys_with(*extra):
        c = compose("bench", [f"dataset.root={root}", "device=cpu", *extra])
        return sweep.point_keys(sweep.point_config(c, name, overrides), dataset)

    default = keys_with()
    assert keys_with("eval.labels=balanced", "eval.reference=test") == default  # defaults spelled out: same key
    uniform = keys_with("eval.labels=uniform")
    assert uniform["point_key"] != default["point_key"] and uniform["recipe_key"] != default["recipe_key"]
    assert uniform["train_key"] == default["train_key"]  # an evaluation change reuses the checkpoint
    fid_keys = {r: keys_with("eval.metric=fid", f"eval.reference={r}")["point_key"]
                for r in ("test", "train", "/data/VIRTUAL_imagenet256_labeled.npz")}
    assert len(set(fid_keys.values())) == 3


def test_eval_config_values_are_checked():
    assert compose("bench", ["eval.metric=fid", "eval.reference=train", "eval.labels=uniform"]).eval.labels == \
        "uniform"
    with pytest.raises(ConfigError, match="eval.labels"):
        compose("bench", ["eval.labels=random"])
    with pytest.raises(ConfigError, match="eval.reference='val': choose test or train .* or an FID statistics .npz"):
        compose("bench", ["eval.metric=fid", "eval.reference=val"])
    with pytest.raises(ConfigError, match="eval.reference=train applies to eval.metric=fid"):
        compose("bench", ["eval.reference=train"])


def test_evaluation_labels():
    assert torch.equal(fid.evaluation_labels(23, 10), torch.arange(23) % 10)
    state = torch.get_rng_state()
    u = fid.evaluation_labels(5000, 10, "uniform", seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    assert torch.equal(u, fid.evaluation_labels(5000, 10, "uniform", seed=3))  # same seed, same labels
    assert not torch.equal(u, fid.evaluation_labels(5000, 10, "uniform", seed=4))
    counts = torch.bincount(u, minlength=10)
    assert u.dtype == torch.int64 and u.min() >= 0 and u.max() <= 9 and counts.min() > 400 and counts.max() < 600
    assert not torch.equal(counts, torch.full((10,), 500))  # random, not balanced
    with pytest.raises(ValueError, match="choose one of balanced, uniform"):
        fid.evaluation_labels(4, 10, "zipf")


def test_make_scorer_takes_the_reference_from_eval_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "_resolve_inception_weights", lambda w: (tmp_path / "w.pth", "0" * 64))
    base = ["dataset=digits", f"cache_dir={tmp_path}", "progress=false", "device=cpu", "eval.metric=fid"]
    train = sweep.make_scorer(compose("bench", base + ["eval.reference=train"]))
    assert isinstance(train.reference, DatasetImages) and train.reference.split == "train"
    assert len(train.reference) == len(load_dataset("digits", "train"))
    test = sweep.make_scorer(compose("bench", base))
    assert test.reference.split == "test" and len(test.reference) == len(load_dataset("digits", "test"))
    assert test.class_names == [str(i) for i in range(10)]
    write_statistics(tmp_path / "ref.npz", np.zeros(4), np.eye(4))
    stats = sweep.make_scorer(compose("bench", base + [f"eval.reference={tmp_path / 'ref.npz'}"]))
    assert stats.reference is None and stats.statistics.path == tmp_path / "ref.npz"
    with pytest.raises(FileNotFoundError, match="missing.npz: no such file"):
        sweep.make_scorer(compose("bench", base + [f"eval.reference={tmp_path / 'missing.npz'}"]))
    made = []
    monkeypatch.setattr(metrics, "ClassifierMetric", lambda *a, **k: made.append((a, k)) or type("C", (), {})())
    cfg = compose("bench", ["dataset=digits", f"cache_dir={tmp_path}", "progress=false"])
    sweep.make_scorer(cfg)
    (args, kwargs), = made  # the classifier path is unchanged: train and test split tensors
    assert args[0] == "digits" and torch.equal(args[1], load_from_config(cfg.dataset, "train").images)
    assert torch.equal(args[3], load_from_config(cfg.dataset, "test").images)


# --------------------------------------------------------------------------------------------------------------
# Command line and source guards
# --------------------------------------------------------------------------------------------------------------

def test_help_runs_offline_and_writes_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "bench.fid", "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "python -m bench.fid ref dataset=" in proc.stdout and "python -m bench.fid score samples=" in proc.stdout
    assert not list(tmp_path.iterdir())


def test_fid_source_loads_nothing_unsafely():
    tree = ast.parse((REPO / "bench" / "fid.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith((".load", ".loads")):
            kw = {k.arg: k.value for k in node.keywords}
            assert ast.unparse(node.func) == "np.load" and isinstance(kw.get("allow_pickle"), ast.Constant) \
                and kw["allow_pickle"].value is False, ast.unparse(node)


def test_published_scaling_study_is_the_cpu_scaling_grid_at_both_seeds(tmp_path):
    """results/published/scaling/fashion_mnist/runs.csv holds exactly conf/sweep/cpu_scaling.yaml's points (those of
    the backbones it was run for) at seeds 0 and 1, under the keys the grid gives them today, all ok."""
    root = tmp_path / "fmnist"
    root.mkdir()
    fake_fashion_mnist(root)
    cfg = compose("bench", [f"dataset.root={root}", "device=cpu", "sweep=cpu_scaling"])
    dataset = load_from_config(cfg.dataset, "train")
    with open(REPO / "results" / "published" / "scaling" / "fashion_mnist" / "runs.csv") as f:
        published = {(r["point_key"]): r for r in csv.DictReader(f)}
    backbones = {r["backbone"] for r in published.values()}
    assert backbones == set(cfg.sweep.axes) == {"dit", "lit", "rwkv", "dico", "dimr", "dis"}
    points, skipped = sweep.expand_grid(cfg, sorted(backbones), dataset)
    assert not skipped and len(points) == 24 and len(published) == 48
    for seed in (0, 1):
        for name, overrides in points:
            keys = sweep.point_keys(sweep.point_config(cfg, name, overrides, seed=seed), dataset)
            row = published[keys["point_key"]]
            assert (row["run_key"], row["recipe_key"], row["seed"], row["status"]) == \
                (keys["run_key"], keys["recipe_key"], str(seed), "ok"), (name, overrides, seed)


def test_readme_scaling_table_is_the_published_csv():
    """The README's scaling-study table shows exactly the published CSV: per point both seeds' metric and their mean."""
    import re

    text = (REPO / "README.md").read_text()
    section = text[text.index("### Scaling study"):]
    rows = re.findall(r"^\| (\w+) \| ([\d-]+) \| (\d+) \| [\d.]+M \| ([\d.]+) \| ([\d.]+) / ([\d.]+) \| ([\d.]+) \|",
                      section, re.M)
    with open(REPO / "results" / "published" / "scaling" / "fashion_mnist" / "runs.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(rows) == 24
    for name, patch, width, gmacs, fd0, fd1, mean in rows:
        patch = "" if patch == "-" else patch  # DiCo has no patch size
        point = [r for r in csv_rows if (r["backbone"], r["width"], r["patch"]) == (name, width, patch)
                 and f"{float(r['gmacs']):.4f}" == gmacs]
        by_seed = {r["seed"]: float(r["metric_value"]) for r in point}
        assert sorted(by_seed) == ["0", "1"], (name, patch, width)
        assert (f"{by_seed['0']:.2f}", f"{by_seed['1']:.2f}") == (fd0, fd1)
        assert f"{(by_seed['0'] + by_seed['1']) / 2:.2f}" == mean
