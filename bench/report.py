"""One static HTML page of a results folder: tables of its CSVs, its plots and sample grids, provenance.

python -m bench.report
python -m bench.report results=results out=results/report/index.html

Renders every CSV found under the results folder (``<dataset>/runs.csv``, ``plots/fits.csv``, ``tokens/*.csv``,
``<dataset>/stitch/*.csv``, anything else) as a table, the fitted exponents first (every ``fits.csv``, confidence
interval columns included when the file has them), the plots, the sample grids and any other PNG, and the
provenance of the page (git commit with ``-dirty``, device, torch version, generation time, command line). The
images are copied into ``assets/`` next to the HTML (their paths under the results folder kept, links relative, so
the folder can be moved as a whole) or, with ``embed=true``, inlined as data URIs (one self-contained file). The
page loads nothing from the network and runs no script: inline CSS only, every cell HTML-escaped, and a
Content-Security-Policy that forbids scripts. The committed reference results/published/ is left out of a render
of results/; it renders on its own with ``results=results/published`` (by default into
``results/report/published/index.html``: nothing is ever written under results/published/).
Options also read as ``--results DIR --out FILE --embed --max-rows N``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as _dt
import html
import os
import platform
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from runio.files import atomic_write, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "results" / "published"
ASSETS = "assets"  # folder of copied images next to the HTML
ASSETS_MARKER = ".bench-report-assets"  # marks a folder this module writes: never read back as results
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp"}
MAX_ROWS = 5000  # rows shown per table (the rest are counted, not shown)
CSP = ("default-src 'none'; img-src 'self' data: file:; style-src 'unsafe-inline'; base-uri 'none'; "
       "form-action 'none'")
KEY_COLUMNS = re.compile(r"(^|_)(exponent|ci|ci\d+|lo|low|lower|hi|high|upper|metric_value|status)(_|$)")
NUMBER = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5rem auto; max-width: 1500px;
       padding: 0 1rem; color: #1d1d1f; background: #fff; line-height: 1.4; }
h1 { font-size: 1.5rem; margin-bottom: .3rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem;
margin-top: 2.2rem; } h3 { font-size: 1rem; margin: 1.4rem 0 .3rem; font-family: ui-monospace, monospace; }
nav ul { columns: 2; font-size: .9rem; } .meta, .note { color: #555; font-size: .85rem; margin: .2rem 0; }
.error { color: #a00; }
.scroll { overflow: auto; max-height: 70vh; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: .8rem; }
th, td { border: 1px solid #e3e3e3; padding: .2rem .45rem; text-align: left; vertical-align: top;
         white-space: nowrap; }
thead th { position: sticky; top: 0; background: #f3f3f6; z-index: 1; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th.key, td.key { background: #fff8e1; font-weight: 600; }
tbody tr:nth-child(even) td { background-color: #fafafa; } tbody tr:nth-child(even) td.key { background: #fff3cd; }
table.prov td, table.prov th { white-space: normal; font-size: .85rem; } table.prov th { background: #f3f3f6; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 1rem; }
.gallery.small { grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); }
figure { margin: 0; border: 1px solid #e3e3e3; padding: .4rem; background: #fff; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; image-rendering: auto; }
figcaption { font-size: .75rem; font-family: ui-monospace, monospace; word-break: break-all; margin-top: .3rem; }
code { font-family: ui-monospace, monospace; font-size: .85em; word-break: break-all; }
"""


class ReportError(RuntimeError):
    """Missing results folder, nothing to report, or a forbidden output place; the message names the fix."""


@dataclass
class Table:
    path: Path  # relative to the results folder
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    total_rows: int = 0
    error: str = ""


