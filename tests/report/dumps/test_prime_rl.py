"""prime-rl's rollout dump (trm_diag/report/dumps/prime_rl.py): msgpack micro-batches of packed samples, built here
the way prime-rl 559b447 writes them (trainer/batch.py packing and padding, the dummy micro-batches that even out
the ranks, transports/rollouts filesystem.py paths) from the rows of a real `compare` run, read back field by field
and scored like the rollout file they came from."""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import msgpack
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.helpers import run_cli
from trm_diag.errors import InputError
from trm_diag.report.dumps import detect as detect_any
from trm_diag.report.dumps.prime_rl import detect, rows

TEMPERATURE = 0.8
MAX_SEQ_LEN = 64  # two samples of the bundled run per micro-batch
PAD_TO = 8  # pad_to_multiple_of: the last sample of most micro-batches gets a padded tail
LAYERS, TOPK = 2, 2


# --- a mimic of prime-rl's writer (names as in prime_rl.transports.rollouts.types.MicroBatch) ---------------------
def _sample(row: dict, advantage: float, routed: np.ndarray | None) -> dict:
    """prepare_sample of the TrainingSample the orchestrator builds from one single-turn branch."""
    p, r = row["prompt_ids"], row["response_ids"]
    n = len(p) + len(r)
    return {
        "input_ids": p + r,
        "loss_mask": [False] * len(p) + [True] * len(r),
        "advantages": [0.0] * len(p) + [advantage] * len(r),
        "inference_logprobs": [0.0] * len(p) + list(row["rollout_logprobs"]),
        "position_ids": list(range(n)),
        "sequence_lengths": [n],
        "temperatures": [TEMPERATURE] * n,
        "env_names": ["gsm8k"] * n,
        "seq_lens": [n],
        "ref_logprobs": None,
        "routed_experts": None if routed is None else [routed.tobytes(), list(routed.shape), str(routed.dtype)],
    }


def _materialize(samples: list[dict]) -> dict:
    mb = {k: [x for s in samples for x in s[k]] for k in samples[0] if k not in ("ref_logprobs", "routed_experts")}
    mb["sequence_lengths"] = [len(s["input_ids"]) for s in samples]
    mb["ref_logprobs"] = None
    mb["routed_experts"] = None
    if samples[0]["routed_experts"] is not None:
        data = b"".join(s["routed_experts"][0] for s in samples)
        mb["routed_experts"] = [data, [len(mb["input_ids"]), LAYERS, TOPK], samples[0]["routed_experts"][2]]
    return mb


def _pad(mb: dict) -> int:
    """pad_micro_batch: the padding joins the last sample (its sequence_lengths / seq_lens entry grows)."""
    size = -len(mb["input_ids"]) % PAD_TO
    mb["input_ids"] += [1] * size
    mb["advantages"] += [0.0] * size
    mb["loss_mask"] += [False] * size
    mb["position_ids"] += list(range(size))
    mb["sequence_lengths"][-1] += size
    mb["seq_lens"][-1] += size
    mb["inference_logprobs"] += [0.0] * size
    mb["temperatures"] += [1.0] * size
    mb["env_names"] += [""] * size
    if mb["routed_experts"] is not None:
        data, shape, dtype = mb["routed_experts"]
        mb["routed_experts"] = [data + b"\0" * (size * LAYERS * TOPK * 4), [shape[0] + size, *shape[1:]], dtype]
    return size


def _encode(mb: dict) -> list:
    """A MicroBatch as msgspec writes it (array_like, omit_defaults): fields by position, trailing Nones left out."""
    order = ["input_ids", "loss_mask", "advantages", "inference_logprobs", "position_ids", "sequence_lengths"]
    fields = [mb[k] for k in (*order, "temperatures", "env_names", "seq_lens", "ref_logprobs", "routed_experts")]
    while fields[-1] is None:
        fields.pop()
    return fields


