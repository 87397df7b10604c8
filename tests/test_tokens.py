"""bench.tokens: every registered token mixer is timed per T, the CSV is complete and the plot is drawn."""

import csv

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
