"""Rich terminal rendering of reports and bound tables. Reads dicts, computes nothing new."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from trm_diag.cli.numbers import fmt, pct
from trm_diag.criteria import CRITERIA
from trm_diag.math.bounds import LABEL, UNIFIED_MEMBERS
from trm_diag.math.metrics import METRICS


def _bound_cell(v: float | None, best: bool) -> Text:
    if v is None:
        return Text("-", style="dim")
    style = "bold green" if best else ""
    if v >= 1.0:
        return Text(fmt(v) + " (vacuous)", style="red" if not best else "bold red")
    return Text(fmt(v), style=style)


def bounds_rich_table(rows: list[dict], title: str = "Bounds on |J(pi_theta) - J(pi_roll) - L| (R in [0,1])") -> Table:
    """Rows: bounds; columns: horizons; tightest bound per horizon bold; vacuous (>= 1) red."""
    horizons = sorted({r["T"] for r in rows})
    by = {(r["bound"], r["T"]): r["value"] for r in rows}
    names = list(dict.fromkeys(r["bound"] for r in rows))
    table = Table(title=title, title_justify="left")
    table.add_column("bound")
    for T in horizons:
        table.add_column(f"T={T:,}", justify="right")
    best = {}
    for T in horizons:
        vals = [(by[(n, T)], n) for n in names if n != "unified" and by.get((n, T)) is not None]
        best[T] = min(vals)[1] if vals else None
    for n in names:
        cells = [_bound_cell(by.get((n, T)), best[T] == n or n == "unified") for T in horizons]
        table.add_row(Text(LABEL.get(n, n), style="bold" if n == "unified" else ""), *cells)
    return table


def _without_model(spec: str, model: str) -> str:
    """A backend spec without its model=PATH key (shown once when both sides load the same model)."""
    name, _, keys = spec.partition(":")
    rest = [k for k in keys.split(",") if k and k != f"model={model}"]
    return f"{name}:{','.join(rest)}" if rest else name


def render_compare(console: Console, summary: dict[str, Any]) -> None:
    """Headline table, acceptance, bounds at the observed length and the worst sequences."""
    m = summary["metrics"]
    roll = summary["rollout"]
    source = roll.get("format")
    kind = f"{source} dump" if source not in (None, "jsonl", "parquet") else "file"
    roll_text = roll["spec"] if "spec" in roll else f"{kind} {roll['source']}"
    train_text, model = summary["train"]["spec"], summary["train"].get("model")
    if train_text == "recorded":
        train_text = "the trainer's recorded log-probs" + (f" (tokens: {model})" if model else " (no model)")
    shared = model and roll.get("model") == model  # one model on both sides: say it once, on its own line
    if shared:
        roll_text, train_text = (_without_model(t, model) for t in (roll_text, train_text))
    console.print(
        f"[bold]trm-diag {summary['command']}[/bold]: rollout [cyan]{escape(roll_text)}[/cyan] vs "
        f"train [cyan]{escape(train_text)}[/cyan] ({summary['fidelity']} fidelity)"
    )
    if shared:
        console.print(f"[dim]model {escape(str(model))}[/dim]")
    if summary.get("lp_roll_source", "").startswith("the rollout spec's own scoring pass"):
        console.print("[dim]the trainer against itself: lp_roll is the rollout spec's scoring pass (old_log_prob), "
                      "not its decode steps[/dim]")  # fmt: skip
    render_verdict(console, summary)
    render_views(console, summary.get("views"))
    head = Table(title="Token-level mismatch", title_justify="left")
    head.add_column("metric")
    for c in ("mean", "p99", "max"):
        head.add_column(c, justify="right")
    rows = (("kl", "KL(p||q)"), ("tv", "TV"), ("kl_lo", "KL lower (top-K)"), ("kl_hi", "KL upper (top-K)"),
            ("tv_lo", "TV lower (top-K)"), ("tv_hi", "TV upper (top-K)"), ("abs_log_ratio", "|log ratio|"),
            ("k3", "k3"), ("tv_bin", "binary TV"), ("kl_bin", "binary KL"))  # fmt: skip
    for col, label in rows:
        if f"token_{col}_mean" in m:
            head.add_row(label, *(fmt(m.get(f"token_{col}_{s}")) for s in ("mean", "p99", "max")))
    console.print(head)
    render_breakdown(console, summary.get("breakdowns"))
    infinite = [(label, m[f"token_{col}_n_inf"]) for col, label in rows if m.get(f"token_{col}_n_inf")]
    if infinite:
        parts = ", ".join(f"{label} at {n:,}" for label, n in infinite)
        console.print(
            f"[yellow]infinite values (probability 0 on one side), counted in every statistic: {parts} tokens[/yellow]"
        )
    if summary["fidelity"] != "exact":
        console.print(f"[yellow]masks and bounds use {summary['criteria_basis']}[/yellow]")

    batch = Table(title="Batch (log_ratio = lp_train - lp_roll; docs/metrics.md)", title_justify="left")
    batch.add_column("metric")
    batch.add_column("value", justify="right")
    batch.add_column("definition")
    batch.add_row("tokens / sequences", f"{m['n_tokens']:,} / {m['n_sequences']:,}", "")
    for key in ("kl", "k3_kl", "log_ppl_abs_diff", "ppl_ratio", "chi2_token", "chi2_seq",
                "rollout_is_eff_sample_size_seq", "ess_token", "ess_seq", "frac_ratio_outside_2",
                "frac_ratio_outside_5", "prefill_gap_abs_max"):  # fmt: skip
        if key in m:
            batch.add_row(key, fmt(m[key]), "verl's" if METRICS.get(key, ("", ""))[1] == "verl" else "trm-diag's")
    console.print(batch)

    acc = Table(title="Masking: acceptance rate (paper advises > 70%)", title_justify="left")
    acc.add_column("criterion")
    acc.add_column("threshold", justify="right")
    acc.add_column("accepted", justify="right")
    th = summary["thresholds"]
    th_of = {
        name: str(th[c.threshold]) if c.threshold else " & ".join(f"{th[CRITERIA[r].threshold]:g}" for r in c.requires)
        for name, c in CRITERIA.items()
    }
    for key, label in ((k, c.label) for k, c in CRITERIA.items()):
        rate = m.get(f"accept_{key}")
        style = "red" if rate is not None and rate < 0.7 else "green"
        acc.add_row(label, str(th_of[key]), Text(f"{100 * rate:.1f}%" if rate is not None else "-", style=style))
    for key, label in (("dppo_tv", "DPPO binary TV (tokens over)"), ("dppo_kl", "DPPO binary KL (tokens over)")):
        frac = m.get(f"{key}_token_frac")  # null in a report without tokens (an empty shard)
        acc.add_row(label, str(th[key]), f"{100 * frac:.2f}% of tokens" if frac is not None else "-")
    console.print(acc)

    render_masking(console, summary)

    bi = summary["bound_inputs"]
    b = summary.get("bounds_at_observed_T") or {}
    if b:
        T = bi["observed_T"]
        unified = b.get("unified")
        verdict = "[red]vacuous[/red]" if unified is None or unified >= 1 else "[green]non-vacuous[/green]"
        src = bi.get("source") or {}

        def val(key: str) -> str:  # a number that is not measured says so next to it
            how = str(src.get(key, ""))
            tag = next((w for w in ("estimate", "heuristic", "unknown") if how.startswith(w)), "")
            return fmt(bi[key]) + (f" ({tag})" if tag else "")

        console.print(
            f"[bold]Bounds at the observed max length T={T}[/bold]: delta={val('delta')} eps={val('eps')} "
            f"D_KL^seq={val('kl_seq')} D_TV^seq={val('tv_seq')}  ->  B* = {fmt(unified)} ({verdict}); "
            f"members: {', '.join(f'{LABEL[k]} {fmt(v)}' for k, v in b.items() if k in UNIFIED_MEMBERS and v is not None and v == v)}"
        )
        console.print(
            "[dim]delta and eps are empirical maxima over the sampled positions; see bounds.parquet for other horizons.[/dim]"
        )

    render_routing(console, summary.get("routing"))
    render_steps(console, summary.get("steps"))

    worst = summary.get("worst_sequences") or []
    if worst:
        wt = Table(title="Worst sequences (where the backends disagree most)", title_justify="left")
        wt.add_column("seq", justify="right")
        wt.add_column("prompt", justify="right")
        wt.add_column("sample", justify="right")
        wt.add_column(worst[0]["score_name"], justify="right")
        wt.add_column("pos / T", justify="right")
        wt.add_column("context (worst token in red, between \u00ab \u00bb)")
        for w in worst:
            ctx = Text(w["before"][-60:].replace("\n", "\\n"))
            ctx.append("\u00ab" + w["token"].replace("\n", "\\n") + "\u00bb", style="bold red")
            ctx.append(w["after"][:40].replace("\n", "\\n"))
            wt.add_row(str(w["seq_id"]), *_origin(w), fmt(w["score"]), f"{w['pos']}/{w['length']}", ctx)
        console.print(wt)
    t = summary.get("timings", {})
    if t:
        console.print("[dim]" + "  ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in t.items()) + "[/dim]")


def render_breakdown(console: Console, brk: dict[str, Any] | None, axis: str = "prob") -> None:
    """Where the mismatch sits: one row per bucket of the rollout's probability of the sampled token
    (summary.json `breakdowns`; entropy and position buckets are in breakdowns.parquet and report.html)."""
    rows = [r for r in (brk or {}).get("rows", []) if r["axis"] == axis]
    if not rows:
        return
    band = (brk or {}).get("ratio_band") or [0.8, 1.25]
    t = Table(title="Where the mismatch sits: by the rollout's probability of the sampled token", title_justify="left")
    cols = ["p(sampled)", "tokens", "KL share", "KL mean", "|log ratio|", f"rho outside [{band[0]},{band[1]}]"]
    for c in cols:
        t.add_column(c, justify="left" if c == "p(sampled)" else "right")
    for r in rows:
        t.add_row(r["range"], pct(r["token_share"]), pct(r.get("kl_share")), fmt(r.get("kl_mean")),
                  fmt(r["abs_log_ratio_mean"]), pct(r["outside_band"]))  # fmt: skip
    console.print(t)


def render_views(console: Console, views: dict[str, Any] | None) -> None:
    """The three views (truncated sampling, raw log-probs) side by side, or the line that says why not."""
    if not views:
        return
    if "by_view" not in views:
        console.print(f"[dim]{escape(views.get('note', ''))}[/dim]")
        return
    t = Table(
        title=f"Three views of the rollout's distribution (masks, bounds and metrics use: {views['view']})",
        title_justify="left",
    )
    for c in ("view", "bias", "KL mean", "KL p99", "TRM-Max", "TRM-Avg", "clip PPO/DAPO"):
        t.add_column(c, justify="left" if c == "view" else "right")
    for name, v in views["by_view"].items():
        style = "bold" if name == views["view"] else ""
        t.add_row(name, fmt(v["bias"]), fmt(v["kl_mean"]), fmt(v["kl_p99"]), pct(v["accept_trm_max"]),
                  pct(v["accept_trm_avg"]), f"{pct(v['ppo_clip_frac'])} / {pct(v['dapo_clip_frac'])}", style=style)  # fmt: skip
    console.print(t)
    km = views["kept_mass"]
    console.print(
        f"[dim]bias = mean sampled-token log ratio; clip = tokens whose ratio leaves [0.8, 1.2] / [0.8, 1.28]. Kept mass "
        f"mean {fmt(km['mean'])} (min {fmt(km['min'])}), {fmt(views['kept_count_mean'])} tokens kept on average; "
        f"the two sides' kept sets differ at {pct(views['support_differs_frac'])} of tokens.[/dim]"
    )


def render_verdict(console: Console, summary: dict[str, Any], limit: int = 3) -> None:
    """The verdict first: inside or outside the trust region, then the findings that explain it with
    the action each suggests (summary.json's `verdict`; computed for reports written without one)."""
    from trm_diag.report.verdict import verdict

    v = summary.get("verdict") or verdict(summary)
    style = (
        "bold green" if v["status"] == "inside" else ("bold yellow" if v["status"].startswith("inside") else "bold red")
    )
    console.print(Text(v["headline"], style=style))
    if v.get("bitwise"):  # the bit-for-bit certificate (certify.py)
        console.print(Text("bitwise: " + v["bitwise"]), soft_wrap=True)
    later = [h for h in v["horizons"] if not h["observed"] and h["B_star"] is not None]
    if later:
        console.print("  at your horizons: " + ", ".join(
            f"T={h['T']:,}: B* {fmt(h['B_star'])} ({'inside' if h['inside'] else 'outside'})" for h in later))  # fmt: skip
    for f in v["findings"][:limit]:
        console.print(f"  [bold]-[/bold] {escape(f['finding'])}")
        console.print(f"    [dim]->[/dim] {escape(f['action'])}")
    if len(v["findings"]) > limit:
        console.print(f"  [dim]({len(v['findings']) - limit} more finding(s) in summary.json 'verdict')[/dim]")


def render_masking(console: Console, summary: dict[str, Any]) -> None:
    """Acceptance by length bucket next to (1-p)^T, and acceptance versus threshold."""
    mk = summary.get("masking") or {}
    if mk.get("by_length"):
        p = mk.get("token_violation_rate")
        t = Table(
            title=f"Acceptance by length (TRM-Max predicted = (1-p)^T, p = {fmt(p)} tokens over the threshold)",
            title_justify="left",
        )
        for c in ("lengths", "n", "TRM-Max", "predicted", "TRM-Avg", "LN-TRM", "SER"):
            t.add_column(c, justify="right")
        for r in mk["by_length"]:
            t.add_row(
                r["lengths"],
                str(r["n"]),
                *(f"{100 * r[k]:.0f}%" for k in ("trm_max", "trm_max_predicted", "trm_avg", "ln_trm", "ser")),
            )
        console.print(t)
    if mk.get("sweep"):
        factors = sorted({r["factor"] for r in mk["sweep"]})
        t = Table(title="Acceptance versus threshold (x the configured value)", title_justify="left")
        t.add_column("criterion")
        for f in factors:
            t.add_column(f"x{f:g}", justify="right")
        for key, label in ((k, c.label) for k, c in CRITERIA.items()):
            cells = {r["factor"]: r["acceptance"] for r in mk["sweep"] if r["criterion"] == key}
            if cells:
                t.add_row(label, *(f"{100 * cells[f]:.0f}%" if cells[f] is not None else "-" for f in factors))
        console.print(t)


def render_routing(console: Console, r: dict[str, Any] | None) -> None:
    """MoE section: flip rates, and how much of the mismatch sits on flipped tokens."""
    if not r:
        return
    if not r.get("available"):
        console.print(f"[yellow]MoE routing not compared: {escape(r.get('reason', 'unknown reason'))}[/yellow]")
        return
    layers = ", ".join(f"L{i} {100 * x:.2f}%" for i, x in enumerate(r["per_layer_flip_rate"]))
    console.print(
        f"[bold]MoE routing[/bold] ({r['num_experts']} experts, top-{r['experts_per_token']}): "
        f"{100 * r['token_any_flip_rate']:.2f}% of tokens flip an expert set in some layer; per layer: {layers}"
    )
    t = Table(title="Token divergence on routing flips versus the rest", title_justify="left")
    t.add_column("tokens", no_wrap=True)
    for c in ("n", "kl mean", "kl p99", "kl max", "|lr| mean", "|lr| max"):
        t.add_column(c, justify="right")
    for label, kl, lr in (
        ("with a flip", r["kl_flip"], r["abs_log_ratio_flip"]),
        ("no flip", r["kl_no_flip"], r["abs_log_ratio_no_flip"]),
    ):
        t.add_row(label, str(kl["n"]), fmt(kl["mean"]), fmt(kl["p99"]), fmt(kl["max"]), fmt(lr["mean"]), fmt(lr["max"]))
    console.print(t)
    w = r.get("worst_token_is_flip")
    if w:
        ids = ", ".join(map(str, w["seq_ids"][:10]))
        console.print(
            f"worst token of {w['count']} of {w['of']} sequences is a routing flip" + (f" (seq {ids})" if ids else "")
        )


def _origin(w: dict[str, Any]) -> tuple[str, str]:
    """Prompt index and sample index of a worst sequence ('-' in reports written before they were kept)."""
    return tuple("-" if w.get(k) is None else str(w[k]) for k in ("prompt_idx", "sample_idx"))  # type: ignore[return-value]


def worst_table(rows: list[dict[str, Any]]) -> Table:
    """The worst sequences read from sequences.parquet (`show --top N` beyond the summary's five)."""
    t = Table(title=f"Worst {len(rows)} sequences (sequences.parquet)", title_justify="left")
    for c in ("seq", "prompt", "sample", rows[0]["score_name"] if rows else "score", "T", "response"):
        t.add_column(c, justify="left" if c == "response" else "right")
    for r in rows:
        text = (r.get("response_text") or "").replace("\n", "\\n")
        t.add_row(str(r["seq_id"]), str(r["prompt_idx"]), str(r["sample_idx"]), fmt(r["score"]), str(r["length"]),
                  escape(text[:60]))  # fmt: skip
    return t


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    cells = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(r) + " |" for r in cells),
    ]


