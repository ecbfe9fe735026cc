"""slime's --dump-details dumps read as rollout rows: fixtures written the way slime writes them
(slime/observability/rollout_data_utils.py save_debug_rollout_data, train_data_utils.py _build_dump_payload, Sample.to_dict)
from a real compare run of the bundled model."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import main_exit, run_cli
from trm_diag.errors import InputError, UsageError
from trm_diag.report.dumps import detect as detect_any
from trm_diag.report.dumps import slime

MODEL = "sample_data/tiny-llama"
STEPS = {2: [0, 1], 10: [2, 3]}  # step -> rows of the compare run (2 < 10 numerically, not as text)
INDEX0 = 100  # slime's Sample.index is global over the run


def _sample_dict(row: dict, index: int, **over) -> dict:
    """Sample.to_dict() of a finished single-turn sample: every dataclass field, status and the info dicts as values."""
    n = len(row["response_ids"])
    d = {
        "group_index": row["prompt_idx"], "index": index, "rollout_id": None, "prompt": "a prompt",
        "tokens": row["prompt_ids"] + row["response_ids"], "multimodal_inputs": None, "multimodal_train_inputs": None,
        "multimodal_train_input_id": None, "apply_chat_template_kwargs": {}, "response": "a response",
        "response_length": n, "label": "40", "reward": float(index % 2), "loss_mask": [1] * n,
        "weight_versions": ["3"], "rollout_log_probs": list(row["rollout_logprobs"]), "rollout_top_p_token_ids": None,
        "rollout_top_p_token_offsets": None, "rollout_routed_experts": None, "remove_sample": False,
        "teacher_log_probs": None, "status": "truncated" if row["finish_reason"] == "length" else "completed",
        "metadata": {}, "generate_function_path": None, "custom_rm_path": None, "train_metadata": None,
        "session_id": None, "non_generation_time": 0.0,
        "spec_info": {"spec_accept_token_num": 0, "spec_draft_token_num": 0, "spec_verify_ct": 0, "completion_token_num": 0},
        "prefix_cache_info": {"cached_tokens": 0, "total_prompt_tokens": len(row["prompt_ids"])},
    }  # fmt: skip
    d.update(over)
    return d


def _train_payload(step: int, samples: list[dict], lp_train: list[list[float]]) -> dict:
    """_build_dump_payload of one DP shard: per-sample columns of the actor's rollout_data, tensors where slime has them."""
    out = []
    for pos, (s, lps) in enumerate(zip(samples, lp_train)):
        n = s["response_length"]
        out.append({
            "data_parallel_rank": 0, "sample_index": s["index"], "rollout_position": pos,
            "tokens": torch.tensor(s["tokens"], dtype=torch.long), "response_lengths": n,
            "rewards": s["reward"], "truncated": int(s["status"] == "truncated"),
            "loss_masks": torch.tensor(s["loss_mask"], dtype=torch.int), "rollout_ids": pos,
            "rollout_mask_sums": torch.tensor(float(n)), "total_lengths": len(s["tokens"]),
            "rollout_log_probs": torch.tensor(s["rollout_log_probs"], dtype=torch.float32),
            "log_probs": torch.tensor(lps, dtype=torch.float32), "ref_log_probs": torch.tensor(lps, dtype=torch.float32),
            "advantages": torch.zeros(n), "returns": torch.zeros(n), "entropy": torch.ones(n),
        })  # fmt: skip
    layout = {
        "rank": 0, "data_parallel_rank": 0, "sample_indices": [s["index"] for s in samples],
        "partition": list(range(len(samples))), "micro_batch_indices": [[list(range(len(samples)))]],
        "num_microbatches": [1], "global_batch_sizes": [len(samples)],
    }  # fmt: skip
    raw = [s["reward"] for s in samples]
    return {
        "format_version": 2,
        "rollout_id": step,
        "rank": 0,
        "samples": out,
        "dp_shards": [layout],
        "raw_reward": raw,
    }


