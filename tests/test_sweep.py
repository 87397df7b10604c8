"""bench.sweep: one row per point key, reuse only under the same key, resume, failures recorded, locks."""

import csv

import pytest
from omegaconf import OmegaConf

from bench import sweep
from bench.schema import RUN_COLUMNS
from diffusion.config import ConfigError, compose, to_plain
from diffusion.trainer import load_checkpoint

TINY_POINTS = {
    "dit": [{"size": "S", "patch_size": 2, "depth": 1, "hidden_size": 32, "num_heads": 2},
            {"size": "S", "patch_size": 4, "depth": 1, "hidden_size": 32, "num_heads": 2}],
    "lit": [{"size": "S", "patch_size": 2, "depth": 1, "hidden_size": 32, "num_heads": 3}],  # 32 % 3: fails
}


CACHE = {}


@pytest.fixture(autouse=True)
def shared_metric_cache(metric_cache):
    CACHE["dir"] = metric_cache


def sweep_config(tmp_path, overrides=(), points=TINY_POINTS):
    base = [f"results_dir={tmp_path / 'results'}", f"runs_root={tmp_path / 'runs'}",
            f"cache_dir={CACHE['dir']}", "dataset=digits", "dataset.image_size=8", "eval.num_samples=80",
            "train.steps=2", "train.batch_size=8", "train.ckpt_every=1", "eval.steps=2", "progress=false",
            "threads=1"]
    cfg = compose("bench", base + list(overrides))
    cfg.sweep.points = OmegaConf.create(points)
    return cfg


