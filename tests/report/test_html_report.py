"""report.html: written with every report, self-contained (parsed with a real HTML parser, every image
decoded, no external URL, no script), the verdict on its first screen; `show --html` rebuilds it."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import pandas as pd
import pytest
from PIL import Image

from tests.helpers import run_cli


class Page(HTMLParser):
    """Every tag with its attributes, the text in order, and the text inside each tag of interest."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.stack: list[str] = []
        self.seq_spans = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "span" and "seq" in self.stack:
            self.seq_spans += 1
        if tag == "div" and ("class", "seq") in attrs:
            self.stack.append("seq")
        elif tag == "div":
            self.stack.append("div")

    def handle_endtag(self, tag):
        if tag == "div" and self.stack:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.fixture(scope="module")
def report(tmp_path_factory, dense_model):
    out = tmp_path_factory.mktemp("html") / "r"
    with pytest.raises(SystemExit) as e:
        from trm_diag.cli import main

        main(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--out", str(out),
              "--num-prompts", "10", "--max-new-tokens", "24", "-q"])  # fmt: skip
    assert e.value.code == 0
    return out


def test_report_html_is_self_contained_and_answers_first(report):
    page = parse(report / "report.html")
    summary = json.loads((report / "summary.json").read_text())
    images = [a for t, a in page.tags if t == "img"]
    assert len(images) >= 5  # profile, acceptance, bounds, histogram, breakdowns
    for a in images:
        src = a["src"]
        assert src.startswith("data:image/png;base64,") and a.get("alt")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        img.verify()
        assert img.size[0] >= 400 and img.size[1] >= 200
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object")
        for k in ("src", "href"):
            v = attrs.get(k) or ""
            assert not v.startswith(("http:", "https:", "//", "ftp:")), (tag, k, v)
    text = "".join(page.text)
    head = text.index(summary["verdict"]["headline"])
    first_img = page.tags.index(next(t for t in page.tags if t[0] == "img"))
    assert head < text.index("Figures")  # the verdict comes before any figure
    assert first_img > 0 and "Headline numbers" in text
    # the worst sequences: one shaded span per token of each
    tokens = pd.read_parquet(report / "tokens.parquet", columns=["seq_id"])
    worst = [w["seq_id"] for w in summary["worst_sequences"]]
    assert page.seq_spans == int(tokens["seq_id"].isin(worst).sum()) > 0


def test_show_html_rebuilds_the_page_of_an_older_report(report, tmp_path, capsys):
    """A report written before report.html existed (no breakdowns in its summary, no page): `show --html`
    computes the same breakdowns from tokens.parquet and writes the page."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(report, old)
    (old / "report.html").unlink()
    s = json.loads((old / "summary.json").read_text())
    saved = {k: s.pop(k) for k in ("breakdowns", "profile", "histograms")}
    (old / "summary.json").write_text(json.dumps(s))
    code, out, err = run_cli(["show", str(old), "--html"], capsys)
    assert code == 0 and "report.html" in err and out == ""
    assert len([t for t, _ in parse(old / "report.html").tags if t == "img"]) >= 5
    from trm_diag.report.html_report import figure_data
    from trm_diag.report.tables import complete_report

    path, summary = complete_report(old)
    again = figure_data(path, summary)
    for key in saved:
        assert json.dumps(again[key], sort_keys=True) == json.dumps(saved[key], sort_keys=True), key


def test_a_failed_figure_costs_the_page_not_the_report(dense_model, tmp_path, monkeypatch, capsys):
    import trm_diag.report.plots

    def broken(*a, **k):
        raise ValueError("no figure today")

    monkeypatch.setattr(trm_diag.report.plots, "bounds_png", broken)
    out = tmp_path / "r"
    code, _, err = run_cli(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--out",
                            str(out), "--num-prompts", "2", "--max-new-tokens", "8", "-q"], capsys)  # fmt: skip
    assert code == 0 and "report.html not written" in err and "show" in err
    assert (out / "summary.json").is_file() and not (out / "report.html").exists()
    monkeypatch.undo()
    code, _, err = run_cli(["show", str(out), "--html"], capsys)  # the retry the warning names
    assert code == 0 and (out / "report.html").is_file()


def test_overwrite_replaces_the_page(report, dense_model, tmp_path, capsys):
    """A stale report.html never survives a new run in the same folder."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.html").write_text("<html>old run</html>")
    code, _, err = run_cli(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--out",
                            str(out), "--num-prompts", "2", "--max-new-tokens", "8", "-q", "--overwrite"], capsys)  # fmt: skip
    assert code == 0, err
    assert "old run" not in (out / "report.html").read_text()