def to_markdown(summary: dict[str, Any], worst: list[dict[str, Any]] | None = None) -> str:
    """The report as Markdown (a CI summary, a pull request): the verdict and its findings first,
    then the headline numbers, acceptance, bounds at the observed length and the worst sequences."""
    m, v = summary["metrics"], summary["verdict"]
    roll = summary.get("rollout") or {}
    lines = [
        f"## trm-diag {summary['command']}: {v['headline']}",
        "",
        f"rollout `{roll.get('spec') or roll.get('source')}` vs train `{(summary.get('train') or {}).get('spec')}`"
        f" ({summary['fidelity']} fidelity)",
        "",
    ]
    for f in v["findings"]:
        lines.append(f"- **{f['finding']}**: {f['action']}")
    later = [h for h in v["horizons"] if not h["observed"] and h["B_star"] is not None]
    if later:
        lines += ["", "B* at your horizons: " + ", ".join(f"T={h['T']:,}: {fmt(h['B_star'])}" for h in later)]
    stats = [
        ("kl", "KL(p||q)"),
        ("tv", "TV"),
        ("kl_hi", "KL upper (top-K)"),
        ("abs_log_ratio", "|log ratio|"),
        ("k3", "k3"),
    ]
    rows = [[label, *(fmt(m.get(f"token_{c}_{s}")) for s in ("mean", "p99", "max"))] for c, label in stats
            if f"token_{c}_mean" in m]  # fmt: skip
    lines += ["", "### Token-level mismatch", "", *_md_table(["metric", "mean", "p99", "max"], rows)]
    th = summary.get("thresholds") or {}
    acc = [[c.label, str(th.get(c.threshold, "")) if c.threshold else " & ".join(str(th.get(CRITERIA[r].threshold)) for r in c.requires),
            f"{100 * m[f'accept_{k}']:.1f}%" if m.get(f"accept_{k}") is not None else "-"]
           for k, c in CRITERIA.items()]  # fmt: skip
    lines += [
        "",
        "### Masking: acceptance (paper advises > 70%)",
        "",
        *_md_table(["criterion", "threshold", "accepted"], acc),
    ]
    b = summary.get("bounds_at_observed_T") or {}
    if b:
        T = (summary.get("bound_inputs") or {}).get("observed_T")
        lines += ["", f"### Bounds at the observed length T = {T}", "",
                  *_md_table(["bound", "value"], [[LABEL.get(k, k), fmt(x)] for k, x in b.items()])]  # fmt: skip
    if worst is not None:
        rows = [[str(r["seq_id"]), str(r["prompt_idx"]), str(r["sample_idx"]), fmt(r["score"]), str(r["length"]),
                 (r.get("response_text") or "")[:80]] for r in worst]  # fmt: skip
        name = worst[0]["score_name"] if worst else "score"
        lines += ["", "### Worst sequences", "", *_md_table(["seq", "prompt", "sample", name, "T", "response"], rows)]
    elif summary.get("worst_sequences"):
        w = summary["worst_sequences"]
        rows = [[str(x["seq_id"]), *_origin(x), fmt(x["score"]), f"{x['pos']}/{x['length']}",
                 f"{x['before'][-40:]}«{x['token']}»{x['after'][:30]}"] for x in w]  # fmt: skip
        header = ["seq", "prompt", "sample", w[0]["score_name"], "pos / T", "context"]
        lines += ["", "### Worst sequences", "", *_md_table(header, rows)]
    return "\n".join(lines) + "\n"


