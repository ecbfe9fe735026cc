"""The docs against the code: the README's tables against each command's real options (read from the typer
app, so no terminal wrapping is involved) and the registries, and every citation of the design reference
against the sections docs/design.md has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DESIGN = ROOT / "docs" / "design.md"


def _commands() -> dict:
    import typer.main

    from trm_diag.cli.app import app

    return typer.main.get_command(app).commands


def _option(command: str, flag: str):
    """The click parameter of `trm-diag COMMAND` that takes FLAG (None when it has none)."""
    return next((p for p in _commands()[command].params if flag in (*p.opts, *p.secondary_opts)), None)


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Markdown tables: (header cells, body rows as lists of cells; escaped \\| kept)."""
    out = []
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if len(block) > 2:
            rows = [[c.strip() for c in re.split(r"(?<!\\)\|", b.strip())[1:-1]] for b in block]
            out.append((rows[0], rows[2:]))  # rows[1] is the |---| line
        block = []
    return out


def _table(*header: str) -> list[list[str]]:
    """The body of the one README table whose header starts with these cells."""
    found = [rows for head, rows in _tables(README) if head[: len(header)] == list(header)]
    assert len(found) == 1, (header, len(found))
    return found[0]


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _named_choices(help_text: str) -> set[str]:
    """The values an option's help offers, written 'name: what it does; name: ...'."""
    return set(re.findall(r"(?:^|; )([a-z]+): ", help_text))


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_readme_tier_and_view_tables_match_the_options(command):
    """'tier' rows are --fidelity's values, 'view' rows --view's; the row marked (default) is the default."""
    for header, flag in ((("tier", "what is compared"), "--fidelity"), (("view", "rollout side"), "--view")):
        option = _option(command, flag)
        if option is None:  # a sweep's arms are exact reports: it has --view, not --fidelity
            assert (command, flag) == ("sweep", "--fidelity")
            continue
        rows = _table(*header)
        names = {_ticked(r[0])[0] for r in rows}
        assert names == _named_choices(option.help), (command, flag, option.help)
        default = [_ticked(r[0])[0] for r in rows if "(default)" in r[0]]
        assert default == [option.default], (command, flag)


def test_readme_tables_match_the_vocabularies():
    from trm_diag.config import VIEWS
    from trm_diag.tiers import TIERS

    assert {_ticked(r[0])[0] for r in _table("tier", "what is compared")} == set(TIERS)
    assert {_ticked(r[0])[0] for r in _table("view", "rollout side")} == set(VIEWS)


def test_score_offers_only_the_view_it_gives():
    """score's tiers carry no full rows: its --view help names the pipeline view only."""
    option = _option("score", "--view")
    assert option.default == "pipeline" and not _named_choices(option.help), option.help
    assert "only view score gives" in option.help and "compare --fidelity exact" in option.help


def test_readme_report_files_match_compare_help_and_what_a_report_holds():
    from trm_diag.report.outputs import REPORT_FILES

    in_table = {_ticked(r[0])[0] for r in _table("file", "one row per")}
    in_help = set(re.findall(r"\b\w+\.(?:parquet|json|html)\b", _commands()["compare"].help))
    assert in_table == in_help == set(REPORT_FILES), (in_table, in_help)


def test_readme_backend_table_matches_the_registry():
    """Every spec key a backend accepts is in its README row, and nothing else; hf's dtypes are DTYPES."""
    from trm_diag.backends import REGISTRY
    from trm_diag.config import DTYPES

    rows = {_ticked(r[0])[0]: r[1] for r in _table("backend", "keys")}
    assert set(rows) == set(REGISTRY)
    for name, cell in rows.items():
        keys = {"engine.*" if k.startswith("engine.") else k for k in _ticked(cell)}
        assert keys == set(REGISTRY[name].keys), (name, keys ^ set(REGISTRY[name].keys))
        listed = re.search(r"`dtype` \(([^;)]*)", cell).group(1).split(", ")
        assert set(listed) <= set(DTYPES), (name, listed)
        if name == "hf":
            assert set(listed) == set(DTYPES)


def _command_lines(text: str) -> list[tuple[str, str]]:
    """(command, rest of the line) for every `trm-diag COMMAND ...` in code blocks (with their backslash
    continuations) and in inline code."""
    names = "|".join(_commands())
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            out += re.findall(rf"trm-diag ({names})\b([^#\n]*)", line)
    out += re.findall(rf"`trm-diag ({names})\b([^`]*)`", text)
    return out


def test_every_option_the_readme_uses_exists():
    used = _command_lines(README)
    assert len(used) > 30
    for command, rest in used:
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            assert _option(command, flag) is not None or flag == "--help", f"trm-diag {command} has no {flag}"
    # options named on their own in the text belong to some command
    every = {f for c in _commands().values() for p in c.params for f in (*p.opts, *p.secondary_opts)}
    alone = set(re.findall(r"`(--[a-z][a-z0-9-]*)", README))
    assert alone and alone <= every | {"--help", "--version"}, alone - every


def test_defaults_the_readme_states_are_the_options_defaults():
    stated = re.findall(r"`(--[a-z-]+)`, default ([\w.]+)", README)
    stated += re.findall(r"`(--[a-z-]+)` \w+ \(default ([\w.]+)\)", README)
    assert {f for f, _ in stated} >= {"--topk", "--chunk-prompts"}
    for flag, value in stated:
        having = [c for c in _commands() if _option(c, flag) is not None]
        assert having, flag
        for c in having:
            assert str(_option(c, flag).default) == value, (c, flag, _option(c, flag).default, value)


# ------------------------------------------------------------------ citations of the design reference
CITATION = re.compile(
    r"([\w./-]*design\.md)\)?,?\s+(?:sections?|s\.)\s*(\d+(?:\s*(?:-|,|and|&)\s*(?:s\.)?\s*\d+)*)", re.IGNORECASE
)
SCANNED = ("README.md", "CHANGELOG.md", "docs", "trm_diag", "tests", "bench", "scripts")


def _citations() -> list[tuple[str, str, list[int]]]:
    """(file, cited path, section numbers) for every citation of the design reference in the repository."""
    files = []
    for name in SCANNED:
        p = ROOT / name
        files += [p] if p.is_file() else [f for f in p.rglob("*") if f.suffix in (".py", ".md", ".toml", ".c")]
    out = []
    for f in files:
        for m in CITATION.finditer(f.read_text(errors="replace")):
            numbers = [int(n) for n in re.findall(r"\d+", m.group(2))]
            if "-" in m.group(2):  # 's.3-4': every section of the range
                numbers = list(range(numbers[0], numbers[-1] + 1))
            out.append((str(f.relative_to(ROOT)), m.group(1), numbers))
    return out


def test_design_citations_name_sections_that_exist():
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", DESIGN.read_text(), flags=re.M)}
    assert sections == set(range(1, 10))
    found = _citations()
    assert len(found) > 20  # the modules cite it throughout
    wrong_file = [(f, path) for f, path, _ in found if not (path == "docs/design.md" or (f.startswith("docs/") and path == "design.md"))]  # fmt: skip
    assert not wrong_file, f"cite docs/design.md (the spec the repository ships): {wrong_file}"
    missing = [(f, n) for f, _, numbers in found for n in numbers if n not in sections]
    assert not missing, missing
