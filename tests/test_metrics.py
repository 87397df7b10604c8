"""bench.metrics: Frechet distance, the torch-fidelity plumbing (offline), the classifier metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import UInt8Images, register_tiny_extractor
from scipy import linalg

from bench.metrics import (
    INCEPTION_WEIGHTS_FILE,
    TORCH_FIDELITY_WEIGHTS_FILE,
    WEIGHTS_CONFIG_KEY,
    ClassifierMetric,
    InceptionMetric,
    content_hash,
    feature_statistics,
    frechet_distance,
    resolve_inception_weights,
    to_uint8_rgb,
    to_unit_range,
)
from diffusion import sampling


def _features(n=2000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ a + rng.standard_normal(d)


def _fd_eig(f1, f2):
    """Independent computation: Tr sqrt(S1 S2) as the sum of square roots of the eigenvalues of S1 S2."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    tr = np.sqrt(linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


# --------------------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------------------

def test_fd_identical_sets_is_zero():
    f = _features()
    assert abs(frechet_distance(*feature_statistics(f), *feature_statistics(f.copy()))) < 1e-6
    tf = torch.from_numpy(f).float()
    assert abs(frechet_distance(*feature_statistics(tf), *feature_statistics(tf))) < 1e-6


def test_fd_equal_covariance_is_squared_mean_shift():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((8, 8))
    sigma = a @ a.T + 0.1 * np.eye(8)
    mu = rng.standard_normal(8)
    for scale in (0.0, 0.5, 1.0, 3.0):
        shift = scale * np.arange(1, 9) / 8
        fd = frechet_distance(mu, sigma, mu + shift, sigma)
        assert fd == pytest.approx(float(shift @ shift), rel=1e-9, abs=1e-9)
    # On features: a constant shift leaves the covariance unchanged, so FD = ||shift||^2 and grows with it.
    f = _features()
    shifts = [0.1, 0.5, 2.0]
    fds = [frechet_distance(*feature_statistics(f), *feature_statistics(f + s)) for s in shifts]
    for s, fd in zip(shifts, fds):
        assert fd == pytest.approx(16 * s * s, rel=1e-6)
    assert fds == sorted(fds)


def test_fd_agrees_with_direct_scipy_computation():
    f1, f2 = _features(seed=0), _features(seed=1) * 1.3
    fd = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    assert fd > 1.0
    assert fd == pytest.approx(_fd_eig(f1, f2), rel=1e-6)
    # torch-fidelity's own formula on the same statistics.
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    (m1, s1), (m2, s2) = feature_statistics(f1), feature_statistics(f2)
    ref = fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, False)
    assert fd == pytest.approx(ref["frechet_inception_distance"], rel=1e-6)


def test_fd_singular_covariance_and_bad_shapes():
    f = _features(n=10, d=32)  # N < D: singular covariances
    assert abs(frechet_distance(*feature_statistics(f), *feature_statistics(f))) < 1e-4
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))


# --------------------------------------------------------------------------------------------------------------
# Inception metrics: weights resolution and torch-fidelity plumbing with a tiny registered extractor
# --------------------------------------------------------------------------------------------------------------

def test_missing_inception_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as e:
        resolve_inception_weights(None)
    msg = str(e.value)
    assert INCEPTION_WEIGHTS_FILE in msg and f"{WEIGHTS_CONFIG_KEY}=/path/to/" in msg
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / TORCH_FIDELITY_WEIGHTS_FILE) in msg
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        InceptionMetric(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_inception_weights(tmp_path / "nope.pth")


def test_inception_weights_from_cache_and_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    fake = hub / INCEPTION_WEIGHTS_FILE  # pytorch-fid's cache name is accepted too
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, fake)
    assert resolve_inception_weights(None) == fake
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="fc.weight"):
        resolve_inception_weights(bad)


