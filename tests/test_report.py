"""bench.report: a small results folder (real runs.csv rows, a plot, sample grids, fits with CI columns, token and
stitch CSVs, hostile cells) rendered to one page, checked by parsing the HTML (always) and in a real headless
browser (Chromium driven by Selenium; skipped, naming what is missing, when either is absent)."""

from __future__ import annotations

import base64
import csv
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from PIL import Image

from bench import report
from bench.schema import RUN_COLUMNS
from runio.env import git_commit

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "results" / "published"
HOSTILE = '<script>alert(1)</script> & "quoted" <b>bold</b>'
ODD_IMAGE = "fashion_mnist/samples/odd #1 & more.png"  # '#', '&' and spaces must survive as a relative link


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    return rows[0], rows[1:]


@pytest.fixture
def results(tmp_path) -> Path:
    """results/ with 3 real runs.csv rows (the current schema, one hostile error cell), their first sample grid,
    a hand-made grid with an odd name, a published plot, fits.csv with CI columns, a token and a stitch CSV, and
    files the report must ignore (a hidden CSV, the CSV lock)."""
    root = tmp_path / "results"
    with open(PUBLISHED / "fashion_mnist" / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:3]
    rows[1]["error"], rows[1]["status"] = HOSTILE, "failed"
    _write_csv(root / "fashion_mnist" / "runs.csv", RUN_COLUMNS, [[r.get(c, "") for c in RUN_COLUMNS] for r in rows])
    (root / "fashion_mnist" / "runs.csv.lock").touch()
    samples = root / "fashion_mnist" / "samples"
    samples.mkdir()
    shutil.copy(PUBLISHED / "fashion_mnist" / "samples" / f"{rows[0]['point_key']}.png", samples)
    Image.new("RGB", (7, 5), (200, 30, 30)).save(root / ODD_IMAGE)
    plot = next((PUBLISHED / "plots").glob("*_vs_gmacs_*.png"))
    (root / "plots").mkdir()
    shutil.copy(plot, root / "plots" / plot.name)
    _write_csv(root / "plots" / "fits.csv",
               ["dataset", "recipe", "metric_name", "x", "backbone", "exponent", "exponent_ci_low",
                "exponent_ci_high", "points"],
               [["fashion_mnist", "steps500-bs128", "fd_fashion_mnist_classifier", "gmacs", "dit", "-0.2503129871",
                 "-0.31", "-0.19", "3"],
                ["fashion_mnist", "steps500-bs128", "fd_fashion_mnist_classifier", "gmacs", "dico", "-0.12", "", "",
                 "3"]])
    with open(PUBLISHED / "tokens" / "cpu.csv") as f:
        (root / "tokens").mkdir()
        (root / "tokens" / "cpu.csv").write_text("".join(f.readlines()[:4]))
    _write_csv(root / "fashion_mnist" / "stitch" / "dit_rwkv.csv", ["pair", "layer", "note"],
               [["dit->rwkv", "2", "a & b"], ["dit->rwkv", "3", "<i>x</i>"]])
    _write_csv(root / "fashion_mnist" / ".hidden.csv", ["x"], [["1"]])
    return root


def expected_tables(root: Path) -> dict[str, tuple[list[str], list[list[str]]]]:
    return {p.relative_to(root).as_posix(): _read_csv(p) for p in sorted(root.rglob("*.csv"))
            if not p.name.startswith(".") and "report" not in p.relative_to(root).parts}


