"""`trm-diag gate` on inputs a CI job meets: an exact-tier rule on another tier's report, a shard or partial
merge gated (or used as the baseline), a run's verl names in `--list-metrics`."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import main_exit, run_cli


def _compare(out, model, *extra):
    assert main_exit(["compare", "--model", str(model), "--rollout", "hf:dtype=bfloat16", "--num-prompts", "2",
                      "--max-new-tokens", "6", "--out", str(out), "-q", *extra]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def reports(tmp_path_factory, dense_model):
    d = tmp_path_factory.mktemp("gate-inputs")
    return {
        "exact": _compare(d / "exact", dense_model),
        "topk": _compare(d / "topk", dense_model, "--fidelity", "topk"),
        "sampled": _compare(d / "sampled", dense_model, "--fidelity", "sampled"),
    }


@pytest.mark.parametrize(
    "tier,rule,use",
    [
        ("topk", "token.kl.p99 <= 1e-3", "use token.kl_hi.p99 (its certified upper end; token.kl_lo.p99 the lower)"),
        ("topk", "token.tv.max <= 0.1", "use token.tv_hi.max"),
        ("sampled", "token.kl.p99 <= 1e-3", "use token.k3.p99 or token.abs_log_ratio.p99"),
        ("sampled", "token.tv.mean <= 0.1", "use token.abs_log_ratio.mean"),
    ],
)
def test_an_exact_tier_rule_on_another_tier_names_that_tiers_numbers(reports, tier, rule, use, capsys):
    """README's first gate rule (token.kl.p99) on a top-K or sampled report: the error says why and names the
    tier's own number, not the nearest spellings (token.k3.p99, token.k2.p99, token.k1.p99)."""
    code, _, err = run_cli(["gate", str(reports[tier]), "-r", rule], capsys)
    name = rule.split()[0]
    assert code == 2 and f"'{name}' needs the exact tier" in err and f"is {tier}" in err and use in err, err
    assert "did you mean" not in err and "Traceback" not in err
    use_name = use.removeprefix("use ").split()[0]
    code, _, err = run_cli(["gate", str(reports[tier]), "-r", f"{use_name} <= 1e9"], capsys)
    assert code == 0, err  # the name it points to answers


def test_a_shard_or_partial_merge_says_it_covers_part_of_the_prompts(reports, tmp_path, capsys):
    """A report of one shard, or a --partial merge, gated (or used as the baseline): a warning that its
    numbers are those prompts' only; the exit code is the rules'."""
    shard, part = tmp_path / "shard", tmp_path / "part"
    for folder, edit in ((shard, {"shard": "0/3"}),
                         (part, {"coverage": {"split": 3, "shards": ["0/3", "1/3"], "missing": ["2/3"],
                                              "complete": False, "partial": True}})):  # fmt: skip
        shutil.copytree(reports["exact"], folder)
        summary = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps({**summary, **edit}))
    code, _, err = run_cli(["gate", str(part), "-r", "token.kl.p99 <= 1"], capsys)
    assert code == 0 and f"'{part}' merges 2 of 3 shards (missing 2/3, --partial)" in err
    code, _, err = run_cli(["gate", str(reports["exact"]), "--baseline", str(shard), "-r", "token.kl.p99 <= baseline"],
                           capsys)  # fmt: skip
    assert code == 0 and f"baseline '{shard}' is shard 0/3 of a --shard split" in err
    code, _, err = run_cli(["gate", str(reports["exact"]), "-r", "token.kl.p99 <= 1"], capsys)
    assert code == 0 and "warning" not in err


def test_a_runs_verl_metrics_are_listed_as_verls():
    """`gate --list-metrics RUN` has the same `by` column as a report's: verl's kl is verl's there too."""
    from trm_diag.report.gate_names import defined_by

    assert defined_by("metrics.kl") == "verl" and defined_by("trend.last.kl") == "verl"
    assert defined_by("trend.max.k3_kl") == "verl" and defined_by("trend.max.abs_log_ratio_mean") == "trm-diag"
    assert defined_by("trend.max.abs_log_ratio.p99") == "trm-diag" and defined_by("trend.steps") == "trm-diag"
