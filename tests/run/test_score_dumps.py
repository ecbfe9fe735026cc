"""`score` on training-run dumps end to end: the trainer's recorded log-probs with no model, the replay view
from the engine's own kept set, context tokens under a loss mask, and router flips from the engine's
recorded experts. Dumps are written the way slime writes them (tests/report/dumps/test_slime.py) from real
runs of the bundled models; every expected value is recomputed here in float64 from a plain transformers
forward, not through trm-diag's scoring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import main_exit, run_cli
from tests.report.dumps.test_slime import _sample_dict, _train_payload

DENSE, MOE = "sample_data/tiny-llama", "sample_data/tiny-qwen3-moe"
TEMPERATURE = 0.8
F32 = 2.0**-24  # float32 rounding, relative


def _compare_run(d: Path, model: str) -> tuple[list[dict], list[list[float]]]:
    """Rollouts of a real compare run (hf bf16 sampler, fp32 trainer) and the trainer's log-probs per token."""
    argv = ["compare", "--model", model, "--rollout", "hf:dtype=bfloat16", "--num-prompts", "4",
            "--max-new-tokens", "16", "--temperature", str(TEMPERATURE), "--save-rollouts", str(d / "x.jsonl"),
            "-q", "--out", str(d / "cmp")]  # fmt: skip
    assert main_exit(argv) == 0
    rows = [json.loads(line) for line in (d / "x.jsonl").read_text().splitlines()]
    tok = pq.read_table(d / "cmp" / "tokens.parquet", columns=["seq_id", "pos", "lp_train"]).to_pydict()
    lp = [[] for _ in rows]
    for s, _p, v in sorted(zip(tok["seq_id"], tok["pos"], tok["lp_train"])):
        lp[s].append(v)
    return rows, lp


def _dump(root: Path, rows: list[dict], lp_train: list[list[float]], **per_sample) -> Path:
    """A one-step slime dump (rollout_data/1.pt + train_data/1.pt); per_sample[key][i] overrides sample i's key."""
    samples = [_sample_dict(r, i, **{k: v[i] for k, v in per_sample.items() if i in v}) for i, r in enumerate(rows)]
    (root / "rollout_data").mkdir(parents=True)
    (root / "train_data").mkdir()
    torch.save({"rollout_id": 1, "samples": samples}, root / "rollout_data" / "1.pt")
    torch.save(_train_payload(1, samples, lp_train), root / "train_data" / "1.pt")
    return root


def _tokens(out: Path, *cols: str) -> dict[str, list]:
    return pq.read_table(out / "tokens.parquet", columns=["seq_id", "pos", *cols]).to_pydict()


def _by_seq(t: dict[str, list], col: str) -> dict[int, list]:
    out: dict[int, list] = {}
    for s, _p, v in sorted(zip(t["seq_id"], t["pos"], t[col])):
        out.setdefault(s, []).append(v)
    return out


