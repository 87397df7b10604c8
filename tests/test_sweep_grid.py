"""conf/sweep/cpu_scaling.yaml: every backbone spans >= 8x in forward GMACs with >= 4 distinct compute points (counted
here with bench.flops, not read from the file), its comment table says the same, its recipe is cpu.yaml's and the
points it shares with cpu.yaml are those points exactly (so their keys, and the published rows, are reused)."""

from __future__ import annotations

import re
import warnings
from collections import defaultdict

import pytest

from backbones.layers import count_parameters
from bench import sweep
from bench.flops import build_for_counting, forward_gmacs
from diffusion.config import CONF_DIR, compose, to_plain

MIN_SPAN, MIN_DISTINCT = 8.0, 4
BACKBONES = ["dico", "dimr", "dis", "dit", "lit", "rwkv"]  # (tests register more: test_diverging)


def counted(name: str, overrides: dict) -> tuple[int, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_for_counting(name, input_size=16, in_channels=1, num_classes=10, learn_sigma=True, **overrides)
    return count_parameters(model), forward_gmacs(model, 16, 1)


def test_cpu_scaling_spans_8x_in_gmacs_per_backbone_and_matches_its_table():
    cfg = compose("bench", ["sweep=cpu_scaling"])
    assert to_plain(cfg.sweep.seeds) == [0, 1] and cfg.dataset.image_size == 16 and cfg.dataset.name == "fashion_mnist"
    points = sweep.grid_points(cfg, sweep.selected_backbones(cfg))
    assert all(from_axes for _, _, from_axes in points)
    counts = [(name, *counted(name, overrides)) for name, overrides, _ in points]
    gmacs = defaultdict(list)
    for name, _, g in counts:
        gmacs[name].append(g)
    assert sorted(gmacs) == BACKBONES  # every backbone of the comparison
    for name, values in gmacs.items():
        distinct = sorted({round(v, 6) for v in values})
        assert len(distinct) >= MIN_DISTINCT, (name, distinct)
        assert distinct[-1] / distinct[0] >= MIN_SPAN, (name, distinct)
    # the table in the file's comments: one line per point, in the grid's order, params and GMACs as counted
    text = (CONF_DIR / "sweep" / "cpu_scaling.yaml").read_text()
    # img/s is "-" where not measured yet
    table = re.findall(r"^# (dit|lit|rwkv|dico|dimr|dis) .*? ([\d.]+)M +([\d.]+) +(?:\d+|-)", text, flags=re.M)
    assert [t[0] for t in table] == [c[0] for c in counts]
    for (name, params, g), (_, p_text, g_text) in zip(counts, table):
        assert float(p_text) == pytest.approx(params / 1e6, abs=5e-4) and float(g_text) == pytest.approx(g, abs=5e-5)


def test_cpu_scaling_has_the_recipe_of_cpu_and_reuses_its_points():
    cpu, scaling = compose("bench", []), compose("bench", ["sweep=cpu_scaling"])
    a, b = to_plain(cpu), to_plain(scaling)
    a.pop("sweep"), b.pop("sweep")
    assert a == b  # everything but the grid: the same recipe, the same evaluation
    shared = [(n, p) for n in cpu.sweep.points for p in to_plain(cpu.sweep.points[n])
              if (n, p) in [(m, o) for m, o, _ in sweep.grid_points(scaling, sweep.selected_backbones(scaling))]]
    assert len(shared) == 10 and {n for n, _ in shared} == {"dit", "lit", "dico", "dimr", "dis"}
