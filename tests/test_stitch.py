"""bench.stitch (T-Stitch): endpoints reproduce each model's own samples, the small model takes exactly the first
floor(r * N) steps, the GMACs column is the formula, mismatched checkpoints are refused, CSV and plot are written."""

import copy
import csv

import pytest
import torch
from helpers import SMOKE_KWARGS, train_config

from bench import stitch, sweep
from bench.fid import evaluation_labels
from bench.flops import forward_gmacs
from diffusion.sampling import sample_images, to_uint8
from diffusion.trainer import build_from_checkpoint, load_checkpoint, train

SMALL, LARGE = "dico", "dit"  # two different backbones: DiCo early, DiT late


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the tiny models run ~100x faster than with 2 threads on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny backbones trained 2 steps on 8x8 digits (same data and diffusion), in the trainer's format."""
    root = tmp_path_factory.mktemp("stitch_runs")
    n = torch.get_num_threads()
    out = {}
    try:
        for name in (SMALL, LARGE):
            cfg = train_config(root / name, ["train.steps=2", "train.ckpt_every=2", "threads=1"],
                               backbone={"name": name, **SMOKE_KWARGS[name]})
            train(cfg)
            out[name] = root / name
    finally:
        torch.set_num_threads(n)
    return out


@pytest.fixture(scope="module")
def models(runs):
    return {k: build_from_checkpoint(load_checkpoint(d)).eval() for k, d in runs.items()}


def counting(model):
    """Record the timestep of every forward of ``model`` (CFG included: forward_with_cfg calls forward once)."""
    seen = []
    inner = model.forward

    def forward(x, t, y):
        assert (t == t[0]).all()
        seen.append(int(t[0]))
        return inner(x, t, y)

    model.forward = forward
    return seen


SAMPLERS = [("ddpm", 1.0), ("ddpm", 2.0), ("ddim", 1.0), ("ddim", 2.0)]


@pytest.mark.parametrize("sampler,cfg_scale", SAMPLERS)
def test_endpoints_reproduce_each_models_own_samples(models, sampler, cfg_scale):
    small, large = models[SMALL], models[LARGE]
    labels = torch.arange(6) % 10
    kw = dict(sampler=sampler, steps=5, cfg_scale=cfg_scale, seed=3, batch_size=4)  # two chunks of noise seeds
    own_large, own_small = sample_images(large, labels, **kw), sample_images(small, labels, **kw)
    assert not torch.equal(own_large, own_small)  # the models differ, so equality below means something
    r0, m0 = stitch.stitched_sample(small, large, labels, 0.0, **kw)
    r1, m1 = stitch.stitched_sample(small, large, labels, 1.0, **kw)
    assert torch.equal(r0, own_large) and m0.calls == {"small": 0, "large": 10}
    assert torch.equal(r1, own_small) and m1.calls == {"small": 10, "large": 0}


@pytest.mark.parametrize("sampler,cfg_scale", SAMPLERS)
def test_small_model_takes_exactly_the_first_floor_r_n_steps(models, sampler, cfg_scale):
    small, large = copy.deepcopy(models[SMALL]), copy.deepcopy(models[LARGE])
    seen_small, seen_large = counting(small), counting(large)
    labels = torch.arange(6) % 10
    kw = dict(sampler=sampler, steps=5, cfg_scale=cfg_scale, seed=3, batch_size=4)
    trajectory = stitch.sampling_timesteps(sampler, 5, 1000)  # visited order: highest t first
    assert len(trajectory) == 5 and trajectory == sorted(trajectory, reverse=True)
    out, _ = stitch.stitched_sample(small, large, labels, 0.5, **kw)  # floor(0.5 * 5) = 2 small steps
    assert seen_small == trajectory[:2] * 2 and seen_large == trajectory[2:] * 2  # per chunk, in order
    again, _ = stitch.stitched_sample(models[SMALL], models[LARGE], labels, 0.5, **kw)
    assert torch.equal(out, again)  # deterministic
    for r in (0.0, 1.0):
        assert not torch.equal(out, stitch.stitched_sample(models[SMALL], models[LARGE], labels, r, **kw)[0])