def esc(value: Any) -> str:
    """Text or attribute value, HTML-escaped (quotes included)."""
    return html.escape(str(value), quote=True)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def default_out(results: Path) -> Path:
    """``<results>/report/index.html``; for the committed reference ``results/report/published/index.html``."""
    if _inside(results, PUBLISHED):
        return REPO / "results" / "report" / "published" / "index.html"
    return results / "report" / "index.html"


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def discover(results: Path, out: Path) -> tuple[list[Path], list[Path]]:
    """(CSV files, image files) under ``results``, relative to it, sorted; hidden entries, the report's own
    assets folder, any folder holding ASSETS_MARKER (an earlier report's copies) and the committed reference
    results/published/ (inside results/, unless it is what is rendered) are left out."""
    skip = {(out.parent / ASSETS).resolve()}
    if not _inside(results, PUBLISHED):
        skip.add(PUBLISHED.resolve())
    csvs: list[Path] = []
    images: list[Path] = []
    for root, dirs, files in os.walk(results):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in skip
                         and not (here / d / ASSETS_MARKER).exists())
        for name in sorted(files):
            p = here / name
            if name.startswith(".") or not p.is_file():
                continue
            suffix = p.suffix.lower()
            if suffix == ".csv":
                csvs.append(p.relative_to(results))
            elif suffix in IMAGE_TYPES:
                images.append(p.relative_to(results))
    return csvs, images


def read_table(results: Path, rel: Path, max_rows: int) -> Table:
    """The CSV as text cells (never reinterpreted); ragged rows are padded; a malformed file gives ``error``."""
    table = Table(rel)
    try:
        with open(results / rel, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f)
            for fields in reader:
                if not fields:
                    continue
                if not table.header:
                    table.header = fields
                    continue
                table.total_rows += 1
                if len(table.rows) < max_rows:
                    table.rows.append(fields)
    except (OSError, csv.Error) as e:
        table.error = f"cannot read {rel}: {e}"
    width = max([len(table.header)] + [len(r) for r in table.rows])
    table.header += [""] * (width - len(table.header))
    table.rows = [r + [""] * (width - len(r)) for r in table.rows]
    return table


def csv_kind(rel: Path) -> tuple[int, str]:
    """Section order and title of a CSV by where it lies."""
    parts = rel.parts
    if rel.name == "fits.csv":
        return 0, "Fitted exponents"
    if len(parts) == 2 and rel.name == "runs.csv":
        return 1, "Sweep results"
    if "stitch" in parts[:-1]:
        return 3, "Stitching"
    if parts[0] == "tokens":
        return 4, "Token-mixer benchmarks"
    if parts[0] == "throughput":
        return 4, "Throughput benchmarks"
    return 5, "Other tables"


def image_kind(rel: Path) -> tuple[int, str]:
    folders = rel.parts[:-1]
    if "plots" in folders:
        return 0, "Plots"
    if "samples" in folders:
        return 1, "Sample grids"
    return 2, "Other images"


def _cell(text: str, column: str, link: str | None = None) -> str:
    """One <td>: escaped text; long decimals shortened to 6 significant digits (full value in the tooltip)."""
    classes = []
    shown, title = text, ""
    if NUMBER.fullmatch(text.strip()):
        classes.append("num")
        if ("." in text or "e" in text.lower()) and len(text.strip()) > 9:
            try:
                shown, title = f"{float(text):.6g}", text
            except ValueError:
                pass
    if KEY_COLUMNS.search(column.lower()):
        classes.append("key")
    body = esc(shown)
    if link:
        body = f'<a href="{esc(link)}">{body}</a>'
    attrs = (f' class="{" ".join(classes)}"' if classes else "") + (f' title="{esc(title)}"' if title else "")
    return f"<td{attrs}>{body}</td>"