def rows(tmp_path):
    with open(tmp_path / "results" / "digits" / "runs.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == RUN_COLUMNS
        return list(reader)


def test_sweep_writes_rows_records_failures_and_reuses_only_same_key(tmp_path, capsys):
    cfg = sweep_config(tmp_path)
    sweep.run_sweep(cfg)
    out = rows(tmp_path)
    assert [r["status"] for r in out] == ["ok", "ok", "failed"]
    ok = out[0]
    assert ok["backbone"] == "dit" and ok["patch"] == "2" and ok["width"] == "32" and ok["depth"] == "1"
    assert ok["metric_name"] == "fd_digits_classifier" and float(ok["metric_value"]) > 0
    assert 0 <= float(ok["classifier_accuracy"]) <= 1
    assert float(ok["train_compute_gmacs"]) == pytest.approx(float(ok["gmacs"]) * 3 * 8 * 2)
    assert int(ok["params"]) > 0 and float(ok["sample_img_per_s"]) > 0
    assert ok["point_key"].startswith("dit-S-2-digits8-s2-") and ok["run_key"] and ok["recipe_key"]
    assert out[0]["recipe_key"] == out[1]["recipe_key"] != "" and out[0]["run_key"] != out[1]["run_key"]
    assert "divisible" in out[2]["error"]

    # a rerun reuses finished rows (announced), leaves their run dirs untouched, retries the failed point
    ckpt = tmp_path / "runs" / "digits" / sweep.point_keys(sweep.point_config(cfg, "dit", TINY_POINTS["dit"][0]),
                                                           _digits())["train_key"] / "checkpoints" / "last.pt"
    mtime = ckpt.stat().st_mtime
    capsys.readouterr()
    sweep.run_sweep(cfg)
    assert "reusing row dit-S-2-digits8" in capsys.readouterr().out
    again = rows(tmp_path)
    assert [r["point_key"] for r in again] == [r["point_key"] for r in out]  # no duplicates
    assert ckpt.stat().st_mtime == mtime

    # a changed recipe is a new point: new rows, the old ones stay distinguishable
    sweep.run_sweep(sweep_config(tmp_path, ["train.lr=5e-4"], {"dit": TINY_POINTS["dit"][:1]}))
    after = rows(tmp_path)
    assert len(after) == 4 and after[-1]["lr"] == "0.0005" and after[-1]["point_key"] != out[0]["point_key"]

    # only the evaluation changed: a new row, but the trained checkpoint is reused (announced)
    capsys.readouterr()
    sweep.run_sweep(sweep_config(tmp_path, ["eval.cfg_scale=1.5"], {"dit": TINY_POINTS["dit"][:1]}))
    assert "reusing the trained checkpoint" in capsys.readouterr().out
    assert len(rows(tmp_path)) == 5 and ckpt.stat().st_mtime == mtime


def _digits():
    from diffusion.data import load_dataset

    return load_dataset("digits", "train", 8)


def test_interrupted_point_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    cfg = sweep_config(tmp_path, ["backbone=dit", "train.steps=3"], {"dit": TINY_POINTS["dit"]})
    real = sweep.make_scorer

    def interrupted_scorer(cfg):
        class S:
            class_names = None

            def score(self, samples, labels):
                raise KeyboardInterrupt  # killed during evaluation, after training finished
        return S()

    monkeypatch.setattr(sweep, "make_scorer", interrupted_scorer)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(cfg)
    assert not (tmp_path / "results" / "digits" / "runs.csv").exists()  # no half row
    keys = sweep.point_keys(sweep.point_config(cfg, "dit", TINY_POINTS["dit"][0]), _digits())
    run_dir = tmp_path / "runs" / "digits" / keys["train_key"]
    assert load_checkpoint(run_dir)["step"] == 3
    monkeypatch.setattr(sweep, "make_scorer", real)
    sweep.run_sweep(cfg)
    assert [r["status"] for r in rows(tmp_path)] == ["ok", "ok"]
    assert load_checkpoint(run_dir)["step"] == 3 and len(load_checkpoint(run_dir)["config"]["history"]) == 1


def test_a_point_locked_by_another_sweep_is_skipped(tmp_path, capsys):
    cfg = sweep_config(tmp_path, ["backbone=dit"], {"dit": TINY_POINTS["dit"][:1]})
    keys = sweep.point_keys(sweep.point_config(cfg, "dit", TINY_POINTS["dit"][0]), _digits())
    lock = tmp_path / "runs" / "digits" / (keys["train_key"] + ".lock")
    with sweep.point_lock(lock):
        sweep.run_sweep(cfg)
    assert "being trained by another sweep" in capsys.readouterr().out
    assert not (tmp_path / "results" / "digits" / "runs.csv").exists()


def test_unknown_backbone_and_missing_grid_entry_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="Could not find 'backbone/nope'"):
        sweep_config(tmp_path, ["backbone=nope"])
    with pytest.raises(ConfigError, match="has no points for backbone 'dico'"):
        sweep.selected_backbones(sweep_config(tmp_path, ["backbone=dico"]))


# --------------------------------------------------------------------------------------------------------------
# Grids of axes, seeds
# --------------------------------------------------------------------------------------------------------------
AXES = {
    "dit": {"size": ["S"], "patch_size": [4, 2], "depth": [1], "hidden_size": [32, 48], "num_heads": [3]},
    "rwkv": {"size": ["S"], "patch_size": [4], "depth": [1, 2], "hidden_size": [32]},
    "dimr": {"size": ["S/2R"], "depth": [1], "hidden_size": [32, 33], "num_heads": [1]},
}


