"""bench.throughput on a tiny preset: the trainer's own step is what is timed, every column is written and the
derived ones (img/s, utilisation, state memory) follow from the row, out-of-memory halves the batch, switch rows
(and the ones this device cannot run), upserts, the trainer-vs-bare comparison."""

from __future__ import annotations

import csv
import math
import re
import statistics
from pathlib import Path

import pytest
import torch

from bench import throughput
from bench.flops import forward_gmacs
from diffusion import trainer

TINY = ["--sizes", "cpu", "--resolution", "8", "--channels", "1", "--num-classes", "10", "--batch", "4",
        "--warmup", "1", "--repeats", "2", "--matmul-sizes", "32", "64", "--device", "cpu",
        "--memory-fraction", "0"]  # no address-space cap on the test process


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def counted_steps(monkeypatch):
    """Every trainer step bench.throughput takes, with the run it was taken on."""
    runs = []

    def step(run):
        runs.append(run)
        return trainer.train_step(run)

    monkeypatch.setattr(throughput, "train_step", step)
    return runs


def test_rows_are_complete_and_consistent(tmp_path, counted_steps):
    rows = throughput.main(["--backbones", "dit", *TINY, "--out", str(tmp_path)])
    written = read(tmp_path / "cpu.csv")
    assert list(written[0]) == throughput.COLUMNS and len(written) == len(rows) == 1
    r = written[0]
    assert (r["backbone"], r["size"], r["patch"], r["resolution"], r["channels"], r["batch"], r["precision"],
            r["switches"], r["status"]) == ("dit", "cpu", "2", "8", "1", "4", "fp32", "none", "ok")
    # the trainer's own step on a Run of the trainer: warm-up + repeats + the memory step, all on one Run
    assert len(counted_steps) == 1 + 2 + 1 and len({id(run) for run in counted_steps}) == 1
    run = counted_steps[0]
    assert isinstance(run, trainer.Run) and run.step == 4 and run.dataset.name == "synthetic"
    assert run.kwargs["input_size"] == 8 and run.kwargs["in_channels"] == 1 and run.kwargs["num_classes"] == 10
    f = {k: float(r[k]) for k in ("gmacs", "train_ms", "train_img_per_s", "train_util", "sample_img_per_s",
                                  "sample_cfg_img_per_s", "sample_util", "sample_cfg_util", "matmul_gmac_per_s",
                                  "peak_mem_mb", "state_mem_mb", "params")}
    assert f["gmacs"] == pytest.approx(forward_gmacs(run.model, 8, 1), rel=1e-5)
    assert f["params"] == sum(p.numel() for p in run.model.parameters())
    assert f["train_img_per_s"] == pytest.approx(4 / (f["train_ms"] / 1e3), rel=1e-4)
    rate = f["matmul_gmac_per_s"]
    assert rate > 0
    assert f["train_util"] == pytest.approx(3 * f["gmacs"] * f["train_img_per_s"] / rate, rel=1e-4)
    assert f["sample_util"] == pytest.approx(f["gmacs"] * f["sample_img_per_s"] / rate, rel=1e-4)
    assert f["sample_cfg_util"] == pytest.approx(2 * f["gmacs"] * f["sample_cfg_img_per_s"] / rate, rel=1e-4)
    # weights + EMA (all parameters) and two Adam moments (trainable ones), 4 bytes each
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert f["state_mem_mb"] == pytest.approx(4 * (2 * f["params"] + 2 * trainable) / 2**20, rel=1e-3)
    # the step's extra memory holds at least its new gradients (freed before it), and not a second model state
    assert 4 * trainable / 2**20 <= f["peak_mem_mb"] < f["state_mem_mb"]
    assert r["mem_method"] == "torch_profiler_live_tensor_bytes"
    assert int(r["threads"]) == torch.get_num_threads() and r["torch_version"] == torch.__version__
    assert (tmp_path / "cpu.png").is_file() and (tmp_path / "cpu.svg").is_file()


