"""`make demo`: the CPU sweep over every backbone on 16x16 Fashion-MNIST, its plots, and a comparison with the
published reference results.

    python -m bench.demo                          # conf/bench.yaml + conf/sweep/cpu.yaml (12 points)
    python -m bench.demo train.steps=100          # any bench.sweep override (a new recipe: new rows)
    python -m bench.demo --help

The demo trains, samples and scores its points itself (resuming its own unfinished work; a point already done
under the same key is announced and reused). Rows go to results/<dataset>/runs.csv, sample grids to
results/<dataset>/samples/, plots to results/plots/: all untracked. The published reference under
results/published/ is only read: the demo prints its table beside the published one with the differences.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from bench import plots
from bench.sweep import run_sweep
from diffusion.config import ConfigError, compose

PUBLISHED = Path("results/published")
MATCH = ["backbone", "size", "patch", "depth", "width"]


def compare_with_published(rows: list[dict], published_csv: Path) -> str:
    """A table of this run's metric beside the published one for the same architectures and budget."""
    import pandas as pd

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return "no finished points to compare"
    if not published_csv.is_file():
        return f"no published reference at {published_csv}"
    mine = pd.DataFrame(ok)
    ref = pd.read_csv(published_csv, dtype=str, keep_default_na=False)
    ref = ref[ref.get("status", "ok") == "ok"]
    for df in (mine, ref):
        for c in MATCH + ["train_steps", "batch"]:
            df[c] = df[c].astype(str).str.replace(r"\.0$", "", regex=True)
    merged = mine.merge(ref, on=MATCH + ["train_steps", "batch"], how="left", suffixes=("", "_published"))
    out = []
    for _, r in merged.iterrows():
        arch = f"{r['backbone']} {r['size']} p{r['patch'] or '-'} d{r['depth']} w{r['width']}"
        yours = float(r["metric_value"])
        if r.get("metric_value_published") in (None, "") or pd.isna(r.get("metric_value_published")):
            out.append(f"{arch:<28} {yours:>9.3f} {'-':>11} {'':>8}  (no published point with this budget)")
            continue
        pub = float(r["metric_value_published"])
        out.append(f"{arch:<28} {yours:>9.3f} {pub:>11.3f} {100 * (yours - pub) / pub:>+7.1f}%  "
                   f"acc {float(r['classifier_accuracy']):.3f} vs {float(r['classifier_accuracy_published']):.3f}")
    metric = ok[0]["metric_name"]
    header = f"{'point':<28} {'yours':>9} {'published':>11} {'diff':>8}   ({metric}, lower is better)"
    return "\n".join([f"comparison with {published_csv}:", header, *out])


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in overrides):
        print(__doc__)
        return 0
    try:
        cfg = compose("bench", overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        rows = run_sweep(cfg)
    except KeyboardInterrupt:
        print("\ndemo interrupted; rerun `make demo` to resume (finished points are kept)", file=sys.stderr)
        return 130
    samples_dir = Path(cfg.results_dir) / cfg.dataset.name / "samples"
    for row in rows:
        grid = Path(row.get("run_dir") or "") / "eval_samples.png"
        if row.get("status") == "ok" and grid.is_file():
            samples_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, samples_dir / f"{row['point_key']}.png")
    code = plots.main(["--results", str(cfg.results_dir)])
    print(compare_with_published(rows, PUBLISHED / cfg.dataset.name / "runs.csv"))
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        print(f"{len(failed)} point(s) failed; see the error column of the CSV", file=sys.stderr)
    return 1 if failed or code else 0


if __name__ == "__main__":
    sys.exit(main())