def write_step(out: Path, step: int, samples: list[dict], ranks: int = 2) -> dict:
    """prepare_batch + FileSystemMicroBatchSender: first-fit-decreasing packing, padding, dummy micro-batches
    (copies with loss_mask all 0) up to a multiple of the ranks, one rank_R.bin per rank."""
    bins: list[list[dict]] = []
    for s in sorted(samples, key=lambda s: -len(s["input_ids"])):
        fit = next((b for b in bins if sum(len(x["input_ids"]) for x in b) + len(s["input_ids"]) <= MAX_SEQ_LEN), None)
        if fit is None:
            bins.append([s])
        else:
            fit.append(s)
    mbs = [_materialize(b) for b in bins]
    padded = sum(_pad(mb) for mb in mbs)
    dummies = -len(mbs) % ranks
    for _ in range(dummies):
        dummy = copy.deepcopy(mbs[0])
        dummy["advantages"] = [0.0] * len(dummy["input_ids"])
        dummy["loss_mask"] = [False] * len(dummy["input_ids"])
        mbs.append(dummy)
    folder = out / "rollouts" / f"step_{step}"
    folder.mkdir(parents=True)
    for r in range(ranks):
        (folder / f"rank_{r}.bin").write_bytes(msgpack.packb([_encode(mb) for mb in mbs[r::ranks]]))
    return {"padded": padded, "dummies": dummies, "micro_batches": len(mbs)}


# --- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory, dense_model):
    """A real compare run (4 prompts x 2 samples) and a prime-rl dump of its rows: step_2 holds rows 0-4 (padding
    and a dummy micro-batch), step_10 rows 5-7 with routed experts (steps in numeric, not name, order)."""
    base = tmp_path_factory.mktemp("prime_rl")
    roll = base / "X.jsonl"
    argv = ["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--num-prompts", "4"]
    argv += ["--samples", "2", "--max-new-tokens", "16", "--temperature", str(TEMPERATURE)]
    with pytest.raises(SystemExit) as e:
        from trm_diag.cli import main

        main([*argv, "--save-rollouts", str(roll), "-q", "--out", str(base / "Y")])
    assert e.value.code in (0, None)
    src = [json.loads(line) for line in roll.read_text().splitlines()]
    assert len(src) == 8 and len({(tuple(r["prompt_ids"]), tuple(r["response_ids"])) for r in src}) == 8
    rng = np.random.default_rng(7)
    adv = rng.normal(size=len(src)).round(6).tolist()
    routed = [rng.integers(0, 64, size=(len(r["prompt_ids"]) + len(r["response_ids"]), LAYERS, TOPK)) for r in src]
    routed = [x.astype(np.int32) for x in routed]
    out = base / "out"
    info2 = write_step(out, 2, [_sample(src[i], adv[i], None) for i in range(5)])
    info10 = write_step(out, 10, [_sample(src[i], adv[i], routed[i]) for i in range(5, 8)])
    assert info2["padded"] > 0 and info2["dummies"] == 1 and info10["padded"] > 0  # the cases the reader must undo
    return {"base": base, "roll": roll, "src": src, "adv": adv, "routed": routed, "out": out}


def _key(row: dict) -> tuple:
    return tuple(row["prompt_ids"]), tuple(row["response_ids"])


