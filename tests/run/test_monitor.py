"""trm_diag.Monitor without a model: a slow drift and its rate, a run killed and continued, reading while a
run writes, several ranks merged, ragged inputs, the one host copy, bad inputs, and the light import."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trm_diag.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]


def batch(seed: int, sigma: float, B: int = 16, T: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded sampler / trainer log-probs [B, T] whose log ratio is N(0, sigma^2), and a ragged response mask."""
    g = torch.Generator().manual_seed(seed)
    lp_roll = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lp_train = lp_roll + sigma * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return lp_roll, lp_train, mask


def test_a_slow_drift_is_flagged_with_its_rate(tmp_path):
    """The log ratio's scale grows linearly over 60 steps: E|lr| = sigma sqrt(2/pi), so the mean |log ratio| rises
    at 100 * rate * sqrt(2/pi) per 100 steps; the trend names the drift and that rate (within 15%)."""
    from trm_diag import Monitor
    from trm_diag.report.trend_report import run_trend

    base, rate = 0.01, 2e-4  # sigma per step: a 2x rise over 50 steps
    with Monitor(out=tmp_path / "run") as mon:
        for step in range(60):
            mon.update(step, *batch(step, base + rate * step))
    res = run_trend(tmp_path / "run")
    drifts = [f for f in res.flags if f.kind == "drift"]
    assert len(drifts) == 1 and not [f for f in res.flags if f.kind == "spike"]
    d = drifts[0]
    assert d.last_step == 59 and d.step >= 19  # judged once 20 steps are in
    want = 100 * rate * np.sqrt(2 / np.pi)
    assert d.detail["per_100_steps"] == pytest.approx(want, rel=0.15)
    assert "per 100 steps" in d.message and "staleness" in d.action


def test_a_flat_run_has_no_flags(tmp_path):
    """Noise alone (the same scale every step, 60 steps): no spike, no drift."""
    from trm_diag import Monitor
    from trm_diag.report.trend_report import run_trend

    with Monitor(out=tmp_path / "run") as mon:
        for step in range(60):
            mon.update(step, *batch(step, 0.01))
    assert [f.message for f in run_trend(tmp_path / "run").flags if f.kind != "acceptance"] == []