def test_axes_expand_in_order_skip_refused_combinations_and_appear_once(tmp_path, capsys):
    explicit = {"size": "S", "patch_size": 4, "depth": 1, "hidden_size": 48, "num_heads": 3}  # = an axis point
    cfg = sweep_config(tmp_path, ["sweep.dry_run=true"], {"dit": [explicit]})
    cfg.sweep.axes = OmegaConf.create(AXES)
    names = sweep.selected_backbones(cfg)
    assert names == ["dit", "rwkv", "dimr"]  # the points' backbones, then the axes' others, in order
    points, skipped = sweep.expand_grid(cfg, names, _digits())
    dit = {"size": "S", "depth": 1, "num_heads": 3}
    assert points == [("dit", explicit),  # explicit points first; the same axis combination not again
                      ("dit", {**dit, "patch_size": 2, "hidden_size": 48}),
                      ("rwkv", {"size": "S", "patch_size": 4, "depth": 1, "hidden_size": 32}),
                      ("dimr", {"size": "S/2R", "depth": 1, "hidden_size": 32, "num_heads": 1})]
    reasons = {(n, o.get("patch_size"), o.get("depth"), o["hidden_size"]): r for n, o, r in skipped}
    assert reasons == {("dit", 4, 1, 32): "hidden size 32 is not divisible by num_heads 3",
                       ("dit", 2, 1, 32): "hidden size 32 is not divisible by num_heads 3",
                       ("rwkv", 4, 2, 32): reasons[("rwkv", 4, 2, 32)],
                       ("dimr", None, 1, 33): reasons[("dimr", None, 1, 33)]}
    assert "odd depth" in reasons[("rwkv", 4, 2, 32)] and "divisible by 2" in reasons[("dimr", None, 1, 33)]
    # the dry run prints the skips with the constructor's message and the points, and trains nothing
    assert sweep.run_sweep(cfg) == []
    out = capsys.readouterr().out
    assert "skipped dit {size: S, patch_size: 4, depth: 1, hidden_size: 32, num_heads: 3}: hidden size 32 is not " \
           "divisible by num_heads 3" in out
    assert "4 points (4 combinations skipped) x 1 seed [0] = 4 runs" in out and "[4/4] point 4/4 seed 0: dimr" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_an_axis_is_overridden_on_the_command_line(tmp_path):
    cfg = compose("bench", ["backbone=dit", "sweep.axes.dit.patch_size=[2,4,8]"])  # cpu grid: explicit points only
    assert to_plain(cfg.sweep.axes) == {"dit": {"patch_size": [2, 4, 8]}}
    points = sweep.grid_points(cfg, sweep.selected_backbones(cfg))
    assert [o for _, o, from_axes in points if from_axes] == [{"patch_size": p} for p in (2, 4, 8)]
    assert [o for _, o, from_axes in points if not from_axes] == to_plain(cfg.sweep.points.dit)
    # a grid of axes: the override replaces that axis (in its place), the others stay
    cfg = compose("bench", ["sweep=cpu_scaling", "sweep.axes.dit.patch_size=[8,4]", "sweep.axes.lit.num_heads=[4]"])
    assert to_plain(cfg.sweep.axes.dit) == {"size": ["S"], "patch_size": [8, 4], "depth": [4],
                                            "hidden_size": [88, 128], "num_heads": [4]}
    assert to_plain(cfg.sweep.axes.lit.num_heads) == [4] and to_plain(cfg.sweep.axes.lit.patch_size) == [4, 2]
    dit = [o for n, o, _ in sweep.grid_points(cfg, ["dit"])]
    assert [(o["patch_size"], o["hidden_size"]) for o in dit] == [(8, 88), (8, 128), (4, 88), (4, 128)]
    for bad, match in [("sweep.axes.dit.nope=[1]", "sweep.axes.dit.nope: unknown key for backbone 'dit'"),
                       ("sweep.axes.dit.size=[Q]", "backbone.size='Q' is not a preset of dit"),
                       ("sweep.axes.dit.depth=[0]", "backbone.depth=0 must be a positive integer"),
                       ("sweep.axes.dit.depth=[]", "must list at least one value"),
                       ("sweep.axes.nope.depth=[1]", "'nope' is not a registered backbone"),
                       ("sweep.seeds=[1,1]", "lists a seed twice"),
                       ("sweep.seeds=[-1]", "sweep.seeds")]:
        with pytest.raises(ConfigError, match=match):
            compose("bench", [bad])

    # the same from the shell (a dry run: the points with their GMACs, nothing trained)
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "bench.sweep", "backbone=dit", "sweep.axes.dit.patch_size=[2,4,8]",
                           "sweep.dry_run=true", "dataset=digits", "dataset.image_size=8", "progress=false",
                           f"results_dir={tmp_path / 'results'}", f"runs_root={tmp_path / 'runs'}"],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(repo)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sweep cpu: 5 points x 1 seed [0] = 5 runs" in proc.stdout
    for i, p in enumerate((2, 4, 8), 3):
        assert f"point {i}/5: dit {{patch_size: {p}}}: " in proc.stdout and "GMACs" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_seeds_give_one_row_each_with_their_own_run(tmp_path, capsys):
    cfg = sweep_config(tmp_path, ["backbone=dit", "sweep.seeds=[0,1]"], {"dit": TINY_POINTS["dit"][:1]})
    sweep.run_sweep(cfg)
    out = capsys.readouterr().out
    assert "[1/2] point 1/1 seed 0: dit" in out and "[2/2] point 1/1 seed 1: dit" in out
    first, second = rows(tmp_path)
    assert (first["seed"], second["seed"]) == ("0", "1") and first["status"] == second["status"] == "ok"
    assert first["run_key"] != second["run_key"] and first["point_key"] != second["point_key"]
    assert first["run_dir"] != second["run_dir"]
    assert first["recipe_key"] == second["recipe_key"]  # one recipe: the plots aggregate the seeds
    # seed 0 is the point as before (the config's seed): same keys as a sweep without seeds
    plain = sweep.point_keys(sweep.point_config(cfg, "dit", TINY_POINTS["dit"][0]), _digits())
    assert {k: first[k] for k in ("point_key", "run_key", "recipe_key")} == \
        {k: plain[k] for k in ("point_key", "run_key", "recipe_key")}
    # a row of seed 1 written before the recipe key left the seed out gets today's recipe key when reused
    from bench.results_csv import upsert_row

    upsert_row(tmp_path / "results" / "digits" / "runs.csv", {**second, "recipe_key": "s2-bs8-old"}, key="point_key")
    sweep.run_sweep(cfg)
    assert "reusing row" in capsys.readouterr().out
    assert [r["recipe_key"] for r in rows(tmp_path)] == [first["recipe_key"]] * 2


