"""bench.metrics never unpickles what it reads: weights files and caches are loaded weights-only / without pickle.

Each test plants a pickle whose ``__reduce__`` calls ``os.mkdir(sentinel)`` at every path the metrics code (or
torch-fidelity on its behalf) could read, runs the code, and asserts that the sentinel directory was never made.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import register_tiny_extractor

from bench import metrics
from bench.metrics import (
    INCEPTION_EXTRACTOR,
    INCEPTION_WEIGHTS_FILE,
    TORCH_FIDELITY_WEIGHTS_FILE,
    ClassifierMetric,
    InceptionMetric,
    resolve_inception_weights,
)

KINDS = ("torch", "pickle", "npz")


class _Payload:
    """Unpickling this runs ``os.mkdir(sentinel)``: harmless, and visible afterwards."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.mkdir, (self.sentinel,)


def _plant(path: Path, sentinel: Path, kind: str) -> None:
    """A payload at ``path``: inside a plausible torch.save'd state dict, a bare pickle, or an object array in an
    .npz (under every key the code looks up)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _Payload(sentinel)
    if kind == "torch":
        torch.save({"fc.weight": torch.zeros(1008, 2048), "state_dict": payload, "test_accuracy": 1.0,
                    "mu": payload, "sigma": payload}, path)
    elif kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"fc.weight": torch.zeros(2), "payload": payload}, f, protocol=2)
    else:
        obj = np.array([payload], dtype=object)
        with open(path, "wb") as f:
            np.savez(f, mu=obj, sigma=obj, features=obj)


def test_payload_is_live(tmp_path):
    """The payload does run under an unsafe load: the tests below would notice a regression."""
    for i, kind in enumerate(KINDS):
        sentinel = tmp_path / f"sentinel{i}"
        _plant(tmp_path / f"p{i}", sentinel, kind)
        if kind == "npz":
            with np.load(tmp_path / f"p{i}", allow_pickle=True) as z:
                z["mu"]
        elif kind == "pickle":
            with open(tmp_path / f"p{i}", "rb") as f:
                pickle.load(f)
        else:
            torch.load(tmp_path / f"p{i}", weights_only=False)
        assert sentinel.is_dir()


# --------------------------------------------------------------------------------------------------------------
# Inception weights: the configured file and torch-fidelity's / pytorch-fid's hub cache
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_planted_inception_weights_rejected(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    sentinel = tmp_path / "sentinel"
    ref = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    weights = tmp_path / "inception.pth"
    _plant(weights, sentinel, kind)
    with pytest.raises(ValueError, match="refused without unpickling"):
        resolve_inception_weights(weights)
    with pytest.raises(ValueError, match="refused without unpickling"):
        InceptionMetric(ref, tmp_path / "cache", inception_weights=str(weights))
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    for name in (TORCH_FIDELITY_WEIGHTS_FILE, INCEPTION_WEIGHTS_FILE):
        _plant(hub / name, sentinel, kind)
    with pytest.raises(ValueError, match="refused without unpickling"):
        InceptionMetric(ref, tmp_path / "cache")
    (hub / TORCH_FIDELITY_WEIGHTS_FILE).unlink()
    with pytest.raises(ValueError, match=INCEPTION_WEIGHTS_FILE):
        resolve_inception_weights(None)
    assert not sentinel.exists()


class _LoadSpy:
    """Records every torch.load / np.load call and whether it could unpickle arbitrary objects."""

    def __init__(self, monkeypatch):
        self.unsafe: list[str] = []
        self.calls = 0
        torch_load, np_load = torch.load, np.load

        def spy_torch_load(f, *args, **kwargs):
            self.calls += 1
            forced = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == "1"
            # Only our own in-memory re-serialisation may be loaded with weights_only=False, and then forced safe.
            if kwargs.get("weights_only") is not True and not (isinstance(f, io.BytesIO) and forced):
                self.unsafe.append(f"torch.load({f!r}, {kwargs})")
            return torch_load(f, *args, **kwargs)

        def spy_np_load(f, *args, **kwargs):
            self.calls += 1
            if kwargs.get("allow_pickle") is not False:
                self.unsafe.append(f"np.load({f!r}, {kwargs})")
            return np_load(f, *args, **kwargs)

        monkeypatch.setattr(torch, "load", spy_torch_load)
        monkeypatch.setattr(np, "load", spy_np_load)


def _random_inception_weights(path: Path, monkeypatch) -> None:
    """A random-init state dict of torch-fidelity's InceptionV3 (its constructor's own load patched out)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as mp:
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        torch.manual_seed(0)
        torch.save(fe.FeatureExtractorInceptionV3(INCEPTION_EXTRACTOR, ["2048"]).state_dict(), path)