OOM_ERRORS = {"cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"),
              "cpu": RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                                  "memory: you tried to allocate 8589934592 bytes. Error code 12 (simulated)")}


@pytest.mark.parametrize("kind", sorted(OOM_ERRORS))
def test_out_of_memory_halves_the_batch(tmp_path, monkeypatch, kind):
    calls = []

    def step(run):
        calls.append(run.cfg.train.batch_size)
        if len(calls) == 1:
            raise OOM_ERRORS[kind]
        return trainer.train_step(run)

    monkeypatch.setattr(throughput, "train_step", step)
    throughput.main(["--backbones", "dit", *TINY, "--out", str(tmp_path)])
    (r,) = read(tmp_path / "cpu.csv")
    assert r["status"] == "ok" and (r["batch_asked"], r["batch"]) == ("4", "2")
    assert "out of memory at batch 4, halved" in r["note"]
    assert calls[0] == 4 and set(calls[1:]) == {2}
    assert float(r["train_img_per_s"]) == pytest.approx(2 / (float(r["train_ms"]) / 1e3), rel=1e-4)


def test_other_errors_are_failed_rows_not_back_off(tmp_path, monkeypatch):
    def step(run):
        raise RuntimeError("shape mismatch (simulated)")

    monkeypatch.setattr(throughput, "train_step", step)
    throughput.main(["--backbones", "dit", *TINY, "--out", str(tmp_path)])
    (r,) = read(tmp_path / "cpu.csv")
    assert r["status"] == "failed: RuntimeError: shape mismatch (simulated)" and r["batch"] == "4"