# --- reading ---------------------------------------------------------------------------------------------------------
def test_rows_equal_the_rollout_rows_they_were_packed_from(run):
    got = list(rows(run["out"], allow_pickle=False))
    src = {_key(r): i for i, r in enumerate(run["src"])}
    assert len(got) == 8 and [row["step"] for _, row in got] == [2] * 5 + [10] * 3
    assert {src[_key(row)] for _, row in got[:5]} == set(range(5)) and {src[_key(row)] for _, row in got[5:]} == {
        5,
        6,
        7,
    }
    for where, row in got:
        i = src[_key(row)]
        want = run["src"][i]
        assert row["prompt_ids"] == want["prompt_ids"] and row["response_ids"] == want["response_ids"], where
        # stored as msgpack float64: the engine's values come back bit for bit
        assert row["rollout_logprobs"] == want["rollout_logprobs"], where
        assert row["temperature"] == TEMPERATURE and row["advantage"] == run["adv"][i]
        assert "train_logprobs" not in row and "reward" not in row
        if row["step"] == 10:
            full = run["routed"][i]
            assert row["routed_experts"] == full[len(want["prompt_ids"]) :].tolist()
            assert np.asarray(row["routed_experts"]).shape == (len(want["response_ids"]), LAYERS, TOPK)
        else:
            assert "routed_experts" not in row
        assert f"step {row['step']}, sample {row['sample_idx']}" in where and "rank_" in where
    for step in (2, 10):
        these = [row for _, row in got if row["step"] == step]
        assert sorted(r["sample_idx"] for r in these) == list(range(len(these)))
        by_prompt = {}
        for r in these:  # one prompt_idx per distinct prompt, numbered from 0 within the step
            by_prompt.setdefault(tuple(r["prompt_ids"]), set()).add(r["prompt_idx"])
        assert all(len(v) == 1 for v in by_prompt.values())
        assert sorted(v.pop() for v in by_prompt.values()) == list(range(len(by_prompt)))


def test_a_step_folder_the_rollouts_folder_and_one_file_read_the_same_rows(run):
    whole = [row for _, row in rows(run["out"], allow_pickle=False)]
    assert [row for _, row in rows(run["out"] / "rollouts", allow_pickle=True)] == whole
    assert [row for _, row in rows(run["out"] / "rollouts" / "step_10", allow_pickle=False)] == whole[5:]
    # one rank alone: the same samples, numbered over what is read (the dump holds no indices of its own)
    one = [row for _, row in rows(run["out"] / "rollouts" / "step_2" / "rank_1.bin", allow_pickle=False)]
    assert [r["sample_idx"] for r in one] == list(range(len(one))) and len(one) == 2

    def bare(r):
        return {k: v for k, v in r.items() if k not in ("prompt_idx", "sample_idx")}

    assert all(bare(r) in [bare(w) for w in whole[:5]] for r in one)


def test_detect(run, tmp_path):
    out = run["out"]
    for path in (out, out / "rollouts", out / "rollouts" / "step_2", out / "rollouts" / "step_2" / "rank_0.bin"):
        assert detect(path) and detect_any(path) == "prime-rl", path
    (tmp_path / "step_0").mkdir()
    (tmp_path / "step_0" / "rank_0.bin").write_bytes(b"\x80")  # a msgpack map, not a list of micro-batches
    (tmp_path / "empty").mkdir()
    for path in (run["roll"], tmp_path / "empty", tmp_path / "step_0" / "rank_0.bin", tmp_path / "missing"):
        assert not detect(path), path


