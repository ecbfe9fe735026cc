"""report.html: one self-contained page per report folder (no network, no JavaScript; figures are
embedded PNGs). The verdict and findings come first, then the headline numbers, the figures of
plots.py and the worst sequences with each token shaded by its KL.

Written with the report (before summary.json, so a complete report always has it) and by
`trm-diag show DIR --html` for reports written before it existed.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from trm_diag.math.breakdowns import AXIS

HTML_FILE = "report.html"
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:1.5em auto;
padding:0 1em;color:#1a1a1a;line-height:1.45}
h1{font-size:1.35em;margin:.2em 0} h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
.verdict{padding:.8em 1em;border-radius:6px;font-size:1.1em;font-weight:600}
.inside{background:#e6f4ea;border-left:6px solid #188038}.outside{background:#fce8e6;border-left:6px solid #c5221f}
.warn{background:#fef7e0;border-left:6px solid #e37400}.unknown{background:#f1f3f4;border-left:6px solid #5f6368}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right} th{background:#f6f6f6}
td.l,th.l{text-align:left} .muted{color:#666;font-size:.9em}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #eee} figcaption{color:#555;font-size:.9em}
.seq{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;font-size:.88em;border:1px solid #eee;
padding:.6em;background:#fff}
.seq span{border-radius:2px}
"""
STATUS_CLASS = {"inside": "inside", "outside": "outside", "inside, masking too much": "warn"}
SHADE_DECADES = 4.0  # token shading spans this many decades of KL below the largest shown


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, int):
        return f"{v:,}"
    v = float(v)
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table; cells are escaped here, the first ``left`` columns are left-aligned."""
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{_e(c)}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def _figure(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _bound_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every bound on a log grid of horizons from 1 to beyond the largest horizon, from the saved inputs."""
    import numpy as np

    from trm_diag.math.bounds import BoundInputs, bounds_table

    inp = BoundInputs.from_dict(summary.get("bound_inputs"))
    if inp is None:
        return []
    horizons = [int(h) for h in summary.get("horizons") or []]
    t_obs = int(summary["bound_inputs"].get("observed_T") or 1)
    top = max([t_obs, *horizons]) * 2
    grid = sorted({int(t) for t in np.unique(np.logspace(0, math.log10(top), 36).round())} | {t_obs, *horizons})
    return bounds_table(grid, inp)


def _worst_html(report: Path, summary: dict[str, Any], kl_col: str | None) -> str:
    """The worst sequences' responses, each token shaded by its per-token divergence (log scale)."""
    worst = summary.get("worst_sequences") or []
    if not worst:
        return "<p>No sequences.</p>"
    from trm_diag.report.tables import read_schema, read_table

    names = read_schema(report / "tokens.parquet").names
    score = kl_col if kl_col in names else next((c for c in ("k2", "log_ratio") if c in names), None)
    if "token_text" not in names or score is None:  # a report written before tokens carried their text
        rows = [
            [str(w["seq_id"]), _fmt(w["score"]), f"{w['pos']}/{w['length']}", f"{w['before']}\u00ab{w['token']}\u00bb{w['after']}"]
            for w in worst
        ]  # fmt: skip
        head = ["seq", worst[0]["score_name"], "pos / T", "context (worst token between \u00ab \u00bb)"]
        return _table(head, rows, 0)
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = [int(w["seq_id"]) for w in worst]
    t = read_table(report / "tokens.parquet", columns=["seq_id", "pos", "token_text", score])
    t = t.filter(pc.is_in(t["seq_id"], value_set=pa.array(ids, type=t["seq_id"].type)))
    rows = t.to_pylist()
    values = [abs(r[score]) for r in rows if r[score] is not None and math.isfinite(r[score]) and r[score] != 0]
    hi = math.log10(max(values)) if values else 0.0
    out = [
        f'<p class="muted">Each token is shaded by its {_e(score)} (darker = larger; log scale over '
        f"{SHADE_DECADES:g} decades below the largest shown, {_fmt(10**hi)}). Hover a token for its value.</p>"
    ]
    for w in worst:
        toks = sorted((r for r in rows if r["seq_id"] == w["seq_id"]), key=lambda r: r["pos"])
        spans = []
        for r in toks:
            v = r[score]
            alpha = 0.0
            if v is not None and math.isfinite(v) and v != 0:
                alpha = min(1.0, max(0.0, (math.log10(abs(v)) - hi + SHADE_DECADES) / SHADE_DECADES))
            elif v is not None and math.isinf(v):
                alpha = 1.0
            style = f"background:rgba(197,34,31,{0.85 * alpha:.2f})"
            if r["pos"] == w["pos"]:
                style += ";outline:2px solid #111"
            spans.append(
                f'<span style="{style}" title="pos {r["pos"]}: {_e(score)} {_fmt(v)}">{_e(r["token_text"])}</span>'
            )
        origin = "" if w.get("prompt_idx") is None else f", prompt {w['prompt_idx']}, sample {w['sample_idx']}"
        out.append(
            f"<h3>seq {w['seq_id']}{_e(origin)}: {_e(w['score_name'])} = {_fmt(w['score'])} at position "
            f'{w["pos"]} of {w["length"]}</h3><div class="seq">{"".join(spans)}</div>'
        )
    return "\n".join(out)


