"""Test helpers shared across modules."""

from __future__ import annotations

import pytest

from trm_diag.cli import main


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the real CLI entry point in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def main_exit(argv: list[str]) -> int:
    """Run the real CLI entry point in-process, output left alone: its exit code (any other exception escapes)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return int(e.value.code or 0)


def token_columns(r, p_rows, q_rows, fidelity, vocab_width, chunk_elements=None, experts_per_token=None):
    """scoring.batch_columns of one rollout."""
    from trm_diag.math.divergence import DEFAULT_CHUNK_ELEMENTS
    from trm_diag.math.scoring import batch_columns

    p = None if p_rows is None else [p_rows]
    chunk = chunk_elements or DEFAULT_CHUNK_ELEMENTS
    return batch_columns([r], p, [q_rows], fidelity, vocab_width, chunk, experts_per_token)[0]


def t95_reference(df: int) -> float:
    """Student's t one-sided 95% quantile by root-finding on its CDF (mpmath's regularised incomplete beta)."""
    import mpmath as mp

    mp.mp.dps = 30
    cdf = lambda t: 1 - 0.5 * mp.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True)  # noqa: E731
    return float(mp.findroot(lambda t: cdf(t) - 0.95, 1.7))
