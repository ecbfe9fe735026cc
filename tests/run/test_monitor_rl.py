"""trm_diag.Monitor inside a real RL loop on the bundled model: transformers fp32 as the trainer, a bfloat16
sampler copy of its weights synced before each step, a policy-gradient update per step. A weight-sync failure
at one step (the sampler keeps the previous step's weights) must be flagged at that step and no earlier, and
the flag must clear once sync is restored. Also: Monitor's numbers and mask equal `score`'s on the same tokens."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tests.helpers import run_cli

PROMPTS = ("The cat", "Once upon a time", "1 2 3", "Hello")
NEW_TOKENS = 16
LR = 3e-4  # one Adam step moves the log-probs ~10x the bf16 sampler's own noise (a real report's ratio)


class Loop:
    """The tiny RL loop: sample with the bf16 sampler, score with the fp32 trainer, one policy-gradient step."""

    def __init__(self, model_path, seed: int = 0) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        tok = AutoTokenizer.from_pretrained(model_path)
        self.trainer = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.sampler = copy.deepcopy(self.trainer).to(torch.bfloat16).eval()
        self.opt = torch.optim.Adam(self.trainer.parameters(), lr=LR)
        prompts = [tok.encode(p) for p in PROMPTS]
        self.P = max(len(p) for p in prompts)  # left-padded prompts, 2 samples each
        self.ids = torch.tensor([[0] * (self.P - len(p)) + p for p in prompts]).repeat_interleave(2, 0)
        self.att = torch.tensor([[0] * (self.P - len(p)) + [1] * len(p) for p in prompts]).repeat_interleave(2, 0)

    def sync(self) -> None:
        self.sampler.load_state_dict({k: v.to(torch.bfloat16) for k, v in self.trainer.state_dict().items()})

    def _logps(self, model, seq: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=seq, attention_mask=am).logits[:, self.P - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(-1, seq[:, self.P :, None])[..., 0]  # (B, T)

    def rollout(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(response ids, the sampler's log-probs, the trainer's log-probs with grad, mask), all [B, T]."""
        torch.manual_seed(1000 + step)
        with torch.no_grad():
            seq = self.sampler.generate(input_ids=self.ids, attention_mask=self.att, do_sample=True,
                                        max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=None)  # fmt: skip
            am = torch.cat([self.att, torch.ones_like(seq[:, self.P :])], 1)
            lp_roll = self._logps(self.sampler, seq, am)
        lp_train = self._logps(self.trainer, seq, am)
        return seq[:, self.P :], lp_roll, lp_train, torch.ones_like(lp_roll, dtype=torch.bool)

    def train(self, resp: torch.Tensor, lp_train: torch.Tensor, keep: torch.Tensor) -> None:
        reward = (resp == resp[:, :1]).float().mean(1)  # any reward: repeat the first token
        adv = reward - reward.mean()
        loss = -(adv[:, None] * lp_train * keep[:, None]).sum() / lp_train.numel()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


STALE = 8
STEPS = 13


@pytest.fixture(scope="module")
def stale_run(dense_model, tmp_path_factory):
    """A 13-step run whose sampler is not synced at step 8; (run folder, per-step online flags)."""
    from trm_diag import Monitor

    out = tmp_path_factory.mktemp("rl") / "run"
    loop = Loop(dense_model)
    online = {}
    with Monitor(out=out, thresholds={"trm_avg": 0.01}, horizons=(1024, 4096)) as mon:
        for step in range(STEPS):
            if step != STALE:  # the injected failure: this step samples with the previous step's weights
                loop.sync()
            resp, lp_roll, lp_train, mask = loop.rollout(step)
            res = mon.update(step, lp_roll, lp_train.detach(), mask)
            online[step] = [f.kind for f in res.flags]
            loop.train(resp, lp_train, res.mask)
    return out, online


