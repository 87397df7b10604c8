"""Scaling plots from the sweep CSVs: ``python -m bench.plots`` (``make scaling-plots``).

For every ``results/<dataset>/runs.csv`` (rows with status ``ok``), per training recipe (the ``recipe_key``
column, or dataset, image size, steps, batch, lr and the sampling protocol) and metric: the metric against forward
GMACs (per-GMAC view), training compute (equal-training-compute view; both views are drawn for every recipe),
parameters (log-log, one marker series per backbone, points labelled by preset and patch, a least-squares power law
per backbone with >= 3 distinct x values, its exponent and confidence interval in the legend) and against training
throughput. One figure per recipe, so no figure or fit mixes two budgets; a figure whose x is constant, or (beyond
the two views) a constant multiple of an x already drawn, is skipped with a note.

**Seeds.** Rows of one point that differ only in the run seed (same recipe, backbone and architecture columns) are
one marker at their mean metric with an error bar: the min-max of 2 seeds, or a bootstrap 90% interval of the mean
(2000 resamples, seeded) for 3 or more; the legend says which. A single-seed point is a bare marker.

**Fits** (``fits.csv``): per recipe, metric, x and backbone, the exponent k of metric = c * x^k fitted by least
squares on log-log over every row (seeds as replicate observations), with its standard error and the 90%
Student-t interval (``points`` - 2 degrees of freedom): ``ci_method`` = ``ols_t``. ``distinct_x`` and ``seeds``
count the distinct x values and run seeds. A backbone with fewer than 3 distinct x values (or x spanning less than
1.2x) gets no line and a row with empty exponent and interval and its ``reason``.

From ``results/tokens/<device>.csv`` (bench.tokens), when present: time and peak memory of each token mixer against
the number of tokens. PNG and SVG under ``results/plots/`` (or ``--out``), plus ``fits.csv``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from bench.schema import RUN_COLUMNS  # noqa: E402
from runio.files import atomic_write  # noqa: E402

# (column, fit a power law); axis text from AXIS_LABELS
X_AXES: list[tuple[str, bool]] = [
    ("gmacs", True),
    ("train_compute_gmacs", True),
    ("params", True),
    ("train_img_per_s", False),
]
# Human axis text per column / metric name; fd_<dataset>_classifier and fd_<extractor> are matched in axis_label.
AXIS_LABELS: dict[str, str] = {
    "gmacs": "forward GMACs per image (batch 1, no CFG)",
    "train_compute_gmacs": "training compute in GMACs (3 x forward x batch x steps)",
    "params": "parameters",
    "train_img_per_s": "training throughput (images/s, higher is better)",
    "sample_img_per_s": "sampling throughput (images/s, higher is better)",
    "peak_mem_mb": "peak memory (MB)",
    "wall_time_s": "wall time (s)",
    "fid": "FID (Inception, lower is better)",
    "classifier_accuracy": "classifier accuracy on samples (higher is better)",
    "kid_mean": "KID (Inception, lower is better)",
    "isc_mean": "Inception score (higher is better)",
}
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "digits": "digits", "cifar10": "CIFAR-10",
                 "imagenet": "ImageNet"}
# The columns that define a training + evaluation recipe when the CSV has no recipe_key.
RECIPE_COLUMNS = ("dataset", "image_size", "train_steps", "batch", "lr", "num_samples", "sampler", "sample_steps",
                  "cfg_scale")
REQUIRED = ["backbone", "metric_name", "metric_value", "status", "train_steps", "batch"] + [c for c, _ in X_AXES]
TOKEN_TIME_COLUMNS = ("time_ms_median", "fwd_bwd_ms", "time_ms", "median_ms", "ms")  # bench.tokens: the first
MARKERS = "osD^vP*Xh<>"
MIN_FIT_X = 3  # distinct x values a backbone needs for a fitted power law (two points always fit exactly)
MIN_FIT_SPAN = 1.2  # a power law needs x to span at least this factor (near-equal x gives a meaningless slope)
SAME_RATIO_RTOL = 1e-6  # x / other x constant to this relative tolerance: the figure repeats the other one
BOTH_VIEWS = ("gmacs", "train_compute_gmacs")  # per-GMAC and equal-training-compute views: drawn for every recipe
CI_LEVEL = 0.9  # of the seed intervals (bootstrap) and of the fitted exponents (Student t)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
FIT_CI_METHOD = "ols_t"  # least squares on log-log over every row; Student-t interval of the slope, points - 2 dof
# Columns that, with the recipe and the backbone, identify a point: rows equal in them differ only in the seed.
POINT_COLUMNS = ("size", "patch", "depth", "width", "params", "gmacs")
FIT_COLUMNS = ["dataset", "image_size", "recipe", "device", "metric_name", "x", "backbone", "exponent", "coefficient",
               "points", "exponent_se", "exponent_ci_low", "exponent_ci_high", "ci_level", "ci_method", "distinct_x",
               "seeds", "reason"]

plt.rcParams["svg.hashsalt"] = "bench.plots"  # stable SVG ids: re-running gives byte-identical files to commit


class PlotError(RuntimeError):
    """Missing or malformed results; the message names the file and the fix."""


def dataset_name(name: str) -> str:
    return DATASET_NAMES.get(name, name)


def axis_label(name: str) -> str:
    """Human text for a column or metric name; the raw name when unknown."""
    if name in AXIS_LABELS:
        return AXIS_LABELS[name]
    if m := re.fullmatch(r"fd_(.+)_classifier", name):
        return f"Frechet distance in {dataset_name(m[1])} classifier features (lower is better)"
    if m := re.fullmatch(r"fd_(.+)", name):
        return f"Frechet distance in {m[1]} features (lower is better)"
    return name


def _plain(v: float) -> str:
    """A tick value as a plain number: 0.02, 5, 300, 16384, 200k, 1.5M (never 6x10^0)."""
    if v <= 0 or not math.isfinite(v):
        return ""
    if v >= 1e5:
        scale, suffix = next((s, x) for s, x in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if v >= s)
        return f"{v / scale:.3g}{suffix}"
    if v >= 1:
        return f"{v:.6g}"
    return f"{v:.3g}" if v >= 1e-4 else f"{v:.1e}"


def readable_log_ticks(axis: Any) -> None:
    """Plain-number tick labels on a log axis (x or y). Minor ticks (2..9 x 10^n) are labelled too when the view
    spans less than a decade (otherwise a short axis shows a single label or none; 7 and 9 stay bare, too close to
    their neighbours), 2 and 5 only when it spans less than two decades, none beyond."""
    def minor(v: float, _pos: Any) -> str:
        lo, hi = sorted(axis.get_view_interval())
        span = hi / lo if lo > 0 else math.inf
        mantissa = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
        if (span < 10 and mantissa not in (7, 9)) or (span < 100 and mantissa in (2, 5)):
            return _plain(v)
        return ""

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: _plain(v)))
    axis.set_minor_formatter(FuncFormatter(minor))


def fit_power_law(x: Any, y: Any) -> tuple[float, float] | None:
    """Least-squares fit of y = c * x^k in log-log space; (k, c), or None when x spans less than MIN_FIT_SPAN."""
    lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    if lx.max() - lx.min() < math.log(MIN_FIT_SPAN):
        return None
    k, logc = np.polyfit(lx, ly, 1)
    return float(k), float(np.exp(logc))


def fit_power_law_ci(x: Any, y: Any, level: float = CI_LEVEL) -> dict[str, float] | None:
    """:func:`fit_power_law` with the uncertainty of the exponent: {exponent, coefficient, exponent_se,
    exponent_ci_low, exponent_ci_high}, the interval the Student-t one of the least-squares slope of log y on log x
    (n - 2 degrees of freedom; none, NaN, for n = 2). None when x spans less than MIN_FIT_SPAN."""
    from scipy import stats

    fitted = fit_power_law(x, y)
    if fitted is None:
        return None
    k, c = fitted
    lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    n = len(lx)
    se = lo = hi = math.nan
    if n > 2:
        resid = ly - (k * lx + math.log(c))
        se = math.sqrt(float(resid @ resid) / (n - 2) / float(((lx - lx.mean()) ** 2).sum()))
        half = float(stats.t.ppf(0.5 + level / 2, n - 2)) * se
        lo, hi = k - half, k + half
    return dict(exponent=k, coefficient=c, exponent_se=se, exponent_ci_low=lo, exponent_ci_high=hi)


def bootstrap_mean_interval(values: Any, level: float = CI_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                            seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (seeded: the same values give the same interval)."""
    v = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def seed_spread(values: Any) -> tuple[float, float, float, str]:
    """(mean, low, high, kind) of one point's metric over its seeds: kind "single" (low = high = the value),
    "min-max" for 2 seeds, "bootstrap" (90% interval of the mean) for 3 or more."""
    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    if len(v) == 1:
        return mean, mean, mean, "single"
    if len(v) == 2:
        return mean, float(v.min()), float(v.max()), "min-max"
    lo, hi = bootstrap_mean_interval(v)
    return mean, lo, hi, "bootstrap"


