"""`trm-diag locate` rendering: one verdict line per token, then one bar per layer."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape

from trm_diag.run.locate import layer_bars


def render_locate(console: Console, summary: dict[str, Any]) -> None:
    """Per token: where the divergence enters; then the median relative error per layer as bars."""
    console.print(f"rollout {escape(summary['rollout'])}\ntrain   {escape(summary['train'])}", soft_wrap=True)
    for t in summary["tokens"]:
        console.print(f"seq {t['seq_id']} pos {t['pos']} (token {t['token_id']}): {escape(t['text'])}", soft_wrap=True)
        if t.get("bitwise"):
            console.print(f"  bitwise: {escape(t['bitwise']['text'])}", soft_wrap=True)
    console.print("median over the tokens of ||h_roll - h_train|| / ||h_train|| after each layer (log scale):")
    for layer, value, bar in layer_bars({int(k): v for k, v in summary["layer_median_rel_err"].items()}):
        console.print(f"  layer {layer:>3}  {value:9.2e}  {'█' * bar}")
    ranked = f"worst tokens by {summary['ranked_by']}; " if summary.get("ranked_by") else ""
    console.print(f"rule: {escape(summary['rule'])}; {ranked}every layer and component: locate.parquet", soft_wrap=True)
