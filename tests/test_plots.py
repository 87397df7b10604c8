"""bench.plots on a synthetic runs.csv: files, exact power-law exponents, failed rows, missing results, one figure
per recipe, axis text, log ticks, label placement."""

from __future__ import annotations

import csv

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

from bench import plots
from bench.schema import RUN_COLUMNS

EXPONENTS = {"dit": -0.5, "dico": -0.25}


def _row(backbone, size, patch, gmacs, params, **kw):
    steps, batch = kw.pop("train_steps", 500), kw.pop("batch", 64)
    a = {"dit": 100.0, "dico": 80.0, "lit": 100.0}[backbone]
    row = dict.fromkeys(RUN_COLUMNS, "")
    row.update(point_key=f"{backbone}-{size}-{patch}-s{steps}", dataset="fashion_mnist", image_size=16, channels=1,
               backbone=backbone, size=size, patch=patch, depth=4, width=128, params=params, gmacs=gmacs,
               train_steps=steps, batch=batch, lr=1e-3, train_compute_gmacs=gmacs * 3 * batch * steps,
               metric_name="fd_fashion_mnist_classifier", metric_value=a * gmacs ** EXPONENTS.get(backbone, -0.5),
               classifier_accuracy=0.5, num_samples=1000, sampler="ddpm", sample_steps=100, cfg_scale=2.0, seed=0,
               train_img_per_s=1000 / gmacs, sample_img_per_s=10.0, peak_mem_mb=100.0, device="cpu",
               status="ok", run_dir="runs/x")
    row.update(kw)
    return row


