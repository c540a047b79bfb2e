"""``zkllm-hf report``: one self-contained HTML page, every figure present and decodable, no network reference,
the plotted numbers the capture's own, and the command's exit codes (issue 18, deliverable 2)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import make_tiny, tiny_ids

import zkllm_hf
from zkllm_hf.cli import main
from zkllm_hf.writer import foreign_files

pytest.importorskip("matplotlib")
PIL = pytest.importorskip("PIL.Image")

UNIT_FIGURES = {"headroom", "identities", "drift", "gate"}


class Page(HTMLParser):
    """Every element's attributes, by tag, and the text of <style> blocks."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.styles: list[str] = []
        self._in_style = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)

    def images(self) -> dict[str, dict]:
        return {a["id"].removeprefix("fig-"): a for t, a in self.tags if t == "img"}


def decode_png(src: str):
    assert src.startswith("data:image/png;base64,")
    image = PIL.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
    image.load()  # the whole image decodes, not just its header
    return image


def network_references(text: str) -> list[str]:
    """Anything a browser would fetch: a src/href/srcset/poster that is not a data: URI or a fragment, CSS url()
    or @import, and any <script>, <link>, <iframe>, <object> or <embed>."""
    page = Page(text)
    found = [f"<{t}>" for t, _ in page.tags if t in ("script", "link", "iframe", "object", "embed", "base")]
    for _, attrs in page.tags:
        for name in ("src", "href", "srcset", "poster", "action", "data"):
            value = (attrs.get(name) or "").strip()
            if value and not value.startswith(("data:", "#")):
                found.append(f"{name}={value[:60]}")
    for css in page.styles:
        found += re.findall(r"url\s*\(|@import", css)
    return found


