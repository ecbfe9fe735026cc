"""The page of a training run (`trm-diag trend RUN --html`, `show RUN --html`): the flags with the action each
suggests, the metrics versus step as figures (plots.steps_png), the steps and the last step's length buckets.
Self-contained like a report's page (html_report.py): no network, no JavaScript, figures embedded as PNGs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trm_diag.report.html_report import CSS, _e, _figure, _fmt, _pct, _table
from trm_diag.report.trend_report import TrendResult, rows_shown

RUN_HTML = "report.html"  # in a Monitor run folder: the run's page
SCORE_TREND_HTML = "trend.html"  # in a `score` report: its report.html is the report's own page, left as it is
TABLE_ROWS = 60  # steps listed at most (evenly spaced; flagged steps and the last always)


def html_path(res: TrendResult) -> Path:
    """Where the page of this run goes: RUN/report.html, or REPORT/trend.html for a `score` report."""
    return res.data.path / (SCORE_TREND_HTML if res.data.source == "score" else RUN_HTML)


# the figures of a run's page: (columns -> legend, title, y label, caption, marks, reference line, percent);
# marks: "gaps" (spikes dotted, drifts shaded) or "acceptance" (the first step under target); a reference line
# "target" (the acceptance target) or "vacuous" (B* = 1). "{horizons}" stands for B* at each horizon.
FIGURES: tuple[tuple[Any, ...], ...] = (
    ({"abs_log_ratio_mean": "mean", "token_abs_log_ratio_p99": "p99", "abs_log_ratio_max": "max"},
     "|log ratio| per token versus step", "|log pi_train - log pi_roll| (nats)",
     "Mean, p99 and max of the sampled tokens' |log ratio| per step. Red: a spike (dotted; check weight "
     "sync / staleness) or a drift (shaded), flagged on the mean (docs/trend.md).", "gaps", None, False),
    ({"kl": "k1 (verl kl)", "k3_kl": "k3 (verl k3_kl)"}, "KL estimates versus step", "KL per token (nats)",
     "Token means of the k1 and k3 estimators of KL(pi_roll || pi_train); k1 is signed.", "gaps", None, False),
    ({"accept_trm_max": "TRM-Max", "accept_trm_avg": "TRM-Avg"}, "Sequences the masks keep versus step",
     "sequences accepted (%)",
     "Share of each step's sequences that TRM-Max and TRM-Avg keep; the dotted line is the paper's 70%.",
     "acceptance", "target", True),
    ("{horizons}", "B* versus step", "B* (bound on the surrogate error)",
     "The smallest of the paper's bounds from each step's inputs, at each horizon; at or above 1 it says nothing.",
     "gaps", "vacuous", False),
    ({"route_token_flip_rate": "tokens with a flip", "route_flip_rate": "layer flips"},
     "MoE router flips versus step", "flipped (%)",
     "Share of tokens whose top-k expert set differs in some layer, and of (token, layer) pairs.", "gaps", None, True),
    ({"kept_mass_mean": "mean", "kept_mass_min": "min"}, "Sampler's kept mass versus step", "kept mass M_t",
     "The probability mass the sampler kept under top-p / top-k, per step (1: untruncated).", "gaps", None, False),
)  # fmt: skip


def _figures(res: TrendResult) -> list[str]:
    from trm_diag.report import plots

    steps, flags = res.data.steps, res.flags
    x = [int(s) for s in steps["step"]]
    marks = {
        "gaps": [(f.step, f.last_step, f.kind) for f in flags if f.kind in ("spike", "drift")],
        "acceptance": [(f.step, f.step, "acceptance below target") for f in flags if f.kind == "acceptance"],
    }
    lines = {None: None, "target": (res.config.acceptance, f"target {res.config.acceptance:.0%}"),
             "vacuous": (1.0, "vacuous (>= 1)")}  # fmt: skip
    out = []
    for cols, title, ylabel, caption, mark, line, percent in FIGURES:
        if cols == "{horizons}":
            cols = {f"bstar@{T}": f"B* at T = {T:,}" for T in res.data.horizons}
        series = {label: steps[c].tolist() for c, label in cols.items() if c in steps}
        if series:
            png = plots.steps_png(x, series, title, ylabel, marks[mark], lines[line], percent=percent)
            out.append(_figure(png, title, caption))
    return out


def build_trend_html(res: TrendResult) -> str:
    """The page of one run (or a `score` report's steps)."""
    data, steps, flags = res.data, res.data.steps, res.flags
    what = "score report" if data.source == "score" else "run"
    n_seq = int(steps["n_sequences"].sum()) if "n_sequences" in steps else 0
    parts = [
        f"<h1>trm-diag trend: {_e(what)} <code>{_e(data.path)}</code></h1>",
        f'<p class="muted">{len(steps):,} step(s), {n_seq:,} sequences; sampled tokens\' log-probs; horizons '
        f"{_e(', '.join(f'{T:,}' for T in data.horizons))}; rules: docs/trend.md</p>",
    ]
    parts += [f'<p class="muted">note: {_e(n)}</p>' for n in data.notes]
    if steps.empty:
        headline, status = "No steps logged yet.", "unknown"
    elif not flags:
        headline, status = "No flags: no spike, drift or acceptance below 70% over the steps.", "inside"
    else:
        kinds = sorted({f.kind for f in flags})
        headline = (
            f"{len(flags)} flag(s): " + "; ".join(f.message for f in flags[:3]) + ("; ..." if len(flags) > 3 else "")
        )
        status = "warn" if kinds == ["acceptance"] else "outside"
    parts.append(f'<div class="verdict {status}">{_e(headline)}</div>')
    if flags:
        parts.append("<h2>What changed when, and what to do</h2><ul>")
        parts += [f"<li><b>{_e(f.kind)}: {_e(f.message)}</b><br>{_e(f.action)}</li>" for f in flags]
        parts.append("</ul>")
    if not steps.empty:
        parts.append("<h2>Figures</h2>")
        parts += _figures(res)
        parts.append("<h2>Steps</h2>")
        cols = [(c, h) for c, h in (("n_sequences", "seqs"), ("n_tokens", "tokens"), ("kl", "k1 (kl)"),
                ("k3_kl", "k3_kl"), ("abs_log_ratio_mean", "|lr| mean"), ("token_abs_log_ratio_p99", "|lr| p99"),
                ("abs_log_ratio_max", "|lr| max"), ("accept_trm_max", "TRM-Max"), ("accept_trm_avg", "TRM-Avg"),
                *((f"bstar@{T}", f"B*@{T:,}") for T in data.horizons), ("route_token_flip_rate", "flips"))
                if c in steps]  # fmt: skip
        step_list = [int(s) for s in steps["step"]]
        flagged = {f.step for f in flags if f.kind != "drift"}
        shown = rows_shown(step_list, flagged, TABLE_ROWS)
        rows = []
        for i in shown:
            r = steps.iloc[i]
            mark = ", ".join(sorted({f.kind for f in flags if f.step == step_list[i]}))
            cells = [_pct(r[c]) if c.startswith("accept_") or c == "route_token_flip_rate"
                     else _fmt(int(r[c]) if c in ("n_sequences", "n_tokens") else float(r[c])) for c, _ in cols]  # fmt: skip
            rows.append([str(step_list[i]), *cells, mark])
        if len(shown) < len(step_list):
            parts.append(f'<p class="muted">{len(shown)} of {len(step_list):,} steps: evenly spaced, every flagged '
                         "step and the last; `trm-diag trend --format json` gives them all.</p>")  # fmt: skip
        parts.append(_table(["step", *(h for _, h in cols), "flag"], rows))
        b = data.buckets
        if not b.empty:
            last = b[b["step"] == b["step"].max()]
            parts.append(f"<h2>Step {int(last['step'].iloc[0])} by response length</h2>")
            parts.append(_table(
                ["lengths", "sequences", "k1 (kl)", "|lr| max", "TRM-Max", "TRM-Avg"],
                [[str(r["bucket"]), _fmt(int(r["n_sequences"])), _fmt(float(r["kl"])), _fmt(float(r["abs_log_ratio_max"])),
                  _pct(r["accept_trm_max"]), _pct(r["accept_trm_avg"])] for _, r in last.iterrows()],
            ))  # fmt: skip
    parts.append(
        f'<p class="muted">Terminal view: <code>trm-diag trend {_e(data.path)}</code>; rebuild this page: '
        f"<code>trm-diag trend {_e(data.path)} --html</code>; gate it: <code>trm-diag gate {_e(data.path)} -r "
        "'trend.flags == 0'</code>.</p>"
    )
    title = f"trm-diag trend: {headline}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>\n<body>\n'
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def write_trend_html(res: TrendResult) -> Path:
    """Write the run's page atomically (html_path); returns its path."""
    from trm_diag.report.tables import atomic_write

    page = build_trend_html(res)
    path = html_path(res)
    atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path
