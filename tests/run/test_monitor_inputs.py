"""trm_diag.Monitor fed what training loops pass: the trainer's log-probs with their graph, NaN / inf on padding
(ignored) and on response tokens (refused), malformed kept_mass / advantages, a bad rank, and two writers of
one rank on one folder. Every expected number is a float64 numpy reference over the masked tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trm_diag.errors import InputError, UsageError


def padded(seed: int, B: int = 6, T: int = 24, dtype: torch.dtype = torch.float32) -> tuple:
    """Seeded log-probs [B, T] of both sides and a right-padded 0/1 float mask (sequence 2 fully masked)."""
    g = torch.Generator().manual_seed(seed)
    lp_roll = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lp_train = lp_roll + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[2] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float32)
    return lp_roll.to(dtype), lp_train.to(dtype), mask


def k1_mean(lp_roll: torch.Tensor, lp_train: torch.Tensor, mask: torch.Tensor) -> float:
    """verl's kl (mean over response tokens of log q - log p), from the inputs as the caller holds them."""
    r, t, m = (x.detach().double().numpy() for x in (lp_roll, lp_train, mask))
    keep = m != 0
    return float(np.mean(r[keep] - t[keep]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_trainers_log_probs_with_their_graph_are_read_and_the_loss_still_backpropagates(dtype):
    from trm_diag import Monitor

    lp_roll, lp_train, mask = padded(0, dtype=dtype)
    lp_train = lp_train.clone().requires_grad_(True)  # the trainer's log-probs, as a loop holds them
    res = Monitor().update(3, lp_roll, lp_train, mask)
    # the reference reads the same low-precision values widened to float64, as the Monitor does: only summation
    # order differs
    assert res["kl"] == pytest.approx(k1_mean(lp_roll, lp_train, mask), rel=1e-12)
    assert res["n_tokens"] == int(mask.sum())
    loss_per_seq = (lp_train.float() * mask).sum(-1)
    loss = (loss_per_seq * res.mask).sum() / res.mask.sum().clamp(min=1)  # docs/trend.md's line
    loss.backward()
    assert lp_train.grad is not None
    ragged = Monitor().update(
        3, [r[m != 0] for r, m in zip(lp_roll, mask)], [t[m != 0] for t, m in zip(lp_train, mask)]
    )
    assert ragged["kl"] == res["kl"]


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool, torch.int64])
def test_nan_and_inf_on_padding_are_ignored(mask_dtype):
    from trm_diag import Monitor

    lp_roll, lp_train, mask = padded(1)
    dirty_r, dirty_t = lp_roll.clone(), lp_train.clone()
    pad = mask == 0
    dirty_r[pad], dirty_t[pad] = float("nan"), float("inf")
    dirty_r[2, 0] = float("-inf")  # the fully masked sequence
    res = Monitor().update(0, dirty_r, dirty_t, mask.to(mask_dtype))
    assert res["kl"] == pytest.approx(k1_mean(lp_roll, lp_train, mask), rel=1e-12)
    assert res["n_tokens"] == int(mask.sum()) and np.isfinite(res["k3_kl"])


@pytest.mark.parametrize(
    "side, value", [("logp_rollout", float("nan")), ("logp_train", float("nan")), ("logp_train", float("inf"))]
)
def test_nan_or_inf_on_a_response_token_is_refused_with_its_place(side, value):
    from trm_diag import Monitor

    lp_roll, lp_train, mask = padded(2)
    x = lp_roll if side == "logp_rollout" else lp_train
    x[4, 0] = value
    x[5, 0] = value
    with pytest.raises(
        UsageError, match=rf"{side} is {value} at 2 response token\(s\) \(first: sequence 4, position 0\)"
    ):
        Monitor().update(0, lp_roll, lp_train, mask)
    # ragged: sequence 2 is empty, so the flat index of sequence 4's first token is not 4 * T
    rr = [r[m != 0] for r, m in zip(lp_roll, mask)]
    rt = [t[m != 0] for t, m in zip(lp_train, mask)]
    with pytest.raises(UsageError, match=r"\(first: sequence 4, position 0\)"):
        Monitor().update(0, rr, rt)


def test_malformed_kept_mass_and_advantages_are_one_line_errors():
    from trm_diag import Monitor

    lp_roll, lp_train, mask = padded(3)
    B, T = mask.shape
    rr = [r[m != 0] for r, m in zip(lp_roll, mask)]
    rt = [t[m != 0] for t, m in zip(lp_train, mask)]
    km = [torch.full((len(r),), 0.9) for r in rr]
    res = Monitor().update(0, rr, rt, kept_mass=km)
    assert res["kept_mass_mean"] == pytest.approx(0.9, rel=1e-7)
    with pytest.raises(UsageError, match="kept_mass"):  # one sequence's kept mass one token short
        Monitor().update(0, rr, rt, kept_mass=[*km[:-1], km[-1][:-1]])
    with pytest.raises(UsageError, match=r"kept_mass list is not \[B, T\]"):
        Monitor().update(0, lp_roll, lp_train, mask, kept_mass=[0.9] * B)
    dppo = Monitor(criterion="dppo_tv")
    with pytest.raises(UsageError, match=r"advantages \(7,\) are not \[B\] = \[6\]"):
        dppo.update(0, lp_roll, lp_train, mask, advantages=torch.ones(B + 1))
    with pytest.raises(UsageError, match="advantages"):
        dppo.update(0, lp_roll, lp_train, mask, advantages=torch.ones(B, T - 1))
    # [B, 1], as a loss broadcasts it, is the per-sequence advantage
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(B, generator=g)
    lp_far = lp_train.clone()
    lp_far[mask != 0] += 2.0 * torch.sign(torch.randn(int(mask.sum()), generator=g))  # DPPO drops some tokens
    a = dppo.update(1, lp_roll, lp_far, mask, advantages=adv).mask
    b = dppo.update(2, lp_roll, lp_far, mask, advantages=adv[:, None]).mask
    assert torch.equal(a, b) and not bool(a[mask != 0].all())