def test_cpu_memory_cap_turns_the_oom_killer_into_an_allocation_error():
    """In a child process: after limit_cpu_memory, a tensor larger than the memory left fails to allocate with the
    error the back-off recognises (without the cap the kernel would kill the process)."""
    import subprocess
    import sys

    code = ("import torch; from bench.throughput import is_out_of_memory, limit_cpu_memory\n"
            "limit = limit_cpu_memory(0.5)\n"
            "try:\n    torch.empty(limit, dtype=torch.uint8)\nexcept Exception as e:\n"
            "    print('refused', is_out_of_memory(e))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "refused True", proc.stderr[-2000:]


def test_out_of_memory_at_batch_one_is_a_failed_row(tmp_path, monkeypatch):
    def step(run):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(throughput, "train_step", step)
    throughput.main(["--backbones", "dit", *TINY, "--batch", "2", "--out", str(tmp_path)])
    (r,) = read(tmp_path / "cpu.csv")
    assert r["status"].startswith("failed: out of memory at batch 1") and r["batch"] == "1"
    assert r["note"] == "out of memory at batch 2, halved"


@pytest.mark.slow
def test_switch_rows_and_upsert(tmp_path):
    throughput.main(["--backbones", "dit", *TINY, "--out", str(tmp_path), "--switches", "grad_checkpoint", "tf32",
                     "flash_attn"])
    rows = {r["switches"]: r for r in read(tmp_path / "cpu.csv")}
    assert list(rows) == ["none", "grad_checkpoint", "tf32", "flash_attn"]
    ckpt = rows["grad_checkpoint"]
    assert ckpt["status"] == "ok"
    assert float(ckpt["train_speedup"]) == pytest.approx(
        float(ckpt["train_img_per_s"]) / float(rows["none"]["train_img_per_s"]), rel=1e-4)
    if not torch.cuda.is_available():
        assert rows["tf32"]["status"].startswith("not on this device: train.tf32=true applies to CUDA only")
        assert rows["flash_attn"]["status"].startswith("not on this device: train.flash_attn=true needs CUDA")
    # a later run of another backbone adds its rows; re-measuring a key replaces its row in place
    throughput.main(["--backbones", "dico", *TINY, "--out", str(tmp_path)])
    throughput.main(["--backbones", "dit", *TINY, "--out", str(tmp_path)])
    again = read(tmp_path / "cpu.csv")
    assert [(r["backbone"], r["switches"]) for r in again] == [("dit", s) for s in rows] + [("dico", "none")]
    assert again[0]["train_ms"] != rows["none"]["train_ms"] and again[1] == ckpt
    assert again[-1]["patch"] == ""  # DiCo has no patch size


def test_size_resolution_and_unknown_names(tmp_path):
    assert throughput.resolve_size("dimr", "S") == "S/2R" and throughput.resolve_size("dit", "S") == "S"
    assert throughput.resolve_size("dit", "Q") is None
    rows = throughput.main(["--backbones", "dit", *TINY, "--sizes", "Q", "--out", str(tmp_path)])
    assert rows[0]["status"] == "skipped: dit has no preset Q"
    for bad in (["--backbones", "nope"], ["--switches", "turbo"], ["--batch", "0"]):
        with pytest.raises(SystemExit) as e:
            throughput.main(bad + ["--out", str(tmp_path)])
        assert e.value.code == 2


def test_compare_bare_interleaves_rounds(tmp_path, counted_steps):
    rows = throughput.main(["--backbones", "dit", *TINY, "--compare-bare", "--rounds", "3", "--out", str(tmp_path)])
    written = read(tmp_path / "cpu-trainer-vs-bare.csv")
    assert list(written[0]) == throughput.BARE_COLUMNS and len(written) == len(rows) == 3
    assert [r["first"] for r in written] == ["trainer", "bare", "trainer"]
    assert len(counted_steps) == 1 + 3  # warm-up + one per round, on the trainer's Run
    for r in written:
        ratio = float(r["trainer_ms"]) / float(r["bare_ms"])
        assert float(r["ratio"]) == pytest.approx(ratio, rel=1e-4)
        assert float(r["bare_util"]) / float(r["trainer_util"]) == pytest.approx(ratio, rel=1e-4)
        assert math.isclose(float(r["trainer_util"]), 3 * float(r["gmacs"]) * 4 / (float(r["trainer_ms"]) / 1e3)
                            / float(r["matmul_gmac_per_s"]), rel_tol=1e-4)


def test_bare_step_trains_the_same_loss_as_the_trainer(tmp_path):
    """The bare step is the same model and loss: on the trainer's own x, t, noise and labels it gives the loss the
    trainer step logs (so the comparison times the same work plus the trainer's extras)."""
    cfg = throughput.compose("train", throughput.run_overrides("dit", "cpu", 2, 4, "fp32", "none",
                                                                throughput.parse_args(["--device", "cpu"]),
                                                                tmp_path / "run"))
    run = trainer.build_run(cfg, dataset=throughput.synthetic_dataset(4, 1, 8, 10))
    bare = throughput.BareStep(run)
    captured = {}
    original = run.loss_module.forward

    def capture(x, t, y, noise):
        captured.update(x=x.clone(), t=t.clone(), y=y.clone(), noise=noise.clone())
        return original(x, t, y, noise)

    run.loss_module.forward = capture
    logged = trainer.train_step(run)["loss"]
    bare.x, bare.t, bare.y, bare.noise = captured["x"], captured["t"], captured["y"], captured["noise"]
    loss = bare.model.training_losses(bare.diffusion, bare.x, bare.t, bare.y, bare.noise)["loss"].mean()
    assert loss.item() == pytest.approx(logged, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- README
REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "results" / "published" / "throughput"


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Throughput")
    return text[start:text.index("\n## ", start + 1)]


def markdown_tables(text: str) -> list[list[dict]]:
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and lines[i + 1].startswith("|---") and (i == 0 or not lines[i - 1].startswith("|")):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(header, (c.strip() for c in row.strip("|").split("|")))))
            tables.append(rows)
    return tables