def _images(n, seed, c=1, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


def test_torch_fidelity_plumbing_offline(tmp_path):
    name = register_tiny_extractor()
    ref = _images(120, 0)
    m = InceptionMetric(ref, tmp_path / "cache", feature_extractor=name, kid=True, batch_size=50)
    assert m.metric_name == f"fd_{name}"  # never labelled "fid" without Inception
    same = m.score(ref)
    assert abs(same["metric_value"]) < 1e-6 and same["metric_name"] == f"fd_{name}"
    assert np.isfinite(same[f"{name}_kid_mean"])  # unbiased MMD: near 0 (slightly negative) for one set
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any(p.startswith(m.reference_key) and "stat-fid" in p for p in cached), cached
    shifted = m.score((ref * 0.5 + 0.3).clamp(-1, 1))
    assert shifted["metric_value"] > 0.01
    assert shifted[f"{name}_kid_mean"] > same[f"{name}_kid_mean"] + 0.01
    # Same FD as our formula on the same features (grayscale repeated to RGB, uint8, 4x4 pooled).
    feat = lambda x: torch.nn.functional.adaptive_avg_pool2d(to_uint8_rgb(x).float() / 255, 4).flatten(1)  # noqa
    direct = frechet_distance(*feature_statistics(feat((ref * 0.5 + 0.3).clamp(-1, 1))),
                              *feature_statistics(feat(ref)))
    assert shifted["metric_value"] == pytest.approx(direct, rel=1e-4, abs=1e-7)
    # Second instance: same cache key (content hash), cache reused.
    m2 = InceptionMetric(ref.clone(), tmp_path / "cache", feature_extractor=name)
    assert m2.reference_key == m.reference_key
    assert m2.score((ref * 0.5 + 0.3).clamp(-1, 1))["metric_value"] == pytest.approx(shifted["metric_value"])
    with pytest.raises(ValueError, match="differ in shape"):
        m.score(_images(10, 1, size=16))


def test_one_to_uint8_for_samples_and_references():
    """The sweep scores ``sampling.to_uint8(samples)``; references go through the metrics' conversions: both are the
    same function with DiT's rounding, so every float (ties included) lands on the same 8-bit level."""
    from bench import metrics

    assert metrics.to_uint8 is sampling.to_uint8
    u = torch.arange(255, dtype=torch.float64)
    # Halfway between levels u and u+1 (x = 0 is the one exact float32 tie): 169 of these x map differently
    # under round((x + 1) * 127.5), the rounding bench.metrics used to have.
    ties = (u + 0.5) / 127.5 - 1
    x = torch.cat([ties, ties + 1e-7, ties - 1e-7, torch.linspace(-1.2, 1.2, 4801, dtype=torch.float64)])
    x = x.float().reshape(1, 1, 1, -1)
    sample_path = sampling.to_uint8(x)
    assert torch.equal(sample_path, torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8))  # DiT sample.py
    assert torch.equal(to_uint8_rgb(x), sample_path.repeat(1, 3, 1, 1))  # InceptionMetric's reference path
    assert torch.equal(to_unit_range(x), to_unit_range(sample_path))  # ClassifierMetric's reference path
    assert sampling.to_uint8(torch.zeros(1, 1, 1, 1)).item() == 128  # the exact tie goes up (DiT)
    assert torch.equal(sampling.to_uint8(x.double()), sample_path)
    assert sampling.to_uint8(np.array([[[[-1.0, 1.0]]]], np.float32)).tolist() == [[[[0, 255]]]]
    q = torch.randint(0, 256, (2, 1, 2, 2), dtype=torch.uint8)
    assert torch.equal(sampling.to_uint8(q), q)  # uint8 passes through


def test_to_uint8_validation():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        sampling.to_uint8(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match="no images"):
        sampling.to_uint8(torch.zeros(0, 1, 4, 4))
    with pytest.raises(TypeError, match="uint8 or floating"):
        sampling.to_uint8(torch.zeros(1, 1, 4, 4, dtype=torch.int64), "samples")


def test_image_conversion_errors():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        to_uint8_rgb(torch.full((2, 1, 4, 4), 200.0))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_uint8_rgb(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        to_uint8_rgb(torch.zeros(4, 4, 4))
    x = to_uint8_rgb(torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3))
    assert x.shape == (1, 3, 1, 3) and x[0, :, 0].tolist() == [[0, 128, 255]] * 3