def test_a_stale_weight_sync_is_flagged_at_its_step_and_clears(stale_run, capsys):
    from trm_diag.report.trend_report import run_trend

    out, online = stale_run
    res = run_trend(out)
    spikes = [f for f in res.flags if f.kind == "spike"]
    assert spikes and {f.step for f in spikes} == {STALE}
    assert all(f.step >= STALE for f in res.flags), [f.message for f in res.flags]  # nothing earlier
    assert all(f.step == STALE for f in res.flags if f.kind != "drift")
    assert "spike" in online[STALE] and all(not online[s] for s in range(STALE))
    assert all("spike" not in online[s] for s in range(STALE + 1, STEPS))  # sync restored: the flag clears
    steps = res.data.steps.set_index("step")
    healthy = steps.drop(index=STALE)["abs_log_ratio_mean"]
    assert steps.loc[STALE, "abs_log_ratio_mean"] > 5 * healthy.median()
    code, out_text, _ = run_cli(["trend", str(out)], capsys)
    assert code == 0 and f"step {STALE}:" in out_text and "check weight sync / staleness" in out_text
    code, out_text, _ = run_cli(["gate", str(out), "-r", "trend.flags.spike == 0"], capsys)
    assert code == 1 and f"step {STALE}" in out_text


def test_monitor_equals_score_on_the_same_tokens(dense_model, tmp_path, capsys):
    """Monitor.update on a report's own tokens (the sampler's log-probs in the file, the trainer's as `score`
    rescored them) gives summary.json's metrics and bound inputs, bounds.parquet's B*, and as mask each
    criterion's accept flags of sequences.parquet."""
    import pandas as pd

    from trm_diag import Monitor
    from trm_diag.criteria import CRITERIA

    loop = Loop(dense_model, seed=1)
    loop.sync()
    with torch.no_grad():
        loop.sampler.model.layers[0].mlp.down_proj.weight.mul_(1.1)  # a mismatch the masks see
    rows = []
    for step in range(2):
        resp, lp_roll, _, _ = loop.rollout(step)
        for i in range(len(resp)):
            n = NEW_TOKENS - 2 * i  # ragged lengths
            rows.append({"prompt_ids": loop.ids[i][loop.att[i] > 0].tolist(), "response_ids": resp[i, :n].tolist(),
                         "rollout_logprobs": lp_roll[i, :n].tolist(), "prompt_idx": i // 2, "sample_idx": i % 2 + 2 * step})  # fmt: skip
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = tmp_path / "rep"
    th = ["--trm-max", "0.002", "--trm-avg", "0.0005"]
    code, _, err = run_cli(["score", str(f), "--model", str(dense_model), "--fidelity", "sampled", "--horizons",
                            "1024,4096", "--out", str(rep), "-q", *th], capsys)  # fmt: skip
    assert code == 0, err
    summary = json.loads((rep / "summary.json").read_text())
    tok = pd.read_parquet(rep / "tokens.parquet").sort_values(["seq_id", "pos"])
    seqs = pd.read_parquet(rep / "sequences.parquet").sort_values("seq_id")
    lengths = seqs["length"].to_numpy()
    B, T = len(lengths), int(lengths.max())
    lp_r, lp_t, mask = (torch.zeros(B, T, dtype=torch.float64) for _ in range(3))
    for j, (_, g) in enumerate(tok.groupby("seq_id", sort=True)):
        lp_r[j, : len(g)] = torch.tensor(g["lp_roll"].to_numpy())
        lp_t[j, : len(g)] = torch.tensor(g["lp_train"].to_numpy())
        mask[j, : len(g)] = 1
    th_kw = {"trm_max": 0.002, "trm_avg": 0.0005}
    for crit in CRITERIA:
        res = Monitor(thresholds=th_kw, horizons=(1024, 4096), criterion=crit).update(0, lp_r, lp_t, mask)
        assert res.mask.tolist() == seqs[f"accept_{crit}"].tolist(), crit
    assert 0 < res.acceptance["trm_max"] < 1  # the masks drop some sequences, keep others
    for k, v in summary["metrics"].items():
        if isinstance(v, (int, float)) and k in res.metrics:
            assert res.metrics[k] == pytest.approx(v, rel=1e-12, abs=1e-15, nan_ok=True), k
    assert len([k for k in summary["metrics"] if k in res.metrics]) >= 60
    for k in ("delta", "kl_seq", "tv_seq", "kl_rate"):
        assert res.inputs[k] == pytest.approx(summary["bound_inputs"][k], rel=1e-12), k
    b = pd.read_parquet(rep / "bounds.parquet")
    for T_ in (1024, 4096):
        want = b[(b["T"] == T_) & (b["bound"] == "unified")]["value"].item()
        assert res.bstar[T_] == pytest.approx(want, rel=1e-12)
    assert np.isclose(res.bstar["obs"], summary["bounds_at_observed_T"]["unified"], rtol=1e-12)