SPREAD_TEXT = {"min-max": "min-max of 2 seeds", "bootstrap": f"bootstrap {CI_LEVEL:.0%} CI of the mean (>= 3 seeds)"}


def aggregate_seeds(g: pd.DataFrame, x_col: str) -> pd.DataFrame:
    """One row per point of one backbone's rows: the points' columns (from the first seed's row) with x the mean x
    (throughput varies between seeds), metric_value the mean metric, lo / hi / spread from :func:`seed_spread` and
    n_seeds. Rows equal in POINT_COLUMNS and in the seed (distinct points the CSV columns cannot tell apart, e.g.
    two head counts) stay separate points (the k-th row of each seed forms the k-th point)."""
    keys = [c for c in POINT_COLUMNS if c in g]
    seed = g["seed"] if "seed" in g else pd.Series(0, index=g.index)
    g = g.assign(_seed=seed.fillna(-1), _rep=0)
    g["_rep"] = g.groupby(keys + ["_seed"], dropna=False, sort=False).cumcount()
    if (g["_rep"] > 0).any():
        print(f"bench.plots: {g['backbone'].iloc[0]}: rows equal in {', '.join(keys)} and the seed are distinct "
              f"points (e.g. head counts): plotted separately", file=sys.stderr)
    out = []
    for _, p in g.groupby(keys + ["_rep"], dropna=False, sort=False):
        mean, lo, hi, kind = seed_spread(p["metric_value"])
        first = p.iloc[0].copy()
        first[x_col] = float(p[x_col].mean())
        first["metric_value"], first["lo"], first["hi"], first["spread"] = mean, lo, hi, kind
        first["n_seeds"] = len(p)
        out.append(first)
    return pd.DataFrame(out).drop(columns=["_seed", "_rep"]).sort_values(x_col)


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
    for col, fmt in (("lr", "lr {}"), ("num_samples", "{} samples"), ("sampler", "{}"), ("sample_steps", "{} steps"),
                     ("cfg_scale", "cfg {}")):
        if col in df and df[col].nunique(dropna=True) == 1:
            parts.append(fmt.format(_fmt_num(df[col].dropna().iloc[0])))
    return ", ".join(parts)