def _trainer_logprobs(model: str, rows: list[dict], temperatures: list[float] | None = None) -> list[np.ndarray]:
    """float64 tempered log-softmax rows [T, V] of the fp32 trainer at each response token, one sequence at a time."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for i, r in enumerate(rows):
            p, y = r["prompt_ids"], r["response_ids"]
            logits = m(torch.tensor([p + y])).logits[0, len(p) - 1 : len(p) - 1 + len(y)].double().numpy()
            x = logits / (temperatures[i] if temperatures else TEMPERATURE)
            top = x.max(axis=1, keepdims=True)
            out.append(x - top - np.log(np.exp(x - top).sum(axis=1, keepdims=True)))
    return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = tmp_path_factory.mktemp("score_dumps")
    rows, lp = _compare_run(d, DENSE)
    return {"dir": d, "rows": rows, "lp": lp, "dump": _dump(d / "dump", rows, lp)}


def test_a_dump_with_both_sides_needs_no_model(dense, capsys):
    """No --model, no --train: the trainer's recorded log-probs are the training side, equal to a re-score of the
    same tokens to float32 rounding (they are the fp32 trainer's values stored as float32)."""
    out, ref = dense["dir"] / "free", dense["dir"] / "ref"
    code, _, err = run_cli(
        ["score", str(dense["dump"]), "--allow-pickle", "--temperature", "0.8", "--out", str(out)], capsys
    )
    assert code == 0, err
    code, _, err = run_cli(
        ["score", str(dense["dir"] / "x.jsonl"), "--model", DENSE, "--fidelity", "sampled", "--temperature", "0.8",
         "-q", "--out", str(ref)], capsys,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["spec"] == "recorded" and summary["train"]["model"] is None
    assert summary["fidelity"] == "sampled" and summary["rollout"]["recorded"]["train_logprobs"] == len(dense["rows"])
    assert summary["views"]["truncated"] is None and "as the run computed it" in summary["views"]["note"]
    got, want = _tokens(out, "lp_train", "lp_roll", "token_id"), _tokens(ref, "lp_train", "lp_roll", "token_id")
    assert got["token_id"] == want["token_id"] and got["lp_roll"] == want["lp_roll"]
    for s, lps in _by_seq(got, "lp_train").items():  # exactly the stored float32 values
        assert lps == [float(np.float32(x)) for x in dense["lp"][s]]
    for a, b in zip(got["lp_train"], want["lp_train"]):  # float32 storage, and two fp32 passes of other batches
        assert abs(a - b) <= F32 * max(abs(a), abs(b)) + F32, (a, b)
    # every metric and mask from the same tokens: k1 mean agrees to float32 rounding, the masks' decisions equal
    m, r = summary["metrics"], json.loads((ref / "summary.json").read_text())["metrics"]
    lr = np.asarray(want["lp_train"]) - np.asarray(want["lp_roll"])
    for key in ("kl", "k3_kl", "log_ppl_abs_diff"):  # means of per-token values each within F32 (1 + |lr|)
        assert abs(m[key] - r[key]) <= F32 * (1 + np.abs(lr).max()) * 2, key
    code, out_text, err = run_cli(["diff", str(ref), str(out)], capsys)  # a report without a model diffs cleanly
    assert code == 0 and "vocabulary" not in out_text + err, out_text + err
    cols = ["seq_id", "accept_trm_max", "accept_trm_avg", "accept_combined", "accept_ln_trm", "accept_ser"]
    sa = pq.read_table(out / "sequences.parquet").to_pydict()
    sb = pq.read_table(ref / "sequences.parquet").to_pydict()
    assert [sa[c] for c in cols if c in sa] == [sb[c] for c in cols if c in sb] and "accept_trm_max" in sa


def test_no_model_is_loaded_without_one(dense, tmp_path):
    """The model-free path imports neither transformers nor vLLM (a fresh process)."""
    code = (
        "import sys\nfrom trm_diag.cli.entry import main\n"
        f"try:\n    main(['score', {str(dense['dump'])!r}, '--allow-pickle', '-q', '--out', {str(tmp_path / 'o')!r}])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'transformers' not in sys.modules and 'vllm' not in sys.modules, 'a model backend was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "o" / "summary.json").is_file()


def test_recorded_needs_every_row_and_refuses_what_it_cannot_give(dense, capsys, tmp_path):
    rows = dense["rows"][:2]
    d = _dump(tmp_path / "d", rows, dense["lp"][:2])
    for extra in (["--top-p", "0.9"], []):  # a view other than the pipeline's, with or without truncation options
        code, _, err = run_cli(["score", str(d), "--allow-pickle", "--view", "replay", *extra,
                                "--out", str(tmp_path / "o")], capsys)  # fmt: skip
        assert code == 2 and "needs the trainer's rows" in err and "--model" in err
    code, _, err = run_cli(
        ["score", str(d), "--allow-pickle", "--fidelity", "topk", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "recorded log-probs do not have" in err
    code, _, err = run_cli(
        ["score", str(dense["dir"] / "x.jsonl"), "--train", "recorded", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "no train_logprobs" in err and "--model" in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "o").exists()


def _random_kept_sets(rows: list[dict], vocab: int, seed: int) -> list[list[list[int]]]:
    """A kept set per response token: random ids and the sampled token (any set the engine could have kept)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in rows:
        sets = []
        for y in r["response_ids"]:
            k = int(rng.integers(1, 40))
            ids = set(rng.choice(vocab, size=k, replace=False).tolist()) | {y}
            sets.append(sorted(ids))
        out.append(sets)
    return out


def _slime_kept(sets: list[list[int]]) -> dict:
    ids = [t for s in sets for t in s]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])])
    return {"rollout_top_p_token_ids": torch.tensor(ids, dtype=torch.int32),
            "rollout_top_p_token_offsets": torch.tensor(offsets, dtype=torch.int32)}  # fmt: skip


def test_replay_view_uses_the_engines_kept_set(dense, capsys, tmp_path):
    """--view replay on a re-scored dump with kept sets: lp_train is log q(y) - log sum_{K_t} q, recomputed here in
    float64 from the trainer's logits and the dump's K_t."""
    rows = dense["rows"]
    sets = _random_kept_sets(rows, 2048, seed=3)
    over = {"rollout_top_p_token_ids": {}, "rollout_top_p_token_offsets": {}}
    for i, s in enumerate(sets):
        for k, v in _slime_kept(s).items():
            over[k][i] = v
    d = _dump(tmp_path / "kept", rows, dense["lp"], **over)
    out = tmp_path / "replay"
    code, _, err = run_cli(
        ["score", str(d), "--allow-pickle", "--model", DENSE, "--view", "replay", "--temperature", "0.8",
         "--top-p", "0.9", "-q", "--out", str(out)], capsys,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["view"] == "replay" and "engine's own kept set" in summary["rollout"]["kept_set"]
    got = _by_seq(_tokens(out, "lp_train"), "lp_train")
    lq = _trainer_logprobs(DENSE, rows)
    moved = 0.0
    for i, r in enumerate(rows):
        for t, y in enumerate(r["response_ids"]):
            full = lq[i][t, y]
            want = full - np.log(sum(np.exp(lq[i][t, k]) for k in sets[i][t]))
            # float32 logits (batched vs one at a time) through log-softmax: a few ulp of |logit| <= ~20
            assert abs(got[i][t] - want) <= 1e-5, (i, t, got[i][t], want)
            moved = max(moved, abs(want - full))
    assert moved > 1e-2  # the kept set changes the numbers: a test that ignores it fails


def test_context_tokens_under_a_loss_mask_are_not_scored(dense, capsys, tmp_path):
    """A multi-turn sample's tool tokens (loss_mask 0) stay in the context and leave the tables; positions count the
    policy's tokens, and the scored tokens' values equal those of the same sequence scored whole."""
    rows = dense["rows"]
    n0 = len(rows[0]["response_ids"])
    mask = [0 if 4 <= t < 8 else 1 for t in range(n0)]
    d = _dump(tmp_path / "mt", rows, dense["lp"], loss_mask={0: mask})
    for extra, name in (([], "free"), (["--model", DENSE], "model")):
        out = tmp_path / name
        code, _, err = run_cli(["score", str(d), "--allow-pickle", "--temperature", "0.8", *extra,
                                "--out", str(out)], capsys)  # fmt: skip
        assert code == 0, err
        assert "4 response token(s) have loss_mask 0" in err
        t = _tokens(out, "lp_train", "token_id")
        keep = [i for i, m in enumerate(mask) if m]
        assert _by_seq(t, "token_id")[0] == [rows[0]["response_ids"][i] for i in keep]
        assert sorted(p for s, p in zip(t["seq_id"], t["pos"]) if s == 0) == list(range(len(keep)))
        for a, i in zip(_by_seq(t, "lp_train")[0], keep):
            assert abs(a - dense["lp"][0][i]) <= F32 * abs(a) + F32
        seqs = pq.read_table(out / "sequences.parquet", columns=["seq_id", "length"]).to_pydict()
        assert dict(zip(seqs["seq_id"], seqs["length"]))[0] == len(keep)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rollout"]["loss_mask"] == {"rollouts": 1, "tokens_not_scored": 4, "placeholder_eos": 0}
        worst = {w["seq_id"]: w for w in summary["worst_sequences"]}[0]  # every sequence is among the worst 5
        assert 0 <= worst["pos"] < worst["length"] == len(keep)  # t counts scored tokens, as tokens.parquet
        tok = dict(zip(zip(t["seq_id"], t["pos"]), t["token_id"]))
        assert summary["worst_sequences"] and tok[(0, worst["pos"])] == rows[0]["response_ids"][keep[worst["pos"]]]


def test_worst_token_maps_back_through_the_mask():
    from trm_diag.report.assemble import _response_pos
    from trm_diag.types import Rollout

    r = Rollout(0, 0, 0, [1], [5, 6, 7, 8, 9], [0.0] * 5, "stop", {"loss_mask": np.array([1, 0, 0, 1, 1], bool)})
    assert [_response_pos(r, t) for t in range(3)] == [0, 3, 4]
    assert _response_pos(Rollout(0, 0, 0, [1], [5], [0.0], "stop"), 0) == 0


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    d = tmp_path_factory.mktemp("score_moe")
    rows, lp = _compare_run(d, MOE)
    return {"dir": d, "rows": rows, "lp": lp}


def _trainer_experts(rows: list[dict], k: int) -> list[np.ndarray]:
    """The fp32 trainer's top-k experts per input position ([len(tokens) - 1, layers, k]), as slime records them."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(MOE, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for r in rows:
            ids = r["prompt_ids"] + r["response_ids"]
            res = m(torch.tensor([ids]), output_router_logits=True)
            logits = torch.stack([x.view(len(ids), -1) for x in res.router_logits])  # (layers, L, E)
            top = torch.topk(logits.double(), k, dim=-1).indices  # (layers, L, k)
            out.append(top.permute(1, 0, 2)[:-1].numpy().astype(np.int32))
    return out


def test_router_flips_from_the_engines_recorded_experts(moe, capsys, tmp_path):
    """Engine experts = the trainer's own top-k except at chosen (token, layer) pairs, where one expert is swapped for
    one outside the set: route_flips counts exactly the swapped layers of each response token."""
    rows, k, n_experts = moe["rows"], 2, 8
    experts = _trainer_experts(rows, k)
    rng = np.random.default_rng(5)
    swapped: dict[tuple[int, int], int] = {}
    for i, r in enumerate(rows):
        p, n = len(r["prompt_ids"]), len(r["response_ids"])
        for t in rng.choice(n, size=min(3, n), replace=False):
            layers = rng.choice(experts[i].shape[1], size=int(rng.integers(1, 3)), replace=False)
            for layer in layers:
                row = experts[i][p - 1 + t, layer]
                row[0] = next(e for e in range(n_experts) if e not in row)
            swapped[(i, int(t))] = len(layers)
    n0 = len(rows[0]["response_ids"])
    mask0 = [0, 0] + [1] * (n0 - 2)  # sample 0's first two tokens are context: their routes are not scored
    routed = {i: torch.tensor(e) for i, e in enumerate(experts)}
    d = _dump(tmp_path / "moe", rows, moe["lp"], rollout_routed_experts=routed, loss_mask={0: mask0})
    out = tmp_path / "o"
    code, _, err = run_cli(["score", str(d), "--allow-pickle", "--model", MOE, "--temperature", "0.8", "-q",
                            "--out", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    t = _tokens(out, "route_flips")
    flips = {(s, p): f for s, p, f in zip(t["seq_id"], t["pos"], t["route_flips"])}
    want = {(i, t - 2 if i == 0 else t): f for (i, t), f in swapped.items() if i or t >= 2}  # policy positions
    assert flips == {key: want.get(key, 0) for key in flips}
    assert len(flips) == sum(len(r["response_ids"]) for r in rows) - 2
    routing = json.loads((out / "summary.json").read_text())["routing"]
    assert routing["available"] and routing["token_any_flip_rate"] == pytest.approx(len(want) / len(flips))
    assert "trainer side only" in routing["margin"]
    rt = pq.read_table(out / "routing.parquet", columns=["seq_id", "pos"]).to_pydict()
    assert max(p for s, p in zip(rt["seq_id"], rt["pos"]) if s == 0) == n0 - 3  # routing rows follow the mask


def test_a_glob_of_steps_reads_like_the_folder(dense, capsys, tmp_path):
    """A quoted glob over one step's files per step: the same report as the dump folder, steps in numeric order
    (10 after 2), and a pattern that matches nothing is a one-line error."""
    rows, lp = dense["rows"], dense["lp"]
    root = tmp_path / "dump"
    (root / "rollout_data").mkdir(parents=True)
    (root / "train_data").mkdir()
    for step, which in ((10, [2, 3]), (2, [0, 1])):
        samples = [_sample_dict(rows[i], i) for i in which]
        torch.save({"rollout_id": step, "samples": samples}, root / "rollout_data" / f"{step}.pt")
        torch.save(_train_payload(step, samples, [lp[i] for i in which]), root / "train_data" / f"{step}.pt")
    outs = {}
    for name, arg in (("folder", str(root)), ("glob", str(root / "rollout_data" / "*.pt"))):
        outs[name] = tmp_path / name
        code, _, err = run_cli(["score", arg, "--allow-pickle", "-q", "--out", str(outs[name])], capsys)
        assert code == 0, err
    a, b = (pq.read_table(outs[n] / "tokens.parquet").to_pydict() for n in ("folder", "glob"))
    assert a == b
    steps = json.loads((outs["glob"] / "summary.json").read_text())["steps"]
    assert [s["step"] for s in steps] == [2, 10]
    code, _, err = run_cli(
        ["score", str(root / "nothing" / "*.pt"), "--allow-pickle", "--out", str(tmp_path / "x")], capsys
    )
    assert code == 2 and "matches no file" in err


def test_an_engine_only_dump_without_a_model_is_refused(dense, capsys, tmp_path):
    """A dump with no trainer side (no train_data/: the engine's log-probs only) and no --model: nothing to compare
    with, never the bundled sample model in its place."""
    d = _dump(tmp_path / "d", dense["rows"][:2], dense["lp"][:2])
    for f in (d / "train_data").iterdir():
        f.unlink()
    (d / "train_data").rmdir()
    code, _, err = run_cli(["score", str(d), "--allow-pickle", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "carries no trainer log-probs" in err and "--model PATH" in err
    assert len(err.strip().splitlines()) <= 2 and not (tmp_path / "o").exists()


def test_a_glob_over_files_of_several_formats_is_refused(dense, capsys, tmp_path):
    d = _dump(tmp_path / "d", dense["rows"][:1], dense["lp"][:1])
    (d / "rollout_data" / "rows.jsonl").write_text((dense["dir"] / "x.jsonl").read_text().splitlines()[0] + "\n")
    code, _, err = run_cli(
        ["score", str(d / "rollout_data" / "*"), "--allow-pickle", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "matches files in several formats" in err


@pytest.mark.parametrize(
    ("k", "value", "needle"),
    [(3, 0, "(3, "), (2, 100, "outside 0..7"), (2, 1, "repeated within a token's k")],  # the model: 8 experts, k 2
)
def test_routed_experts_of_another_model_are_named(moe, capsys, tmp_path, k, value, needle):
    rows = moe["rows"][:1]
    n = len(rows[0]["prompt_ids"]) + len(rows[0]["response_ids"]) - 1
    wrong = torch.full((n, 3, k), value, dtype=torch.int32)
    d = _dump(tmp_path / "d", rows, moe["lp"][:1], rollout_routed_experts={0: wrong})
    code, _, err = run_cli(["score", str(d), "--allow-pickle", "--model", MOE, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "the experts were not recorded by this model" in err and needle in err
    assert not (tmp_path / "o").exists()  # refused mid-run: the claimed folder goes, nothing half-written stays


def test_rollouts_of_several_temperatures_are_each_scored_at_their_own(dense, capsys, tmp_path):
    """prime-rl records a temperature per sample: a re-score tempers the trainer as each rollout's engine was."""
    temps = [0.7, 0.7, 1.0, 1.0]
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({**r, "temperature": t}) + "\n" for r, t in zip(dense["rows"], temps)))
    out = tmp_path / "o"
    code, _, err = run_cli(
        ["score", str(f), "--model", DENSE, "--fidelity", "sampled", "-q", "--out", str(out)], capsys
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampling"]["temperature"] is None and summary["sampling"]["temperatures"] == [0.7, 1.0]
    assert summary["compared_distribution"].startswith("each rollout's own temperature (0.7, 1)")
    got = _by_seq(_tokens(out, "lp_train"), "lp_train")
    lq = _trainer_logprobs(DENSE, dense["rows"], temps)
    for i, r in enumerate(dense["rows"]):
        for t, y in enumerate(r["response_ids"]):
            assert abs(got[i][t] - lq[i][t, y]) <= 1e-5, (i, t)  # float32 logits, as in the replay test
    one_less = [{**r, "temperature": t} for r, t in zip(dense["rows"], temps)]
    del one_less[3]["temperature"]
    f.write_text("".join(json.dumps(r) + "\n" for r in one_less))
    code, _, err = run_cli(["score", str(f), "--model", DENSE, "-q", "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "mixes temperatures [0.7, 1.0] and 1 rollout(s) carry none" in err


def _kept_file(path: Path, rows: list[dict], sets: list[list[list[int]]]) -> Path:
    path.write_text("".join(json.dumps({**r, "kept_ids": k}) + "\n" for r, k in zip(rows, sets)))
    return path


def test_replay_from_kept_sets_is_float64_exact_at_its_limits(dense, capsys, tmp_path):
    """A kept set of the sampled token alone gives log q~(y) = 0 and the whole vocabulary gives the pipeline's
    log q(y), both to float64 rounding: no float32 step between the scores and log Q_t."""
    rows = dense["rows"]
    common = ["--model", DENSE, "--fidelity", "sampled", "--temperature", "0.8", "-q"]
    one = _kept_file(tmp_path / "one.jsonl", rows, [[[y] for y in r["response_ids"]] for r in rows])
    full = _kept_file(tmp_path / "all.jsonl", rows, [[list(range(2048)) for _ in r["response_ids"]] for r in rows])
    outs = {}
    for name, f, view in (("one", one, "replay"), ("all", full, "replay"), ("pipe", full, "pipeline")):
        outs[name] = tmp_path / name
        code, _, err = run_cli(["score", str(f), *common, "--view", view, "--out", str(outs[name])], capsys)
        assert code == 0, err
    one_lp = _tokens(outs["one"], "lp_train")["lp_train"]
    assert max(abs(x) for x in one_lp) <= 1e-12
    a, b = _tokens(outs["all"], "lp_train")["lp_train"], _tokens(outs["pipe"], "lp_train")["lp_train"]
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-12 * max(1.0, max(abs(y) for y in b))
    views = json.loads((outs["one"] / "summary.json").read_text())["views"]
    assert views["view"] == "replay" and "kept_ids" in views["kept_set"] and views["truncated"]


def test_replay_from_kept_sets_refuses_what_it_cannot_give(dense, capsys, tmp_path):
    rows = dense["rows"][:2]
    f = _kept_file(tmp_path / "k.jsonl", rows, [[[y] for y in r["response_ids"]] for r in rows])
    base = ["score", str(f), "--model", DENSE, "--view", "replay", "--temperature", "0.8", "--out", str(tmp_path / "o")]
    code, _, err = run_cli([*base, "--fidelity", "sampled", "--logprobs", "raw"], capsys)
    assert code == 2 and "--logprobs processed" in err
    topk = tmp_path / "t.jsonl"  # top-K data on every row: the top-K tier's intervals are the pipeline view's
    topk.write_text("".join(json.dumps({**json.loads(line), "topk_k": 1, "topk_logprobs": [[[y, -0.1]] for y in r["response_ids"]]})
                            + "\n" for line, r in zip(f.read_text().splitlines(), rows)))  # fmt: skip
    code, _, err = run_cli([*base[:1], str(topk), *base[2:]], capsys)
    assert code == 2 and "--fidelity sampled" in err
    assert not (tmp_path / "o").exists()


def test_a_fully_masked_input_is_refused(dense, capsys, tmp_path):
    rows = dense["rows"][:2]
    masks = {i: [0] * len(r["response_ids"]) for i, r in enumerate(rows)}
    d = _dump(tmp_path / "d", rows, dense["lp"][:2], loss_mask=masks)
    code, _, err = run_cli(["score", str(d), "--allow-pickle", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "nothing the policy sampled to score" in err
    d2 = _dump(tmp_path / "d2", rows, dense["lp"][:2], loss_mask={0: masks[0]})
    code, _, err = run_cli(["score", str(d2), "--allow-pickle", "-q", "--out", str(tmp_path / "o2")], capsys)
    assert code == 0 and "1 rollout(s) have no token the policy sampled" in err


def test_options_override_the_files_settings_one_by_one(dense, capsys, tmp_path):
    """--top-k alone keeps the file's temperature (it does not reset it to 1)."""
    f = tmp_path / "t.jsonl"
    drop = ("top_p", "top_k", "min_p")  # the file records its temperature only
    rows = [{**{k: v for k, v in r.items() if k not in drop}, "temperature": 0.8} for r in dense["rows"][:2]]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    code, _, err = run_cli(
        ["score", str(f), "--model", DENSE, "--fidelity", "sampled", "--top-k", "50", "-q", "--out", str(out)], capsys
    )
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert (s["sampling"]["temperature"], s["sampling"]["top_k"]) == (0.8, 50)
    assert s["rollout"]["sampling_from"] == "options and file"


def test_an_interrupted_score_does_not_offer_resume(monkeypatch, capsys):
    import trm_diag.run.score

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trm_diag.run.score, "run_score", interrupted)
    code, _, err = run_cli(["score", "x.jsonl"], capsys)
    assert code == 130 and "--resume" not in err and "run the command again" in err