def _write_dump(root: Path, rows: list[dict], lp_train: list[list[float]], train: bool = True) -> Path:
    (root / "rollout_data").mkdir(parents=True)
    if train:
        (root / "train_data").mkdir()
    for step, which in STEPS.items():
        samples = [_sample_dict(rows[i], INDEX0 + i) for i in which]
        torch.save({"rollout_id": step, "samples": samples}, root / "rollout_data" / f"{step}.pt")
        if train:
            torch.save(_train_payload(step, samples, [lp_train[i] for i in which]), root / "train_data" / f"{step}.pt")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A compare run of the bundled model (its rollouts and the fp32 trainer's log-probs) and its slime dump."""
    d = tmp_path_factory.mktemp("slime")
    argv = ["compare", "--model", MODEL, "--rollout", "hf:dtype=bfloat16", "--num-prompts", "4",
            "--max-new-tokens", "16", "--temperature", "0.8", "--save-rollouts", str(d / "x.jsonl"), "-q",
            "--out", str(d / "y")]  # fmt: skip
    assert main_exit(argv) == 0
    rows = [json.loads(line) for line in (d / "x.jsonl").read_text().splitlines()]
    tok = pq.read_table(d / "y" / "tokens.parquet", columns=["seq_id", "pos", "lp_train"]).to_pylist()
    lp_train = [[t["lp_train"] for t in sorted((t for t in tok if t["seq_id"] == i), key=lambda t: t["pos"])]
                for i in range(len(rows))]  # fmt: skip
    assert [len(x) for x in lp_train] == [len(r["response_ids"]) for r in rows]
    return {"dir": d, "rows": rows, "lp_train": lp_train, "dump": _write_dump(d / "dump", rows, lp_train)}


def _copy(run, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run["dump"], tmp_path / "dump"))


def test_rows_equal_the_rollout_file_and_join_the_trainer(run):
    got = list(slime.rows(run["dump"], allow_pickle=True))
    order = [i for which in STEPS.values() for i in which]
    assert len(got) == len(order)
    for (where, row), i in zip(got, order):
        ref = run["rows"][i]
        step = next(s for s, which in STEPS.items() if i in which)
        assert where == f"{run['dump'] / 'rollout_data' / f'{step}.pt'}: sample {INDEX0 + i}"
        assert row["prompt_ids"] == ref["prompt_ids"] and row["response_ids"] == ref["response_ids"]
        assert row["rollout_logprobs"] == ref["rollout_logprobs"]  # Python floats, pickled exactly
        # the trainer's log-probs are float32 tensors: each is the float32 nearest the fp32 backend's value
        assert row["train_logprobs"] == [float(np.float32(x)) for x in run["lp_train"][i]]
        assert (row["step"], row["prompt_idx"], row["sample_idx"]) == (step, ref["prompt_idx"], INDEX0 + i)
        assert row["reward"] == float((INDEX0 + i) % 2)
        assert row["finish_reason"] == ref["finish_reason"]
        assert "kept_ids" not in row and "routed_experts" not in row and "temperature" not in row


def test_one_step_file_joins_its_train_file_and_steps_go_in_numeric_order(run, tmp_path):
    one = list(slime.rows(run["dump"] / "rollout_data" / "10.pt", allow_pickle=True))
    assert [r["sample_idx"] for _, r in one] == [INDEX0 + 2, INDEX0 + 3]
    assert all("train_logprobs" in r for _, r in one)
    assert [r["step"] for _, r in slime.rows(run["dump"], allow_pickle=True)] == [2, 2, 10, 10]
    # without train_data/ the rows carry the rollout side only
    bare = _write_dump(tmp_path / "bare", run["rows"], run["lp_train"], train=False)
    assert all("train_logprobs" not in r for _, r in slime.rows(bare, allow_pickle=True))


def test_eval_files_are_left_out_of_a_folder_and_read_alone(run, tmp_path):
    dump = _copy(run, tmp_path)
    samples = [_sample_dict(run["rows"][0], 7)]
    torch.save({"rollout_id": 2, "samples": samples}, dump / "rollout_data" / "eval_2.pt")
    assert len(list(slime.rows(dump, allow_pickle=True))) == 4
    alone = list(slime.rows(dump / "rollout_data" / "eval_2.pt", allow_pickle=True))
    assert [(r["step"], r["sample_idx"]) for _, r in alone] == [(2, 7)]
    assert "train_logprobs" not in alone[0][1]


def test_detect(run, tmp_path):
    assert slime.detect(run["dump"]) and slime.detect(run["dump"] / "rollout_data" / "2.pt")
    assert detect_any(run["dump"]) == "slime"
    assert not slime.detect(run["dir"] / "x.jsonl") and not slime.detect(tmp_path)
    assert not slime.detect(run["dump"] / "train_data" / "2.pt")


