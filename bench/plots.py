"""Scaling plots from the sweep CSVs: ``python -m bench.plots`` (``make scaling-plots``).

For every ``results/<dataset>/runs.csv`` (rows with status ``ok``), per dataset, image size and metric: the metric
against forward GMACs, training compute, parameters (log-log, one marker series per backbone, points labelled by
preset and patch, a least-squares power law per backbone with >= 2 points, its exponent in the legend) and against
training throughput. From ``results/tokens/<device>.csv`` (bench.tokens), when present: time and peak memory of
each token mixer against the number of tokens. PNG and SVG under ``results/plots/``, plus ``fits.csv`` with every
fitted exponent. Titles name the dataset, the metric and the training budget (steps x batch).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.schema import RUN_COLUMNS  # noqa: E402
from runio.files import atomic_write  # noqa: E402

# (column, axis label, fit a power law)
X_AXES: list[tuple[str, str, bool]] = [
    ("gmacs", "forward GMACs per image (batch 1, no CFG)", True),
    ("train_compute_gmacs", "training compute (GMACs x 3 x batch x steps)", True),
    ("params", "parameters", True),
    ("train_img_per_s", "training throughput (img/s)", False),
]
REQUIRED = ["backbone", "metric_name", "metric_value", "status", "train_steps", "batch"] + [c for c, _, _ in X_AXES]
TOKEN_TIME_COLUMNS = ("time_ms_median", "fwd_bwd_ms", "time_ms", "median_ms", "ms")  # bench.tokens: the first
MARKERS = "osD^vP*Xh<>"

plt.rcParams["svg.hashsalt"] = "bench.plots"  # stable SVG ids: re-running gives byte-identical files to commit


class PlotError(RuntimeError):
    """Missing or malformed results; the message names the file and the fix."""


MIN_FIT_SPAN = 1.2  # a power law needs x to span at least this factor (near-equal x gives a meaningless slope)


def fit_power_law(x: Any, y: Any) -> tuple[float, float] | None:
    """Least-squares fit of y = c * x^k in log-log space; (k, c), or None when x spans less than MIN_FIT_SPAN."""
    lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    if lx.max() - lx.min() < math.log(MIN_FIT_SPAN):
        return None
    k, logc = np.polyfit(lx, ly, 1)
    return float(k), float(np.exp(logc))


def _fmt_num(v: Any) -> str:
    return str(int(v)) if isinstance(v, (int, float, np.integer, np.floating)) and float(v).is_integer() else str(v)


def point_label(row: pd.Series) -> str:
    """"S/2 d4-w128": preset, patch size where the backbone has one (not DiCo), then depth and width, since sweeps
    override the presets' depth and width."""
    has = lambda v: v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v) != ""  # noqa: E731
    parts = []
    if has(row.get("size")):
        parts.append(str(row.get("size")) + (f"/{_fmt_num(row.get('patch'))}" if has(row.get("patch")) else ""))
    if has(row.get("depth")) and has(row.get("width")):
        parts.append(f"d{_fmt_num(row.get('depth'))}-w{_fmt_num(row.get('width'))}")
    return " ".join(parts)


def budget_label(df: pd.DataFrame) -> str:
    """Training budget of the rows: "500 steps x 128", or the range when the budget varies (compute budgets)."""
    pairs = sorted({(int(s), int(b)) for s, b in zip(df["train_steps"], df["batch"])})
    if len(pairs) == 1:
        return f"{pairs[0][0]} steps x {pairs[0][1]}"
    batches = {b for _, b in pairs}
    if len(batches) == 1:
        return f"{pairs[0][0]}-{pairs[-1][0]} steps x {batches.pop()}"
    return "budgets " + ", ".join(f"{s}x{b}" for s, b in pairs[:4]) + (" ..." if len(pairs) > 4 else "")


def _protocol_label(df: pd.DataFrame) -> str:
    parts = []
    for col, fmt in (("num_samples", "{} samples"), ("sampler", "{}"), ("sample_steps", "{} steps"),
                     ("cfg_scale", "cfg {}")):
        if col in df and df[col].nunique(dropna=True) == 1:
            parts.append(fmt.format(_fmt_num(df[col].dropna().iloc[0])))
    return ", ".join(parts)


def _atomic_savefig(fig: plt.Figure, path: Path) -> None:
    fmt = path.suffix.lstrip(".")
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=150, bbox_inches="tight",
                                             metadata={"Date": None} if fmt == "svg" else {}))


def _save(fig: plt.Figure, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("png", "svg")]
    for p in paths:
        _atomic_savefig(fig, p)
    plt.close(fig)
    return paths