def render_table(table: Table, anchor: str, links: dict[str, str]) -> str:
    """The heading, size line and <table> of one CSV; ``links``: first-column value -> in-page link."""
    out = [f'<h3 id="{esc(anchor)}">{esc(table.path.as_posix())}</h3>']
    if table.error:
        return "\n".join(out + [f'<p class="note error">{esc(table.error)}</p>'])
    shown = len(table.rows)
    size = f"{table.total_rows} row{'s' if table.total_rows != 1 else ''} x {len(table.header)} columns"
    if shown < table.total_rows:
        size += f" (first {shown} shown)"
    out.append(f'<p class="meta">{esc(size)}</p>')
    head = "".join(f'<th{" class=key" if KEY_COLUMNS.search(c.lower()) else ""}>{esc(c)}</th>' for c in table.header)
    body = []
    for row in table.rows:
        cells = [_cell(v, c, links.get(v) if i == 0 else None) for i, (v, c) in enumerate(zip(row, table.header))]
        body.append("<tr>" + "".join(cells) + "</tr>")
    out.append(f'<div class="scroll"><table data-source="{esc(table.path.as_posix())}" '
               f'data-rows="{table.total_rows}"><thead><tr>{head}</tr></thead>'
               f'<tbody>{"".join(body)}</tbody></table></div>')
    if not table.total_rows:
        out.append('<p class="note">no rows (header only)</p>')
    return "\n".join(out)


def _copy_image(src: Path, dest: Path) -> None:
    """Atomic copy, skipped when ``dest`` already has the same size and modification time."""
    st = src.stat()
    if dest.is_file():
        d = dest.stat()
        if d.st_size == st.st_size and d.st_mtime_ns == st.st_mtime_ns:
            return
    with open(src, "rb") as f:
        atomic_write(dest, lambda out: shutil.copyfileobj(f, out))
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))


def place_images(results: Path, images: list[Path], out: Path, embed: bool) -> dict[Path, str]:
    """Image path (relative to results) -> the src of its <img>: a relative, URL-quoted link to its copy under
    ``<out dir>/assets/`` (stale copies of an earlier render removed), or a data URI with ``embed``."""
    srcs: dict[Path, str] = {}
    assets = out.parent / ASSETS
    if embed:
        for rel in images:
            data = base64.b64encode((results / rel).read_bytes()).decode("ascii")
            srcs[rel] = f"data:{IMAGE_TYPES[rel.suffix.lower()]};base64,{data}"
        return srcs
    assets.mkdir(parents=True, exist_ok=True)
    (assets / ASSETS_MARKER).write_text("images copied by bench.report; rewritten on every render\n")
    for rel in images:
        _copy_image(results / rel, assets / rel)
        srcs[rel] = quote(f"{ASSETS}/{rel.as_posix()}")
    return srcs


def prune_assets(out: Path, keep: list[Path]) -> None:
    """Remove copies under the (marked) assets folder that the page no longer shows, then empty folders."""
    assets = out.parent / ASSETS
    if not (assets / ASSETS_MARKER).is_file():
        return
    wanted = {(assets / k).resolve() for k in keep}
    for p in sorted(assets.rglob("*"), reverse=True):
        if p.name == ASSETS_MARKER:
            continue
        if p.is_file() and p.resolve() not in wanted:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()


def point_summary(row: dict[str, str]) -> str:
    """"dit S/2 d4-w128 | fd_fashion_mnist_classifier 7.152 | accuracy 0.356 | ok" from a runs.csv row."""
    def short(v: str) -> str:
        try:
            return f"{float(v):.4g}"
        except ValueError:
            return v

    arch = row.get("backbone", "") + " " + row.get("size", "") + (f"/{row['patch']}" if row.get("patch") else "")
    if row.get("depth") and row.get("width"):
        arch += f" d{row['depth']}-w{row['width']}"
    parts = [arch.strip()]
    if row.get("metric_value"):
        parts.append(f"{row.get('metric_name', 'metric')} {short(row['metric_value'])}")
    if row.get("classifier_accuracy"):
        parts.append(f"accuracy {short(row['classifier_accuracy'])}")
    parts.append(row.get("status", ""))
    return " | ".join(p for p in parts if p)


def provenance(command: str, results: Path) -> list[tuple[str, str]]:
    import torch

    from runio.env import device_name, git_commit, resolve_device

    now = _dt.datetime.now(_dt.timezone.utc).astimezone()
    return [("results folder", str(results)), ("git commit", git_commit()),
            ("device", device_name(resolve_device("auto"))), ("torch", torch.__version__),
            ("python", platform.python_version()), ("generated", now.isoformat(timespec="seconds")),
            ("command", command)]


