"""The sweep CSV: validated reads (no swallowed, dropped or crashing rows), locked atomic upserts."""

import multiprocessing

import numpy as np
import pytest

from bench.results_csv import KEY, ResultsCSVError, read_rows, upsert_row
from bench.schema import RUN_COLUMNS


def row(pid, **kw):
    return {KEY: pid, "backbone": "dit", "status": "ok", **kw}


def write(path, *lines):
    path.write_text("".join(line + "\n" for line in lines))


def header(columns=RUN_COLUMNS):
    return ",".join(columns)


def data(key="", **kw):
    """One CSV line over all RUN_COLUMNS, ``key`` in the key column."""
    kw[KEY] = key
    return ",".join(str(kw.get(c, "")) for c in RUN_COLUMNS)


def test_missing_and_empty_files_have_no_rows(tmp_path):
    assert read_rows(tmp_path / "runs.csv") == []
    (tmp_path / "runs.csv").write_text("")
    assert read_rows(tmp_path / "runs.csv") == []


def test_round_trip_is_exact(tmp_path):
    path = tmp_path / "runs.csv"
    upsert_row(path, row("a", metric_value=0.1 + 0.2, gmacs=np.float64(1 / 3), params=np.int64(1279520),
                         lr=1e-4, error="Traceback:\n  line 1\r\nValueError: x, \"quoted\""))
    upsert_row(path, row("b", patch=None))
    rows = read_rows(path)
    assert [r[KEY] for r in rows] == ["a", "b"] and list(rows[0]) == RUN_COLUMNS
    a = rows[0]
    assert a["metric_value"] == "0.30000000000000004" and float(a["gmacs"]) == 1 / 3
    assert a["params"] == "1279520" and a["lr"] == "0.0001" and rows[1]["patch"] == ""
    assert a["error"] == "Traceback:   line 1 ValueError: x, \"quoted\""  # newlines became spaces
    assert path.read_text().count("\n") == 3
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_replace_keeps_order(tmp_path):
    path = tmp_path / "runs.csv"
    for pid in "abc":
        upsert_row(path, row(pid, status="failed"))
    upsert_row(path, row("b", status="ok", seed=3))
    rows = read_rows(path)
    assert [(r[KEY], r["status"], r["seed"]) for r in rows] == [
        ("a", "failed", ""), ("b", "ok", "3"), ("c", "failed", "")]


@pytest.mark.parametrize("bad_line", [2, 3])
def test_unterminated_quote_is_an_error_naming_its_line(tmp_path, bad_line):
    path = tmp_path / "runs.csv"
    lines = [header()] + [data(f"p{i}", status="ok") for i in range(2, 6)]
    lines[bad_line - 1] = data(f"p{bad_line}", status="failed", error='"oops, no closing quote')
    lines.append(data("p6", error='closes "here" later"'))  # a stray quote later must not rescue it
    write(path, *lines)
    with pytest.raises(ResultsCSVError, match=rf"runs.csv, line {bad_line}: .*unterminated quote.*"
                                              rf"fix line {bad_line} or move the file aside"):
        read_rows(path)


def test_unknown_column_is_an_error_naming_it(tmp_path):
    path = tmp_path / "runs.csv"
    write(path, header(RUN_COLUMNS + ["fid_score"]), data("a") + ",3.2")
    with pytest.raises(ResultsCSVError, match=r"line 1: unknown columns \['fid_score'\]"):
        read_rows(path)


@pytest.mark.parametrize("first_line", ["data", "wrong_names"])
def test_file_without_a_header_is_an_error(tmp_path, first_line):
    path = tmp_path / "runs.csv"
    top = data("a", status="ok") if first_line == "data" else "id,name,value"
    write(path, top, data("b", status="ok"))
    with pytest.raises(ResultsCSVError, match=r"runs.csv, line 1: no header"):
        read_rows(path)


@pytest.mark.parametrize("extra", [-1, 1])
def test_row_with_wrong_field_count_is_an_error_naming_its_line(tmp_path, extra):
    path = tmp_path / "runs.csv"
    bad = data("b")
    bad = bad[:bad.rindex(",")] if extra < 0 else bad + ","
    write(path, header(), data("a"), bad, data("c"))
    n = len(RUN_COLUMNS) + extra
    with pytest.raises(ResultsCSVError, match=rf"line 3: {n} fields where the header has {len(RUN_COLUMNS)}"):
        read_rows(path)


def test_duplicate_key_is_an_error(tmp_path):
    path = tmp_path / "runs.csv"
    write(path, header(), data("a"), data("b"), data("a"))
    with pytest.raises(ResultsCSVError, match=rf"line 4: {KEY} 'a' repeats the row on line 2"):
        read_rows(path)


def test_older_schema_reads_with_fills_and_is_upgraded_on_write(tmp_path):
    path = tmp_path / "runs.csv"
    old = [KEY, "backbone", "metric_value", "status"]
    write(path, ",".join(old), "a,dit,8.5,ok", "b,lit,7.25,failed")
    rows = read_rows(path)
    assert [list(r) for r in rows] == [RUN_COLUMNS, RUN_COLUMNS]
    assert (rows[1]["backbone"], rows[1]["metric_value"], rows[1]["gmacs"], rows[1]["run_dir"]) == (
        "lit", "7.25", "", "")
    upsert_row(path, row("c", gmacs=0.5))
    assert path.read_text().splitlines()[0] == header()
    assert [(r[KEY], r["metric_value"], r["gmacs"]) for r in read_rows(path)] == [
        ("a", "8.5", ""), ("b", "7.25", ""), ("c", "", "0.5")]


def test_unknown_keys_raise_and_leave_the_file_unchanged(tmp_path):
    path = tmp_path / "runs.csv"
    upsert_row(path, row("a"))
    before = path.read_bytes()
    with pytest.raises(KeyError, match=r"\['bogus', 'fid'\]"):
        upsert_row(path, row("a", fid=1.0, bogus=2, status="failed"))
    with pytest.raises(KeyError, match=KEY):
        upsert_row(path, {"status": "ok"})
    assert path.read_bytes() == before


def _upsert_many(path, worker):
    for i in range(20):
        upsert_row(path, row(f"w{worker}-{i}", seed=worker, train_steps=i, error="x" * 2000))


def test_concurrent_upserts_from_four_processes_keep_every_row(tmp_path):
    path = tmp_path / "runs.csv"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_upsert_many, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    rows = read_rows(path)
    assert len(rows) == 80 and len({r[KEY] for r in rows}) == 80
    assert all(r["seed"] == r[KEY][1] and r["error"] == "x" * 2000 and r["status"] == "ok" for r in rows)
    assert sorted(r[KEY] for r in rows) == sorted(f"w{w}-{i}" for w in range(4) for i in range(20))