def _slug(s: Any) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s))


def load_runs(csv_path: Path) -> pd.DataFrame:
    """The ``ok`` rows of one runs.csv with numeric columns parsed; raises PlotError on a malformed file."""
    try:
        df = pd.read_csv(csv_path, dtype={"size": str, "status": str, "metric_name": str, "backbone": str})
    except Exception as e:
        raise PlotError(f"cannot read {csv_path}: {e}") from e
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise PlotError(f"{csv_path} lacks the columns {missing} (expected the bench/schema.py RUN_COLUMNS: "
                        f"{', '.join(RUN_COLUMNS)})")
    df = df[df["status"].astype(str).str.strip() == "ok"].copy()
    for c in ["metric_value", "train_steps", "batch", "image_size", "patch", "depth", "width"] + \
             [c for c, _, _ in X_AXES]:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df.dropna(subset=["metric_value", "train_steps", "batch"])


def plot_scaling(df: pd.DataFrame, x_col: str, x_label: str, fit: bool, title_head: str, out_dir: Path,
                 stem: str, colors: dict[str, Any]) -> tuple[list[Path], list[dict[str, Any]]]:
    """One metric-vs-x figure (log-log), a marker series and (when ``fit``) a power law per backbone."""
    metric = df["metric_name"].iloc[0]
    d = df[(df[x_col] > 0) & (df["metric_value"] > 0)]
    if len(d) < len(df):
        print(f"bench.plots: {stem}: {len(df) - len(d)} row(s) with non-positive or missing {x_col}/metric "
              f"left out of the log-log plot", file=sys.stderr)
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    fits = []
    for backbone, g in sorted(d.groupby("backbone"), key=lambda kv: kv[0]):
        g = g.sort_values(x_col)
        color, marker = colors[backbone], MARKERS[sorted(colors).index(backbone) % len(MARKERS)]
        label = backbone
        power_law = fit_power_law(g[x_col], g["metric_value"]) if fit and g[x_col].nunique() >= 2 else None
        if power_law is not None:
            k, c = power_law
            xs = np.geomspace(g[x_col].min(), g[x_col].max(), 50)
            ax.plot(xs, c * xs ** k, "--", color=color, lw=1.2, alpha=0.8)
            label = f"{backbone} (fit: ∝ x^{k:.3f})"
            fits.append(dict(x=x_col, backbone=backbone, exponent=k, coefficient=c, points=len(g)))
        else:  # no fit (throughput axis, or x too narrow for one): connect the points
            ax.plot(g[x_col], g["metric_value"], "-", color=color, lw=0.8, alpha=0.5)
        ax.scatter(g[x_col], g["metric_value"], color=color, marker=marker, s=36, label=label, zorder=3)
        for _, row in g.iterrows():
            ax.annotate(point_label(row), (row[x_col], row["metric_value"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{title_head}\n{metric} vs {x_label}", fontsize=10)
    if d["backbone"].nunique():
        ax.legend(fontsize=8)
    return _save(fig, out_dir, stem), fits


def plot_dataset(df: pd.DataFrame, source: str, out_dir: Path) -> tuple[list[Path], list[dict[str, Any]]]:
    """All plots of one runs.csv: per (dataset, image size, metric) the four metric-vs-x figures."""
    paths, fits = [], []
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(sorted(df["backbone"].unique()))}
    keys = [k for k in ("dataset", "image_size", "metric_name") if k in df]
    for key, g in df.groupby(keys, dropna=False):
        info = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        dataset = info.get("dataset", source)
        dataset = source if not isinstance(dataset, str) else dataset
        size = info.get("image_size")
        res = f" {int(size)}x{int(size)}" if size is not None and not pd.isna(size) else ""
        protocol = _protocol_label(g)
        head = f"{dataset}{res} | {info['metric_name']} | budget {budget_label(g)}" + \
            (f"\n({protocol})" if protocol else "")
        for x_col, x_label, fit in X_AXES:
            stem = _slug(f"{dataset}{res.replace(' ', '_')}_{info['metric_name']}_vs_{x_col}")
            p, f = plot_scaling(g.dropna(subset=[x_col]), x_col, x_label, fit, head, out_dir, stem, colors)
            paths += p
            fits += [dict(dataset=dataset, image_size=size, metric_name=info["metric_name"], **r) for r in f]
    return paths, fits


def plot_tokens(csv_path: Path, out_dir: Path) -> tuple[list[Path], list[dict[str, Any]]]:
    """Time (and peak memory) of each token mixer vs tokens, log-log, a power-law exponent per mixer."""
    df = pd.read_csv(csv_path)
    time_col = next((c for c in TOKEN_TIME_COLUMNS if c in df.columns), None)
    if "mixer" not in df or "tokens" not in df or time_col is None:
        raise PlotError(f"{csv_path} needs columns mixer, tokens and one of {TOKEN_TIME_COLUMNS}; "
                        f"found {list(df.columns)}")
    if "status" in df:
        df = df[df["status"].astype(str).str.strip() == "ok"]
    device = str(df["device"].iloc[0]) if "device" in df and len(df) else csv_path.stem
    if "device_name" in df and df["device_name"].nunique() == 1:
        device += f" ({df['device_name'].iloc[0]})"
    panels = [(time_col, "forward + backward time (ms" + (", median)" if "median" in time_col else ")"))]
    if "peak_mem_mb" in df and df["peak_mem_mb"].notna().any():
        panels.append(("peak_mem_mb", "peak memory (MB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    fits = []
    extra = ", ".join(f"{c} {_fmt_num(df[c].iloc[0])}" for c in ("width", "batch", "dtype", "threads")
                      if c in df and df[c].nunique() == 1)
    for ax, (col, label) in zip(axes[0], panels):
        for i, (mixer, g) in enumerate(sorted(df.groupby("mixer"), key=lambda kv: kv[0])):
            g = g[(g[col] > 0) & (g["tokens"] > 0)].sort_values("tokens")
            if g.empty:
                continue
            name = str(mixer)
            power_law = fit_power_law(g["tokens"], g[col]) if g["tokens"].nunique() >= 2 else None
            if power_law is not None:
                k = power_law[0]
                name += f" (∝ T^{k:.2f})"
                fits.append(dict(dataset="tokens", device=device, metric_name=col, x="tokens", backbone=mixer,
                                 exponent=k, points=len(g)))
            ax.plot(g["tokens"], g[col], marker=MARKERS[i % len(MARKERS)], label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"token-mixer scaling on {device}" + (f"\n{extra}" if extra else ""), fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir, _slug(f"tokens_{csv_path.stem}")), fits


def _write_fits(fits: list[dict[str, Any]], path: Path) -> None:
    cols = ["dataset", "image_size", "device", "metric_name", "x", "backbone", "exponent", "coefficient", "points"]
    atomic_write(path, lambda f: pd.DataFrame(fits, columns=cols).to_csv(f, index=False, float_format="%.10g"),
                 binary=False)


def make_plots(results_dir: str | os.PathLike = "results", out_dir: str | os.PathLike | None = None
               ) -> dict[str, Any]:
    """Every plot for ``results_dir``; returns {"paths": [...], "fits": [...]}. Raises PlotError if nothing to plot."""
    results = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results / "plots"
    if not results.is_dir():
        raise PlotError(f"results directory {results} not found: run a sweep first (python -m bench.sweep, "
                        f"make demo) or pass --results DIR")
    run_csvs = sorted(results.glob("*/runs.csv"))
    token_csvs = sorted((results / "tokens").glob("*.csv"))
    if not run_csvs and not token_csvs:
        raise PlotError(f"no {results}/<dataset>/runs.csv and no {results}/tokens/<device>.csv found: run a sweep "
                        f"(python -m bench.sweep) or bench.tokens first")
    paths: list[Path] = []
    fits: list[dict[str, Any]] = []
    for csv in run_csvs:
        df = load_runs(csv)
        if df.empty:
            print(f"bench.plots: {csv} has no rows with status ok; skipped", file=sys.stderr)
            continue
        p, f = plot_dataset(df, csv.parent.name, out)
        paths += p
        fits += f
    for csv in token_csvs:
        p, f = plot_tokens(csv, out)
        paths += p
        fits += f
    if not paths:
        raise PlotError(f"nothing to plot under {results}: no successful runs yet")
    _write_fits(fits, out / "fits.csv")
    return {"paths": paths, "fits": fits}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="results", help="results directory holding <dataset>/runs.csv")
    ap.add_argument("--out", default=None, help="output directory (default: <results>/plots)")
    args = ap.parse_args(argv)
    try:
        res = make_plots(args.results, args.out)
    except PlotError as e:
        print(f"bench.plots: {e}", file=sys.stderr)
        return 1
    for f in res["fits"]:
        print(f"fit {f['dataset']} {f['metric_name']} vs {f['x']}: {f['backbone']} exponent {f['exponent']:.4f} "
              f"({f['points']} points)")
    print(f"bench.plots: wrote {len(res['paths'])} files to {Path(res['paths'][0]).parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
