"""bench.tokens: every registered token mixer is timed per T, the CSV is complete and the plot is drawn."""

import csv

import torch

import backbones
from bench import tokens


def test_token_benchmark_writes_csv_and_plot(tmp_path, capsys):
    rows = tokens.main(["--tokens", "16", "64", "--width", "32", "--repeats", "1", "--warmup", "0",
                        "--threads", "1", "--out", str(tmp_path / "csv"), "--plots-out", str(tmp_path / "plots")])
    mixers = set(backbones.token_mixers())
    assert {"softmax_attention", "bi_wkv", "linear_attention", "dico_conv"} <= mixers
    with open(tmp_path / "csv" / "cpu.csv") as f:
        written = list(csv.DictReader(f))
    assert [(r["mixer"], int(r["tokens"])) for r in written] == [(r["mixer"], r["tokens"]) for r in rows]
    assert {(r["mixer"], r["tokens"]) for r in written} == {(m, t) for m in mixers for t in ("16", "64")}
    assert all(r["status"] == "ok" and float(r["time_ms_median"]) > 0 for r in written)
    assert (tmp_path / "plots" / "tokens_cpu.png").is_file() and (tmp_path / "plots" / "tokens_cpu.svg").is_file()
    assert "bi_wkv is" in capsys.readouterr().out  # the Bi-WKV vs softmax-attention summary per T


def test_cpu_peak_memory_is_the_largest_live_bytes_of_the_step():
    keep = torch.zeros(2**20)  # 4 MiB that exists before the step: not counted

    def step():
        a = torch.ones(2**20)  # 4 MiB
        b = torch.ones(2**21)  # + 8 MiB: peak 12 MiB
        del a, b
        c = torch.ones(2**21)  # 8 MiB after the frees: below the peak
        keep.add_(c[: 2**20])

    mb, method = tokens.step_peak_memory_mb(step, torch.device("cpu"))
    assert method == "torch_profiler_live_tensor_bytes"
    assert mb == 12.0


def test_cpu_peak_memory_equals_the_profilers_memory_timeline():
    """The running sum of allocation events gives what the profiler's own (much slower) timeline analysis gives."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    torch.manual_seed(0)
    point = tokens.Point(backbones.token_mixers()["bi_wkv"], 64, 32, 2, torch.device("cpu"))
    point.step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        point.step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    totals = [sum(s) for s in sizes]
    mb, _ = point.peak_memory_mb()
    assert mb > 0.05 and mb == (max(totals) - totals[0]) / 2**20


def test_readme_token_table_is_the_published_csv_and_meets_the_bi_wkv_targets():
    """Every row of the README's token table equals results/published/tokens/cpu.csv as printed; the published
    Bi-WKV run keeps its peak at T = 16384 at most linear attention's and time(16384)/time(1024) <= 24."""
    import re
    from pathlib import Path

    import pandas as pd

    root = Path(__file__).resolve().parents[1]
    published = pd.read_csv(root / "results/published/tokens/cpu.csv")
    section = (root / "README.md").read_text().split("## Token scaling")[1].split("\n## ")[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\|[^|`]*`(\w+)` \|(.*)\|$", section, re.M)}
    assert set(rows) == set(published.mixer) == set(backbones.token_mixers())
    for mixer, cells in rows.items():
        r = published[published.mixer == mixer].set_index("tokens")
        t = r.time_ms_median
        expected = [f"{t[256]:.1f} ms", f"{t[1024]:.1f}", f"{t[4096]:.1f}", f"{t[16384]:.1f}",
                    f"{t[16384] / t[1024]:.1f}", f"{r.peak_mem_mb[16384]:.0f}"]
        assert [c.strip().strip("*") for c in cells.split("|")] == expected, mixer
    assert (published.status == "ok").all() and (published.threads == 1).all()
    peak = published[published.tokens == 16384].set_index("mixer").peak_mem_mb
    assert peak["bi_wkv"] <= peak["linear_attention"]
    t = published[published.mixer == "bi_wkv"].set_index("tokens").time_ms_median
    assert t[16384] / t[1024] <= 24