def test_rounding_is_floor_of_decimal_fraction_and_fraction_parsing():
    assert [stitch.small_step_count(r, 10) for r in stitch.parse_fractions("0:1:0.1")] == list(range(11))
    assert [stitch.small_step_count(r, 25) for r in (0.1, 0.3, 0.5, 0.7, 0.98, 1.0)] == [2, 7, 12, 17, 24, 25]
    assert stitch.small_step_count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in binary floats
    assert stitch.parse_fractions("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert stitch.parse_fractions("[0.3,0.6]") == [0.0, 0.3, 0.6, 1.0]  # the endpoints are always evaluated
    for bad in ("0:2:0.5", "0:1:0", "a", "0.5,1.5"):
        with pytest.raises(stitch.StitchError):
            stitch.parse_fractions(bad)


def _rows(path):
    with open(path) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == stitch.STITCH_COLUMNS
        return list(reader)


def test_cli_writes_one_row_per_fraction_with_the_gmacs_formula_and_a_plot(runs, models, tmp_path, monkeypatch,
                                                                          capsys):
    scored = []

    class FakeScorer:  # the real one (bench.sweep.make_scorer) trains a classifier: slow; tested by test_sweep
        class_names = None

        def score(self, samples, labels):
            scored.append((samples.clone(), labels.clone()))
            return {"metric_name": "fd_digits_classifier", "metric_value": 1.0 + float(samples.float().mean())}

    made = []
    monkeypatch.setattr(sweep, "make_scorer", lambda cfg: made.append(cfg) or FakeScorer())
    results = tmp_path / "results"
    args = [f"small={runs[SMALL]}", f"large={runs[LARGE]}", "fractions=0:1:0.25", "eval.num_samples=8",
            "eval.steps=4", "eval.sampler=ddim", "eval.cfg_scale=2", "eval.batch_size=8", f"results_dir={results}",
            f"cache_dir={tmp_path / 'cache'}", "progress=false", "threads=1"]
    assert stitch.main(args) == 0
    csv_path = results / "digits" / "stitch" / "dico-S-dit-S-2.csv"
    rows = _rows(csv_path)
    assert [float(r["fraction"]) for r in rows] == [0, 0.25, 0.5, 0.75, 1]
    assert [int(r["small_steps"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [int(r["large_steps"]) for r in rows] == [4, 3, 2, 1, 0]
    g_small = forward_gmacs(models[SMALL], 8, 1)
    g_large = forward_gmacs(models[LARGE], 8, 1)
    assert g_small != g_large
    for r in rows:
        k = int(r["small_steps"])
        assert float(r["small_gmacs"]) == pytest.approx(g_small) and float(r["large_gmacs"]) == pytest.approx(g_large)
        assert float(r["sampling_gmacs"]) == pytest.approx((k * g_small + (4 - k) * g_large) * 2)
        assert r["dataset"] == "digits" and r["image_size"] == "8" and r["sampler"] == "ddim"
        assert float(r["sample_time_s"]) > 0 and float(r["wall_time_s"]) > 0 and r["metric_value"]
    assert len({r["row_key"] for r in rows}) == 5 and len({r["stitch_key"] for r in rows}) == 1
    # the scorer is the sweep's, for the checkpoints' dataset (8x8 digits, not the sweep grid's 16x16 default)
    assert made[0].dataset.name == "digits" and made[0].dataset.image_size == 8 and made[0].eval.num_samples == 8
    # r = 0 scored exactly the large model's own samples under the evaluation protocol
    labels = evaluation_labels(8, 10, "balanced", 0)
    own = sample_images(models[LARGE], labels, sampler="ddim", steps=4, cfg_scale=2.0, seed=0, batch_size=8)
    assert torch.equal(scored[0][0], to_uint8(own)) and torch.equal(scored[0][1], labels)
    plots = list((results / "digits" / "stitch").glob("dico-S-dit-S-2-*.png"))
    assert len(plots) == 1 and plots[0].stat().st_size > 1000

    # another protocol adds rows (the old ones stay); the same protocol again reuses its rows
    capsys.readouterr()
    assert stitch.main([*args[:6], "eval.cfg_scale=1", *args[7:]]) == 0
    after = _rows(csv_path)
    assert len(after) == 10 and after[:5] == rows
    for r in after[5:]:
        k = int(r["small_steps"])
        assert float(r["sampling_gmacs"]) == pytest.approx(k * g_small + (4 - k) * g_large)  # no CFG doubling
    assert stitch.main(args) == 0
    assert "reusing row" in capsys.readouterr().out and _rows(csv_path) == after


@pytest.mark.parametrize("section,key,value", [
    ("diffusion", "noise_schedule", "cosine"),
    ("diffusion", "diffusion_steps", 500),
    ("diffusion", "learn_sigma", False),
    ("dataset", "image_size", 16),
])
def test_mismatched_settings_are_refused_naming_the_difference(runs, tmp_path, section, key, value, capsys):
    ckpt = load_checkpoint(runs[LARGE])
    ckpt["config"]["identity"][section][key] = value
    ckpt["config"]["train"][section][key] = value
    bad = tmp_path / "other.pt"
    torch.save(ckpt, bad)
    good = load_checkpoint(runs[SMALL])
    assert stitch.check_compatible(good, load_checkpoint(runs[LARGE]))  # the real pair is compatible
    with pytest.raises(stitch.StitchError, match=rf"{section}\.{key}: .* \(small\) vs {value!r} \(large\)"):
        stitch.check_compatible(good, ckpt)
    assert stitch.main([f"small={runs[SMALL]}", f"large={bad}", f"results_dir={tmp_path}", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert f"{section}.{key}" in err and "cannot stitch" in err
    assert not (tmp_path / "digits").exists()  # nothing written


def test_bad_arguments_are_one_line_errors(runs, capsys):
    assert stitch.main([f"small={runs[SMALL]}"]) == 2
    assert "missing large=" in capsys.readouterr().err
    assert stitch.main([f"small={runs[SMALL]}", f"large={runs[LARGE]}", "train.lr=1"]) == 2
    assert "from the checkpoints" in capsys.readouterr().err
    assert stitch.main([f"small={runs[SMALL]}", f"large={runs[LARGE]}", "fractions=0:1.5:0.5"]) == 2
    assert "outside [0, 1]" in capsys.readouterr().err