def recipe_keys(df: pd.DataFrame) -> pd.Series:
    """Per row: its ``recipe_key`` when present and non-empty, else the RECIPE_COLUMNS values joined."""
    fallback = df.apply(lambda r: "|".join(_fmt_num(r.get(c)) for c in RECIPE_COLUMNS), axis=1).astype(str)
    if "recipe_key" not in df:
        return fallback
    given = df["recipe_key"].astype(str).str.strip()
    return given.where(df["recipe_key"].notna() & (given != "") & (given != "nan"), fallback)


def _recipe_part(df: pd.DataFrame, col: str) -> str:
    """The short file-name token of one recipe column, "" when the rows have no single value."""
    vals = df[col].dropna().unique() if col in df else []
    if len(vals) != 1:
        return ""
    v = vals[0]
    return {"lr": f"lr{_fmt_num(v)}", "num_samples": f"n{_fmt_num(v)}", "sampler": str(v),
            "sample_steps": f"s{_fmt_num(v)}", "cfg_scale": f"cfg{_fmt_num(v)}"}[col]


def recipe_labels(groups: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Short, unique file-name labels of the recipes of one dataset: "steps500-bs128", plus lr / samples / sampler /
    cfg where recipes differ in them, plus a hash of the recipe key when they still collide."""
    protocol = ("lr", "num_samples", "sampler", "sample_steps", "cfg_scale")
    varying = [c for c in protocol if len({_recipe_part(g, c) for g in groups.values()}) > 1]
    labels = {}
    for key, g in groups.items():
        parts = [f"steps{_fmt_num(g['train_steps'].iloc[0])}", f"bs{_fmt_num(g['batch'].iloc[0])}"]
        labels[key] = "-".join(parts + [p for c in varying if (p := _recipe_part(g, c))])
    taken = list(labels.values())
    return {key: f"{label}-{hashlib.sha1(key.encode()).hexdigest()[:6]}" if taken.count(label) > 1 else label
            for key, label in labels.items()}


def _overlap(a: Bbox, b: Bbox) -> float:
    """Intersection area of two display-space boxes (0 when they only touch or are apart)."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _candidate_offsets(gap: float = 5.0, step: float = 9.0, rings: int = 6) -> list[tuple[float, float, str, str]]:
    """(dx, dy in points, ha, va): right of the point, its corners and other sides, then the same farther away."""
    out = []
    for r in range(rings):
        d, s = gap + r * step, gap + 1 + r * step
        out += [(s, 0, "left", "center"), (d, d, "left", "bottom"), (d, -d, "left", "top"),
                (-s, 0, "right", "center"), (-d, d, "right", "bottom"), (-d, -d, "right", "top"),
                (0, s, "center", "bottom"), (0, -s, "center", "top")]
    return out


def place_labels(ax: plt.Axes, xs: Any, ys: Any, texts: list[str], colors: list[Any], fontsize: float = 7,
                 marker_pt: float = 3.5, bars: list[tuple[float, float, float]] = ()) -> list[Any]:
    """Annotate each point with its text so that no two labels overlap, nor a label and a marker (or an error bar,
    ``bars``: (x, low, high) in data coordinates), nor a label and the axes border, where the candidate offsets allow
    it. Deterministic greedy repel in display space: points in order of position, each label takes the first free
    offset of ``_candidate_offsets`` (the least overlapping one when none is free); far offsets get a thin leader
    line. Call after the scales and limits are final."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    ax.autoscale_view()
    to_px = fig.dpi / 72.0
    pts = ax.transData.transform(np.column_stack([np.asarray(xs, float), np.asarray(ys, float)]))
    r = marker_pt * to_px
    markers = [Bbox([[x - r, y - r], [x + r, y + r]]) for x, y in pts]
    for bx, lo, hi in bars:  # a bar is an obstacle as wide as its caps
        (x0, y0), (_, y1) = ax.transData.transform([[bx, lo], [bx, hi]])
        markers.append(Bbox([[x0 - r, min(y0, y1)], [x0 + r, max(y0, y1)]]))
    frame = ax.get_window_extent(renderer)
    placed: list[Bbox] = []
    anns: list[Any] = [None] * len(texts)
    for i in sorted(range(len(texts)), key=lambda j: (round(pts[j][0], 3), round(pts[j][1], 3), texts[j])):
        ann = ax.annotate(texts[i], (xs[i], ys[i]), textcoords="offset points", xytext=(0, 0), fontsize=fontsize,
                          color=colors[i], zorder=4)
        best: tuple[float, int, Bbox] | None = None
        candidates = _candidate_offsets()
        for c, (dx, dy, ha, va) in enumerate(candidates):
            ann.xyann = (dx, dy)
            ann.set_ha(ha)
            ann.set_va(va)
            box = label_box(ann, renderer).padded(1.0)
            outside = box.width * box.height - _overlap(box, frame)
            cost = sum(_overlap(box, b) for b in placed) + sum(_overlap(box, m) for m in markers) + 2 * outside
            if best is None or cost < best[0]:
                best = (cost, c, box)
            if cost == 0:
                break
        assert best is not None
        dx, dy, ha, va = candidates[best[1]]
        ann.xyann = (dx, dy)
        ann.set_ha(ha)
        ann.set_va(va)
        if best[1] >= 8:  # beyond the first ring: redraw with a leader line back to the point
            ann.remove()
            ann = ax.annotate(texts[i], (xs[i], ys[i]), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                              fontsize=fontsize, color=colors[i], zorder=4,
                              arrowprops=dict(arrowstyle="-", lw=0.5, color=colors[i], alpha=0.6, shrinkA=0,
                                              shrinkB=3))
        placed.append(best[2])
        anns[i] = ann
    return anns


def label_box(ann: Any, renderer: Any) -> Bbox:
    """Display-space box of an annotation's text (its leader line left out)."""
    ann.update_positions(renderer)
    return Text.get_window_extent(ann, renderer)


def count_label_overlaps(anns: list[Any], renderer: Any = None) -> int:
    """Number of pairs of annotations whose text boxes intersect."""
    if not anns:
        return 0
    renderer = renderer or anns[0].figure.canvas.get_renderer()
    boxes = [label_box(a, renderer) for a in anns]
    return sum(_overlap(boxes[i], boxes[j]) > 0 for i in range(len(boxes)) for j in range(i + 1, len(boxes)))


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
        df = pd.read_csv(csv_path, dtype={"size": str, "status": str, "metric_name": str, "backbone": str,
                                          "recipe_key": str, "point_key": str})
    except Exception as e:
        raise PlotError(f"cannot read {csv_path}: {e}") from e
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise PlotError(f"{csv_path} lacks the columns {missing} (expected the bench/schema.py RUN_COLUMNS: "
                        f"{', '.join(RUN_COLUMNS)})")
    df = df[df["status"].astype(str).str.strip() == "ok"].copy()
    for c in ["metric_value", "train_steps", "batch", "image_size", "patch", "depth", "width", "seed"] + \
             [c for c, _ in X_AXES]:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df.dropna(subset=["metric_value", "train_steps", "batch"])


def plot_scaling(df: pd.DataFrame, x_col: str, fit: bool, title: str, out_dir: Path, stem: str,
                 colors: dict[str, Any]) -> dict[str, Any]:
    """One metric-vs-x figure (log-log) of one recipe: a marker series per backbone (the seeds of a point
    aggregated: the mean, an error bar for their spread), a power law per backbone with >= MIN_FIT_X distinct x when
    ``fit``. Returns {"paths", "fits" (fitted: with their intervals), "unfitted" (no line: the reason), "fitted"
    (backbones), "spread" (one entry per aggregated point), "label_overlaps"}."""
    metric = df["metric_name"].iloc[0]
    d = df[(df[x_col] > 0) & (df["metric_value"] > 0)]
    if len(d) < len(df):
        print(f"bench.plots: {stem}: {len(df) - len(d)} row(s) with non-positive or missing {x_col}/metric "
              f"left out of the log-log plot", file=sys.stderr)
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    fits: list[dict[str, Any]] = []
    unfitted: list[dict[str, Any]] = []
    spread: list[dict[str, Any]] = []
    xs, ys, texts, text_colors, bars = [], [], [], [], []
    for backbone, g in sorted(d.groupby("backbone"), key=lambda kv: kv[0]):
        g = g.sort_values(x_col)
        pts = aggregate_seeds(g, x_col)
        color, marker = colors[backbone], MARKERS[sorted(colors).index(backbone) % len(MARKERS)]
        label, n_x = backbone, g[x_col].nunique()
        n_seeds = max(int(g["seed"].nunique()), 1) if "seed" in g else 1
        counts = dict(x=x_col, backbone=backbone, points=len(g), distinct_x=n_x, seeds=n_seeds)
        power_law = fit_power_law_ci(g[x_col], g["metric_value"]) if fit and n_x >= MIN_FIT_X else None
        if power_law is not None:
            k, c = power_law["exponent"], power_law["coefficient"]
            line_x = np.geomspace(g[x_col].min(), g[x_col].max(), 50)
            ax.plot(line_x, c * line_x ** k, "--", color=color, lw=1.2, alpha=0.8)
            ci = power_law["exponent_ci_low"], power_law["exponent_ci_high"]
            label = f"{backbone} (fit: ∝ x^{k:.3f}" + (
                f", {CI_LEVEL:.0%} CI [{ci[0]:.3f}, {ci[1]:.3f}])" if math.isfinite(ci[0]) else ")")
            fits.append(dict(**counts, **power_law, ci_level=CI_LEVEL, ci_method=FIT_CI_METHOD, reason=""))
        elif fit:
            if n_x < MIN_FIT_X:
                reason = f"{n_x} distinct x value{'s' if n_x != 1 else ''} (a fit needs {MIN_FIT_X})"
                label = f"{backbone} ({n_x} x value{'s' if n_x != 1 else ''}: no fit, needs {MIN_FIT_X})"
            else:
                reason = f"x spans < {MIN_FIT_SPAN}x"
                label = f"{backbone} (x spans < {MIN_FIT_SPAN}x: no fit)"
            unfitted.append(dict(**counts, reason=reason))
        ax.scatter(pts[x_col], pts["metric_value"], color=color, marker=marker, s=36, label=label, zorder=3)
        many = pts[pts["n_seeds"] > 1]
        if len(many):
            ax.errorbar(many[x_col], many["metric_value"],
                        yerr=[many["metric_value"] - many["lo"], many["hi"] - many["metric_value"]],
                        fmt="none", ecolor=color, elinewidth=1.0, capsize=3, alpha=0.85, zorder=2)
        for _, row in pts.iterrows():
            xs.append(row[x_col])
            ys.append(row["metric_value"])
            texts.append(point_label(row))
            text_colors.append(color)
            if row["n_seeds"] > 1:
                bars.append((row[x_col], row["lo"], row["hi"]))
            spread.append(dict(backbone=backbone, x=row[x_col], mean=row["metric_value"], low=row["lo"],
                               high=row["hi"], seeds=int(row["n_seeds"]), kind=row["spread"]))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.margins(0.08)
    readable_log_ticks(ax.xaxis)
    readable_log_ticks(ax.yaxis)
    ax.set_xlabel(axis_label(x_col))
    ax.set_ylabel(axis_label(metric))
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    anns = place_labels(ax, xs, ys, texts, text_colors, bars=bars)
    if d["backbone"].nunique():  # outside the axes: never on top of points or labels
        handles, labels = ax.get_legend_handles_labels()
        kinds = [k for k in SPREAD_TEXT if any(p["kind"] == k for p in spread)]
        if kinds:  # what the markers and bars are
            handles.append(Line2D([], [], color="0.35", marker="|", markersize=12, linestyle="none"))
            labels.append("marker: mean over seeds; bar: " + "; ".join(SPREAD_TEXT[k] for k in kinds))
        ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    overlaps = count_label_overlaps(anns)
    return dict(paths=_save(fig, out_dir, stem), fits=fits, unfitted=unfitted, fitted=[f["backbone"] for f in fits],
                spread=spread, label_overlaps=overlaps)


def _repeats(g: pd.DataFrame, x_col: str, drawn: list[str]) -> str | None:
    """Why the x_col figure would repeat information: x constant, or x = r * (an x already drawn) with one r for
    every point; None when it does not."""
    v = g[x_col][g[x_col] > 0]
    if v.empty:
        return f"no positive {x_col}"
    if v.max() <= v.min() * (1 + SAME_RATIO_RTOL):
        return f"{x_col} is the same ({_plain(v.iloc[0])}) for every point"
    for other in drawn:
        w = g[other].reindex(v.index)
        if (w > 0).all():
            ratio = v / w
            if ratio.max() <= ratio.min() * (1 + SAME_RATIO_RTOL):
                return f"{x_col} = {ratio.iloc[0]:.6g} x {other} for every point (same figure, same exponents)"
    return None


def plot_dataset(df: pd.DataFrame, source: str, out_dir: Path) -> list[dict[str, Any]]:
    """All plots of one runs.csv: per recipe and metric, the metric-vs-x figures (none spanning two recipes).
    Returns one description per figure: {"stem", "paths", "recipe", "dataset", "image_size", "metric_name", "x",
    "fits", "unfitted", "fitted", "spread", "label_overlaps", "skipped", "note"} (``skipped``: the reason, with no
    paths, or None; ``note``: why a view repeats another one, said in its title)."""
    figures: list[dict[str, Any]] = []
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(sorted(df["backbone"].unique()))}
    df = df.assign(_recipe=recipe_keys(df))
    # train_steps and batch always split too: even a coarse recipe_key never puts two budgets in one figure.
    keys = [k for k in ("dataset", "image_size", "metric_name") if k in df]
    for key, dm in df.groupby(keys, dropna=False):
        info = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        groups = {"|".join(map(_fmt_num, k)): g for k, g in dm.groupby(["_recipe", "train_steps", "batch"])}
        labels = recipe_labels(groups)
        dataset = info.get("dataset", source)
        dataset = source if not isinstance(dataset, str) else dataset
        size = info.get("image_size")
        res = f" {int(size)}x{int(size)}" if size is not None and not pd.isna(size) else ""
        for rkey, g in groups.items():
            recipe = labels[rkey]
            protocol = _protocol_label(g)
            title = f"{dataset_name(dataset)}{res} | {info['metric_name']} | budget {budget_label(g)}" + \
                (f"\n({protocol})" if protocol else "")
            drawn: list[str] = []
            for x_col, fit in X_AXES:
                stem = _slug(f"{dataset}{res.replace(' ', '_')}_{info['metric_name']}_vs_{x_col}_{recipe}")
                desc: dict[str, Any] = dict(stem=stem, paths=[], recipe=recipe, dataset=dataset, image_size=size,
                                            metric_name=info["metric_name"], x=x_col, fits=[], unfitted=[],
                                            fitted=[], spread=[], label_overlaps=0, skipped=None, note=None)
                gx = g.dropna(subset=[x_col])
                if x_col in BOTH_VIEWS:  # drawn even when it repeats the other view (then said in its title)
                    desc["skipped"] = _repeats(gx, x_col, [])
                    note = None if desc["skipped"] else _repeats(gx, x_col, drawn)
                    desc["note"] = note and note.replace("(same figure, same exponents)", "(rescaled: same exponents)")
                else:
                    desc["skipped"] = _repeats(gx, x_col, drawn)
                if desc["skipped"]:
                    print(f"bench.plots: {stem}: not drawn: {desc['skipped']}", file=sys.stderr)
                    for stale in (out_dir / f"{stem}.{ext}" for ext in ("png", "svg")):  # from an earlier run
                        stale.unlink(missing_ok=True)
                else:
                    full_title = title + (f"\n[{desc['note']}]" if desc["note"] else "")
                    desc.update(plot_scaling(gx, x_col, fit, full_title, out_dir, stem, colors))
                    for k in ("fits", "unfitted"):
                        desc[k] = [dict(dataset=dataset, image_size=size, recipe=recipe,
                                        metric_name=info["metric_name"], **r) for r in desc[k]]
                    drawn.append(x_col)
                figures.append(desc)
    return figures


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
            n_x = g["tokens"].nunique()
            power_law = fit_power_law_ci(g["tokens"], g[col]) if n_x >= MIN_FIT_X else None
            if power_law is not None:
                k = power_law["exponent"]
                name += f" (∝ T^{k:.2f})"
                fits.append(dict(dataset="tokens", device=device, metric_name=col, x="tokens", backbone=mixer,
                                 **power_law, points=len(g), ci_level=CI_LEVEL, ci_method=FIT_CI_METHOD,
                                 distinct_x=n_x, seeds=1, reason=""))
            ax.plot(g["tokens"], g[col], marker=MARKERS[i % len(MARKERS)], label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        readable_log_ticks(ax.xaxis)
        readable_log_ticks(ax.yaxis)
        ax.set_xlabel("tokens T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"token-mixer scaling on {device}" + (f"\n{extra}" if extra else ""), fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir, _slug(f"tokens_{csv_path.stem}")), fits


def _write_fits(fits: list[dict[str, Any]], path: Path) -> None:
    """fits.csv: FIT_COLUMNS (the first ten as before, the interval columns after them); a row without a fit has
    empty exponent, coefficient and interval, and its reason."""
    atomic_write(path, lambda f: pd.DataFrame(fits, columns=FIT_COLUMNS).to_csv(f, index=False,
                                                                                 float_format="%.10g"),
                 binary=False)


def make_plots(results_dir: str | os.PathLike = "results", out_dir: str | os.PathLike | None = None
               ) -> dict[str, Any]:
    """Every plot for ``results_dir``; returns {"paths": [...], "fits": [...], "figures": [...]} (figures: the
    plot_dataset descriptions, skipped ones included). Raises PlotError if nothing to plot."""
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
    rows: list[dict[str, Any]] = []  # fits.csv: the fits and the backbones without one, per figure
    figures: list[dict[str, Any]] = []
    for csv in run_csvs:
        df = load_runs(csv)
        if df.empty:
            print(f"bench.plots: {csv} has no rows with status ok; skipped", file=sys.stderr)
            continue
        figs = plot_dataset(df, csv.parent.name, out)
        figures += figs
        paths += [p for fig in figs for p in fig["paths"]]
        fits += [f for fig in figs for f in fig["fits"]]
        rows += [r for fig in figs for r in sorted(fig["fits"] + fig["unfitted"], key=lambda r: r["backbone"])]
    for csv in token_csvs:
        p, f = plot_tokens(csv, out)
        paths += p
        fits += f
        rows += f
    if not paths:
        raise PlotError(f"nothing to plot under {results}: no successful runs yet")
    _write_fits(rows, out / "fits.csv")
    return {"paths": paths, "fits": fits, "unfitted": [r for r in rows if r.get("reason")], "figures": figures}


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
        recipe = f" [{f['recipe']}]" if f.get("recipe") else ""
        ci = (f" [{f['exponent_ci_low']:.4f}, {f['exponent_ci_high']:.4f}] {f['ci_level']:.0%} CI"
              if math.isfinite(f.get("exponent_ci_low", math.nan)) else "")
        print(f"fit {f['dataset']}{recipe} {f['metric_name']} vs {f['x']}: {f['backbone']} exponent "
              f"{f['exponent']:.4f}{ci} ({f['points']} points, {f.get('distinct_x', '?')} x values, "
              f"{f.get('seeds', 1)} seed(s))")
    print(f"bench.plots: wrote {len(res['paths'])} files to {Path(res['paths'][0]).parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