def test_score_of_the_dump_equals_score_of_the_rollout_file(run, dense_model, capsys):
    """Same tokens.parquet columns, rows joined by (prompt, response); the dump needs no --allow-pickle."""
    outs = {}
    for name, argv in (
        ("file", [str(run["roll"])]),
        ("dump", [str(run["out"]), "--format", "prime-rl"]),
        ("detected", [str(run["out"] / "rollouts" / "step_2"), "--allow-pickle"]),
    ):
        o = run["base"] / f"score_{name}"
        code, _, err = run_cli(
            ["score", *argv, "--model", str(dense_model), "--fidelity", "sampled", "--out", str(o), "-q"], capsys
        )
        assert code == 0, err
        outs[name] = o

    def by_sequence(o: Path) -> dict:
        seqs = pq.read_table(o / "sequences.parquet").to_pylist()
        toks = pq.read_table(o / "tokens.parquet", columns=["seq_id", "pos", "lp_roll", "lp_train", "log_ratio"])
        toks = toks.to_pylist()
        key = {s["seq_id"]: (tuple(s["prompt_token_ids"]), tuple(s["response_token_ids"])) for s in seqs}
        table: dict = {}
        for t in sorted(toks, key=lambda t: (t["seq_id"], t["pos"])):
            table.setdefault(key[t["seq_id"]], []).append((t["lp_roll"], t["lp_train"], t["log_ratio"]))
        return table

    want = by_sequence(outs["file"])
    for name in ("dump", "detected"):
        got = by_sequence(outs[name])
        assert set(got) <= set(want) and len(got) == (8 if name == "dump" else 5)
        for k, cols in got.items():
            a, b = np.asarray(cols, dtype=np.float64), np.asarray(want[k], dtype=np.float64)
            # lp_roll is the same stored value; lp_train comes from the same fp32 forward of the same tokens, in
            # another batch: a float32 rounding or two of the log-probs' magnitude (2**-23 relative per ulp)
            assert np.array_equal(a[:, 0], b[:, 0])
            np.testing.assert_allclose(a[:, 1:], b[:, 1:], rtol=4 * 2.0**-23, atol=4 * 2.0**-23 * np.abs(b).max())


# --- hostile and unsupported inputs: one-line errors -----------------------------------------------------------------
def _one(src_rows: list[dict], tmp_path: Path, edit=None, step: int = 0) -> Path:
    """A one-step, one-rank dump of the given rollout rows; ``edit`` changes the encoded micro-batches."""
    out = tmp_path / "out"
    write_step(out, step, [_sample(r, 0.5, None) for r in src_rows], ranks=1)
    f = out / "rollouts" / f"step_{step}" / "rank_0.bin"
    if edit is not None:
        mbs = msgpack.unpackb(f.read_bytes())
        edit(mbs)
        f.write_bytes(msgpack.packb(mbs))
    return f


def _error(path: Path, needle: str) -> str:
    with pytest.raises(InputError) as e:
        list(rows(path, allow_pickle=True))
    msg = str(e.value)
    assert needle in msg and "Fix:" in msg and "\n" not in msg, msg
    return msg


def test_a_truncated_or_empty_file_is_named(run, tmp_path):
    f = _one(run["src"][:3], tmp_path)
    data = f.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 0):
        f.write_bytes(data[:cut])
        _error(f, "is not a complete msgpack file")
    f.write_bytes(data + b"\xc0")  # trailing garbage
    _error(f, "is not a complete msgpack file")


def test_mismatched_lengths_are_named(run, tmp_path):
    def drop_logprob(mbs):
        mbs[0][3].pop()

    _error(_one(run["src"][:3], tmp_path / "a", drop_logprob), "'inference_logprobs' has")

    def bad_lengths(mbs):
        mbs[0][5][0] += 1
        mbs[0][8][0] += 1

    _error(_one(run["src"][:3], tmp_path / "b", bad_lengths), "do not split its")

    def short_routing(mbs):
        mbs[0].append(None)
        mbs[0].append([b"\0" * 12, [len(mbs[0][0]), LAYERS, TOPK], "int32"])

    _error(_one(run["src"][:3], tmp_path / "c", short_routing), "'routed_experts' holds 12 bytes")


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda mbs: mbs[0].pop(8), "a micro-batch of 8 fields"),  # before seq_lens (prime-rl 0be5ac452)
        (lambda mbs: mbs[0].insert(8, None), "field 'seq_lens' is NoneType"),  # ref_logprobs where seq_lens is
        (lambda mbs: mbs[0].__setitem__(5, [float(x) for x in mbs[0][6]]), "field 'sequence_lengths' has float64"),
        (lambda mbs: mbs[0].extend([None, None, [1, 2]]), "field 'mm_kwargs' is not a map"),  # lora_num_tokens era
        (lambda mbs: mbs.__setitem__(0, {"input_ids": []}), "is not a list of prime-rl micro-batches"),
    ],
)
def test_layouts_this_reader_does_not_know_are_refused(run, tmp_path, edit, needle):
    msg = _error(_one(run["src"][:3], tmp_path, edit), needle)
    assert "289562d2e" in msg