def test_real_inception_extractor_never_gets_a_path(tmp_path, monkeypatch):
    """torch-fidelity's InceptionV3 is built without a weights path: its weights_only=False load only ever sees our
    in-memory copy of weights-only-loaded tensors (and runs forced weights-only); the hub cache, holding payloads
    under both weights file names, is never touched."""
    weights = tmp_path / "rand_inception.pth"
    _random_inception_weights(weights, monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    sentinel = tmp_path / "sentinel"
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    for name in (TORCH_FIDELITY_WEIGHTS_FILE, INCEPTION_WEIGHTS_FILE):
        _plant(hub / name, sentinel, "torch")
    spy = _LoadSpy(monkeypatch)
    m = InceptionMetric(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), tmp_path / "cache",
                        inception_weights=str(weights), kid=True, isc=True, prc=True, progress=False)
    ext, layers = m._get_extractor()
    assert type(ext).__name__ == "FeatureExtractorInceptionV3" and layers["fid"] == "2048"
    assert spy.calls >= 3 and spy.unsafe == [], spy.unsafe
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the guard is undone afterwards
    assert not sentinel.exists()


# --------------------------------------------------------------------------------------------------------------
# Reference feature / statistics caches (the tiny stand-in extractor of helpers: no Inception weights offline)
# --------------------------------------------------------------------------------------------------------------

def _cache_names(reference_key: str, extractor: str) -> list[str]:
    """Every reference cache file name: ours (.npz) and torch-fidelity's (.pt) for every feature layer."""
    names = []
    for layer in ("feat", "logits"):
        for what in (f"stat-fid-{layer}", f"features-{layer}"):
            names += [f"{reference_key}-{extractor}-{what}{ext}" for ext in (".npz", ".pt")]
    return names


@pytest.mark.parametrize("kind", KINDS)
def test_planted_reference_caches_ignored(tmp_path, monkeypatch, kind):
    name = register_tiny_extractor()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # torch-fidelity's default cache_root is here
    sentinel = tmp_path / "sentinel"
    g = torch.Generator().manual_seed(0)
    ref, samples = (torch.rand(40, 3, 8, 8, generator=g) * 2 - 1 for _ in range(2))
    opts = dict(feature_extractor=name, kid=True, isc=True, prc=True, kid_subset_size=20, batch_size=16)
    clean = InceptionMetric(ref, tmp_path / "clean", **opts).score(samples)

    m = InceptionMetric(ref, tmp_path / "cache", **opts)
    planted = [tmp_path / "cache" / n for n in _cache_names(m.reference_key, name)]
    planted += [tmp_path / "torch_home" / "fidelity_cache" / n for n in _cache_names(m.reference_key, name)]
    for p in planted:
        _plant(p, sentinel, kind)
    spy = _LoadSpy(monkeypatch)
    with pytest.warns(UserWarning, match="ignoring cache file"):
        out = m.score(samples)
    assert not sentinel.exists()
    assert spy.unsafe == [] and spy.calls >= 2  # the planted .npz files were found, read safely and rejected
    assert out == pytest.approx(clean, nan_ok=True)
    # The rejected files were replaced by valid ones, which a new instance reads (no warning, same result).
    fresh = InceptionMetric(ref, tmp_path / "cache", **opts)
    assert fresh.score(samples) == pytest.approx(clean, nan_ok=True)
    assert not sentinel.exists()