def _write_runs(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUN_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def test_scaling_plots_from_synthetic_csv(tmp_path, capsys):
    rows = [_row("dit", s, p, g, g * 1e6) for s, p, g in [("S", 4, 0.1), ("S", 2, 0.4), ("B", 2, 1.6)]]
    rows += [_row("dico", s, "", g, g * 2e6) for s, g in [("S", 0.2), ("B", 0.8), ("L", 3.0)]]
    # Failed rows (and their odd values) must not reach the plots or the fits.
    rows.append(_row("dit", "L", 2, 6.4, 6.4e6, status="failed", error="OOM", metric_value=""))
    rows.append(_row("dico", "XL", "", 9.0, 9e6, status="failed", error="boom", metric_value=1e9))
    _write_runs(tmp_path / "results" / "fashion_mnist" / "runs.csv", rows)
    tokens = tmp_path / "results" / "tokens" / "cpu.csv"
    tokens.parent.mkdir()
    pd.DataFrame([dict(mixer=m, tokens=t, time_ms_median=c * t ** k, peak_mem_mb=t / 10, width=384)
                  for m, c, k in [("attention", 1e-4, 2.0), ("bi_wkv", 1e-2, 1.0)]
                  for t in (256, 1024, 4096)]).to_csv(tokens, index=False)

    assert plots.main(["--results", str(tmp_path / "results")]) == 0
    out = tmp_path / "results" / "plots"
    stem = "fashion_mnist_16x16_fd_fashion_mnist_classifier_vs_{}_steps500-bs64"
    for x in ("gmacs", "params", "train_img_per_s"):
        for ext in ("png", "svg"):
            f = out / f"{stem.format(x)}.{ext}"
            assert f.is_file() and f.stat().st_size > 1000, f
    # One budget: training compute = GMACs x 3 x 64 x 500 for every point: the equal-training-compute view is drawn
    # all the same (both views for every recipe), its title saying that it repeats the GMACs figure.
    assert "train_compute_gmacs = 96000 x gmacs" in (out / f"{stem.format('train_compute_gmacs')}.svg").read_text()
    captured = capsys.readouterr()
    assert (out / "tokens_cpu.png").is_file() and (out / "tokens_cpu.svg").is_file()
    assert not list(out.glob("*.tmp"))

    fits = pd.read_csv(out / "fits.csv")
    scaling = fits[fits["dataset"] == "fashion_mnist"]
    # Exact power laws: metric = a * gmacs^k; params are proportional to gmacs, so the same k.
    for x in ("gmacs", "params"):
        for backbone, k in EXPONENTS.items():
            r = scaling[(scaling["x"] == x) & (scaling["backbone"] == backbone)]
            assert len(r) == 1 and int(r["points"].iloc[0]) == 3  # failed rows ignored
            assert abs(r["exponent"].iloc[0] - k) < 1e-6
    assert set(scaling["x"]) == {"gmacs", "train_compute_gmacs", "params"}  # no fit on throughput
    assert set(scaling["recipe"]) == {"steps500-bs64"}
    tok = fits[(fits["dataset"] == "tokens") & (fits["metric_name"] == "time_ms_median")].set_index("backbone")
    assert abs(tok.loc["attention", "exponent"] - 2.0) < 1e-6 and abs(tok.loc["bi_wkv", "exponent"] - 1.0) < 1e-6
    # Titles carry dataset, metric and budget; the SVG holds the title text.
    svg = (out / f"{stem.format('gmacs')}.svg").read_text()
    for s in ("Fashion-MNIST 16x16", "fd_fashion_mnist_classifier", "budget 500 steps x 64", "x^-0.500",
              "Frechet distance in Fashion-MNIST classifier features (lower is better)"):
        assert s in svg, s
    assert "fit" in captured.out


def test_labels_and_budget():
    assert plots.point_label(pd.Series(dict(size="S", patch=2.0))) == "S/2"
    assert plots.point_label(pd.Series(dict(size="S", patch=4.0, depth=4.0, width=128))) == "S/4 d4-w128"
    assert plots.point_label(pd.Series(dict(size="B", patch=float("nan")))) == "B"  # DiCo: no patch
    assert plots.point_label(pd.Series(dict(size=float("nan"), patch=float("nan"), depth=4, width=128))) == "d4-w128"
    df = pd.DataFrame(dict(train_steps=[100, 400], batch=[64, 64]))
    assert plots.budget_label(df) == "100-400 steps x 64"
    assert plots.budget_label(df.iloc[:1]) == "100 steps x 64"
    assert plots.fit_power_law([1.0e6, 1.001e6], [3.0, 2.0]) is None  # x too narrow for a meaningful slope
    k, c = plots.fit_power_law([1, 10, 100], [3, 0.3, 0.03])
    assert k == pytest.approx(-1.0) and c == pytest.approx(3.0)


def test_missing_or_empty_results(tmp_path, capsys):
    assert plots.main(["--results", str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err
    assert "not found" in err and "bench.sweep" in err
    (tmp_path / "empty").mkdir()
    assert plots.main(["--results", str(tmp_path / "empty")]) != 0
    assert "runs.csv" in capsys.readouterr().err
    _write_runs(tmp_path / "failed" / "digits" / "runs.csv", [_row("dit", "S", 2, 1.0, 1e6, status="failed")])
    assert plots.main(["--results", str(tmp_path / "failed")]) != 0
    assert "no successful runs" in capsys.readouterr().err
    bad = tmp_path / "bad" / "digits" / "runs.csv"
    bad.parent.mkdir(parents=True)
    bad.write_text("backbone,status\ndit,ok\n")
    assert plots.main(["--results", str(tmp_path / "bad")]) != 0
    assert "lacks the columns" in capsys.readouterr().err


def test_axis_labels_are_human_text():
    assert plots.axis_label("fd_fashion_mnist_classifier") == \
        "Frechet distance in Fashion-MNIST classifier features (lower is better)"
    assert plots.axis_label("fd_digits_classifier").startswith("Frechet distance in digits classifier")
    assert plots.axis_label("fid") == "FID (Inception, lower is better)"
    assert plots.axis_label("classifier_accuracy") == "classifier accuracy on samples (higher is better)"
    assert "GMACs" in plots.axis_label("gmacs") and "training compute" in plots.axis_label("train_compute_gmacs")
    assert plots.axis_label("params") == "parameters"
    assert plots.axis_label("some_new_metric") == "some_new_metric"  # unknown: the raw name


def _dit_rows(steps, sizes=((0.1, "S"), (0.4, "B"), (1.6, "L")), **kw):
    return [_row("dit", s, 2, g, g * 1e6, train_steps=steps, **kw) for g, s in sizes]


def _figures(tmp_path, rows):
    _write_runs(tmp_path / "results" / "fashion_mnist" / "runs.csv", rows)
    return plots.make_plots(tmp_path / "results")["figures"]


def _drawn(figures, x="gmacs"):
    return [f for f in figures if f["x"] == x and not f["skipped"]]


def test_one_figure_and_fit_per_recipe(tmp_path):
    figs = _drawn(_figures(tmp_path, _dit_rows(100) + _dit_rows(500)))
    assert sorted(f["recipe"] for f in figs) == ["steps100-bs64", "steps500-bs64"]
    assert len({f["paths"][0] for f in figs}) == 2 and all(p.is_file() for f in figs for p in f["paths"])
    for f in figs:  # each fit sees its own budget's 3 points, never the 6 of both
        assert f["fitted"] == ["dit"] and [r["points"] for r in f["fits"]] == [3]
    # Same budget, recipes differing in lr only (no recipe_key): still apart, the label names the lr.
    figs = _drawn(_figures(tmp_path, _dit_rows(500, lr=1e-3) + _dit_rows(500, lr=3e-4)))
    assert sorted(f["recipe"] for f in figs) == ["steps500-bs64-lr0.0003", "steps500-bs64-lr0.001"]
    # A recipe_key column, when filled, decides: two keys, two figures (labels made unique by a hash).
    figs = _drawn(_figures(tmp_path, _dit_rows(500, recipe_key="r1") + _dit_rows(500, recipe_key="r2")))
    assert len({f["recipe"] for f in figs}) == 2
    assert all(f["recipe"].startswith("steps500-bs64-") for f in figs)


def test_fit_needs_three_distinct_x(tmp_path):
    figs = _figures(tmp_path, _dit_rows(500, sizes=((0.1, "S"), (0.4, "B"))))
    (fig,) = _drawn(figs)
    assert fig["fitted"] == [] and fig["fits"] == []
    assert "2 x values: no fit" in fig["paths"][1].read_text()  # noted in the legend (SVG)
    (fig,) = _drawn(_figures(tmp_path, _dit_rows(500)))
    assert fig["fitted"] == ["dit"]


def test_repeated_x_figure_is_skipped(tmp_path, capsys):
    figs = _figures(tmp_path, _dit_rows(500))  # params = 1e6 x GMACs for every point: the GMACs figure again
    (skip,) = [f for f in figs if f["x"] == "params"]
    assert skip["skipped"] and "gmacs" in skip["skipped"] and skip["paths"] == []
    assert "not drawn" in capsys.readouterr().err
    # The two views are both drawn for every recipe: training compute a multiple of GMACs is noted, not skipped.
    (both,) = _drawn(figs, "train_compute_gmacs")
    assert both["note"] and "gmacs" in both["note"] and both["fitted"] == ["dit"]
    # Parameters that are not one multiple of GMACs for every point are drawn, and so is training compute, unnoted.
    rows = _dit_rows(500)
    rows[0]["train_compute_gmacs"] *= 2
    rows[0]["params"] *= 3
    figs = _figures(tmp_path, rows)
    assert _drawn(figs, "params") and _drawn(figs, "train_compute_gmacs")[0]["note"] is None


def test_labels_of_coincident_points_do_not_overlap(tmp_path):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.scatter([1.0, 1.0, 3.0], [5.0, 5.0, 7.0])
    ax.set_xscale("log")
    ax.set_yscale("log")
    anns = plots.place_labels(ax, [1.0, 1.0, 3.0], [5.0, 5.0, 7.0], ["S/2 d4-w128"] * 3, ["C0", "C1", "C2"])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(a, renderer) for a in anns]  # the text, without any leader line
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert plots._overlap(boxes[i], boxes[j]) == 0, (boxes[i], boxes[j])
    plt.close(fig)
    # Through the plot: DiT and LiT S/2 at the same GMACs and metric get separate labels.
    rows = _dit_rows(500) + [_row("lit", s, 2, g, g * 1e6) for g, s in ((0.1, "S"), (0.4, "B"), (1.6, "L"))]
    (f,) = _drawn(_figures(tmp_path, rows))
    assert f["label_overlaps"] == 0


def test_log_ticks_are_plain_numbers():
    fig, ax = plt.subplots()
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(2, 20)  # one decade: 2 and 5 labelled beside 10 and 20
    ax.set_ylim(2.3, 13)  # under a decade: the minor ticks 3..9 carry the labels
    plots.readable_log_ticks(ax.xaxis)
    plots.readable_log_ticks(ax.yaxis)
    fig.canvas.draw()
    for axis, expected in ((ax.xaxis, {"2", "5", "10", "20"}), (ax.yaxis, {"3", "5", "10"})):
        labels = [t.get_text() for t in axis.get_ticklabels(which="both") if t.get_text()]
        assert expected <= set(labels), labels
        for text in labels:
            float(text)  # plain decimals: no 10^x, no \\times, no mathtext
    plt.close(fig)
    assert [plots._plain(v) for v in (0.02, 1024, 2e5, 1.5e6)] == ["0.02", "1024", "200k", "1.5M"]


# --------------------------------------------------------------------------------------------------------------
# Seeds: one marker per point with its spread; fits with confidence intervals
# --------------------------------------------------------------------------------------------------------------
def _seed_rows(backbone, gmacs, seeds, metric, **kw):
    """One row per (point, seed): metric(g, seed) -> value."""
    return [_row(backbone, "S", 2 if backbone != "dico" else "", g, g * 1e6, seed=s, recipe_key="r",
                 point_key=f"{backbone}-{g}-seed{s}", metric_value=metric(g, s), **kw)
            for s in seeds for g in gmacs]


def _spy_figures(monkeypatch):
    """What plot_scaling drew, per stem: the error bars of each colour, the markers, the legend texts."""
    from matplotlib.container import ErrorbarContainer

    drawn = {}
    real = plots._save

    def spy(fig, out_dir, stem):
        ax = fig.axes[0]
        bars = {}
        for c in ax.containers:
            if isinstance(c, ErrorbarContainer):
                (cols,) = c.lines[2]
                color = tuple(cols.get_color()[0][:3])
                bars[color] = sorted((float(s[0][0]), float(min(s[0][1], s[1][1])), float(max(s[0][1], s[1][1])))
                                     for s in cols.get_segments())
        markers = {tuple(coll.get_facecolor()[0][:3]): sorted(map(tuple, coll.get_offsets().data.tolist()))
                   for coll in ax.collections if coll.__class__.__name__ == "PathCollection"}
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        fit_lines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        drawn[stem] = dict(bars=bars, markers=markers, legend=legend, lines=len(fit_lines))
        return real(fig, out_dir, stem)

    monkeypatch.setattr(plots, "_save", spy)
    return drawn


def test_seeds_of_a_point_are_one_marker_with_its_spread(tmp_path, monkeypatch):
    values = {0: [30.0, 20.0, 12.0], 1: [34.0, 18.0, 13.0], 2: [31.0, 23.0, 11.0]}
    gd, gc, gl = (0.1, 0.4, 1.6), (0.2, 0.8, 3.0), (0.3, 1.2, 4.0)
    rows = _seed_rows("dit", gd, (0, 1), lambda g, s: values[s][gd.index(g)])  # 2 seeds: min-max
    rows += _seed_rows("dico", gc, (0, 1, 2), lambda g, s: values[s][gc.index(g)] / 3)  # 3: bootstrap of the mean
    rows += _seed_rows("lit", gl, (0,), lambda g, s: 5.0 / g)  # 1 seed: a bare marker
    drawn = _spy_figures(monkeypatch)
    figs = _figures(tmp_path, rows)
    colors = {b: tuple(plt.get_cmap("tab10")(i)[:3]) for i, b in enumerate(("dico", "dit", "lit"))}
    for x in plots.BOTH_VIEWS:  # both views, each with the bars
        (fig,) = _drawn(figs, x)
        d = drawn[fig["stem"]]
        scale = 1.0 if x == "gmacs" else 3 * 64 * 500
        expected_dit = [(g * scale, min(values[0][i], values[1][i]), max(values[0][i], values[1][i]))
                        for i, g in enumerate(gd)]
        assert np.allclose(d["bars"][colors["dit"]], expected_dit)
        expected_dico = [(g * scale, *plots.bootstrap_mean_interval([values[s][i] / 3 for s in (0, 1, 2)]))
                         for i, g in enumerate(gc)]
        assert np.allclose(d["bars"][colors["dico"]], expected_dico)
        assert colors["lit"] not in d["bars"]  # one seed: no bar
        means = [(g * scale, (values[0][i] + values[1][i]) / 2) for i, g in enumerate(gd)]
        assert np.allclose(d["markers"][colors["dit"]], means)  # one marker per point, at the mean
        assert "marker: mean over seeds; bar: min-max of 2 seeds; bootstrap 90% CI of the mean (>= 3 seeds)" \
            in d["legend"]
        assert {(s["backbone"], s["seeds"], s["kind"]) for s in fig["spread"]} == \
            {("dit", 2, "min-max"), ("dico", 3, "bootstrap"), ("lit", 1, "single")}
    lo, hi = plots.bootstrap_mean_interval([1.0, 2.0, 6.0])
    assert 1.0 <= lo < 3.0 < hi <= 6.0 and (lo, hi) == plots.bootstrap_mean_interval([1.0, 2.0, 6.0])  # seeded
    # a single-seed grid plots as before: no bar, no spread note
    drawn.clear()
    (fig,) = _drawn(_figures(tmp_path, _dit_rows(500)))
    assert drawn[fig["stem"]]["bars"] == {} and not any("seeds" in t for t in drawn[fig["stem"]]["legend"])


def test_fits_csv_has_exponent_intervals_and_says_why_a_fit_is_missing(tmp_path, monkeypatch):
    from scipy import stats

    rng = np.random.default_rng(0)
    gd = (0.05, 0.1, 0.2, 0.4, 0.8)
    noise = {(g, s): float(np.exp(rng.normal(0, 0.03))) for g in gd for s in (0, 1)}
    rows = _seed_rows("dit", gd, (0, 1), lambda g, s: 3 * g ** -0.5 * noise[(g, s)])
    rows += _seed_rows("lit", (0.1, 0.4), (0, 1), lambda g, s: 4 * g ** -0.5 * (1 + 0.01 * s))  # 2 distinct x
    drawn = _spy_figures(monkeypatch)
    figs = _figures(tmp_path, rows)
    fits = pd.read_csv(tmp_path / "results" / "plots" / "fits.csv")
    assert list(fits.columns[:10]) == ["dataset", "image_size", "recipe", "device", "metric_name", "x", "backbone",
                                       "exponent", "coefficient", "points"]  # the old columns first
    assert list(fits.columns[10:]) == ["exponent_se", "exponent_ci_low", "exponent_ci_high", "ci_level", "ci_method",
                                       "distinct_x", "seeds", "reason"]
    lx, ly = np.log([r["gmacs"] for r in rows[:10]]), np.log([r["metric_value"] for r in rows[:10]])
    ref = stats.linregress(lx, ly)  # an independent least-squares fit
    for x in plots.BOTH_VIEWS:
        dit = fits[(fits["x"] == x) & (fits["backbone"] == "dit")].iloc[0]
        assert dit["exponent_ci_low"] < dit["exponent"] < dit["exponent_ci_high"]
        assert dit["exponent_ci_low"] < -0.5 < dit["exponent_ci_high"] and dit["exponent"] == pytest.approx(-0.5,
                                                                                                           abs=0.03)
        assert dit["exponent"] == pytest.approx(ref.slope) and dit["exponent_se"] == pytest.approx(ref.stderr)
        half = stats.t.ppf(0.95, 10 - 2) * ref.stderr  # 90% Student t, points - 2 degrees of freedom
        assert (dit["exponent_ci_low"], dit["exponent_ci_high"]) == pytest.approx((ref.slope - half,
                                                                                  ref.slope + half))
        assert (dit["points"], dit["distinct_x"], dit["seeds"], dit["ci_level"], dit["ci_method"]) == \
            (10, 5, 2, 0.9, "ols_t") and pd.isna(dit["reason"])
        lit = fits[(fits["x"] == x) & (fits["backbone"] == "lit")].iloc[0]
        assert pd.isna(lit[["exponent", "coefficient", "exponent_se", "exponent_ci_low", "exponent_ci_high"]]).all()
        assert lit["reason"] == "2 distinct x values (a fit needs 3)"
        assert (lit["points"], lit["distinct_x"], lit["seeds"]) == (4, 2, 2)
        (fig,) = _drawn(figs, x)
        assert fig["fitted"] == ["dit"] and drawn[fig["stem"]]["lines"] == 1  # one fitted line: dit's, none for lit
        assert any(t.startswith("dit (fit: ∝ x^-0.") and "90% CI [" in t for t in drawn[fig["stem"]]["legend"])