class Page(HTMLParser):
    """What the checks need from the page: tags, every src/href, each table's body cells as (text, title)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.tables: dict[str, list[list[tuple[str, str]]]] = {}
        self._table: str | None = None
        self._in_body = False
        self._cell: list[str] | None = None
        self._title = ""
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        for key in ("href", "src"):
            if a.get(key):
                self.links.append(a[key])
        if tag == "table" and "data-source" in a:
            self._table = a["data-source"]
            self.tables[self._table] = []
        elif tag == "tbody" and self._table:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.tables[self._table].append([])
        elif tag == "td" and self._in_body:
            self._cell, self._title = [], a.get("title") or ""

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.tables[self._table][-1].append(("".join(self._cell), self._title))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def cell_values(rows: list[list[tuple[str, str]]]) -> list[list[str]]:
    """A shortened number shows its full text in the title: compare that."""
    return [[title or text for text, title in row] for row in rows]


def check_page(out: Path, root: Path, n_images: int, hostile: bool = True) -> Page:
    text = out.read_text()
    page = Page(text)
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert "<script" not in text.lower()
    assert ("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quoted&quot; &lt;b&gt;bold&lt;/b&gt;" in text) == hostile
    assert not [u for u in page.links if u.startswith(("http:", "https:", "//", "/", "file:"))], page.links
    tables = expected_tables(root)
    assert set(page.tables) == set(tables)
    for name, (header, rows) in tables.items():
        assert cell_values(page.tables[name]) == rows, name
    if hostile:
        assert cell_values(page.tables["fashion_mnist/runs.csv"])[1][RUN_COLUMNS.index("error")] == HOSTILE
        assert cell_values(page.tables["fashion_mnist/stitch/dit_rwkv.csv"])[0][2] == "a & b"
    assert len(page.imgs) == n_images
    for src in page.imgs:
        if src.startswith("data:"):
            assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            copy = out.parent / unquote(src)
            assert copy.is_file(), src
            assert copy.read_bytes() == (root / Path(unquote(src)).relative_to(report.ASSETS)).read_bytes()
    return page


def test_report_tables_images_escaping(results, tmp_path):
    out = tmp_path / "site" / "index.html"
    res = report.render(results, out, command="python -m bench.report test")
    assert len(res["tables"]) == 4 and len(res["images"]) == 3
    page = check_page(out, results, 3)
    assert any(unquote(s) == f"assets/{ODD_IMAGE}" for s in page.imgs)
    text = out.read_text()
    for value in (git_commit(), torch.__version__, "python -m bench.report test", "exponent_ci_low"):
        assert report.esc(value) in text
    assert text.index("plots/fits.csv") < text.index("fashion_mnist/runs.csv")  # the exponents come first
    # The folder moves as a whole: every link is relative.
    moved = tmp_path / "elsewhere"
    shutil.move(out.parent, moved)
    check_page(moved / "index.html", results, 3)


def test_report_inside_results_skips_itself_and_prunes(results, tmp_path):
    out = results / "report" / "index.html"  # the default place
    assert report.render(results)["out"] == out
    first = check_page(out, results, 3)
    report.render(results)  # its own copies (and HTML) are never read back as results
    assert len(Page(out.read_text()).imgs) == len(first.imgs) == 3
    (results / ODD_IMAGE).unlink()
    report.render(results)
    check_page(out, results, 2)
    assert not (out.parent / report.ASSETS / ODD_IMAGE).exists()  # the stale copy is gone
    report.render(results, embed=True)
    check_page(out, results, 2)
    assert not (out.parent / report.ASSETS).exists()


def test_report_embed_is_one_file(results, tmp_path):
    out = tmp_path / "one" / "index.html"
    report.render(results, out, embed=True)
    assert [p.name for p in out.parent.iterdir()] == ["index.html"]
    assert all(s.startswith("data:image/png;base64,") for s in check_page(out, results, 3).imgs)


def test_report_cli(results, tmp_path, capsys):
    out = tmp_path / "cli" / "index.html"
    assert report.main([f"results={results}", f"out={out}", "max_rows=2"]) == 0
    page = Page(out.read_text())
    assert len(page.tables["fashion_mnist/runs.csv"]) == 2 and "3 rows x" in out.read_text()
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    assert f"bench.report: wrote {out}" in capsys.readouterr().out
    assert report.main([f"results={tmp_path / 'none'}", f"out={out}"]) == 1
    assert "not found" in capsys.readouterr().err
    assert report.main([f"results={results}", f"out={PUBLISHED / 'report' / 'index.html'}"]) == 1
    assert "committed reference" in capsys.readouterr().err
    assert not (PUBLISHED / "report").exists()
    for bad in (["bogus=1"], ["embed=maybe"], ["results"]):
        with pytest.raises(SystemExit) as e:
            report.main(bad)
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0 and "bench.report" in capsys.readouterr().out


def test_report_of_published_reference(tmp_path):
    out = tmp_path / "published" / "index.html"
    res = report.render(PUBLISHED, out)
    pngs = sorted(PUBLISHED.rglob("*.png"))
    assert len(res["images"]) == len(pngs) and len(res["tables"]) == len(list(PUBLISHED.rglob("*.csv")))
    check_page(out, PUBLISHED, len(pngs), hostile=False)


def test_report_of_results_leaves_out_the_reference(tmp_path):
    try:
        res = report.render(REPO / "results", tmp_path / "mine" / "index.html")
    except report.ReportError as e:  # a fresh checkout: results/ holds only the reference
        assert "nothing to report" in str(e)
        return
    assert not [p for p in res["tables"] + res["images"] if p.parts[0] == "published"]


# ---------------------------------------------------------------------------------------------------- browser

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("browser test needs the Python package selenium (pip install -c constraints.txt -e '.[dev]', "
                    "or make install)")
    binary = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        missing = " and ".join(n for n, v in (("a Chromium browser", binary), ("chromedriver", driver_path)) if not v)
        pytest.skip(f"browser test needs {missing} on PATH (make browser: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1024"):
        options.add_argument(arg)
    options.unhandled_prompt_behavior = "ignore"  # an alert stays open, for the check to find
    driver = webdriver.Chrome(service=Service(driver_path), options=options)  # explicit driver: no download
    yield driver
    driver.quit()


IMAGES_JS = "return Array.from(document.images, i => [i.getAttribute('src'), i.complete, i.naturalWidth]);"
TABLES_JS = """return Array.from(document.querySelectorAll('table[data-source]'), t => [t.dataset.source,
  Array.from(t.tBodies[0].rows, r => Array.from(r.cells, c => c.getAttribute('title') || c.textContent))]);"""


def test_report_in_headless_browser(browser, results, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException

    out = tmp_path / "site" / "index.html"
    report.render(results, out)
    browser.get(out.as_uri())  # returns after the load event: every eager image has loaded or failed
    title = browser.title
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018
    assert browser.execute_script("return document.scripts.length;") == 0
    assert title.startswith("diffusion-backbone-bench report")
    images = browser.execute_script(IMAGES_JS)
    assert len(images) == 3
    assert all(complete and width > 0 for _, complete, width in images), images
    tables = dict(browser.execute_script(TABLES_JS))
    expected = expected_tables(results)
    assert set(tables) == set(expected)
    for name, (_, rows) in expected.items():
        assert tables[name] == rows, name
    assert tables["fashion_mnist/runs.csv"][1][RUN_COLUMNS.index("error")] == HOSTILE
    assert tables["plots/fits.csv"][0][6:8] == ["-0.31", "-0.19"]  # the CI columns
    rendered = browser.find_element("xpath", "//td[contains(., 'alert(1)')]").text
    assert rendered == HOSTILE