@pytest.mark.parametrize("rank, env", [(-1, None), (None, "abc"), (1.5, None)])
def test_a_bad_rank_is_refused_before_anything_is_written(tmp_path, monkeypatch, rank, env):
    from trm_diag import Monitor

    if env is not None:
        monkeypatch.setenv("RANK", env)
    with pytest.raises(UsageError, match="not a non-negative integer"):
        Monitor(out=tmp_path / "run", rank=rank)
    assert not (tmp_path / "run").exists()


def test_two_writers_of_one_rank_are_refused_and_no_step_is_lost(tmp_path):
    from trm_diag import Monitor
    from trm_diag.report.run_log import read_run

    run = tmp_path / "run"
    first = Monitor(out=run)
    first.update(0, *padded(4))
    with pytest.raises(UsageError, match="rank 0 of run .* is being written by another Monitor"):
        Monitor(out=run)
    other_rank = Monitor(out=run, rank=1)  # another rank may write beside it
    other_rank.update(0, *padded(5))
    first.update(1, *padded(6))
    first.close()
    other_rank.close()
    with Monitor(out=run) as again:  # closed: the rank can be continued
        again.update(2, *padded(7))
    data = read_run(run)
    assert list(data.steps["step"]) == [0, 1, 2]
    r0 = data.by_rank[data.by_rank["rank"] == 0]
    assert list(r0["step"]) == [0, 1, 2]
    lp_roll, lp_train, mask = padded(4)
    assert float(r0["kl"].iloc[0]) == pytest.approx(k1_mean(lp_roll, lp_train, mask), rel=1e-12)


def test_reading_a_file_as_a_run_says_it_is_a_file(tmp_path):
    from trm_diag.report.run_log import read_run

    f = tmp_path / "steps.txt"
    f.write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        read_run(f)


@pytest.mark.parametrize("criterion", ["combined", "dppo_tv"])
def test_micro_batches_of_one_step_log_the_whole_step(tmp_path, criterion):
    """A loop with gradient accumulation calls update once per micro-batch with the same step (TRL's _compute_loss
    with global_step): the step's row is all its micro-batches, each piece's mask is its own."""
    from trm_diag import Monitor
    from trm_diag.report.run_log import read_run

    g = torch.Generator().manual_seed(8)
    pieces = {}
    with Monitor(out=tmp_path / "run", criterion=criterion) as mon:
        for step in range(3):
            for _ in range(4):
                lp_roll = -torch.rand(2, 12, generator=g, dtype=torch.float64) * 3
                lp_train = lp_roll + 0.3 * torch.randn(2, 12, generator=g, dtype=torch.float64)
                mask = torch.ones(2, 12)
                mask[1, 7:] = 0
                res = mon.update(step, lp_roll, lp_train, mask)
                alone = Monitor(criterion=criterion).update(step, lp_roll, lp_train, mask)
                assert torch.equal(res.mask, alone.mask)
                pieces.setdefault(step, []).append((lp_roll, lp_train, mask))
        assert mon.history["step"] == [0.0, 1.0, 2.0]  # the online rules see one value per step
    steps = read_run(tmp_path / "run").steps
    assert list(steps["n_sequences"]) == [8, 8, 8]
    for step, ps in pieces.items():
        diffs = np.concatenate([(r - t).numpy()[m.numpy() != 0] for r, t, m in ps])
        row = steps[steps["step"] == step].iloc[0]
        assert row["n_tokens"] == diffs.size
        assert row["kl"] == pytest.approx(float(np.mean(diffs)), rel=1e-12)
    # a later session logging a step again replaces it (a job resumed from an earlier checkpoint)
    with Monitor(out=tmp_path / "run", criterion=criterion) as mon:
        mon.update(2, *pieces[2][0])
    assert list(read_run(tmp_path / "run").steps["n_sequences"]) == [8, 8, 2]