def shown(text: str, value: float, scale: float = 1.0) -> bool:
    """``text`` (e.g. "12.3", "0.61", "32.96M", "**0.98**") is ``value / scale`` rounded as printed."""
    number = re.sub(r"[^0-9.\-]", "", text).rstrip(".")  # a number ending a sentence
    decimals = len(number.split(".")[1]) if "." in number else 0
    return abs(float(number) - value / scale) <= 0.5 * 10**-decimals + 1e-9


def test_readme_throughput_tables_are_the_published_csv():
    rows = read(PUBLISHED / "cpu.csv")
    plain = {r["backbone"]: r for r in rows if r["switches"] == "none"}
    tables = markdown_tables(readme_section())
    backbones_table = next(t for t in tables if "train util" in t[0] and "backbone" in t[0] and "switch" not in t[0])
    assert {r["backbone"] for r in backbones_table} == set(plain)
    for shown_row in backbones_table:
        r = plain[shown_row["backbone"]]
        assert shown_row["size"] == r["size"] + (f"/{r['patch']}" if r["patch"] else "")
        if r["status"] != "ok":
            assert r["status"].split(":")[0] in shown_row["train img/s"], (shown_row, r["status"])
            continue
        assert r["batch"] == "32" and r["precision"] == "fp32" and (r["resolution"], r["channels"]) == ("32", "4")
        for column, key, scale in (("params", "params", 1e6), ("GMACs", "gmacs", 1), ("train img/s",
                                   "train_img_per_s", 1), ("train util", "train_util", 1),
                                   ("sample img/s", "sample_img_per_s", 1), ("CFG img/s", "sample_cfg_img_per_s", 1),
                                   ("sample util", "sample_util", 1), ("peak MB", "peak_mem_mb", 1)):
            if column == "peak MB" and math.isnan(float(r[key])):  # the measurement failed: the CSV says why
                assert shown_row[column] == "n/a" and r["mem_method"].startswith("unavailable"), shown_row
                continue
            assert shown(shown_row[column], float(r[key]), scale), (shown_row["backbone"], column, r[key])
    rate = re.search(r"the matmul rate measured in the same run: ([0-9.]+) GMAC/s", " ".join(readme_section().split()))
    assert rate and shown(rate[1], float(plain["dit"]["matmul_gmac_per_s"]))
    measured = [t for t in tables if "switch" in t[0] and "train img/s" in t[0]]  # switch rows, once measured
    by_key = {(r["backbone"], r["switches"]): r for r in rows}
    for shown_row in (row for t in measured for row in t):
        switch = shown_row["switch"].strip("`").removeprefix("train.").split("=")[0].replace("precision", "bf16")
        r = by_key[shown_row["backbone"], "none" if switch == "plain" else switch]
        if r["status"] != "ok":
            assert "not on this device" in r["status"] and "not on this device" in shown_row["train img/s"]
            continue
        assert shown(shown_row["train img/s"], float(r["train_img_per_s"]))
        assert shown(shown_row["vs plain"], float(r["train_speedup"]) if r["train_speedup"] else 1.0)


def test_readme_switch_table_is_the_config():
    """Every switch of the trainer is listed once, with "not keyed" exactly for the exact ones."""
    from diffusion.run import KEYED_SWITCHES, UNKEYED_TRAIN_KEYS

    table = next(t for t in markdown_tables(readme_section()) if "switch" in t[0] and "run key" in t[0])
    names = [r["switch"].strip("`").removeprefix("train.") for r in table]
    assert sorted(names) == sorted(["precision=bf16", *trainer.SWITCHES])
    for row, name in zip(table, names):
        if name in UNKEYED_TRAIN_KEYS:
            assert row["run key"].startswith("not keyed"), row
        else:
            assert row["run key"].startswith("keyed") and (name in KEYED_SWITCHES or name == "precision=bf16"), row