def data_provenance(tables: list[Table]) -> list[tuple[str, str]]:
    """Distinct commits, devices and torch versions recorded in the tables' own columns (who produced the rows)."""
    out = []
    for col, label in (("git_commit", "rows' git commits"), ("device", "rows' devices"),
                       ("device_name", "rows' device names"), ("torch_version", "rows' torch versions")):
        values = sorted({r[t.header.index(col)] for t in tables if col in t.header for r in t.rows} - {""})
        if values:
            out.append((label, ", ".join(values)))
    return out


def render(results: str | os.PathLike = "results", out: str | os.PathLike | None = None, embed: bool = False,
           max_rows: int = MAX_ROWS, command: str | None = None) -> dict[str, Any]:
    """Write the page; returns {"out", "tables" (relative CSV paths), "images" (relative image paths)}."""
    results = Path(results)
    out = Path(out) if out is not None else default_out(results)
    if not results.is_dir():
        raise ReportError(f"results folder {results} not found: run a sweep first (python -m bench.sweep, make demo) "
                          f"or pass results=DIR (the reference: results=results/published)")
    if _inside(out, PUBLISHED):
        raise ReportError(f"out={out} lies in {PUBLISHED}, the committed reference, which is only ever read; "
                          f"pass out= elsewhere (default for it: {default_out(PUBLISHED)})")
    if out.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"out={out} must name an .html file (the images go into an assets/ folder beside it)")
    csvs, images = discover(results, out)
    if not csvs and not images:
        raise ReportError(f"nothing to report under {results}: no CSV and no image (run a sweep, bench.plots or "
                          f"bench.tokens first)")
    command = command or "python -m bench.report " + shlex.join(sys.argv[1:])
    tables = [read_table(results, rel, max_rows) for rel in sorted(csvs, key=lambda p: (csv_kind(p), p))]
    srcs = place_images(results, sorted(images, key=lambda p: (image_kind(p), p)), out, embed)

    anchors: dict[str, str] = {}

    def anchor(prefix: str, rel: Path) -> str:
        a, i = f"{prefix}-{slug(rel.as_posix())}", 2
        while a in anchors.values():
            a, i = f"{prefix}-{slug(rel.as_posix())}-{i}", i + 1
        anchors[f"{prefix}:{rel.as_posix()}"] = a
        return a

    image_anchor = {rel: anchor("img", rel) for rel in srcs}
    body: list[str] = []
    toc: list[str] = []
    # Images, grouped; a sample grid <dataset>/samples/<point_key>.png gets its runs.csv row in its caption and a
    # link from that row.
    points = {(t.path.parent / "samples" / f"{r[0]}.png"): dict(zip(t.header, r))
              for t in tables if t.path.name == "runs.csv" and t.header[:1] == ["point_key"] for r in t.rows}
    image_sections: dict[tuple[int, str], list[str]] = {}
    for rel, src in srcs.items():
        kind = image_kind(rel)
        href = "#" + image_anchor[rel] if embed else src  # a data URI is no link target
        caption = esc(rel.as_posix())
        if rel in points:
            caption += f'<br><span class="meta">{esc(point_summary(points[rel]))}</span>'
        figure = (f'<figure id="{esc(image_anchor[rel])}"><a href="{esc(href)}">'
                  f'<img src="{esc(src)}" alt="{esc(rel.as_posix())}" loading="eager"></a>'
                  f'<figcaption>{caption}</figcaption></figure>')
        image_sections.setdefault(kind, []).append(figure)
    table_sections: dict[tuple[int, str], list[str]] = {}
    for t in tables:
        links = {}
        if t.path.name == "runs.csv":
            for rel in srcs:
                if rel.parent == t.path.parent / "samples":
                    links[rel.stem] = "#" + image_anchor[rel]
        a = anchor("csv", t.path)
        table_sections.setdefault(csv_kind(t.path), []).append(render_table(t, a, links))
        toc.append(f'<li><a href="#{esc(a)}">{esc(t.path.as_posix())}</a></li>')

    fits = table_sections.pop((0, "Fitted exponents"), None)
    if fits:
        body.append('<section id="fits"><h2>Fitted exponents</h2>' + "\n".join(fits) + "</section>")
    for (order, title), parts in sorted(image_sections.items()):
        sid = slug(title.lower())
        body.append(f'<section id="{sid}"><h2>{esc(title)}</h2>'
                    f'<div class="gallery{" small" if order else ""}">' + "\n".join(parts) + "</div></section>")
    for (_, title), parts in sorted(table_sections.items()):
        body.append(f'<section id="{slug(title.lower())}"><h2>{esc(title)}</h2>' + "\n".join(parts) + "</section>")

    prov = provenance(command, results) + data_provenance(tables)
    prov_rows = "".join(f"<tr><th>{esc(k)}</th><td><code>{esc(v)}</code></td></tr>" for k, v in prov)
    sections = [("fits", "Fitted exponents")] if fits else []
    sections += [(slug(t.lower()), t) for _, t in sorted(image_sections)]
    sections += [(slug(t.lower()), t) for _, t in sorted(table_sections)]
    nav = " | ".join(f'<a href="#{esc(s)}">{esc(t)}</a>' for s, t in sections)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>diffusion-backbone-bench report: {esc(results.as_posix())}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>diffusion-backbone-bench report</h1>