def test_kept_ids_and_routed_experts(run, tmp_path):
    row = run["rows"][0]
    p, n = len(row["prompt_ids"]), len(row["response_ids"])
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 4, n)  # an empty span is what slime writes for a token outside the nucleus replay
    spans = [list(rng.integers(0, 300, k)) for k in sizes]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    experts = torch.as_tensor(rng.integers(0, 8, (p + n - 1, 3, 2)), dtype=torch.int32)  # one row per input position
    s = _sample_dict(
        row, 5,
        rollout_top_p_token_ids=torch.tensor([t for sp in spans for t in sp], dtype=torch.int32),
        rollout_top_p_token_offsets=torch.tensor(offsets, dtype=torch.int32),
        rollout_routed_experts=experts,
    )  # fmt: skip
    f = tmp_path / "rollout_data" / "0.pt"
    f.parent.mkdir()
    torch.save({"rollout_id": 0, "samples": [s]}, f)
    (_, got), = slime.rows(f, allow_pickle=True)  # fmt: skip
    assert got["kept_ids"] == [[int(t) for t in sp] for sp in spans]
    # response token t is predicted at input position p - 1 + t
    assert got["routed_experts"] == [experts[p - 1 + t].tolist() for t in range(n)]


def test_numpy_reward_loads(run, tmp_path):
    f = tmp_path / "rollout_data" / "0.pt"
    f.parent.mkdir()
    torch.save({"rollout_id": 0, "samples": [_sample_dict(run["rows"][0], 1, reward=np.float64(0.25))]}, f)
    assert next(slime.rows(f, allow_pickle=True))[1]["reward"] == 0.25


def _score_columns(out: Path) -> list[tuple]:
    t = pq.read_table(out / "tokens.parquet", columns=["seq_id", "pos", "lp_roll", "lp_train", "log_ratio"])
    return sorted(zip(*(t.column(c).to_pylist() for c in t.column_names)))


def test_score_reads_the_dump_like_the_rollout_file(run, capsys):
    common = ["--model", MODEL, "--fidelity", "sampled", "--temperature", "0.8", "-q"]
    a, b = run["dir"] / "score_jsonl", run["dir"] / "score_dump"
    assert run_cli(["score", str(run["dir"] / "x.jsonl"), *common, "--out", str(a)], capsys)[0] == 0
    code, _, err = run_cli(
        ["score", str(run["dump"]), "--format", "slime", "--allow-pickle", *common, "--out", str(b)], capsys
    )
    assert code == 0, err
    ref, got = _score_columns(a), _score_columns(b)
    assert len(got) == len(ref) == sum(len(r["response_ids"]) for r in run["rows"])
    for x, y in zip(got, ref):
        assert x[:2] == y[:2]
        for u, v in zip(x[2:], y[2:]):  # the same float64 inputs and model: equal to float32 rounding at most
            assert abs(u - v) <= 2**-24 * max(abs(u), abs(v)) + 2**-24, (x, y)