def _diff_label(r: dict[str, Any]) -> str:
    """A diff row's name, with the T of each side for B* at the observed lengths and a sign mark."""
    T = r.get("T")
    if r["metric"] == "B* at the observed length" and T and T[0] is not None and T[1] is not None:
        return r["metric"] + (f" T = {T[0]:,}" if T[0] == T[1] else f" (A: T = {T[0]:,}, B: T = {T[1]:,})")
    return r["metric"] + (" (signed)" if r.get("better") == "nearer 0" else "")


def _diff_change(r: dict[str, Any]) -> str:
    """Absolute change and relative change (of the magnitudes for a signed row); percentage points for fractions."""
    rel, change = r["relative"], r["change"]
    if change is None:
        return "-"
    if r.get("unit") == "fraction":
        return f"{100 * change:+.1f} pp"
    signed = "|.| " if r.get("better") == "nearer 0" else ""
    return fmt(change) + ("" if rel is None else f" ({signed}{100 * rel:+.1f}%)")


def render_diff(console: Console, result: dict[str, Any], a: str, b: str) -> None:
    """`trm-diag diff`: both verdicts, what changed between the runs, then one row per quantity with
    its change, coloured by direction."""
    console.print(f"[bold]A[/bold] {escape(a)}: {escape(result['verdicts'][0])}")
    console.print(f"[bold]B[/bold] {escape(b)}: {escape(result['verdicts'][1])}")
    for change in result.get("changes") or ():
        console.print(f"changed: {escape(change)}")
    title = (
        "B against A (lower is better; acceptance: higher; signed: nearer 0, by magnitude; "
        f"relative changes up to {result.get('same_below', 0):g} read as same)"
    )
    t = Table(title=title, title_justify="left")
    for c in ("metric", "A", "B", "change", ""):
        t.add_column(c, justify="left" if c in ("metric", "") else "right")
    styles = {"better": "green", "worse": "red", "same": "dim"}
    for r in result["rows"]:
        show = pct if r.get("unit") == "fraction" else fmt
        word = Text(r["direction"] or "", style=styles.get(r["direction"], ""))
        if r.get("note"):
            word.append(f" ({r['note']})" if r["direction"] else r["note"], style="dim")
        t.add_row(_diff_label(r), show(r["a"]), show(r["b"]), _diff_change(r), word)
    console.print(t)
    worse = sum(r["direction"] == "worse" for r in result["rows"])
    better = sum(r["direction"] == "better" for r in result["rows"])
    console.print(f"{better} better, {worse} worse, {sum(r['direction'] == 'same' for r in result['rows'])} unchanged")


def render_steps(console: Console, steps: list[dict[str, Any]] | None) -> None:
    """A training run's dump: the mismatch step by step (summary.json `steps`)."""
    if not steps:
        return
    t = Table(title="By training step (kl = verl's k1 mean over the step's tokens)", title_justify="left")
    for c in ("step", "rollouts", "tokens", "kl", "TRM-Max", "TRM Max+Avg"):
        t.add_column(c, justify="right")
    for r in steps:
        t.add_row(str(r["step"]), f"{r['n_sequences']:,}", f"{r['n_tokens']:,}", fmt(r["kl"]),
                  pct(r["accept_trm_max"]), pct(r["accept_combined"]))  # fmt: skip
    console.print(t)