<p class="meta">{len(tables)} table{"s" if len(tables) != 1 else ""}, {len(srcs)} image{"s" if len(srcs) != 1 else ""}
 from <code>{esc(results.as_posix())}</code></p>
<table class="prov">{prov_rows}</table>
<nav><p>{nav}</p><ul>{"".join(toc)}</ul></nav>
{chr(10).join(body)}
</body>
</html>
"""
    atomic_write_text(out, page)  # after the images: the page never points at a copy not yet there
    if not embed:
        prune_assets(out, list(srcs))
    elif (out.parent / ASSETS / ASSETS_MARKER).is_file():  # an earlier render's copies, now unused
        shutil.rmtree(out.parent / ASSETS)
    return {"out": out, "tables": [t.path for t in tables], "images": list(srcs)}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0],
                                 epilog="Settings as key=value (results=DIR out=FILE embed=true max_rows=N) or as "
                                        "the options above.")
    ap.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="results=DIR, out=FILE, embed=BOOL, max_rows=N")
    ap.add_argument("--results", default=None, help="results folder (default: results)")
    ap.add_argument("--out", default=None, help="the HTML file (default: <results>/report/index.html; for "
                                                "results/published: results/report/published/index.html)")
    ap.add_argument("--embed", action="store_true", default=None,
                    help="inline the images as data URIs (one self-contained file) instead of copying to assets/")
    ap.add_argument("--max-rows", type=int, default=None, help=f"rows shown per table (default {MAX_ROWS})")
    args = ap.parse_args(argv)
    opts: dict[str, Any] = {"results": args.results, "out": args.out, "embed": args.embed, "max_rows": args.max_rows}
    parse = {"results": str, "out": str, "embed": _bool, "max_rows": int}
    for item in args.settings:
        key, sep, value = item.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in parse:
            ap.error(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(parse)}")
        try:
            opts[key] = parse[key](value)
        except ValueError:
            ap.error(f"{key}={value!r}: expected {'true or false' if key == 'embed' else 'an integer'}")
    if opts["max_rows"] is not None and opts["max_rows"] < 1:
        ap.error(f"max_rows={opts['max_rows']}: expected at least 1")
    try:
        res = render(opts["results"] or "results", opts["out"], embed=bool(opts["embed"]),
                     max_rows=opts["max_rows"] or MAX_ROWS, command="python -m bench.report " + shlex.join(argv))
    except ReportError as e:
        print(f"bench.report: {e}", file=sys.stderr)
        return 1
    print(f"bench.report: wrote {res['out']} ({len(res['tables'])} tables, {len(res['images'])} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
