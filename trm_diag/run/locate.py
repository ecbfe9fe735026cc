"""`trm-diag locate`: re-run chosen tokens of a report on both sides and find the layer where they part.

The report's summary.json names both backends (specs and models). The chosen sequences are run
teacher-forced on the rollout side, then on the training side (one engine at a time), capturing at the
chosen positions every decoder layer's attention output, MLP / MoE output and hidden state, the final
norm, the logits and MoE router logits (backends/capture.py). locate.parquet (token x layer x
component) and locate.json go into the report folder; the report's own files are not touched.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trm_diag.config import BackendSpec, SamplingConfig
from trm_diag.errors import InputError, UsageError
from trm_diag.math.locate_math import (
    FLOOR,
    JUMP,
    MODULE_WORDS,
    bits_differ,
    carrier,
    entry_layer,
    expert_flip,
    first_bit_difference,
    growth,
    relative_error,
)
from trm_diag.report.outputs import LOCATE_SUMMARY, LOCATE_TABLE
from trm_diag.report.tables import atomic_write, complete_report, read_schema, read_table, to_json
from trm_diag.run.pipeline import CompareResult, Engines, Reporter
from trm_diag.tiers import TIERS

WORST_POS = ("worst_pos", "kl_argmax")  # sequences.parquet's worst token position (kl_argmax: older reports)


@dataclass(frozen=True)
class LocateConfig:
    report: str
    top: int = 8  # the top-K tokens by the tier's locate column (when seq is None)
    seq: int | None = None
    pos: int | None = None  # None with seq: the sequence's worst token
    trust_remote_code: bool = False
    allow_pickle: bool = False
    bitwise: bool = False  # name the first module whose output differs by any bit (pairs meant to be identical)


def _sides(summary: dict[str, Any], where: str) -> tuple[BackendSpec, BackendSpec]:
    """The report's two backend specs, their models checked to be where the report found them."""
    from trm_diag.backends import parse_spec

    if summary.get("command") != "compare" or "spec" not in (summary.get("rollout") or {}):
        raise UsageError(
            f"'{where}' is a `{summary.get('command')}` report: it has no rollout backend to re-run",
            "locate needs a report written by `trm-diag compare`",
        )
    specs = []
    for side in ("rollout", "train"):
        spec = parse_spec(summary[side]["spec"])
        if not spec.model or not Path(spec.model).is_dir():
            raise InputError(
                f"the report's {side} model '{spec.model}' is no longer at its path",
                "put the checkpoint back there, or re-run compare with its new path",
            )
        specs.append(spec)
    return specs[0], specs[1]


def _same_weights_as_the_report(summary: dict[str, Any], specs: dict[str, BackendSpec]) -> None:
    """Each side's checkpoint must hold the weights the report measured (its weights fingerprint), or locate
    would explain another pair than the report's: NOT COMPARABLE (report/comparable.py)."""
    from trm_diag.backends.fingerprint import weights_fingerprint
    from trm_diag.report.comparable import NotComparable

    for side, spec in specs.items():
        recorded = (summary.get(side) or {}).get("weights_fingerprint")
        now = weights_fingerprint(spec.model) if recorded else None
        if recorded and now != recorded:
            raise NotComparable(
                f"the {side} checkpoint '{spec.model}' changed since the report (weights {recorded[:12]} then, "
                f"{str(now)[:12]} now)",
                "re-run compare on the checkpoints as they are, then locate",
            )