def test_readme_trainer_ratios_are_the_published_rounds():
    section = " ".join(readme_section().split())  # sentences, whatever the line breaks
    bare = [float(r["ratio"]) for r in read(PUBLISHED / "cpu-trainer-vs-bare.csv")]
    match = re.search(r"trainer step / bare step: median \*\*([0-9.]+)\*\* over (\d+) rounds \(([0-9.]+)-([0-9.]+)\)",
                      section)
    assert match, "the README states the trainer-vs-bare ratio"
    assert shown(match[1], statistics.median(bare)) and int(match[2]) == len(bare)
    assert shown(match[3], min(bare)) and shown(match[4], max(bare))
    rounds = read(PUBLISHED / "cpu-trainer-vs-bare.csv")
    util = re.search(r"utilisation ([0-9.]+) \(trainer\) and ([0-9.]+) \(bare\) of", section)
    assert util and shown(util[1], statistics.median(float(r["trainer_util"]) for r in rounds))
    assert shown(util[2], statistics.median(float(r["bare_util"]) for r in rounds))
    official = read(PUBLISHED / "cpu-trainer-vs-official.csv")
    for batch in sorted({r["batch"] for r in official}):
        rounds = [r for r in official if r["batch"] == batch]
        match = re.search(rf"batch {batch}: median \*\*([0-9.]+)\*\* \(before: ([0-9.]+)\)", section)
        assert match, f"the README states the trainer-vs-official ratio at batch {batch}"
        assert shown(match[1], statistics.median(float(r["ratio"]) for r in rounds))
        assert shown(match[2], statistics.median(float(r["ratio_before"]) for r in rounds))
    b16 = [r for r in official if r["batch"] == "16"]
    calm = re.search(r"rounds 1-5 on the calm machine ranged ([0-9.]+)-([0-9.]+) \(before: ([0-9.]+)-([0-9.]+)\)",
                     section)
    assert calm, "the README states the calm rounds"
    ours, before = [float(r["ratio"]) for r in b16[:5]], [float(r["ratio_before"]) for r in b16[:5]]
    assert shown(calm[1], min(ours)) and shown(calm[2], max(ours))
    assert shown(calm[3], min(before)) and shown(calm[4], max(before))
    bare_rate = re.search(r"bare-comparison matmul rate ([0-9.]+) GMAC/s", section)
    assert bare_rate and all(shown(bare_rate[1], float(r["matmul_gmac_per_s"]))
                             for r in read(PUBLISHED / "cpu-trainer-vs-bare.csv"))


