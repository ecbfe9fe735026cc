"""SkyRL's dumped training batches (global_step_N_training_input.pkl) read as rollout rows, without SkyRL.

The fixtures pickle mimics of SkyRL's TrainingInputBatch under the module path and name the real pickles
reference, with the writer's state layout (skyrl/backends/skyrl_train/training_batch.py, commit a956457):
the current one (``__reduce__`` -> ``_rebuild_tensor_batch``) and the older one (plain dict-subclass
pickle under ``skyrl_train.training_batch``, raw tensors as dict items plus the same state), filled with
the rows of a real compare run laid out as SkyRL's ``convert_prompts_responses_to_batch_tensors`` lays
them out (left-padded rows, right-aligned response tensors; the older left-prompt / right-response layout).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import main_exit, run_cli
from trm_diag.errors import InputError, UsageError
from trm_diag.report.dumps import detect, skyrl

MODEL = "sample_data/tiny-llama"
PAD = 0  # pad token id of the fixture batches (a real id too: the reader must go by the masks)
NEW_MOD, OLD_MOD = "skyrl.backends.skyrl_train.training_batch", "skyrl_train.training_batch"
F32_REL = 2.0**-24  # float32 round-to-nearest: relative error at most 2^-24 (normal numbers)


def _serialize_tensor(value: torch.Tensor) -> dict:
    """SkyRL's _serialize_tensor: numpy bytes + shape + dtype, or a torch.save for dtypes numpy lacks."""
    try:
        arr = value.numpy()
        return {"format": "numpy", "data": arr.tobytes(), "shape": arr.shape, "dtype": str(arr.dtype)}
    except TypeError:
        buf = io.BytesIO()
        torch.save(value, buf)
        return {"format": "torch", "data": buf.getvalue()}


def _state(batch: dict, metadata: dict) -> dict:
    """TensorBatch.__getstate__."""
    batch_dict = {k: (None if v is None else _serialize_tensor(v.contiguous())) for k, v in batch.items()}
    n = len(next(iter(batch.values())))
    return {"batch_dict": batch_dict, "batch_size": n, "device": torch.device("cpu"), "metadata": metadata}


@contextmanager
def _fake_module(name: str):
    """A module of that dotted name (and its parents) in sys.modules while a mimic is pickled; gone after."""
    parts = name.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    assert not any(n in sys.modules for n in names), "the test must run without SkyRL installed"
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    try:
        yield sys.modules[name]
    finally:
        for n in names:
            del sys.modules[n]


def pickle_new(batch: dict, metadata: dict) -> bytes:
    """A dump as SkyRL writes it now: TrainingInputBatch.__reduce__ -> (_rebuild_tensor_batch, (cls, state))."""
    with _fake_module(NEW_MOD) as mod:

        def _rebuild_tensor_batch(cls, state):
            raise AssertionError("never called while pickling")

        class TrainingInputBatch(dict):
            def __reduce__(self):
                return (_rebuild_tensor_batch, (type(self), _state(dict(self), metadata)))

        for obj in (_rebuild_tensor_batch, TrainingInputBatch):
            obj.__module__, obj.__qualname__ = NEW_MOD, obj.__name__
            setattr(mod, obj.__name__, obj)
        return pickle.dumps(TrainingInputBatch(batch))


def pickle_old(batch: dict, metadata: dict) -> bytes:
    """A dump as SkyRL wrote it before its __reduce__: the dict items as raw tensors, then __getstate__."""
    with _fake_module(OLD_MOD) as mod:

        class TrainingInputBatch(dict):
            def __getstate__(self):
                return _state(dict(self), metadata)

        TrainingInputBatch.__module__, TrainingInputBatch.__qualname__ = OLD_MOD, "TrainingInputBatch"
        mod.TrainingInputBatch = TrainingInputBatch
        return pickle.dumps(TrainingInputBatch(batch))