def test_multi_turn_tokens_come_with_their_loss_mask_and_varying_temperature_is_refused(run, tmp_path):
    p, n = len(run["src"][0]["prompt_ids"]), len(run["src"][0]["response_ids"])

    def tool_token(mbs):  # a loss-mask 0 token inside the first sample's response
        mbs[0][1][p + 5] = False

    (_, row), = rows(_one(run["src"][:1], tmp_path / "a", tool_token), allow_pickle=True)  # fmt: skip
    assert row["response_ids"] == run["src"][0]["response_ids"]
    assert row["loss_mask"] == [t != 5 for t in range(n)]

    def tail_token(mbs):  # ... or after it (a trailing context token, not padding: its position keeps counting)
        mbs[0][1][p + n - 1] = False

    (_, row), = rows(_one(run["src"][:1], tmp_path / "b", tail_token), allow_pickle=True)  # fmt: skip
    assert len(row["response_ids"]) == n and row["loss_mask"] == [t != n - 1 for t in range(n)]
    (_, row), = rows(_one(run["src"][:1], tmp_path / "e"), allow_pickle=True)  # fmt: skip
    assert "loss_mask" not in row  # every token trained on: no mask

    def two_temperatures(mbs):
        mbs[0][6][p + 3] = 1.0

    _error(_one(run["src"][:1], tmp_path / "c", two_temperatures), "varying temperature within one sample")

    def images(mbs):
        mbs[0].extend([None, None, {"pixel_values": ["float32", [1], b"\0" * 4]}])

    _error(_one(run["src"][:1], tmp_path / "d", images), "multimodal samples (images) are not supported yet")


def test_missing_or_partial_ranks_and_stray_files_are_named(run, tmp_path):
    out = tmp_path / "run"
    write_step(out, 0, [_sample(r, 0.5, None) for r in run["src"][:5]], ranks=3)
    write_step(out, 1, [_sample(r, 0.5, None) for r in run["src"][5:]], ranks=3)
    (out / "rollouts" / "step_1" / "rank_2.bin").rename(out / "rollouts" / "step_1" / "rank_2.bin.tmp")
    _error(out, "step_1 of")  # the step still being written has fewer ranks than the others
    (out / "rollouts" / "step_0" / "rank_1.bin").unlink()
    _error(out / "rollouts" / "step_0", "has no rank_1.bin")
    stray = tmp_path / "rank_0.bin"
    stray.write_bytes((out / "rollouts" / "step_0" / "rank_0.bin").read_bytes())
    _error(stray, "cannot tell the step of")
    _error(tmp_path / "nothing", "does not exist")
    (tmp_path / "plain").mkdir()
    _error(tmp_path / "plain", "no prime-rl rollout dump in")


def test_a_pickle_named_like_a_rank_file_is_never_loaded(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    f = tmp_path / "step_0" / "rank_0.bin"
    f.parent.mkdir()
    f.write_bytes(pickle.dumps([Payload()]))
    assert not detect(f) and not detect(f.parent)
    _error(f, "is not a complete msgpack file")
    assert not marker.exists()


def test_score_refuses_a_damaged_dump_in_one_line(run, tmp_path, dense_model, capsys):
    f = _one(run["src"][:3], tmp_path)
    f.write_bytes(f.read_bytes()[:-7])
    o = tmp_path / "o"
    code, _, err = run_cli(["score", str(f.parent), "--model", str(dense_model), "--out", str(o), "-q"], capsys)
    assert code == 2 and "is not a complete msgpack file" in err and len(err.strip().splitlines()) == 1, err
    assert not (o / "summary.json").exists()


def test_without_msgpack_the_error_names_the_install(run, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "msgpack", None)  # `import msgpack` now fails
    _error(run["out"], "pip install msgpack")