@pytest.fixture(scope="module")
def unit(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "unit"
    model = make_tiny()
    note = {"note": "<script>alert(1)</script> & <b>bold</b>"}  # metadata is printed, so it must be escaped
    with torch.no_grad(), zkllm_hf.capture(model, out, extra_metadata=note):
        model(tiny_ids())
    return out


@pytest.fixture(scope="module")
def exact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "exact"
    model = make_tiny()
    with torch.no_grad(), zkllm_hf.capture(model, out, residuals="exact-int"):
        model(tiny_ids())
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "batch"
    model = make_tiny()
    ids = torch.cat([tiny_ids(16, seed=1), tiny_ids(16, seed=2)])
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # the second row is 11 tokens, right-padded
    with torch.no_grad(), zkllm_hf.capture(model, out, layers="0-1"):
        model(input_ids=ids, attention_mask=mask)
    return out


def report_of(folder: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    out = tmp_path / f"{folder.name}.html"
    code = main(["report", str(folder), "--out", str(out), *extra])
    return code, out.read_text(encoding="utf-8") if out.exists() else ""


def test_a_units_report_holds_every_figure_each_a_png_that_decodes(unit, tmp_path):
    code, text = report_of(unit, tmp_path)
    assert code == 0
    images = Page(text).images()
    assert set(images) == UNIT_FIGURES  # a unit has no units figure
    for name, attrs in images.items():
        assert attrs["alt"], name
        image = decode_png(attrs["src"])
        assert image.format == "PNG" and image.width >= 400 and image.height >= 100, name
        assert len(set(image.convert("L").getdata())) > 8, name  # drawn, not blank
    assert 'id="verdict" class="verdict ok"' in text and "VALID" in text


def test_the_page_references_no_network_and_escapes_what_it_prints(unit, tmp_path):
    _, text = report_of(unit, tmp_path)
    assert network_references(text) == []
    assert "http:" not in text and "https:" not in text  # not even a link to a CDN in a comment
    assert "<script>" not in text and "<b>bold</b>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in text


def test_the_network_check_catches_what_it_looks_for():
    """The check above must be able to fail."""
    assert network_references('<img src="https://cdn.example/x.png">') == ["src=https://cdn.example/x.png"]
    assert network_references("<style>body { background: url(x.png) }</style>") == ["url("]
    assert network_references('<script src="x.js"></script>') == ["<script>", "src=x.js"]
    assert network_references('<img src="data:image/png;base64,AAAA">') == []


def test_a_datasets_report_has_the_unit_figure_and_each_units_verdict(dataset, tmp_path):
    code, text = report_of(dataset, tmp_path)
    assert code == 0
    images = Page(text).images()
    assert set(images) == UNIT_FIGURES | {"units"}
    decode_png(images["units"]["src"])
    table = re.search(r'<table id="units-table">(.*?)</table>', text, flags=re.S).group(1)
    rows = re.findall(r"<tr><td>(sample-\d+)</td>.*?<td class=\"n\">(\d+)</td><td[^>]*>(\w+)", table)
    assert rows == [("sample-0", "16", "valid"), ("sample-1", "11", "valid")]


def test_the_plotted_numbers_are_the_captures_own(unit, exact, dataset):
    """Each series, recomputed here from the files and the manifest read with pyarrow alone."""
    from zkllm_hf.report import UnitView, drift_series, gate_series, headroom_series, identity_series

    table = pa.ipc.open_file(pa.memory_map(str(unit / "manifest.arrow"))).read_all()
    meta = json.loads(table.schema.metadata[b"zkllm_hf"])
    view = UnitView("", meta, table.to_pylist())
    want: dict[str, dict[int, float]] = {}
    for r in table.to_pylist():
        if r["alias_of"] is None:
            codes = np.fromfile(unit / r["file"], dtype="<i4")
            want.setdefault(r["point"], {})[r["layer"]] = float(np.abs(codes.astype(np.int64)).max()) / 2**16
    assert headroom_series([view], 16) == want
    checks = {(r["check"], r["layer"]): r["max_dev_ratio"] for r in table.to_pylist() if r["check"]}
    assert {(c, x): v for c, pts in identity_series([view]).items() for x, v in pts.items()} == checks
    assert gate_series([view]) == {g["layer"]: g["value"] for g in meta["ffn"]["gate_abs_max"]}
    assert drift_series([view]) == {}  # the model's own residuals: nothing drifts
    em = json.loads((exact / "capture.json").read_text())
    drift = drift_series([UnitView("", em, [])])
    assert drift and {(p.removeprefix("drift "), x): v for p, pts in drift.items() for x, v in pts.items()} == {
        (d["point"], d["layer"]): d["max_ratio"] for d in em["residuals"]["drift"]}
    units = [UnitView(f"sample-{i}", json.loads((dataset / f"sample-{i}" / "capture.json").read_text()), [])
             for i in (0, 1)]
    both = gate_series(units)
    assert both == {x: max(g["value"] for u in units for g in u.metadata["ffn"]["gate_abs_max"] if g["layer"] == x)
                    for x in (0, 1)}


def test_an_exact_int_report_draws_the_drift(exact, tmp_path):
    code, text = report_of(exact, tmp_path)
    assert code == 0 and set(Page(text).images()) == UNIT_FIGURES
    assert "not an exact-int capture" not in text


def test_an_invalid_capture_is_reported_and_exits_1(unit, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(unit, broken)
    path = broken / "layer-1-mlp-output.bin"
    codes = np.fromfile(path, dtype="<i4")
    codes[3] += 7
    codes.tofile(path)
    code, text = report_of(broken, tmp_path)
    assert code == 1
    assert 'class="verdict bad"' in text and "layer-1-mlp-output.bin" in text
    assert set(Page(text).images()) == UNIT_FIGURES


def test_out_is_never_inside_the_capture_nor_over_someone_elses_file(unit, tmp_path, capsys):
    before = sorted(p.name for p in unit.iterdir())
    assert main(["report", str(unit), "--out", str(unit / "report.html")]) == 2
    assert sorted(p.name for p in unit.iterdir()) == before and not foreign_files(unit)
    assert "inside the capture" in capsys.readouterr().err
    theirs = tmp_path / "notes.html"
    theirs.write_text("mine")
    assert main(["report", str(unit), "--out", str(theirs)]) == 2
    assert main(["report", str(unit), "--out", str(theirs), "--overwrite"]) == 2
    assert theirs.read_text() == "mine"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("zkllm-hf: error: --out") for line in err)
    ours = tmp_path / "ours.html"
    assert main(["report", str(unit), "--out", str(ours)]) == 0
    assert main(["report", str(unit), "--out", str(ours)]) == 2
    assert main(["report", str(unit), "--out", str(ours), "--overwrite"]) == 0
    link = tmp_path / "link.html"
    link.symlink_to(ours)
    assert main(["report", str(unit), "--out", str(link), "--overwrite"]) == 2


def test_a_folder_that_is_not_a_capture_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.arrow" in err[0] and not (tmp_path / "r.html").exists()


def test_without_matplotlib_it_says_what_to_install(unit, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["report", str(unit), "--out", str(tmp_path / "r.html")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'zkllm-hf[report]'" in err[0]
    assert not (tmp_path / "r.html").exists()


def test_each_figure_draws_from_an_empty_series_too():
    from zkllm_hf import report_plots as plots

    for png in (plots.headroom({}, 32768.0, 16), plots.ratios({}, "t", "nothing"), plots.gate({}, 512.0),
                plots.units([], [], [])):
        assert decode_png("data:image/png;base64," + base64.b64encode(png).decode()).width > 0