def choose_tokens(path: Path, summary: dict[str, Any], cfg: LocateConfig) -> list[tuple[int, int]]:
    """(seq_id, response position) of the tokens to locate: one token, a sequence's worst, or the top K."""
    table = path / "sequences.parquet"
    worst = next((c for c in WORST_POS if c in read_schema(table).names), WORST_POS[0])
    seqs = read_table(table, ["seq_id", "length", worst]).to_pandas()
    if cfg.seq is not None:
        hit = seqs[seqs["seq_id"] == cfg.seq]
        if hit.empty:
            raise UsageError(f"--seq {cfg.seq}: the report has no such sequence",
                             f"use a seq_id from 0 to {int(seqs['seq_id'].max())}")  # fmt: skip
        length = int(hit["length"].iloc[0])
        pos = cfg.pos if cfg.pos is not None else int(hit[worst].iloc[0])
        if not 0 <= pos < length:
            raise UsageError(f"--pos {pos}: sequence {cfg.seq} has {length} response tokens",
                             f"use a position from 0 to {length - 1}")  # fmt: skip
        return [(cfg.seq, pos)]
    if cfg.pos is not None:
        raise UsageError("--pos needs --seq", "pass --seq S --pos P, or --top K")
    if cfg.top < 1:
        raise UsageError(f"--top {cfg.top} must be >= 1", "use a positive integer")
    column = locate_column(summary, str(path))
    tokens = read_table(path / "tokens.parquet", ["seq_id", "pos", column]).to_pandas()
    worst = tokens.dropna(subset=[column]).nlargest(cfg.top, column)
    return [(int(s), int(p)) for s, p in zip(worst["seq_id"], worst["pos"])]


def locate_column(summary: dict[str, Any], where: str) -> str:
    """The token column the report's fidelity tier ranks its worst tokens by (tiers.Tier.locate: kl, the
    certified upper end kl_hi, or the sampled-token k2), as sequences.parquet's worst position does."""
    fidelity = summary.get("fidelity")
    if fidelity not in TIERS:
        raise InputError(
            f"'{where}' names no known fidelity ({fidelity!r})", "re-run the command that writes the report"
        )
    return TIERS[fidelity].locate