def test_a_step_whose_mask_is_all_zero_has_no_acceptance_and_fails_an_acceptance_gate(tmp_path, capsys):
    """No token tested by any criterion: acceptance unknown (NaN), never a vacuous 100% that passes a gate."""
    from tests.helpers import run_cli
    from trm_diag import Monitor

    lp_r, lp_t, mask = padded(3)
    with Monitor(out=tmp_path / "run") as mon:
        mon.update(0, lp_r, lp_t, mask)
        res = mon.update(1, lp_r, lp_t, torch.zeros_like(mask))
    assert res.metrics["n_tokens"] == 0
    assert all(np.isnan(v) for k, v in res.metrics.items() if k.startswith("accept_"))
    code, _, _ = run_cli(["gate", str(tmp_path / "run"), "-r", "trend.last.accept_trm_max >= 0.7"], capsys)
    assert code == 1  # the last step's acceptance is unknown: the rule does not pass
    code, _, err = run_cli(["gate", str(tmp_path / "run"), "-r", "trend.max.accept_trm_max >= 0.7"], capsys)
    assert code == 0, err  # step 0's acceptance is there
    code, out, err = run_cli(["trend", str(tmp_path / "run")], capsys)
    assert code == 0 and "nan" not in out.lower(), out  # the empty step reads as n/a, not a number


def test_a_step_that_a_rank_did_not_log_is_named(tmp_path, capsys):
    """Two ranks, one of which skips step 1: the merged step 1 holds one rank's batch, and trend says so."""
    from tests.helpers import run_cli
    from trm_diag import Monitor
    from trm_diag.report.run_log import read_run

    for rank in (0, 1):
        with Monitor(out=tmp_path / "run", rank=rank) as mon:
            for step in (0, 1, 2):
                if rank == 1 and step == 1:
                    continue
                mon.update(step, *padded(10 * rank + step))
    data = read_run(tmp_path / "run")
    assert list(data.steps["n_sequences"]) == [12, 6, 12]
    assert len(data.notes) == 1 and "1 step(s) logged by fewer ranks than the run's 2 (steps 1)" in data.notes[0]
    code, out, _ = run_cli(["trend", str(tmp_path / "run")], capsys)
    assert code == 0 and "fewer ranks than the run's 2" in " ".join(out.split())


def test_an_all_masked_row_or_rank_changes_no_bound_input(tmp_path):
    """A row whose mask is all zero (an overlong-filtered sample) samples no trajectory: D_KL^seq, D_TV^seq and B*
    are those of the batch without it; a rank whose whole batch is masked leaves the merged step the other's."""
    from trm_diag import Monitor
    from trm_diag.report.run_log import read_run

    lp_r, lp_t, mask = padded(11)
    base = Monitor(horizons=(1024,)).update(0, lp_r, lp_t, mask).metrics
    masked = mask.clone()  # padded() masks row 2 whole already; row 3 too now
    masked[3] = 0
    keep = [i for i in range(len(mask)) if i != 3]
    with_row = Monitor(horizons=(1024,)).update(0, lp_r, lp_t, masked).metrics
    without = Monitor(horizons=(1024,)).update(0, lp_r[keep], lp_t[keep], mask[keep]).metrics
    assert with_row["n_sequences"] == len(mask) and without["n_sequences"] == len(mask) - 1
    for k in ("kl_seq", "kl_seq_mean", "tv_seq", "kl_rate", "bstar_obs", "bstar@1024"):
        assert with_row[k] == pytest.approx(without[k], rel=1e-12), k
    assert with_row["kl_seq"] != base["kl_seq"]  # the row did carry tokens before it was masked
    for rank in (0, 1):
        with Monitor(out=tmp_path / "run", horizons=(1024,), rank=rank) as mon:
            mon.update(0, lp_r, lp_t, mask if rank == 0 else torch.zeros_like(mask))
    row = read_run(tmp_path / "run").steps.iloc[0]
    assert row["n_sequences"] == 2 * len(mask) and row["n_tokens"] == base["n_tokens"]
    for k in ("kl_seq", "tv_seq", "accept_trm_max", "kl", "bstar@1024"):
        assert row[k] == pytest.approx(base[k], rel=1e-12), k


def test_a_job_resumed_from_an_earlier_checkpoint_drops_the_abandoned_steps_from_its_history(tmp_path):
    """Steps 0-9 logged, the job restarts from step 5: the online rules compare step 5 with steps 0-4, not with
    the abandoned 5-9 (the reader, too, keeps each step's latest row)."""
    from trm_diag import Monitor
    from trm_diag.report.run_log import read_run

    with Monitor(out=tmp_path / "run") as mon:
        for step in range(10):
            mon.update(step, *padded(step))
    with Monitor(out=tmp_path / "run") as mon:
        assert mon.history["step"] == list(range(10))
        mon.update(5, *padded(50))
        assert mon.history["step"] == [0, 1, 2, 3, 4, 5]
        mon.update(6, *padded(60))
        assert mon.history["step"] == [0, 1, 2, 3, 4, 5, 6]
    with Monitor(out=tmp_path / "run") as mon:  # one row per step: the latest of each
        assert mon.history["step"] == list(range(10))
        steps = read_run(tmp_path / "run").steps.set_index("step")
        assert mon.history["abs_log_ratio_mean"][5] == pytest.approx(steps.loc[5, "abs_log_ratio_mean"], rel=1e-12)
