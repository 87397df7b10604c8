"""The sweep CSV (results/<dataset>/runs.csv): validated reads, locked atomic upserts.

One row per key (:data:`KEY`, the schema's first column) with the columns of :data:`bench.schema.RUN_COLUMNS`.
We never write a newline inside a field, so a field holding one means an unterminated quote swallowed the rows
after it: reading refuses such a file (and any other malformed one) with a :class:`ResultsCSVError` naming the
file and line, instead of returning merged or dropped rows. A file from an older schema (a subset of the
columns) reads with "" fills and is rewritten with every column on the next upsert.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bench.schema import RUN_COLUMNS
from runio.files import atomic_write_text

KEY = RUN_COLUMNS[0]  # the row key is the schema's first column (point_id, now point_key)
_FIX = "the file was edited or written by another tool; fix line {n} or move the file aside; " \
       "the sweep recomputes missing rows"


class ResultsCSVError(ValueError):
    """runs.csv is malformed; the message names the file, the 1-based line and the fix."""


def _error(path: Path, line: int, problem: str) -> ResultsCSVError:
    return ResultsCSVError(f"{path}, line {line}: {problem}; {_FIX.format(n=line)}")


def lock_path(path: str | os.PathLike) -> Path:
    """The sibling lock file of ``path`` (runs.csv -> runs.csv.lock); never deleted, ignored by git."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``'s sibling ``.lock`` file (blocks until it is free)."""
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:  # "a": never truncate a file another process holds
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_rows(path: str | os.PathLike, columns: list[str] = RUN_COLUMNS, key: str = KEY,
              schema: str = "bench.schema.RUN_COLUMNS") -> list[dict[str, str]]:
    """Every row of ``path`` as a dict over all of ``columns`` (columns absent from the file are ""); ``key`` is
    the row key and ``schema`` names the column list in messages (other CSVs: bench.stitch).

    A missing or empty file gives []. Raises :class:`ResultsCSVError` for a missing or foreign header, unknown or
    repeated columns, a row with the wrong number of fields, a field holding a newline (an unterminated quote),
    a duplicate key, or anything the csv module cannot parse. Blank lines are skipped.
    """
    path = Path(path)
    try:
        f = open(path, newline="", encoding="utf-8")
    except FileNotFoundError:
        return []
    rows: list[dict[str, str]] = []
    seen: dict[str, int] = {}  # key -> line
    with f:
        reader = csv.reader(f)
        header: list[str] | None = None
        end = 0  # last physical line consumed so far
        while True:
            start = end + 1  # a record (even a multi-line one) starts on the line after the previous one
            try:
                fields = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as e:
                raise _error(path, start, f"cannot parse CSV ({e})") from e
            end = reader.line_num
            if not fields:
                continue
            for field in fields:
                if "\n" in field or "\r" in field:
                    raise _error(path, start, "a field spans several lines (an unterminated quote \" swallowed the "
                                              f"lines up to {end})")
            if header is None:
                unknown = [c for c in fields if c not in columns]
                if key not in fields or len(unknown) == len(fields):
                    raise _error(path, start, f"no header: expected a first line of column names from "
                                              f"{schema} ({','.join(columns[:3])},...), "
                                              f"got {','.join(fields)[:120]!r}")
                if unknown:
                    raise _error(path, start, f"unknown columns {unknown} (not in {schema})")
                repeated = sorted({c for c in fields if fields.count(c) > 1})
                if repeated:
                    raise _error(path, start, f"repeated columns {repeated} in the header")
                header = fields
                continue
            if len(fields) != len(header):
                raise _error(path, start, f"{len(fields)} fields where the header has {len(header)}")
            row = dict.fromkeys(columns, "")
            row.update(zip(header, fields))
            if row[key] in seen:
                raise _error(path, start, f"{key} {row[key]!r} repeats the row on line {seen[row[key]]}")
            seen[row[key]] = start
            rows.append(row)
    return rows


def _cell(value: Any) -> str:
    """The text of one field: "" for None, repr-exact numbers, line breaks replaced by spaces."""
    if value is None:
        return ""
    if isinstance(value, float):  # float() first: numpy 2 reprs np.float64 as "np.float64(...)"
        text = repr(float(value))
    else:
        text = str(value)  # ints, numpy scalars (shortest round-trip text), strings
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def upsert_row(path: str | os.PathLike, row: dict[str, Any], key: str = KEY, columns: list[str] = RUN_COLUMNS,
               schema: str = "bench.schema.RUN_COLUMNS") -> None:
    """Insert ``row``, or replace the row with the same ``row[key]`` in place, rewriting ``path`` atomically.

    Runs under :func:`locked`, so concurrent writers never lose each other's rows. Raises KeyError, before
    touching the file, when ``row`` has keys outside ``columns`` or lacks ``key``; ResultsCSVError when the file
    on disk is malformed (it is then left as it is).
    """
    path = Path(path)
    unknown = sorted(set(row) - set(columns))
    if unknown:
        raise KeyError(f"columns {unknown} are not in {schema}; add them there first")
    if key not in columns or key not in row:
        raise KeyError(f"the row has no {key!r} to upsert by")
    new = {c: _cell(row.get(c)) for c in columns}
    with locked(path):
        rows = read_rows(path, columns, key, schema)
        for i, old in enumerate(rows):
            if old[key] == new[key]:
                rows[i] = new
                break
        else:
            rows.append(new)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buf.getvalue())
