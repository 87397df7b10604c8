"""bench.plots on a synthetic runs.csv: files, exact power-law exponents, failed rows, missing results."""

from __future__ import annotations

import csv

import pandas as pd
import pytest

from bench import plots
from bench.schema import RUN_COLUMNS

EXPONENTS = {"dit": -0.5, "dico": -0.25}


def _row(backbone, size, patch, gmacs, params, **kw):
    steps, batch = 500, 64
    a = {"dit": 100.0, "dico": 80.0}[backbone]
    row = dict.fromkeys(RUN_COLUMNS, "")
    row.update(point_id=f"{backbone}-{size}-{patch}", dataset="fashion_mnist", image_size=16, channels=1,
               backbone=backbone, size=size, patch=patch, depth=4, width=128, params=params, gmacs=gmacs,
               train_steps=steps, batch=batch, lr=1e-3, train_compute_gmacs=gmacs * 3 * batch * steps,
               metric_name="fd_fashion_mnist_classifier", metric_value=a * gmacs ** EXPONENTS[backbone],
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
    for x in ("gmacs", "train_compute_gmacs", "params", "train_img_per_s"):
        for ext in ("png", "svg"):
            f = out / f"fashion_mnist_16x16_fd_fashion_mnist_classifier_vs_{x}.{ext}"
            assert f.is_file() and f.stat().st_size > 1000, f
    assert (out / "tokens_cpu.png").is_file() and (out / "tokens_cpu.svg").is_file()
    assert not list(out.glob("*.tmp"))

    fits = pd.read_csv(out / "fits.csv")
    scaling = fits[fits["dataset"] == "fashion_mnist"]
    # Exact power laws: metric = a * gmacs^k; compute and params are proportional to gmacs, so the same k.
    for x in ("gmacs", "train_compute_gmacs", "params"):
        for backbone, k in EXPONENTS.items():
            r = scaling[(scaling["x"] == x) & (scaling["backbone"] == backbone)]
            assert len(r) == 1 and int(r["points"].iloc[0]) == 3  # failed rows ignored
            assert abs(r["exponent"].iloc[0] - k) < 1e-6
    assert set(scaling["x"]) == {"gmacs", "train_compute_gmacs", "params"}  # no fit on throughput
    tok = fits[(fits["dataset"] == "tokens") & (fits["metric_name"] == "time_ms_median")].set_index("backbone")
    assert abs(tok.loc["attention", "exponent"] - 2.0) < 1e-6 and abs(tok.loc["bi_wkv", "exponent"] - 1.0) < 1e-6
    # Titles carry dataset, metric and budget; the SVG holds the title text.
    svg = (out / "fashion_mnist_16x16_fd_fashion_mnist_classifier_vs_gmacs.svg").read_text()
    for s in ("fashion_mnist 16x16", "fd_fashion_mnist_classifier", "budget 500 steps x 64", "x^-0.500"):
        assert s in svg, s
    assert "fit" in capsys.readouterr().out


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