def build_html(report: Path, summary: dict[str, Any], figures: dict[str, Any]) -> str:
    """The page of one report. ``figures``: summary-like dict with breakdowns/profile/histograms (the
    summary's own, or computed from the tables of an older report)."""
    from trm_diag.criteria import CRITERIA
    from trm_diag.math.bounds import LABEL, UNIFIED
    from trm_diag.report import plots
    from trm_diag.tiers import TIERS

    v, m = summary["verdict"], summary["metrics"]
    tier = TIERS[summary["fidelity"]]
    roll, train = summary.get("rollout") or {}, summary.get("train") or {}
    parts = [
        f"<h1>trm-diag {_e(summary['command'])}: rollout <code>{_e(roll.get('spec') or roll.get('source'))}</code> vs "
        f"train <code>{_e(train.get('spec'))}</code></h1>",
        f'<p class="muted">{_e(summary["fidelity"])} fidelity; {_fmt(m.get("n_sequences"))} sequences, '
        f"{_fmt(m.get('n_tokens'))} tokens; trm-diag {_e(summary.get('version'))}; paper: Trust Region Masking, "
        "arXiv 2512.23075</p>",
        f'<div class="verdict {STATUS_CLASS.get(v["status"], "unknown")}">{_e(v["headline"])}</div>',
    ]
    if v["findings"]:
        parts.append("<h2>What explains it, and what to do</h2><ul>")
        parts += [f"<li><b>{_e(f['finding'])}</b><br>{_e(f['action'])}</li>" for f in v["findings"]]
        parts.append("</ul>")
    else:
        parts.append("<p>No finding: nothing in the data calls for a change.</p>")

    # headline numbers
    parts.append("<h2>Headline numbers</h2>")
    stat_rows = []
    for col, label in ((tier.kl, "KL(p||q)"), (tier.tv, "TV"), ("abs_log_ratio", "|log ratio|"), ("k3", "k3")):
        if col and f"token_{col}_mean" in m:
            stat_rows.append([f"{label} ({col})", *(_fmt(m.get(f"token_{col}_{s}")) for s in ("mean", "p99", "max"))])
    parts.append(_table(["per token", "mean", "p99", "max"], stat_rows))
    th = summary.get("thresholds") or {}
    acc = [
        [c.label, _fmt(th.get(c.threshold)) if c.threshold else "", _pct(m.get(f"accept_{name}"))]
        for name, c in CRITERIA.items()
        if f"accept_{name}" in m
    ]
    parts.append(_table(["criterion", "threshold", "sequences accepted"], acc))
    hz = [[f"{h['T']:,}" + (" (observed)" if h["observed"] else ""), _fmt(h["B_star"]),
           "n/a" if h["B_star"] is None else ("inside" if h["inside"] else "outside (vacuous)")] for h in v["horizons"]]  # fmt: skip
    parts.append(_table(["horizon T", "B*", "trust region"], hz))
    views = summary.get("views") or {}
    if "by_view" in views:
        parts.append(f"<h2>Three views of the rollout's distribution (this report uses {_e(views['view'])})</h2>")
        rows_v = [[name, _fmt(x["bias"]), _fmt(x["kl_mean"]), _fmt(x["kl_p99"]), _pct(x["accept_trm_max"]),
                   _pct(x["accept_trm_avg"]), f"{_pct(x['ppo_clip_frac'])} / {_pct(x['dapo_clip_frac'])}"] for name, x in views["by_view"].items()]  # fmt: skip
        parts.append(_table(["view", "bias", "KL mean", "KL p99", "TRM-Max", "TRM-Avg", "clip PPO / DAPO"], rows_v))
        km = views["kept_mass"]
        parts.append(
            f'<p class="muted">pipeline: what the engine reports vs the trainer\'s full softmax; '
            f"replay: both on the rollout's kept set; full: both untruncated. Kept mass mean {_fmt(km['mean'])} "
            f"(min {_fmt(km['min'])}); the two sides' kept sets differ at {_pct(views['support_differs_frac'])} "
            "of tokens.</p>"
        )
    elif views.get("note"):
        parts.append(f'<p class="muted">{_e(views["note"])}.</p>')

    # figures
    parts.append("<h2>Figures</h2>")
    labels = {"kl": "KL(p||q)", "tv": "TV", "kl_hi": "KL upper end", "tv_hi": "TV upper end",
              "abs_log_ratio": "|log ratio|"}  # fmt: skip
    prof = figures.get("profile") or {}
    if prof.get("pos_lo"):
        parts.append(
            _figure(
                plots.profile_png(prof, labels),
                "token divergences versus position",
                "Per-token divergences in position bins along the response: mean (solid) and p99 (dashed). "
                "A rise with position points at state drift (KV cache, long-context kernels).",
            )
        )
    by_length = (summary.get("masking") or {}).get("by_length") or []
    if by_length:
        series = {"trm_max": "TRM-Max measured", "trm_max_predicted": "TRM-Max predicted (1-p)^T"}
        series.update({k: CRITERIA[k].label for k in ("trm_avg", "ln_trm", "ser") if k in by_length[0]})
        target = (v.get("acceptance") or {}).get("target", 0.7)
        parts.append(
            _figure(
                plots.acceptance_png(by_length, series, target),
                "acceptance versus length",
                "Share of sequences each mask keeps per length bucket; the dashed line is TRM-Max's prediction "
                "(1-p)^T from the per-token violation rate p. Longer responses are masked more.",
            )
        )
    rows = _bound_rows(summary)
    if rows:
        parts.append(
            _figure(
                plots.bounds_png(rows, LABEL, UNIFIED, (summary.get("bound_inputs") or {}).get("observed_T")),
                "bounds versus horizon",
                "Every bound of the paper and B* (black, the smallest) against the horizon T; at or above the red "
                "line a bound says nothing (vacuous). Beyond the observed T the inputs are modelled.",
            )
        )
    hist = (figures.get("histograms") or {}).get("log_ratio") or {}
    if hist.get("counts"):
        extra = ", ".join(f"{hist[k]:,} {k}" for k in ("below", "above", "nonfinite") if hist.get(k))
        parts.append(
            _figure(
                plots.histogram_png(hist, "log ratio = log pi_train(y) - log pi_roll(y) (nats)"),
                "histogram of the log ratio",
                "Sampled-token log ratios; a peak off zero is a bias, wide shoulders are large token ratios."
                + (f" Outside the plotted range: {extra}." if extra else ""),
            )
        )
    brk = figures.get("breakdowns") or {}
    for axis in ("prob", "entropy"):
        rows_a = [r for r in brk.get("rows", []) if r["axis"] == axis]
        if rows_a:
            a = AXIS[axis]
            label = a.label if axis != "entropy" or brk.get("entropy_column") == "ent_roll" else (
                "entropy of the training side's next-token distribution (nats)"
            )  # fmt: skip
            parts.append(
                _figure(
                    plots.breakdown_png(rows_a, f"Where the mismatch sits: by {a.name}", label),
                    f"mismatch by {a.name} bucket",
                    "Share of tokens and share of the total KL in each bucket: a bucket whose KL share is far "
                    "above its token share concentrates the mismatch.",
                )
            )
    routing = summary.get("routing") or {}
    if routing.get("per_layer_flip_rate"):
        parts.append(
            _figure(
                plots.routing_png(routing["per_layer_flip_rate"]),
                "MoE routing flips per layer",
                "Fraction of tokens whose top-k expert set differs between the two sides, per layer.",
            )
        )
    if brk.get("rows"):
        parts.append("<h2>Breakdowns</h2>")
        band = brk.get("ratio_band") or [0.8, 1.25]
        head = ["axis", "bucket", "tokens", "KL mean", "KL p99", "KL share", "mean |log ratio|",
                f"ratio outside [{band[0]}, {band[1]}]"]  # fmt: skip
        parts.append(
            _table(
                head,
                [
                    [
                        r["axis"],
                        r["range"],
                        _fmt(r["n"]),
                        _fmt(r.get("kl_mean")),
                        _fmt(r.get("kl_p99")),
                        _pct(r.get("kl_share")),
                        _fmt(r["abs_log_ratio_mean"]),
                        _pct(r["outside_band"]),
                    ]
                    for r in brk["rows"]
                ],  # fmt: skip
                2,
            )
        )
    parts.append("<h2>Worst sequences</h2>")
    parts.append(_worst_html(report, summary, tier.locate))
    parts.append(
        f'<p class="muted">Files: tokens.parquet, sequences.parquet, bounds.parquet, summary.json. '
        f"Terminal view: <code>trm-diag show {_e(report)}</code>; rebuild this page: "
        f"<code>trm-diag show {_e(report)} --html</code>.</p>"
    )
    title = f"trm-diag: {v['headline']}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>\n<body>\n'
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def figure_data(report: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The breakdowns, profile and histogram the figures need: the summary's, else (an older report)
    computed from tokens.parquet."""
    if all(k in summary for k in ("breakdowns", "profile", "histograms")):
        return summary
    from trm_diag.math.breakdowns import report_breakdowns
    from trm_diag.report.tables import read_schema, read_table

    names = set(read_schema(report / "tokens.parquet").names)
    wanted = [
        c for c in ("pos", "lp_roll", "log_ratio", "ent_roll", "ent_train", "kl", "tv", "kl_hi", "tv_hi") if c in names
    ]
    t = read_table(report / "tokens.parquet", columns=wanted)
    return report_breakdowns({c: t[c].to_numpy(zero_copy_only=False) for c in wanted}, summary["fidelity"])


def write_html(report: Path, summary: dict[str, Any]) -> Path:
    """Write REPORT/report.html atomically; returns its path."""
    from trm_diag.report.tables import atomic_write

    page = build_html(report, summary, figure_data(report, summary))
    path = report / HTML_FILE
    atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path


def write_html_or_warn(report: Path, summary: dict[str, Any], warn: Any) -> None:
    """report.html for a report being written: a failure to draw it costs the page, never the report
    (a warning says so and how to retry)."""
    try:
        write_html(report, summary)
    except OSError:
        raise  # a full disk or a read-only folder: the report cannot be written either
    except Exception as e:  # noqa: BLE001 - any plotting failure
        warn(f"report.html not written ({type(e).__name__}: {e}); retry with `trm-diag show {report} --html`")