def _capture_side(
    spec: BackendSpec, seqs: dict[int, tuple[list[int], list[int]]], want: dict[int, list[int]], cfg: LocateConfig,
    sampling: SamplingConfig, engines: Engines, rep: Reporter, label: str,
) -> dict[int, dict[str, Any]]:  # fmt: skip
    """One side: per sequence, the captured states at the wanted response positions and their logits."""
    backend = engines.load(spec, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    out: dict[int, dict[str, Any]] = {}
    with rep.phase(f"capture {label}", len(seqs), "sequences") as advance:
        for sid, (prompt, response) in seqs.items():
            absolute = [len(prompt) - 1 + p for p in want[sid]]  # the state at j predicts token j + 1
            cap = backend.capture_layers(prompt + response, absolute)
            rows = backend.score([(prompt, response)], sampling)[0]
            logits = {p: rows.scores(p, p + 1)[0].double().numpy() for p in want[sid]}
            out[sid] = {"capture": cap, "absolute": dict(zip(want[sid], absolute)), "logits": logits,
                        "moe": backend.moe}  # fmt: skip
            advance(1)
    backend.close()
    return out


def _token_rows(sid: int, pos: int, roll: dict[str, Any], train: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of locate.parquet for one token: every (layer, component), then final norm and logits."""
    a_cap, b_cap = roll["capture"], train["capture"]
    ap, bp = roll["absolute"][pos], train["absolute"][pos]
    rows = []
    layers = max(layer for layer, _ in b_cap.states) if b_cap.states else 0
    k = train["moe"][1] if train["moe"] else 0
    for (layer, comp), values in sorted(b_cap.states.items(), key=lambda kv: (kv[0][0], kv[0][1] != "attn")):
        other = a_cap.states.get((layer, comp), {})
        if ap not in other or bp not in values:
            continue
        flip = math.nan
        if k and layer in a_cap.router and layer in b_cap.router and comp == "mlp":
            flip = float(expert_flip(a_cap.router[layer][ap].numpy(), b_cap.router[layer][bp].numpy(), k))
        rows.append({"seq_id": sid, "pos": pos, "layer": layer, "component": comp,
                     "rel_err": relative_error(other[ap].numpy(), values[bp].numpy()), "expert_flip": flip})  # fmt: skip
    rows.append({"seq_id": sid, "pos": pos, "layer": layers + 1, "component": "logits",
                 "rel_err": relative_error(roll["logits"][pos] - roll["logits"][pos].mean(),
                                           train["logits"][pos] - train["logits"][pos].mean()),
                 "expert_flip": math.nan})  # fmt: skip
    return rows


def _steps(pos: int, roll: dict[str, Any], train: dict[str, Any]) -> list[tuple[int, str, Any, Any]]:
    """(layer, component, rollout output, training output) of one token, in the order the network computes them:
    per layer attention, router, MLP, residual stream; then the final norm and the logits."""
    a_cap, b_cap = roll["capture"], train["capture"]
    ap, bp = roll["absolute"][pos], train["absolute"][pos]
    order = {"attn": 0, "router": 1, "mlp": 2, "layer": 3, "final_norm": 4}
    found = [(layer, comp, a_cap.states.get((layer, comp), {}).get(ap), v.get(bp))
             for (layer, comp), v in b_cap.states.items()]  # fmt: skip
    found += [(layer, "router", a_cap.router.get(layer, {}).get(ap), v.get(bp)) for layer, v in b_cap.router.items()]
    found = sorted(((la, c, a, b) for la, c, a, b in found if a is not None and b is not None),
                   key=lambda x: (x[0], order[x[1]]))  # fmt: skip
    last = max((la for la, *_ in found), default=0) + 1
    steps = [(la, c, a.numpy(), b.numpy()) for la, c, a, b in found]
    return steps + [(last, "logits", roll["logits"][pos], train["logits"][pos])]


def bitwise_verdict(pos: int, roll: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    """locate --bitwise for one token: the first module whose output differs by any bit, in data and in words."""
    steps = _steps(pos, roll, train)
    first = first_bit_difference(steps)
    if first is None:
        return {"first_differing": None, "text": f"BITWISE EQUAL through all {len(steps)} captured outputs"}
    layer, comp = first
    where = f"layer {layer}, {MODULE_WORDS[comp]}" if comp in ("attn", "router", "mlp", "layer") else MODULE_WORDS[comp]
    n = sum(bits_differ(a, b) for _, _, a, b in steps)
    return {"first_differing": {"layer": layer, "component": comp},
            "text": f"first differs by a bit at {where} ({n} of {len(steps)} captured outputs differ)"}  # fmt: skip


def token_verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Where one token's divergence enters (docs/design.md section 8), in data and in words."""
    by = {(r["layer"], r["component"]): r for r in rows}
    layer_err = [by[(i, "layer")]["rel_err"] for i in sorted(i for i, c in by if c == "layer")]
    g = growth(layer_err)
    for i, gi in enumerate(g):
        by[(i, "layer")]["growth"] = gi
    enters = entry_layer(layer_err)
    flips = sorted(r["layer"] for r in rows if r["expert_flip"] == 1.0)
    out: dict[str, Any] = {"enters": enters, "flips": flips, "max_layer_err": max(layer_err, default=math.nan)}
    if enters is None:
        words = f"no layer jumps (largest layer error {out['max_layer_err']:.2g}): the sides agree to rounding"
        out["component"] = None
    else:
        before = layer_err[enters - 1] if enters else 0.0
        comp = carrier(by.get((enters, "attn"), {}).get("rel_err", 0.0), by.get((enters, "mlp"), {}).get("rel_err", 0.0),
                       before)  # fmt: skip
        out["component"] = comp
        if enters == 0:
            words = f"enters at layer 0, {comp} (error {layer_err[0]:.2g}: the sides differ from the first layer on)"
        elif max(layer_err[:enters]) < FLOOR:  # the growth is against FLOOR, not against a measured error
            agree = "bit-equal" if max(layer_err[:enters]) == 0 else f"below {FLOOR:g}, float32 rounding"
            words = f"enters at layer {enters}, {comp} (error {layer_err[enters]:.2g}; the layers before are {agree})"
        else:
            words = (
                f"enters at layer {enters}, {comp} (error {layer_err[enters]:.2g}, {g[enters]:.3g}x the layer before)"
            )
        if enters in flips:
            words += f"; router flip at layer {enters}"
        jump = max(range(enters + 1, len(g)), key=lambda i: g[i], default=None)
        if jump is not None and g[jump] >= JUMP:  # a second, later jump (a router flip, one odd kernel)
            words += f"; largest later jump at layer {jump} ({g[jump]:.3g}x)"
    if flips and enters not in flips:
        words += f"; router flips at layer(s) {', '.join(map(str, flips))}"
    out["text"] = words
    return out


def run_locate(cfg: LocateConfig, reporter: Reporter | None = None) -> CompareResult:
    """Re-run the chosen tokens of a compare report on both sides; write locate.parquet and locate.json."""
    import pandas as pd

    rep = reporter or Reporter()
    t0 = time.perf_counter()
    path, summary = complete_report(cfg.report)
    roll_spec, train_spec = _sides(summary, cfg.report)
    from trm_diag.backends.checkpoint import check_checkpoint

    for spec in (roll_spec, train_spec):
        check_checkpoint(spec.model, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    _same_weights_as_the_report(summary, {"rollout": roll_spec, "train": train_spec})
    tokens = choose_tokens(path, summary, cfg)
    seq_table = read_table(path / "sequences.parquet", ["seq_id", "prompt_token_ids", "response_token_ids"]).to_pandas()
    seq_table = seq_table[seq_table["seq_id"].isin({s for s, _ in tokens})]
    seqs = {int(s): (list(map(int, p)), list(map(int, r)))
            for s, p, r in zip(seq_table["seq_id"], seq_table["prompt_token_ids"], seq_table["response_token_ids"])}  # fmt: skip
    want: dict[int, list[int]] = {}
    for s, p in tokens:
        want.setdefault(s, []).append(p)
    temperature = float(summary.get("sampling", {}).get("temperature", 1.0)) or 1.0
    sampling = SamplingConfig(temperature=temperature, topk=0)
    if roll_spec.name == "vllm":  # hooks need the eager modules (CUDA graphs and compilation bypass them)
        roll_spec = BackendSpec(roll_spec.name, {**roll_spec.options, "enforce_eager": "true"}, roll_spec.text)
    if train_spec.name == "vllm":
        train_spec = BackendSpec(train_spec.name, {**train_spec.options, "enforce_eager": "true"}, train_spec.text)
    with Engines() as engines:
        roll = _capture_side(roll_spec, seqs, want, cfg, sampling, engines, rep, "rollout")
        train = _capture_side(train_spec, seqs, want, cfg, sampling, engines, rep, "train")
    rows, verdicts = [], []
    for s, p in tokens:
        token_rows = _token_rows(s, p, roll[s], train[s])
        v = token_verdict(token_rows)
        for r in token_rows:
            r["enters"] = r["component"] == "layer" and r["layer"] == v["enters"]
        rows += token_rows
        token_id = seqs[s][1][p]
        verdicts.append(
            {"seq_id": s, "pos": p, "token_id": token_id, **{k: v[k] for k in ("enters", "component", "flips", "text")}}
        )
        if cfg.bitwise:  # the first module whose output differs by any bit
            verdicts[-1]["bitwise"] = bitwise_verdict(p, roll[s], train[s])
    df = pd.DataFrame(rows)
    df["growth"] = df.get("growth", pd.Series(dtype=float))
    atomic_write(path / LOCATE_TABLE, lambda tmp: df.to_parquet(tmp, index=False))
    layers = df[df["component"] == "layer"].groupby("layer")["rel_err"].median()
    out = {
        "tool": "trm-diag",
        "command": "locate",
        "report": str(path),
        "rollout": roll_spec.describe(),
        "train": train_spec.describe(),
        "rule": f"enters at the first layer with r_l >= {JUMP:g} x max(r_0..r_(l-1), {FLOOR:g})",
        "ranked_by": locate_column(summary, str(path)),  # the token column the worst tokens are chosen by
        "tokens": verdicts,
        "bitwise": cfg.bitwise,
        "layer_median_rel_err": {int(k): float(v) for k, v in layers.items()},
        "seconds": time.perf_counter() - t0,
    }
    atomic_write(path / LOCATE_SUMMARY, lambda tmp: Path(tmp).write_text(to_json(out) + "\n"))
    return CompareResult(path, out)


def layer_bars(medians: dict[int, float]) -> list[tuple[int, float, int]]:
    """(layer, median error, bar length 0..30) on a log scale from FLOOR / 10 to the largest error."""
    if not medians:
        return []
    lo = math.log10(FLOOR / 10)
    hi = max(math.log10(max(max(medians.values()), FLOOR)), lo + 1)
    return [(k, v, int(round(30 * (math.log10(max(v, 10**lo)) - lo) / (hi - lo)))) for k, v in sorted(medians.items())]