def test_readme_second_machine_table_and_figures_are_its_published_csv():
    """The Xeon section: every row and figure from results/published/throughput/xeon/ (rows, the switch ratios of
    the sentence, the trainer-vs-bare rounds)."""
    xeon = PUBLISHED / "xeon"
    rows = read(xeon / "cpu.csv")
    assert {r["device_name"] for r in rows} == {"Intel(R) Xeon(R) Processor"}
    plain = {r["backbone"]: r for r in rows if r["switches"] == "none"}
    table = next(t for t in markdown_tables(readme_section()) if "train img/s on the Xeon" in t[0])
    assert [r["backbone"] for r in table] == ["dit", "lit", "rwkv", "dico", "dimr", "dis"] and set(plain) == {
        r["backbone"] for r in table}
    for shown_row in table:
        r = plain[shown_row["backbone"]]
        assert r["status"] == "ok" and r["batch"] == "32" and r["precision"] == "fp32"
        assert shown_row["size"] == r["size"] + (f"/{r['patch']}" if r["patch"] else "")
        for column, key in (("train img/s on the Xeon", "train_img_per_s"), ("train util", "train_util"),
                            ("sample img/s", "sample_img_per_s"), ("CFG img/s", "sample_cfg_img_per_s"),
                            ("sample util", "sample_util"), ("peak MB", "peak_mem_mb")):
            assert shown(shown_row[column], float(r[key])), (shown_row["backbone"], column)
    section = " ".join(readme_section().split())
    assert shown(re.search(r"so DiS's is ([0-9]+) MB", section)[1], float(plain["dis"]["peak_mem_mb"]))
    epyc = {r["backbone"]: r for r in read(PUBLISHED / "cpu.csv") if r["switches"] == "none"}
    assert all(plain[b]["peak_mem_mb"] == epyc[b]["peak_mem_mb"] for b in epyc if b != "dis")  # same tensors
    by_key = {(r["backbone"], r["switches"]): r for r in rows}
    runs = re.search(r"DiMR and DiS from the first \(matmul rate ([0-9.]+) GMAC/s\), the switch rows of DiT-S/2 but "
                     r"`heap_cache` from the second \(([0-9.]+)\), DiT and DiCo with their `heap_cache` rows from the "
                     r"last \(the matmul rate measured in that run: ([0-9.]+) GMAC/s\)", section)
    assert runs, "the README says which run each row comes from"
    for backbone, switch, group in (("lit", "none", 1), ("rwkv", "none", 1), ("dimr", "none", 1), ("dis", "none", 1),
                                    ("dit", "compile", 2), ("dit", "bf16", 2), ("dit", "none", 3),
                                    ("dico", "none", 3), ("dit", "heap_cache", 3), ("dico", "heap_cache", 3)):
        rate = float(by_key[backbone, switch]["matmul_gmac_per_s"]) if switch != "bf16" else None
        assert rate is None or shown(runs[group], rate), (backbone, switch)
    xeon_rates = [float(r["matmul_gmac_per_s"]) for r in rows if r["precision"] == "fp32" and r["matmul_gmac_per_s"]]
    epyc_rates = [float(r["matmul_gmac_per_s"]) for r in read(PUBLISHED / "cpu.csv")
                  if r["precision"] == "fp32" and r["matmul_gmac_per_s"]]
    span = re.search(r"fp32 matmul rate is ([0-9.]+)-([0-9.]+)x the EPYC's", section)
    assert shown(span[1], min(xeon_rates) / max(epyc_rates)) and shown(span[2], max(xeon_rates) / min(epyc_rates))
    utils = re.search(r"\(([0-9.]+) in the table's run, ([0-9.]+) with `heap_cache`\)", section)
    assert shown(utils[1], float(plain["dit"]["train_util"]))
    assert shown(utils[2], float(by_key["dit", "heap_cache"]["train_util"]))
    heap = re.search(r"in the last run DiT-S/2 trained ([0-9.]+)x faster with it and DiCo-S ([0-9.]+)x", section)
    assert shown(heap[1], float(by_key["dit", "heap_cache"]["train_speedup"]))
    assert shown(heap[2], float(by_key["dico", "heap_cache"]["train_speedup"]))
    dico = re.search(r"without the switch it trains ([0-9.]+)x slower here than on the EPYC \(([0-9.]+) against "
                     r"([0-9.]+) img/s\), with it ([0-9.]+)x", section)
    epyc_dico, xeon_dico = float(epyc["dico"]["train_img_per_s"]), float(plain["dico"]["train_img_per_s"])
    assert shown(dico[1], epyc_dico / xeon_dico) and shown(dico[2], xeon_dico) and shown(dico[3], epyc_dico)
    assert shown(dico[4], epyc_dico / float(by_key["dico", "heap_cache"]["train_img_per_s"]))
    switched = {r["switches"]: float(r["train_speedup"]) for r in rows if r["train_speedup"] and r["backbone"] == "dit"}
    for label, switch in (("bf16 autocast", "bf16"), ("`torch.compile`", "compile"), ("channels_last",
                          "channels_last"), ("fused AdamW", "fused_adamw"), ("gradient checkpointing",
                          "grad_checkpoint"), ("heap cache", "heap_cache")):
        match = re.search(rf"{re.escape(label)} ([0-9.]+)x", section.split("Switch rows of DiT-S/2 here")[1])
        assert match and shown(match[1], switched[switch]), switch
    rounds = read(xeon / "cpu-trainer-vs-bare.csv")
    ratios = [float(r["ratio"]) for r in rounds]
    match = re.search(r"bare step median ([0-9.]+) over (\d+) rounds \(([0-9.]+)-([0-9.]+)\), utilisation ([0-9.]+) "
                      r"\(trainer\) and ([0-9.]+) \(bare\)", section)
    assert match and int(match[2]) == len(rounds)
    assert shown(match[1], statistics.median(ratios)) and shown(match[3], min(ratios)) and shown(match[4], max(ratios))
    assert shown(match[5], statistics.median(float(r["trainer_util"]) for r in rounds))
    assert shown(match[6], statistics.median(float(r["bare_util"]) for r in rounds))