def layout(rows: list[dict], new: bool, pad_rows: int = 0) -> dict:
    """SkyRL's convert_prompts_responses_to_batch_tensors (new: every row left-padded, response tensors
    right-aligned; old: left-padded prompt, right-padded response), written out independently."""
    n, P = len(rows), [len(r["prompt_ids"]) for r in rows]
    T = [len(r["response_ids"]) for r in rows]
    R = max(T)
    S = max(p + t for p, t in zip(P, T)) if new else max(P) + R
    seq = np.full((n, S), PAD, np.int64)
    attn = np.zeros((n, S), np.int64)
    resp = np.zeros((n, R), np.int64)
    per_token = {k: np.zeros((n, R), np.float32) for k in ("loss_mask", "rollout_logprobs", "action_log_probs")}
    for i, r in enumerate(rows):
        p, t = P[i], T[i]
        if new:
            s0, r0 = S - p - t, R - t  # row start in the sequence, response start in the response tensors
        else:
            s0, r0 = max(P) - p, 0
        seq[i, s0 : s0 + p] = r["prompt_ids"]
        seq[i, s0 + p : s0 + p + t] = r["response_ids"]
        attn[i, s0 : s0 + p + t] = 1
        resp[i, r0 : r0 + t] = 1
        per_token["loss_mask"][i, r0 : r0 + t] = 1
        per_token["rollout_logprobs"][i, r0 : r0 + t] = r["rollout_logprobs"]
        per_token["action_log_probs"][i, r0 : r0 + t] = r["train_logprobs"]
    adv = np.zeros((n, R), np.float32)
    for i in range(n):
        adv[i] = resp[i] * (i - 1.5)  # GRPO-style: one value over the response, 0 on padding
    batch = {
        "sequences": seq, "attention_mask": attn, "response_mask": resp, **per_token,
        "base_action_log_probs": None, "values": None, "advantages": adv, "returns": adv.copy(),
        "rollout_expert_indices": None, "router_padding_mask": None,
    }  # fmt: skip
    if pad_rows:  # SkyRL's pad_training_input_batch: copies of row 0, loss mask 0
        for k, v in batch.items():
            if v is not None:
                extra = np.repeat(v[:1], pad_rows, axis=0)
                if k == "loss_mask":
                    extra[:] = 0
                batch[k] = np.concatenate([v, extra])
    return {k: (None if v is None else torch.from_numpy(np.ascontiguousarray(v))) for k, v in batch.items()}


