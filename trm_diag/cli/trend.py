"""Rendering of `trm-diag trend`: the metrics versus step, the length buckets of the last step, and the
flags with the action each suggests. Reads TrendResult; computes nothing new."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from trm_diag.cli.numbers import fmt, pct
from trm_diag.report.trend_report import TrendResult, rows_shown

# (column of the step rows, header): the metrics versus step
SHOWN = (
    ("kl", "kl"), ("k3_kl", "k3_kl"), ("abs_log_ratio_mean", "|lr|"), ("abs_log_ratio_max", "max"), ("accept_trm_max", "Max"), ("accept_trm_avg", "Avg"),
)  # fmt: skip
PERCENT = ("accept_trm_max", "accept_trm_avg")


def render_trend(console: Console, res: TrendResult, rows: int = 30) -> None:
    steps = res.data.steps
    what = "score report" if res.data.source == "score" else "run"
    n_seq = int(steps["n_sequences"].sum()) if "n_sequences" in steps else 0
    console.print(f"{what} {res.data.path}: {len(steps)} step(s), {n_seq:,} sequences", soft_wrap=True)
    for note in res.data.notes:
        console.print(Text(f"note: {note}", style="yellow"), soft_wrap=True)
    if steps.empty:
        console.print("no steps logged yet")
        return
    cols = [(c, h) for c, h in SHOWN if c in steps]
    horizons = [T for T in res.data.horizons if f"bstar@{T}" in steps][-1:]
    cols += [(f"bstar@{T}", f"B*@{T}") for T in horizons]
    if "route_token_flip_rate" in steps:
        cols.append(("route_token_flip_rate", "flips"))
    flagged = {s for f in res.flags if f.kind != "drift" for s in (f.step,)}
    t = Table(
        box=None,
        title="Mismatch versus step (sampled tokens' log-probs; |lr|, max: |log ratio| mean and max; Max, Avg: TRM "
        "acceptance)",
        title_justify="left",
        padding=(0, 1),
    )
    t.add_column("step", justify="right")
    for _, h in cols:  # the columns fit 80 characters
        t.add_column(h, justify="right", no_wrap=True)
    t.add_column("")
    step_list = [int(s) for s in steps["step"]]
    for i in rows_shown(step_list, flagged, rows):
        r = steps.iloc[i]
        cells = [pct(r[c]) if c in PERCENT else fmt(r[c], 2) for c, _ in cols]
        mark = Text(",".join(sorted({f.kind[:5] for f in res.flags if f.step == step_list[i]})), style="red")
        t.add_row(str(step_list[i]), *cells, mark if step_list[i] in flagged else "")
    console.print(t)
    b = res.data.buckets
    if not b.empty:
        last = b[b["step"] == b["step"].max()]
        bt = Table(title=f"Step {int(last['step'].iloc[0])} by response length", title_justify="left")
        for h in ("lengths", "seqs", "k1 (kl)", "|lr| max", "TRM-Max", "TRM-Avg"):
            bt.add_column(h, justify="right")
        for _, r in last.iterrows():
            bt.add_row(str(r["bucket"]), fmt(int(r["n_sequences"])), fmt(r["kl"]), fmt(r["abs_log_ratio_max"]),
                       pct(r["accept_trm_max"]), pct(r["accept_trm_avg"]))  # fmt: skip
        console.print(bt)
    if not res.flags:
        console.print(Text("no flags: no spike, drift or acceptance below 70% over the steps", style="green"))
        return
    console.print(Text(f"{len(res.flags)} flag(s):", style="bold red"))
    for f in res.flags:
        console.print(Text(f"  - {f.kind}: {f.message}", style="red"), soft_wrap=True)
        console.print(Text(f"    action: {f.action}"), soft_wrap=True)


def trend_markdown(res: TrendResult, rows: int = 30) -> str:
    """The text view as Markdown (a CI comment): the flags with their actions, then the metrics versus step."""
    steps = res.data.steps
    what = "score report" if res.data.source == "score" else "run"
    n_seq = int(steps["n_sequences"].sum()) if "n_sequences" in steps else 0
    out = [f"## trm-diag trend: {what} `{res.data.path}`", "", f"{len(steps)} step(s), {n_seq:,} sequences.", ""]
    out += [f"> note: {n}" for n in res.data.notes]
    if steps.empty:
        return "\n".join([*out, "No steps logged yet.", ""])
    if res.flags:
        out.append(f"**{len(res.flags)} flag(s):**")
        out += [f"- **{f.kind}**: {f.message}. Action: {f.action}" for f in res.flags]
    else:
        out.append("No flags: no spike, drift or acceptance below 70% over the steps.")
    cols = [(c, h.replace("|", "\\|")) for c, h in SHOWN if c in steps]
    cols += [(f"bstar@{T}", f"B*@{T}") for T in res.data.horizons if f"bstar@{T}" in steps][-1:]
    out += [
        "",
        "| step | " + " | ".join(h for _, h in cols) + " | flag |",
        "|" + " ---: |" * (len(cols) + 1) + " --- |",
    ]
    step_list = [int(s) for s in steps["step"]]
    flagged = {f.step for f in res.flags if f.kind != "drift"}
    for i in rows_shown(step_list, flagged, rows):
        r = steps.iloc[i]
        cells = [pct(r[c]) if c in PERCENT else fmt(r[c], 2) for c, _ in cols]
        mark = ", ".join(sorted({f.kind for f in res.flags if f.step == step_list[i]}))
        out.append(f"| {step_list[i]} | " + " | ".join(cells) + f" | {mark} |")
    return "\n".join([*out, ""])