# --------------------------------------------------------------------------------------------------------------
# Classifier metric caches
# --------------------------------------------------------------------------------------------------------------

def _stripes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    i = torch.arange(8)
    x = torch.where(y[:, None, None] == 0, (i[:, None] % 2).float().expand(n, 8, 8),
                    (i[None, :] % 2).float().expand(n, 8, 8)) * 1.6 - 0.8
    return x.unsqueeze(1), y


_RECIPE = dict(version=1, widths=[4, 8], steps=6, batch=16, lr=3e-3, weight_decay=1e-4, seed=0)


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_planted_classifier_caches_ignored(tmp_path, monkeypatch, kind):
    (trx, try_), (tex, tey) = _stripes(64, 0), _stripes(32, 1)

    def make(cache: Path) -> ClassifierMetric:
        return ClassifierMetric("toy", trx, try_, tex, tey, cache, recipe=_RECIPE, progress=False)

    m0 = make(tmp_path / "clean")
    files = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert len(files) == 2 and m0.classifier_path.name in files  # the classifier and its reference statistics
    sentinel = tmp_path / "sentinel"
    for f in files:
        _plant(tmp_path / "cache" / f, sentinel, kind)
    spy = _LoadSpy(monkeypatch)
    with pytest.warns(UserWarning, match="ignoring metric classifier"):
        m = make(tmp_path / "cache")
    assert not sentinel.exists() and spy.unsafe == [] and spy.calls == 2
    assert not m.from_cache and m.test_accuracy == m0.test_accuracy
    assert np.array_equal(m.ref_mu, m0.ref_mu) and np.array_equal(m.ref_sigma, m0.ref_sigma)
    assert make(tmp_path / "cache").from_cache  # replaced by valid files

    # A valid classifier next to planted reference statistics: the classifier is used, the statistics rebuilt.
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / m0.classifier_path.name).write_bytes(m0.classifier_path.read_bytes())
    ref_name = next(f for f in files if f != m0.classifier_path.name)
    _plant(tmp_path / "mixed" / ref_name, sentinel, kind)
    with pytest.warns(UserWarning, match="reference statistics"):
        m2 = make(tmp_path / "mixed")
    assert m2.from_cache and np.array_equal(m2.ref_mu, m0.ref_mu) and not sentinel.exists()


# --------------------------------------------------------------------------------------------------------------
# Static guard: every load in bench/metrics.py is weights-only / pickle-free, and torch-fidelity's cache is unused
# --------------------------------------------------------------------------------------------------------------

_TF_CACHED = {"calculate_metrics", "calculate_fid", "calculate_kid", "calculate_isc", "calculate_prc",
              "extract_featuresdict_from_input_id_cached", "fid_featuresdict_to_statistics_cached",
              "fid_input_id_to_statistics_cached", "fid_inputs_to_metric"}


def test_metrics_source_has_no_unsafe_loads():
    tree = ast.parse(Path(metrics.__file__).read_text())
    loads = 0
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not {"pickle", "dill", "joblib", "cloudpickle"} & set(names), ast.unparse(node)
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if func == "torch.load":
            loads += 1
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                ast.unparse(node)
        elif func == "np.load":
            loads += 1
            assert isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False, \
                ast.unparse(node)
        elif func.endswith(".load") or func.endswith(".loads"):
            pytest.fail(f"unexpected loader in bench/metrics.py: {ast.unparse(node)}")
        # torch-fidelity's calculate_metrics / cache helpers unpickle their cache_root with weights_only=False.
        assert not (func.split(".")[-1] in _TF_CACHED or "cache_lookup" in func), ast.unparse(node)
    assert loads >= 2