def metadata(n: int, pad_rows: int = 0) -> dict:
    """The metadata SkyRL's trainer leaves when it dumps (uids and is_last_step already popped)."""
    return {
        "policy_mini_batch_boundaries": [(0, n)],
        "policy_prompt_boundaries": [(i, i + 1) for i in range(n)],
        "response_length": 16,
        "avg_response_length": 12.0,
        "pad_size": pad_rows,
        "metrics": {"avg_final_rewards": np.float64(0.5)},  # a numpy scalar: numpy globals in the pickle
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real compare run's rollouts, varied in prompt and response length, with its fp32 training log-probs."""
    d = tmp_path_factory.mktemp("skyrl")
    x, y = d / "x.jsonl", d / "y"
    code = main_exit(
        ["compare", "--model", MODEL, "--rollout", "hf:dtype=bfloat16", "--num-prompts", "4",
         "--max-new-tokens", "16", "--temperature", "0.8", "--save-rollouts", str(x), "-q", "--out", str(y)]
    )  # fmt: skip
    assert code == 0
    tok = pd.read_parquet(y / "tokens.parquet")
    rows = []
    for i, line in enumerate(x.read_text().splitlines()):
        r = json.loads(line)
        t = tok[tok.seq_id == i].sort_values("pos")
        assert t.token_id.tolist() == r["response_ids"]
        keep = 16 - 3 * i  # responses of different lengths, so padding shows
        rows.append(
            {
                "prompt_ids": r["prompt_ids"][i:],  # prompts of different lengths too
                "response_ids": r["response_ids"][:keep],
                "rollout_logprobs": r["rollout_logprobs"][:keep],
                "train_logprobs": t.lp_train.tolist()[:keep],
            }
        )
    assert len({len(r["response_ids"]) for r in rows}) == 4 and len({len(r["prompt_ids"]) for r in rows}) == 4
    # the same rows as a rollout file, log-probs as float32 holds them
    plain = d / "plain.jsonl"
    with plain.open("w") as f:
        for i, r in enumerate(rows):
            lps = np.asarray(r["rollout_logprobs"], np.float32).astype(np.float64).tolist()
            f.write(json.dumps({"prompt_ids": r["prompt_ids"], "response_ids": r["response_ids"],
                                "rollout_logprobs": lps, "prompt_idx": i, "sample_idx": 0}) + "\n")  # fmt: skip
    export = d / "export"
    (export / "dumped_data").mkdir(parents=True)
    (export / "dumped_data" / "global_step_10_training_input.pkl").write_bytes(
        pickle_old(layout(rows, new=False), metadata(4))
    )
    (export / "dumped_data" / "global_step_2_training_input.pkl").write_bytes(
        pickle_new(layout(rows, new=True, pad_rows=2), metadata(4, pad_rows=2))
    )
    return {"dir": d, "rows": rows, "export": export, "plain": plain}


def _close32(got: list[float], want: list[float]) -> None:
    """``got`` is ``want`` rounded to float32: within 2^-24 relative (1e-45 absolute for subnormals)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert abs(g - w) <= F32_REL * abs(w) + 1e-45, (g, w)


def test_detect(run):
    ex = run["export"]
    assert detect(ex) == "skyrl" and skyrl.detect(ex / "dumped_data")
    assert skyrl.detect(ex / "dumped_data" / "global_step_2_training_input.pkl")
    assert not skyrl.detect(run["plain"]) and not skyrl.detect(run["dir"] / "y")


def test_rows_match_the_rollouts_and_skyrl_is_never_imported(run):
    got = list(skyrl.rows(run["export"], allow_pickle=True))
    assert not any(m == "skyrl" or m.startswith(("skyrl.", "skyrl_train")) for m in sys.modules)
    assert len(got) == 8  # the two pad rows of step 2 are no samples
    assert [r["step"] for _, r in got] == [2] * 4 + [10] * 4  # numeric order, not 10 before 2
    for k, (where, row) in enumerate(got):
        i = k % 4
        want = run["rows"][i]
        assert where.endswith(f"step {row['step']}, sample {i}") and "global_step_" in where
        assert row["prompt_ids"] == want["prompt_ids"] and row["response_ids"] == want["response_ids"]
        assert (row["prompt_idx"], row["sample_idx"]) == (i, 0)
        _close32(row["rollout_logprobs"], want["rollout_logprobs"])
        _close32(row["train_logprobs"], want["train_logprobs"])
        assert row["advantage"] == i - 1.5
        assert "routed_experts" not in row and "reward" not in row


def test_one_step_file(run):
    f = run["export"] / "dumped_data" / "global_step_10_training_input.pkl"
    got = list(skyrl.rows(f, allow_pickle=True))
    assert [r["step"] for _, r in got] == [10] * 4


def test_uids_and_routes(tmp_path, run):
    """uids (trainers that keep them) give prompt/sample indices; routes are those of the forward before
    each response token; a bf16 tensor (torch.save entry) reads as its value."""
    rows = run["rows"][:2]
    batch = layout(rows, new=True)
    n, S = batch["sequences"].shape
    rng = np.random.default_rng(0)
    routes = rng.integers(0, 8, size=(n, S, 3, 2), dtype=np.int64).astype(np.uint8)
    batch["rollout_expert_indices"] = torch.from_numpy(routes)
    batch["advantages"] = batch["advantages"].to(torch.bfloat16)
    meta = {"uids": ["a", "a"], "pad_size": 0}
    f = tmp_path / "global_step_0_training_input.pkl"
    f.write_bytes(pickle_new(batch, meta))
    got = [r for _, r in skyrl.rows(f, allow_pickle=True)]
    assert [(r["prompt_idx"], r["sample_idx"]) for r in got] == [(0, 0), (0, 1)]
    for i, r in enumerate(got):
        t = len(rows[i]["response_ids"])
        assert r["routed_experts"] == routes[i, S - t - 1 : S - 1].tolist()
        assert r["advantage"] == float(torch.tensor(i - 1.5, dtype=torch.bfloat16))


def test_score_reads_the_dump_like_the_rollout_file(run, capsys):
    d = run["dir"]
    f = run["export"] / "dumped_data" / "global_step_2_training_input.pkl"
    common = ["--model", MODEL, "--fidelity", "sampled", "--temperature", "0.8", "-q"]
    code, _, err = run_cli(
        ["score", str(f), "--format", "skyrl", "--allow-pickle", *common, "--out", str(d / "a")], capsys
    )
    assert code == 0, err
    assert main_exit(["score", str(run["plain"]), *common, "--out", str(d / "b")]) == 0
    a, b = (pd.read_parquet(d / o / "tokens.parquet") for o in ("a", "b"))
    assert len(a) == len(b) == sum(len(r["response_ids"]) for r in run["rows"])
    for col in ("lp_roll", "lp_train", "log_ratio"):
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy())


def test_without_allow_pickle(run, capsys):
    with pytest.raises(UsageError, match="is a pickle \\(SkyRL's dump\\).*--allow-pickle"):
        list(skyrl.rows(run["export"], allow_pickle=False))
    code, _, err = run_cli(
        ["score", str(run["export"]), "--model", MODEL, "-q", "--out", str(run["dir"] / "c")], capsys
    )
    assert code == 2 and "--allow-pickle" in err and "Traceback" not in err


def _one_line(exc: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and "Fix:" in msg
    for w in words:
        assert w in msg, msg


def test_truncated_file(tmp_path, run):
    data = (run["export"] / "dumped_data" / "global_step_2_training_input.pkl").read_bytes()
    f = tmp_path / "global_step_3_training_input.pkl"
    for cut in (len(data) // 2, 10, 0):
        f.write_bytes(data[:cut])
        with pytest.raises(InputError) as e:
            list(skyrl.rows(f, allow_pickle=True))
        _one_line(e, str(f))


def test_mismatched_lengths(tmp_path, run):
    batch = layout(run["rows"], new=True)
    batch["rollout_logprobs"] = batch["rollout_logprobs"][:, 1:].contiguous()
    f = tmp_path / "global_step_1_training_input.pkl"
    f.write_bytes(pickle_new(batch, metadata(4)))
    with pytest.raises(InputError) as e:
        list(skyrl.rows(f, allow_pickle=True))
    _one_line(e, "rollout_logprobs", "mismatched lengths")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top", "metadata"])
def test_a_payload_never_runs(tmp_path, run, where):
    marker = tmp_path / "ran"
    f = tmp_path / "global_step_1_training_input.pkl"
    if where == "top":
        f.write_bytes(pickle.dumps(_Evil(marker)))
    else:  # hidden inside a batch that is otherwise SkyRL's
        f.write_bytes(pickle_new(layout(run["rows"], new=True), {**metadata(4), "x": _Evil(marker)}))
    with pytest.raises(InputError) as e:
        list(skyrl.rows(f, allow_pickle=True))
    _one_line(e, "system", "nothing was run")
    assert not marker.exists()


def test_unknown_tensor_format(tmp_path, run):
    with _fake_module(NEW_MOD) as mod:

        def _rebuild_tensor_batch(cls, state):
            raise AssertionError

        class TrainingInputBatch(dict):
            def __reduce__(self):
                state = _state(layout(run["rows"], new=True), metadata(4))
                state["batch_dict"]["sequences"]["format"] = "zstd"
                return (_rebuild_tensor_batch, (type(self), state))

        for obj in (_rebuild_tensor_batch, TrainingInputBatch):
            obj.__module__, obj.__qualname__ = NEW_MOD, obj.__name__
            setattr(mod, obj.__name__, obj)
        data = pickle.dumps(TrainingInputBatch())
    f = tmp_path / "global_step_1_training_input.pkl"
    f.write_bytes(data)
    with pytest.raises(InputError) as e:
        list(skyrl.rows(f, allow_pickle=True))
    _one_line(e, "unknown format 'zstd'")


def test_multi_turn_samples_carry_their_loss_mask(tmp_path, run):
    batch = layout(run["rows"], new=True)
    batch["loss_mask"][1, -3] = 0  # a tool token inside sample 1's response
    f = tmp_path / "global_step_1_training_input.pkl"
    f.write_bytes(pickle_new(batch, metadata(4)))
    got = [r for _, r in skyrl.rows(f, allow_pickle=True)]
    n = len(got[1]["response_ids"])
    assert got[1]["loss_mask"] == [t != n - 3 for t in range(n)]
    assert all("loss_mask" not in r for i, r in enumerate(got) if i != 1)


def test_a_placeholder_log_prob_on_the_last_token_is_not_scored(tmp_path, run):
    """SkyRL appends an EOS after a stop string with rollout log-prob 0.0 (not the engine's): that token is context."""
    batch = layout(run["rows"], new=True)
    batch["rollout_logprobs"][2, -1] = 0.0  # right-aligned response tensors: column -1 is the last token
    f = tmp_path / "global_step_1_training_input.pkl"
    f.write_bytes(pickle_new(batch, metadata(4)))
    got = [r for _, r in skyrl.rows(f, allow_pickle=True)]
    n = len(got[2]["response_ids"])
    assert got[2]["appended_eos"] and got[2]["loss_mask"] == [t != n - 1 for t in range(n)]
    assert not any(r.get("appended_eos") for i, r in enumerate(got) if i != 2)


def test_filtered_sample_reads(tmp_path, run):
    """A whole response with loss mask 0 (SkyRL's overlong / zero-variance filters) is still the engine's."""
    batch = layout(run["rows"], new=True)
    batch["loss_mask"][2] = 0
    f = tmp_path / "global_step_1_training_input.pkl"
    f.write_bytes(pickle_new(batch, metadata(4)))
    got = [r for _, r in skyrl.rows(f, allow_pickle=True)]
    assert got[2]["response_ids"] == run["rows"][2]["response_ids"]


def test_no_rollout_logprobs(tmp_path, run):
    batch = layout(run["rows"], new=True)
    batch["rollout_logprobs"] = None
    f = tmp_path / "global_step_1_training_input.pkl"
    f.write_bytes(pickle_new(batch, metadata(4)))
    with pytest.raises(InputError) as e:
        list(skyrl.rows(f, allow_pickle=True))
    _one_line(e, "rollout_logprobs", "generator.sampling_params.logprobs")


def test_empty_folder(tmp_path):
    with pytest.raises(InputError) as e:
        list(skyrl.rows(tmp_path, allow_pickle=True))
    _one_line(e, "trainer.dump_data_batch=true")


def test_score_without_a_model_uses_the_trainers_action_log_probs(run, capsys):
    """SkyRL dumps carry action_log_probs: with no --model the report is the engine's log-probs against those
    (float32 as stored), and equals a re-score by the same fp32 trainer to float32 rounding."""
    f = run["export"] / "dumped_data" / "global_step_2_training_input.pkl"
    out, ref = run["dir"] / "free", run["dir"] / "free_ref"
    code, _, err = run_cli(["score", str(f), "--allow-pickle", "-q", "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["train"]["spec"] == "recorded"
    common = ["--model", MODEL, "--fidelity", "sampled", "--temperature", "0.8", "-q"]
    assert main_exit(["score", str(run["plain"]), *common, "--out", str(ref)]) == 0
    a, b = (pd.read_parquet(o / "tokens.parquet").sort_values(["seq_id", "pos"]) for o in (out, ref))
    assert len(a) == len(b) == sum(len(r["response_ids"]) for r in run["rows"])
    np.testing.assert_array_equal(a["lp_roll"].to_numpy(), b["lp_roll"].to_numpy())
    for s, r in enumerate(run["rows"]):  # the stored float32 values, exactly
        got = a[a.seq_id == s]["lp_train"].tolist()
        assert got == [float(np.float32(x)) for x in r["train_logprobs"]]
    # sample 0 keeps the prompt its trainer log-probs were computed with (the fixture shortens the others' prompts)
    x, y = (t[t.seq_id == 0]["lp_train"].to_numpy() for t in (a, b))
    assert len(x) == 16 and np.all(np.abs(x - y) <= 2.0**-24 * np.maximum(np.abs(x), np.abs(y)) + 2.0**-24)
