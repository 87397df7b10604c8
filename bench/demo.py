"""`make demo`: the default CPU sweep over every registered backbone on Fashion-MNIST, then the plots.

    python -m bench.demo                      # conf/bench.yaml + conf/sweep/cpu.yaml
    python -m bench.demo train.steps=100      # any bench.sweep override

Resumable like any sweep: rerunning skips finished points. The per-point sample grids are copied to
results/<dataset>/samples/<backbone>-<point>.png next to the CSV.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from bench import plots
from bench.sweep import CONF_DIR, run_sweep


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=overrides)
    rows = run_sweep(cfg)
    samples_dir = Path(cfg.results_dir) / cfg.dataset.name / "samples"
    for row in rows:
        grid = Path(row.get("run_dir") or "") / "eval_samples.png"
        if row.get("status") == "ok" and grid.is_file():
            samples_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, samples_dir / f"{row['point_id']}.png")
    code = plots.main(["--results", str(cfg.results_dir)])
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        print(f"{len(failed)} point(s) failed; see the error column of the CSV", file=sys.stderr)
    return 1 if failed or code else 0


if __name__ == "__main__":
    sys.exit(main())
