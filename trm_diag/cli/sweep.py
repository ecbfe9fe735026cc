"""`trm-diag sweep` rendering: the verdict, then the ranked table of arms, then the skipped ones."""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# (column, header) of the printed table; sweep.parquet has every sweep_table.SWEEP_COLUMNS column
SHOWN = (
    ("arm", "arm"),
    ("ref_kl_mean", "own KL"),
    ("ref_lp_err_rms", "own err"),  # headers of 7 characters at most: the table fits 80 columns
    ("token_kl_mean", "KL roll"),
    ("gap_lp_rms", "gap"),
    ("b_star_4096", "B*@4096"),
)
# the arms compared with the trainer itself (sweep --arms batch): their own table
BATCH_SHOWN = (
    ("arm", "arm"),
    ("outside_band", "outside"),
    ("abs_log_ratio_max", "max|lr|"),
    ("ppo_clip_flip_pos", "ppo A>0"),
    ("ppo_clip_flip_neg", "ppo A<0"),
    ("dapo_clip_flip_pos", "dapo+"),
    ("route_flip_share", "routes"),
)
BATCH_LEGEND = (
    "Batch shape: each arm against the same spec at batch size 1, both sides scoring passes. outside: share of "
    "tokens with rho outside [0.9, 1.1]; max|lr|: largest |log rho|; ppo A>0 / A<0, dapo+: shares of tokens whose "
    "clip status flips (rho > 1.2 / < 0.8, > 1.28); routes: MoE tokens whose expert set changes."
)
LEGEND = (
    "own KL, own err: KL and rms log-prob error against the reference; KL roll, B*@4096: the arm's report "
    "(rollout side vs arm); gap: rms of e_arm - e_roll. Every column (the errors' correlation, TRM-Max "
    "acceptance, ...): sweep.parquet."
)


def _cell(value: Any, column: str) -> str:
    if isinstance(value, str):
        return escape(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2g}"  # 7 characters at most: the table fits 80 columns


def _batch(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "done" and r.get("against")]


def _columns(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The SHOWN columns this sweep has (without a reference: no own-error columns)."""
    has_ref = summary.get("reference") is not None
    return [(c, h) for c, h in SHOWN if has_ref or not c.startswith(("ref_", "gap_", "indep_", "err_"))]


def sweep_markdown(summary: dict[str, Any]) -> str:
    """The sweep as Markdown (a CI summary, a pull request): the verdict, the ranked table, the arms that did
    not run."""

    def cell(value: Any, column: str) -> str:
        text = value if isinstance(value, str) else _cell(value, column)
        return str(text).replace("|", "\\|").replace("\n", " ")

    cols = _columns(summary)
    rows = summary.get("table", [])
    ref = " against the reference" if summary.get("reference") is not None else ""
    lines = ["## trm-diag sweep", "", *(f"- {line}" for line in summary.get("verdict", [])), "",
             f"### Arms, ranked by own error{ref} (the rollout side first)", "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + " --- |" * len(cols)]  # fmt: skip
    lines += ["| " + " | ".join(cell(r.get(c), c) for c, _ in cols) + " |" for r in rows
              if r.get("status") == "done" and not r.get("against")]  # fmt: skip
    if _batch(rows):
        lines += ["", "### Batch shape: the trainer against itself at batch size 1", "",
                  "| " + " | ".join(h for _, h in BATCH_SHOWN) + " |", "|" + " --- |" * len(BATCH_SHOWN)]  # fmt: skip
        lines += ["| " + " | ".join(cell(r.get(c), c) for c, _ in BATCH_SHOWN) + " |" for r in _batch(rows)]
        lines += ["", BATCH_LEGEND]
    other = [r for r in rows if r.get("status") != "done"]
    if other:
        lines += ["", *(f"- {r['status']} `{r['arm']}`: {r.get('reason', '')}" for r in other)]
    return "\n".join([*lines, "", LEGEND])


def render_sweep(console: Console, summary: dict[str, Any]) -> None:
    """Verdict lines, the ranked table (the rollout side first), and the arms that did not run."""
    for line in summary.get("verdict", []):
        console.print(escape(line), soft_wrap=True)
    rows = summary.get("table", [])
    cols = _columns(summary)
    ref = " against the reference" if summary.get("reference") is not None else ""
    table = Table(
        title=f"Arms, ranked by own error{ref} (the rollout side first)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    for c, h in cols:
        table.add_column(h, justify="left" if c == "arm" else "right", no_wrap=True, min_width=len(h))
    shown = [r for r in rows if r.get("status") == "done" and not r.get("against")]
    for r in shown:
        table.add_row(*(_cell(r.get(c), c) for c, _ in cols))
    if len(shown) > 1 or not _batch(rows):  # a batch-only sweep: the rollout side alone says nothing
        console.print(table)
    if _batch(rows):
        batch = Table(title="Batch shape: the trainer against itself at batch size 1", title_justify="left",
                      box=box.SIMPLE_HEAD, padding=(0, 1))  # fmt: skip
        for c, h in BATCH_SHOWN:
            batch.add_column(h, justify="left" if c == "arm" else "right", no_wrap=True, min_width=len(h))
        for r in _batch(rows):
            batch.add_row(*(_cell(r.get(c), c) for c, _ in BATCH_SHOWN))
        console.print(batch)
        console.print(BATCH_LEGEND, soft_wrap=True)
    other = [r for r in rows if r.get("status") != "done"]
    for r in other:
        console.print(f"[yellow]{r['status']}[/yellow] {escape(r['arm'])}: {escape(str(r.get('reason', '')))}",
                      soft_wrap=True)  # fmt: skip
    if len(shown) > 1 or not _batch(rows):
        console.print(LEGEND, soft_wrap=True)