def test_a_multi_step_dump_keeps_its_steps(run, capsys):
    """sequences.parquet gets a step column, summary.json one row per step (independent recount from the rows),
    and the run says that the dump's own trainer log-probs are not used yet."""
    import json

    import numpy as np

    out = run["dir"] / "score_steps"
    code, _, err = run_cli(
        ["score", str(run["dump"]), "--format", "slime", "--allow-pickle", "--model", MODEL, "--fidelity", "sampled",
         "--temperature", "0.8", "--out", str(out)], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "carry the trainer's own recorded log-probs" in err and "--train recorded" in err
    seqs = pq.read_table(out / "sequences.parquet", columns=["seq_id", "step", "length"]).to_pydict()
    rows = [r for _, r in slime.rows(run["dump"], allow_pickle=True)]
    assert sorted(seqs["step"]) == sorted(r["step"] for r in rows)
    tok = pq.read_table(out / "tokens.parquet", columns=["seq_id", "log_ratio"]).to_pydict()
    step_of = dict(zip(seqs["seq_id"], seqs["step"]))
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert [s["step"] for s in steps] == sorted(set(step_of.values()))
    for s in steps:
        lr = np.array([v for i, v in zip(tok["seq_id"], tok["log_ratio"]) if step_of[i] == s["step"]])
        assert s["n_tokens"] == len(lr) and s["n_sequences"] == sum(1 for v in step_of.values() if v == s["step"])
        assert abs(s["kl"] - float(np.mean(-lr))) <= 1e-12 * max(1.0, abs(s["kl"]))


# hostile and broken dumps: each a one-line error, nothing run


def test_pickles_need_allow_pickle(run, capsys, tmp_path):
    with pytest.raises(UsageError, match="is a pickle .*--allow-pickle"):
        next(slime.rows(run["dump"], allow_pickle=False))
    code, _, err = run_cli(["score", str(run["dump"]), "--model", MODEL, "-q", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--allow-pickle" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_payload_that_calls_os_system_is_refused_and_never_runs(run, tmp_path, how):
    marker = tmp_path / "ran"
    f = tmp_path / "rollout_data" / "0.pt"
    f.parent.mkdir()
    payload = {"rollout_id": 0, "samples": [_sample_dict(run["rows"][0], 1, metadata={"x": _Evil(marker)})]}
    if how == "torch.save":
        torch.save(payload, f)
    else:
        f.write_bytes(pickle.dumps(payload))
    message = (
        r"holds a (posix|os|nt)\.system object, which the restricted unpickler refuses"
        if how == "torch.save"
        else (r"is not a file the restricted unpickler reads \(Unsupported operand")
    )
    with pytest.raises(InputError, match=message) as e:
        list(slime.rows(f, allow_pickle=True))
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_truncated_file(run, tmp_path):
    dump = _copy(run, tmp_path)
    f = dump / "rollout_data" / "10.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(InputError, match=r"10\.pt' is damaged or truncated"):
        list(slime.rows(dump, allow_pickle=True))


def _rewrite(f: Path, change) -> None:
    payload = torch.load(f, weights_only=True)
    change(payload)
    torch.save(payload, f)


@pytest.mark.parametrize(
    ("side", "change", "message"),
    [
        ("rollout", lambda p: p["samples"][1]["rollout_log_probs"].pop(), r"16 response tokens but 15 rollout_log_probs"),
        ("train", lambda p: p["samples"][1].update(log_probs=p["samples"][1]["log_probs"][:-1]),
         r"16 response tokens but 15 train log_probs"),
        ("train", lambda p: p.update(format_version=3), r"format_version 3; this reader knows 2"),
        ("train", lambda p: p["samples"].pop(1), r"step 10 sample 103 has no train sample"),
        ("train", lambda p: p["samples"][0].update(sample_index=999), r"train sample with index 999 has no rollout"),
        ("train", lambda p: p["samples"][0]["tokens"].__setitem__(-1, 7), r"holds other tokens"),
        ("rollout", lambda p: p["samples"][0].update(loss_mask=[1] * 15), r"15 loss_mask entries for 16 response tokens"),
        ("rollout", lambda p: p["samples"][0].update(rollout_top_p_token_ids=[5] * 16, rollout_top_p_token_offsets=list(range(16))),
         r"16 rollout_top_p_token_offsets for 16 response tokens \(expected 17\)"),
        ("rollout", lambda p: p["samples"][0].update(rollout_top_p_token_ids=[5] * 16,
                                                      rollout_top_p_token_offsets=[0, 2, 1] + list(range(3, 17))),
         r"do not split its 16 ids"),
        ("rollout", lambda p: p["samples"][0].update(rollout_top_p_token_ids=[5] * 16,
                                                      rollout_top_p_token_offsets=list(range(1, 18))),
         r"do not split its 16 ids"),
        ("rollout", lambda p: p["samples"][0].update(response_length=40), r"response_length 40 does not fit"),
        ("rollout", lambda p: p.update(rollout_id=3), r"holds rollout_id 3, not the step its name says"),
    ],
)  # fmt: skip
def test_broken_dumps_are_one_line_errors(run, tmp_path, side, change, message):
    dump = _copy(run, tmp_path)
    _rewrite(dump / f"{side}_data" / "10.pt", change)
    with pytest.raises(InputError, match=message) as e:
        list(slime.rows(dump, allow_pickle=True))
    assert "\n" not in str(e.value) and "Fix: " in str(e.value)


def test_a_train_file_alone_is_refused(run):
    with pytest.raises(InputError, match="train-side dump"):
        list(slime.rows(run["dump"] / "train_data" / "2.pt", allow_pickle=True))


def test_samples_without_index_join_by_rollout_position(run, tmp_path):
    """Custom rollouts leave Sample.index None: the train sample's rollout_position joins it."""
    dump = _copy(run, tmp_path)

    def drop_index(p):
        for s in p["samples"]:
            s["index" if "index" in s else "sample_index"] = None

    for side in ("rollout", "train"):
        _rewrite(dump / f"{side}_data" / "10.pt", drop_index)
    _rewrite(dump / "train_data" / "10.pt", lambda p: p["samples"].reverse())  # joined by position, not by order
    got = [r for _, r in slime.rows(dump, allow_pickle=True) if r["step"] == 10]
    assert [r["sample_idx"] for r in got] == [0, 1]
    assert [r["train_logprobs"] for r in got] == [[float(np.float32(x)) for x in run["lp_train"][i]] for i in (2, 3)]