WRITER = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from tests.run.test_monitor import batch
    from trm_diag import Monitor
    first, last, pause = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    mon = Monitor(out=sys.argv[1], horizons=(1024,))
    for step in range(first, last):
        mon.update(step, *batch(step, 0.01))
        print(step, flush=True)
        time.sleep(pause)
    mon.close()
    """
)


def _writer(tmp_path: Path, run: Path, first: int, last: int, pause: float) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(ROOT)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(script), str(run), str(first), str(last), str(pause)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_killed_and_continued_loses_at_most_the_step_in_flight(tmp_path):
    from trm_diag.report.run_log import read_run

    run = tmp_path / "run"
    p = _writer(tmp_path, run, 0, 1000, 0.02)
    done = []
    for line in p.stdout:  # wait until some steps are written, then kill -9 mid-run
        done.append(int(line))
        if len(done) >= 6:
            break
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    before = read_run(run).by_rank
    steps = before["step"].tolist()
    assert steps == list(range(len(steps))) and len(steps) >= len(done)  # every reported step is on disk
    assert not [f for f in (run / "steps").iterdir() if not f.name.endswith(".parquet") or f.name.startswith(".")]
    # continue the run into the same folder from the next step
    q = _writer(tmp_path, run, len(steps), len(steps) + 5, 0.0)
    assert q.wait(timeout=120) == 0, q.stderr.read()
    after = read_run(run)
    assert after.steps["step"].tolist() == list(range(len(steps) + 5))
    kept = after.by_rank.set_index("step").loc[steps]
    assert kept["time"].tolist() == before["time"].tolist()  # the first session's rows are untouched
    assert set(after.by_rank["attempt"]) == {1, 2}


def test_reading_while_a_run_writes(tmp_path):
    """trend reads a folder a live run is writing: every read succeeds, the steps only grow, and a step's length
    buckets appear with its row."""
    from trm_diag.report.run_log import COMPACT_EVERY
    from trm_diag.report.trend_report import run_trend

    run = tmp_path / "run"
    p = _writer(tmp_path, run, 0, 40, 0.0)
    seen = [0]
    while p.poll() is None or seen[-1] < 40:
        if not (run / "run.json").exists():
            time.sleep(0.01)
            continue
        res = run_trend(run)
        n = len(res.data.steps)
        assert n >= seen[-1] and res.data.steps["step"].tolist() == list(range(n))
        assert set(res.data.buckets["step"]) <= set(res.data.steps["step"])
        seen.append(n)
        if p.poll() is not None and n == 40:
            break
    assert p.returncode == 0 and seen[-1] == 40 and len(set(seen)) > 2  # reads saw the run growing
    assert COMPACT_EVERY > 40 and len(list((run / "steps").iterdir())) == 1  # close() compacted the parts


def test_ranks_write_their_own_parts_and_readers_merge_them(tmp_path):
    """Two ranks log one step each with half the batch: the merged row is the whole batch's (counts summed,
    token and sequence means weighted, maxima, B* from the merged inputs)."""
    from trm_diag import Monitor
    from trm_diag.report.run_log import read_run

    lp_r, lp_t, mask = batch(3, 0.02, B=16)
    whole = Monitor(horizons=(1024,)).update(0, lp_r, lp_t, mask).metrics
    for rank in (0, 1):
        with Monitor(out=tmp_path / "run", horizons=(1024,), rank=rank) as mon:
            sl = slice(8 * rank, 8 * rank + 8)
            mon.update(0, lp_r[sl], lp_t[sl], mask[sl])
    data = read_run(tmp_path / "run")
    assert sorted(data.by_rank["rank"]) == [0, 1] and len(data.steps) == 1
    row = data.steps.iloc[0]
    for k in ("n_tokens", "n_sequences", "kl", "k3_kl", "abs_log_ratio_mean", "abs_log_ratio_max", "accept_trm_max",
              "accept_combined", "rollout_log_ppl", "delta", "kl_seq", "kl_seq_mean", "tv_seq", "kl_rate", "token_k2_max"):  # fmt: skip
        assert row[k] == pytest.approx(whole[k], rel=1e-12), k
    assert row["bstar@1024"] == pytest.approx(whole["bstar@1024"], rel=1e-9)
    assert row["token_k1_p99"] >= min(whole["token_k1_p99"], row["token_k1_p99"])  # quantiles: the larger rank's


def test_rank_comes_from_the_environment(tmp_path, monkeypatch):
    from trm_diag import Monitor

    monkeypatch.setenv("RANK", "3")
    with Monitor(out=tmp_path / "run") as mon:
        mon.update(0, *batch(0, 0.01))
    assert [f.name[:6] for f in (tmp_path / "run" / "steps").iterdir()] == ["r00003"]


def test_ragged_lists_give_the_padded_numbers_and_mask():
    from trm_diag import Monitor

    lp_r, lp_t, mask = batch(5, 0.05)
    mon = Monitor(criterion="dppo_tv", thresholds={"dppo_tv": 0.02})
    padded = mon.update(0, lp_r, lp_t, mask)
    lengths = mask.sum(1).tolist()
    ragged = mon.update(1, [lp_r[i, :n] for i, n in enumerate(lengths)], [lp_t[i, :n] for i, n in enumerate(lengths)])
    for k, v in padded.metrics.items():
        if k not in ("step", "time"):
            assert ragged.metrics[k] == pytest.approx(v, rel=1e-12, nan_ok=True), k
    assert padded.mask.shape == mask.shape and padded.mask[~mask].all()  # padding is never dropped
    assert [m.tolist() for m in ragged.mask] == [padded.mask[i, :n].tolist() for i, n in enumerate(lengths)]
    assert 0 < padded.mask[mask].float().mean() < 1
    # DPPO: a token over the threshold is dropped only in the direction its advantage pushes
    adv = torch.ones(len(lengths))
    pos = mon.update(2, lp_r, lp_t, mask, advantages=adv).mask
    lr = lp_t - lp_r
    assert pos[mask & (lr < 0)].all() and not pos[mask & (lr > 0) & ((lp_r.exp() - lp_t.exp()).abs() > 0.02)].any()


def test_one_host_copy_per_update(monkeypatch):
    """update() moves the batch to the host in one copy (counted on .cpu(), .item(), .tolist())."""
    from trm_diag import Monitor

    lp_r, lp_t, mask = batch(1, 0.02)
    mon = Monitor()
    mon.update(0, lp_r, lp_t, mask)  # warm
    calls = []
    for name in ("cpu", "item", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    mon.update(1, lp_r.float(), lp_t.float(), mask, kept_mass=torch.ones_like(lp_r))
    assert calls == ["cpu"]


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda m, r, t, k: m.update(0, r, t[:, :-1], k), "differ in shape"),
        (lambda m, r, t, k: m.update(0, r, t, k[:, :-1]), "mask"),
        (lambda m, r, t, k: m.update(-1, r, t, k), "step -1"),
        (lambda m, r, t, k: m.update(0, r[0], t[0], None), "shape"),
        (lambda m, r, t, k: m.update(0, [r[0]], t, None), "list"),
        (
            lambda m, r, t, k: m.update(0, r, t, k, routed_rollout=torch.zeros(16, 64, 2, 2, dtype=torch.long)),
            "together",
        ),
    ],
)
def test_bad_inputs_are_one_line_errors(call, words):
    from trm_diag import Monitor

    with pytest.raises(UsageError, match=words):
        call(Monitor(), *batch(0, 0.01))


def test_a_folder_is_continued_only_with_its_settings(tmp_path):
    from trm_diag import Monitor

    with Monitor(out=tmp_path / "run", horizons=(1024,)) as mon:
        mon.update(0, *batch(0, 0.01))
    with pytest.raises(UsageError, match="horizons"):
        Monitor(out=tmp_path / "run", horizons=(4096,))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds no trm-diag run"):
        Monitor(out=tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="unknown"):
        Monitor(criterion="trm")
    mon = Monitor()
    mon.close()
    with pytest.raises(UsageError, match="after close"):
        mon.update(0, *batch(0, 0.01))


def test_moe_routing_flips_are_counted():
    from trm_diag import Monitor

    lp_r, lp_t, mask = batch(2, 0.01, B=4, T=8)
    rr = torch.arange(4 * 8 * 3 * 2).reshape(4, 8, 3, 2) % 5
    rt = rr.flip(-1).clone()  # the same sets in another order: no flip
    rt[0, 0, 1] = torch.tensor([7, 8])  # one layer of one token flips
    res = Monitor().update(0, lp_r, lp_t, torch.ones_like(mask), routed_rollout=rr, routed_train=rt)
    assert res["route_token_flip_rate"] == pytest.approx(1 / 32) and res["route_flip_rate"] == pytest.approx(1 / 96)


def test_importing_monitor_loads_no_engine():
    code = "import sys, trm_diag; trm_diag.Monitor; print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'vllm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_an_update_without_a_folder_builds_no_dataframe():
    """The step's tables reach batch_metrics as numpy columns: an update with no run folder imports neither pandas
    nor pyarrow (two DataFrames per update cost more than the metrics at a few thousand tokens: bench/monitor.py)."""
    code = (
        "import sys, torch; from trm_diag import Monitor; "
        "Monitor(horizons=(64,)).update(0, torch.zeros(2, 5, dtype=torch.float64), torch.full((2, 5), -0.01)); "
        "print(sorted(m for m in ('pandas', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_numpy_columns_read_as_the_dataframes_do():
    """batch_metrics on the step's numpy columns gives what it gives on DataFrames of the same columns (the
    report's path), NaN tokens (non-finite logits) and empty sequences included: equal floats, NaN where NaN."""
    import math

    import pandas as pd

    from trm_diag.config import Thresholds
    from trm_diag.math.metrics import batch_metrics
    from trm_diag.math.sequences import sequence_stats
    from trm_diag.math.step_metrics import frame, token_columns

    lp_roll, lp_train, mask = batch(7, 0.05, B=12, T=40)
    mask[3] = False  # an empty sequence
    keep = mask.numpy()
    a, b = lp_roll.numpy()[keep], lp_train.numpy()[keep]
    b[[5, 90]] = np.nan
    lengths = keep.sum(axis=1)
    th = Thresholds()
    tok = token_columns(a, b)
    seqs = sequence_stats(tok, lengths, th, basis="sampled")
    mine = batch_metrics(frame(tok, len(a)), frame(seqs, len(lengths)), fidelity="sampled", thresholds=th)
    ref = batch_metrics(pd.DataFrame(tok), pd.DataFrame(dict(seqs)), fidelity="sampled", thresholds=th)
    assert mine.keys() == ref.keys() and len(ref) > 60
    for k, v in ref.items():
        assert (math.isnan(v) and math.isnan(mine[k])) or mine[k] == v, k
    assert ref["token_abs_log_ratio_n_nan"] == 2 and not math.isnan(ref["log_ppl_diff"])  # NaNs skipped


def test_an_update_computes_on_one_cpu_thread_and_gives_the_callers_back(monkeypatch):
    """torch's intra-op threads cost more than they give at a step's size (and 100x on a busy host): the update
    computes on one thread by default, on the caller's count with cpu_threads=None, and leaves the caller's
    count as it was. Checked on the calls made to torch (what torch reports back is process state other tests
    and OpenMP's per-thread settings can move)."""
    from trm_diag import Monitor
    from trm_diag.math import step_metrics

    events = []
    real_set, before = torch.set_num_threads, torch.get_num_threads()
    own = step_metrics.token_columns

    def set_threads(n):
        events.append(("set", n))
        real_set(n)

    def spy(*a):
        events.append(("compute",))
        return own(*a)

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the caller's count
    monkeypatch.setattr(torch, "set_num_threads", set_threads)
    monkeypatch.setattr(step_metrics, "token_columns", spy)
    try:
        Monitor(horizons=(64,)).update(0, *batch(0, 0.01))
        assert events == [("set", 1), ("compute",), ("set", 2)]
        events.clear()
        Monitor(horizons=(64,), cpu_threads=None).update(0, *batch(0, 0.01))
        assert events == [("compute",)]
    finally:
        real_set(before)