def test_scores_match_torch_fidelity_calculate_metrics(tmp_path):
    """Features extracted here + torch-fidelity's metric functions == its calculate_metrics (run without a cache)."""
    import torch_fidelity

    name = register_tiny_extractor()
    ref, samples = _images(60, 0), (_images(50, 1) * 0.7).clamp(-1, 1)
    opts = dict(kid=True, isc=True, prc=True, batch_size=16, kid_subset_size=40, seed=7)
    ours = InceptionMetric(ref, tmp_path / "cache", feature_extractor=name, progress=False, **opts).score(samples)
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(to_uint8_rgb(samples)), input2=UInt8Images(to_uint8_rgb(ref)), cache=False,
        cuda=False, fid=True, kid=True, isc=True, prc=True, feature_extractor=name, batch_size=16,
        kid_subset_size=40, rng_seed=7, save_cpu_ram=True, verbose=False)
    assert ours[f"fd_{name}"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-9)
    assert ours[f"{name}_kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9)
    assert ours[f"{name}_isc_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    assert ours[f"{name}_precision"] == theirs["precision"] and ours[f"{name}_recall"] == theirs["recall"]


def test_inception_metric_progress_and_extractor_guards(tmp_path, capsys):
    name = register_tiny_extractor()
    ref = _images(20, 0)
    InceptionMetric(ref, tmp_path / "a", feature_extractor=name, progress=False).score(ref)
    assert capsys.readouterr() == ("", "")  # nothing on stdout or stderr
    InceptionMetric(ref, tmp_path / "b", feature_extractor=name).score(ref)
    out, err = capsys.readouterr()
    assert out == "" and f"fd_{name}: reference features" in err and f"fd_{name}: sample features" in err
    with pytest.raises(ValueError, match="built-in extractor 'vgg16'"):  # unpickles / downloads its weights
        InceptionMetric(ref, tmp_path, feature_extractor="vgg16")
    with pytest.raises(ValueError, match="applies to inception-v3-compat only"):
        InceptionMetric(ref, tmp_path, feature_extractor=name, inception_weights=str(tmp_path / "w.pth"))


@pytest.mark.slow
def test_random_init_inception_through_torch_fidelity(tmp_path, monkeypatch):
    """The real inception-v3-compat path with a random-init weights file the test creates (plumbing only)."""
    from fakedata import random_inception_weights

    weights = random_inception_weights(tmp_path / "rand_inception.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    ref = _images(12, 0)
    m = InceptionMetric(ref, tmp_path / "cache", inception_weights=str(weights), batch_size=12)
    out = m.score(ref)
    assert out["metric_name"] == "fid" and abs(out["metric_value"]) < 1e-3


# --------------------------------------------------------------------------------------------------------------
# Classifier metric
# --------------------------------------------------------------------------------------------------------------

def _patterns(n, seed):
    """Two classes at 8x8: horizontal vs vertical stripes, random phase, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    phase = torch.randint(0, 2, (n, 1, 1), generator=g)
    i = torch.arange(8)
    horiz = ((i[:, None] + phase) % 2).float().expand(n, 8, 8)
    vert = ((i[None, :] + phase) % 2).float().expand(n, 8, 8)
    x = torch.where(y[:, None, None] == 0, horiz, vert) * 1.6 - 0.8
    x = (x + 0.15 * torch.randn(n, 8, 8, generator=g)).clamp(-1, 1)
    return x.unsqueeze(1), y


TINY_RECIPE = dict(version=1, widths=[8, 16], steps=40, batch=32, lr=3e-3, weight_decay=1e-4, seed=0)


@pytest.mark.slow
def test_classifier_metric_deterministic_cached(tmp_path):
    (trx, try_), (tex, tey) = _patterns(256, 0), _patterns(160, 1)
    before = torch.get_rng_state()
    m1 = ClassifierMetric("toy", trx, try_, tex, tey, tmp_path / "a", recipe=TINY_RECIPE)
    assert torch.equal(before, torch.get_rng_state())  # the caller's RNG is left alone
    assert not m1.from_cache and m1.classifier_path.is_file() and m1.metric_name == "fd_toy_classifier"
    assert m1.test_accuracy > 0.95
    m2 = ClassifierMetric("toy", trx, try_, tex, tey, tmp_path / "b", recipe=TINY_RECIPE)  # fresh cache: retrain
    assert m2.test_accuracy == m1.test_accuracy
    assert all(torch.equal(a, b) for a, b in zip(m1.model.state_dict().values(), m2.model.state_dict().values()))
    m3 = ClassifierMetric("toy", trx, try_, tex, tey, tmp_path / "a", recipe=TINY_RECIPE)
    assert m3.from_cache and m3.test_accuracy == m1.test_accuracy
    assert np.array_equal(m3.ref_mu, m1.ref_mu) and np.array_equal(m3.ref_sigma, m1.ref_sigma)
    assert not list((tmp_path / "a").glob("*.tmp"))  # atomic writes leave no temp files
    # Different training data or recipe: a different cache entry.
    m4 = ClassifierMetric("toy", trx[:200], try_[:200], tex, tey, tmp_path / "a", recipe=TINY_RECIPE)
    assert m4.classifier_path != m1.classifier_path and not m4.from_cache

    real = m1.score(tex, tey)
    assert real["metric_name"] == "fd_toy_classifier" and abs(real["metric_value"]) < 1e-6
    assert real["classifier_accuracy"] == pytest.approx(m1.test_accuracy)
    assert real["classifier_test_accuracy"] == m1.test_accuracy
    held_out = m1.score(*_patterns(160, 2))
    noise = m1.score(torch.rand(160, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1,
                     torch.arange(160) % 2)
    assert held_out["metric_value"] < 0.1 * noise["metric_value"]
    assert noise["classifier_accuracy"] < 0.9 and np.isnan(m1.score(tex)["classifier_accuracy"])
    swapped = m1.score(tex, 1 - tey)  # samples that ignore their conditioning label
    assert swapped["classifier_accuracy"] == pytest.approx(1 - m1.test_accuracy)


def test_classifier_metric_progress(tmp_path, capsys):
    (trx, try_), (tex, tey) = _patterns(256, 0), _patterns(64, 1)
    m = ClassifierMetric("toy", trx, try_, tex, tey, tmp_path / "a", recipe=TINY_RECIPE, progress=False)
    m.score(tex, tey)
    assert capsys.readouterr() == ("", "")  # stdout and stderr clean
    m = ClassifierMetric("toy", trx, try_, tex, tey, tmp_path / "b", recipe=TINY_RECIPE)
    m.score(tex, tey)
    out, err = capsys.readouterr()
    assert out == ""
    for desc in ("epoch 1/5", "test accuracy", "reference features", "sample features"):  # 40 steps of 256/32
        assert f"metric classifier toy: {desc}" in err


def test_classifier_metric_bad_input(tmp_path):
    (trx, try_), (tex, tey) = _patterns(64, 0), _patterns(32, 1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ClassifierMetric("toy", trx * 255, try_, tex, tey, tmp_path, recipe=TINY_RECIPE)
    with pytest.raises(ValueError, match="labels"):
        ClassifierMetric("toy", trx, try_[:10], tex, tey, tmp_path, recipe=TINY_RECIPE)
    m = ClassifierMetric("toy", trx, try_, tex, tey, tmp_path, recipe=dict(TINY_RECIPE, steps=2))
    with pytest.raises(ValueError, match="classifier trained on"):
        m.score(torch.zeros(4, 1, 16, 16))
    with pytest.raises(ValueError, match="null class"):
        m.score(tex, torch.full((32,), 2))


def test_content_hash():
    a = torch.arange(6).reshape(2, 3)
    assert content_hash(a) == content_hash(a.numpy()) == content_hash(a.clone())
    assert content_hash(a) != content_hash(a.float()) != content_hash(a.reshape(3, 2))