def test_readme_second_machine_official_loop_ratios_are_its_rounds():
    section = " ".join(readme_section().split())
    rounds = read(PUBLISHED / "xeon" / "cpu-trainer-vs-official.csv")
    assert {r["official_commit"] for r in rounds} == {"ed81ce2"} and {r["batch"] for r in rounds} == {"16", "32"}
    for batch in ("16", "32"):
        ratios = [float(r["ratio"]) for r in rounds if r["batch"] == batch]
        match = re.search(rf"Xeon batch {batch}: median ([0-9.]+)(?: over 6 rounds)? \(([0-9.]+)-([0-9.]+)\)",
                          section)
        assert match, batch
        assert shown(match[1], statistics.median(ratios)) and len(ratios) == 6
        assert shown(match[2], min(ratios)) and shown(match[3], max(ratios))
    b32 = [r for r in rounds if r["batch"] == "32"]
    util = re.search(r"utilisation at batch 32: ours ([0-9.]+), official ([0-9.]+) \(matmul rate ([0-9.]+) GMAC/s",
                     section)
    assert util and shown(util[1], statistics.median(float(r["trainer_util"]) for r in b32))
    assert shown(util[2], statistics.median(float(r["official_util"]) for r in b32))
    assert all(shown(util[3], float(r["matmul_gmac_per_s"])) for r in rounds)
    drift = re.search(r"drifted from ([0-9.]+) to ([0-9.]+) GMAC/s across the five runs", section)
    rates = {float(r["matmul_gmac_per_s"]) for name in ("cpu.csv", "cpu-trainer-vs-bare.csv",
                                                         "cpu-trainer-vs-official.csv")
             for r in read(PUBLISHED / "xeon" / name) if r["matmul_gmac_per_s"] and r["precision"] == "fp32"}
    assert drift and len(rates) == 5 and shown(drift[1], min(rates)) and shown(drift[2], max(rates))


def test_process_wide_switch_rows_come_after_every_other_row(tmp_path, monkeypatch):
    """heap_cache changes glibc's malloc policy for good: measured after every other row of the run (else the plain
    rows of the next backbones would be measured with it), its speedup still over its own backbone's plain row."""
    order = []

    def fake(name, size, patch, switch, args, device, rates):
        order.append((name, switch))
        img_s = {"none": 2.0}.get(switch, 3.0) * (1 + (name == "dico"))
        return dict(status="ok", train_img_per_s=img_s, train_util=0.5, sample_img_per_s=1.0, sample_cfg_img_per_s=0.5,
                    sample_util=0.5, sample_cfg_util=0.5, peak_mem_mb=1.0)

    monkeypatch.setattr(throughput, "measure_switch", fake)
    monkeypatch.setattr(throughput, "plot", lambda path: [])
    rows = throughput.main(["--backbones", "dit", "dico", *TINY, "--out", str(tmp_path),
                            "--switches", "heap_cache", "grad_checkpoint"])
    assert order == [("dit", "none"), ("dit", "grad_checkpoint"), ("dico", "none"), ("dico", "grad_checkpoint"),
                     ("dit", "heap_cache"), ("dico", "heap_cache")]
    assert [r["train_speedup"] for r in rows if r["switches"] == "heap_cache"] == [1.5, 1.5]