def test_diffusion_classifier_accuracy_column_and_key(tmp_path):
    from bench.diffusion_classifier import diffusion_classifier_accuracy, fixed_subset
    from diffusion.data import load_dataset
    from diffusion.trainer import build_from_checkpoint

    points = {"dit": [TINY_POINTS["dit"][1]]}
    on = ["eval.diffusion_classifier=true", "eval.diffusion_classifier_images=20", "eval.diffusion_classifier_trials=3"]
    cfg = sweep_config(tmp_path, on, points=points)
    sweep.run_sweep(cfg)
    (row,) = rows(tmp_path)
    acc = float(row["diffusion_classifier_accuracy"])
    # the column is the accuracy of the point's EMA model on the fixed test subset, recomputed here
    test = load_dataset("digits", "test", 8)
    idx = fixed_subset(test.labels, 20, 0)
    model = build_from_checkpoint(load_checkpoint(row["run_dir"] + "/checkpoints/last.pt"), use_ema=True)
    expect = diffusion_classifier_accuracy(model, {"noise_schedule": "linear", "learn_sigma": True,
                                                   "diffusion_steps": 1000}, test.images[idx], test.labels[idx],
                                           trials=3, seed=0)["accuracy"]
    assert acc == pytest.approx(expect) and 0 <= acc <= 1
    # without it: another point key (so another row), and no value in the column
    sweep.run_sweep(sweep_config(tmp_path, points=points))
    both = rows(tmp_path)
    assert len(both) == 2 and both[0]["point_key"] != both[1]["point_key"]
    assert both[1]["diffusion_classifier_accuracy"] == ""
