"""divergence.py against an independent float64 reference, plus the properties of docs/design.md section 2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trm_diag.math.divergence import exact_divergences, gather_logprobs, sampled_token_metrics


def ref_exact(lp: np.ndarray, lq: np.ndarray) -> dict[str, np.ndarray]:
    """Plain float64 definitions, row by row: KL(p||q) = sum p log(p/q), TV = 1/2 sum |p - q|."""
    out = {k: [] for k in ("kl", "kl_rev", "tv", "ent_roll", "ent_train")}
    for a, b in zip(lp.astype(np.float64), lq.astype(np.float64)):
        p, q = np.exp(a), np.exp(b)

        def kl(p, q, a, b):
            s = 0.0
            for pv, qv, av, bv in zip(p, q, a, b):
                if pv > 0:
                    s += math.inf if qv == 0 else pv * (av - bv)
            return s

        out["kl"].append(kl(p, q, a, b))
        out["kl_rev"].append(kl(q, p, b, a))
        out["tv"].append(0.5 * np.abs(p - q).sum())
        out["ent_roll"].append(-sum(pv * av for pv, av in zip(p, a) if pv > 0))
        out["ent_train"].append(-sum(qv * bv for qv, bv in zip(q, b) if qv > 0))
    return {k: np.array(v) for k, v in out.items()}


def random_logits(seed: int, n: int, v: int, scale: float, noise: float):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    y = x + torch.randn(n, v, generator=g, dtype=torch.float64) * noise
    return x, y


def random_pair(seed: int, n: int, v: int, scale: float, noise: float):
    """float32 log-probs, as the backends produce them."""
    x, y = random_logits(seed, n, v, scale, noise)
    return torch.log_softmax(x.float(), -1), torch.log_softmax(y.float(), -1)


CASES = [  # (scale of logits: 0.5 flat ... 40 near one-hot, noise between the sides)
    (0.5, 1e-3), (0.5, 0.5), (3.0, 1e-2), (3.0, 1.0), (10.0, 1e-3), (10.0, 0.3), (40.0, 1e-2), (40.0, 2.0),
]  # fmt: skip


@pytest.mark.parametrize("scale,noise", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_matches_float64_reference(scale, noise, seed):
    lp, lq = random_pair(seed, 6, 300, scale, noise)
    got = exact_divergences(lp, lq)
    # reference: the distributions the float32 inputs represent, renormalised in float64
    ref = ref_exact(torch.log_softmax(lp.double(), -1).numpy(), torch.log_softmax(lq.double(), -1).numpy())
    for k in ref:
        np.testing.assert_allclose(got[k].double().numpy(), ref[k], rtol=2e-4, atol=2e-7, err_msg=k)


def test_float64_inputs_give_float64_precision():
    x, y = random_logits(3, 4, 500, 5.0, 1e-3)
    lp, lq = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    got = exact_divergences(lp, lq)
    ref = ref_exact(lp.numpy(), lq.numpy())
    for k in ref:
        np.testing.assert_allclose(got[k].numpy(), ref[k], rtol=1e-9, atol=1e-15, err_msg=k)


def test_properties_on_random_inputs():
    for seed in range(20):
        scale = [0.3, 2, 8, 30][seed % 4]
        lp, lq = random_pair(seed, 16, 257, scale, [1e-3, 0.2, 3.0][seed % 3])
        d = exact_divergences(lp, lq)
        st = sampled_token_metrics(gather_logprobs(lp, torch.arange(16)), gather_logprobs(lq, torch.arange(16)))
        kl, tv = d["kl"].double(), d["tv"].double()
        assert (kl >= 0).all() and (d["kl_rev"] >= 0).all()
        assert ((tv >= 0) & (tv <= 1)).all()
        assert (tv <= torch.sqrt(kl / 2) + 1e-6).all(), "Pinsker"
        assert (st["tv_bin"] <= tv + 1e-6).all(), "binary TV is a lower bound"
        assert (st["kl_bin"] <= kl * (1 + 1e-4) + 1e-7).all(), "binary KL is a lower bound"


def test_identical_inputs_give_exact_zero():
    lp, _ = random_pair(0, 8, 1000, 10.0, 0.0)
    d = exact_divergences(lp, lp.clone())
    for k in ("kl", "kl_rev", "tv"):
        assert torch.count_nonzero(d[k]) == 0, k
    st = sampled_token_metrics(lp[:, 0], lp[:, 0].clone())
    for k in ("log_ratio", "k1", "k2", "k3", "abs_rho_m1", "tv_bin", "kl_bin"):
        assert torch.count_nonzero(st[k]) == 0, k


def test_chunked_equals_unchunked():
    lp, lq = random_pair(5, 37, 999, 4.0, 0.3)
    whole = exact_divergences(lp, lq, chunk_elements=10**9)
    tiny = exact_divergences(lp, lq, chunk_elements=999 * 3)  # 3 rows per chunk
    for k in whole:
        torch.testing.assert_close(whole[k], tiny[k], rtol=0, atol=0)


def test_truncated_supports():
    # p puts mass where q has none -> KL(p||q) = inf; q's extra mass is counted in KL(q||p) = inf too
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    lq = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    d = exact_divergences(lp, lq)
    assert math.isinf(d["kl_rev"].item()) and d["kl_rev"].item() > 0
    assert d["kl"].item() == pytest.approx(0.5 * math.log(2.0), rel=1e-6)
    assert d["tv"].item() == pytest.approx(0.25, rel=1e-6)


def test_sampled_token_metrics_reference():
    g = torch.Generator().manual_seed(0)
    a = -torch.rand(200, generator=g, dtype=torch.float64) * 6  # log p(y_t)
    b = a + torch.randn(200, generator=g, dtype=torch.float64) * 0.3
    b = b.clamp(max=-1e-9)  # log q(y_t) <= 0
    st = sampled_token_metrics(a, b)
    for i in range(200):
        pa, pb = math.exp(a[i]), math.exp(b[i])
        lr = b[i].item() - a[i].item()
        assert st["log_ratio"][i] == pytest.approx(lr, abs=1e-12)
        assert st["k1"][i] == pytest.approx(-lr, abs=1e-12)
        assert st["k2"][i] == pytest.approx(lr * lr / 2, abs=1e-12)
        assert st["k3"][i] == pytest.approx(math.exp(lr) - 1 - lr, rel=1e-6, abs=1e-12)
        assert st["abs_rho_m1"][i] == pytest.approx(abs(pb / pa - 1), rel=1e-9)
        assert st["tv_bin"][i] == pytest.approx(abs(pa - pb), rel=1e-9, abs=1e-15)
        klb = pa * math.log(pa / pb) + (1 - pa) * math.log((1 - pa) / (1 - pb))
        assert st["kl_bin"][i] == pytest.approx(max(klb, 0.0), rel=1e-6, abs=1e-12)


def test_wide_vocabulary_row():
    x, y = random_logits(9, 3, 151_936, 6.0, 0.05)
    got = exact_divergences(torch.log_softmax(x.float(), -1), torch.log_softmax(y.float(), -1))
    lp, lq = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    p, q = lp.exp(), lq.exp()
    ref_kl = (p * (lp - lq)).sum(-1)
    ref_tv = 0.5 * (p - q).abs().sum(-1)
    torch.testing.assert_close(got["kl"].double(), ref_kl, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(got["tv"].double(), ref_tv, rtol=1e-4, atol=1e-6)


def _topk_inputs(lp: torch.Tensor, k: int, sampled: torch.Tensor):
    """The rollout side's view: its top-k log-probs plus the sampled token (as vLLM returns them)."""
    top_lp, top_ids = lp.topk(k, dim=-1)
    extra_lp = gather_logprobs(lp, sampled)[:, None]
    in_top = (top_ids == sampled[:, None]).any(-1, keepdim=True)
    ids = torch.cat([top_ids, sampled[:, None]], -1)
    lps = torch.cat([top_lp, torch.where(in_top, torch.full_like(extra_lp, -torch.inf), extra_lp)], -1)
    member = torch.cat([torch.ones_like(top_ids, dtype=torch.bool), torch.zeros_like(in_top)], -1)
    return lps, ids, member


@pytest.mark.parametrize("k", [1, 3, 20, 299])
@pytest.mark.parametrize("scale,noise", [(1.0, 0.3), (5.0, 0.05), (30.0, 1.0), (3.0, 2.0)])
def test_topk_interval_contains_exact_value(k, scale, noise):
    from trm_diag.math.divergence import topk_intervals

    lp, lq = random_pair(k, 8, 300, scale, noise)
    lp64, lq64 = torch.log_softmax(lp.double(), -1), torch.log_softmax(lq.double(), -1)
    sampled = torch.multinomial(lp64.exp(), 1, generator=torch.Generator().manual_seed(0)).squeeze(-1)
    iv = topk_intervals(*_topk_inputs(lp64, k, sampled), lq64)
    ex = exact_divergences(lp64, lq64)
    tol = 1e-9
    assert (iv["kl_lo"] <= ex["kl"] + tol).all() and (ex["kl"] <= iv["kl_hi"] + tol).all()
    assert (iv["tv_lo"] <= ex["tv"] + tol).all() and (ex["tv"] <= iv["tv_hi"] + tol).all()
    if k == 299:  # S covers the whole vocabulary but one token: the interval collapses
        torch.testing.assert_close(iv["tv_lo"], ex["tv"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(iv["kl_hi"], ex["kl"], rtol=1e-6, atol=1e-9)


def test_topk_interval_narrows_as_k_grows():
    from trm_diag.math.divergence import topk_intervals

    lp, lq = random_pair(4, 6, 400, 4.0, 0.2)
    lp64, lq64 = torch.log_softmax(lp.double(), -1), torch.log_softmax(lq.double(), -1)
    sampled = lp64.argmax(-1)
    widths = []
    for k in (2, 10, 50, 200):
        iv = topk_intervals(*_topk_inputs(lp64, k, sampled), lq64)
        widths.append(float((iv["kl_hi"] - iv["kl_lo"]).mean()))
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 10


def _ref64(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    lp, lq = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    p, q = lp.exp(), lq.exp()
    return {"kl": (p * (lp - lq)).sum(-1), "kl_rev": (q * (lq - lp)).sum(-1), "tv": 0.5 * (p - q).abs().sum(-1),
            "ent_roll": -(p * lp).sum(-1), "ent_train": -(q * lq).sum(-1)}  # fmt: skip


@pytest.mark.parametrize("scale,noise", CASES)
@pytest.mark.parametrize("kernel", ["eager", "native"])
def test_logit_divergences_match_float64_to_1e6_relative(scale, noise, kernel):
    from trm_diag.math.divergence import logit_divergences

    g = torch.Generator().manual_seed(int(scale * 100 + noise * 1000))
    a = torch.randn(9, 3000, generator=g) * scale
    b = a + torch.randn(9, 3000, generator=g) * noise
    got, ref = (
        logit_divergences(a, b, kernel=kernel),
        _ref64(a, b),
    )  # the float64 reference sees the same float32 logits
    for k in ref:
        big = ref[k].abs() > 1e-8  # values float32 logits can resolve
        rel = ((got[k] - ref[k]).abs() / ref[k].abs())[big]
        assert rel.numel() == 0 or rel.max() < 1e-6, (k, float(rel.max()))
        assert (got[k] - ref[k]).abs().max() < 1e-6, k


@pytest.mark.parametrize("kernel", ["eager", "native"])
def test_logit_divergences_chunking_and_truncated_supports(kernel):
    from trm_diag.math.divergence import logit_divergences

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(11, 500, generator=g) * 4, torch.randn(11, 500, generator=g) * 4
    one = logit_divergences(a, b, rows_per_chunk=1, kernel=kernel)
    many = logit_divergences(a, b, rows_per_chunk=7, kernel=kernel)
    for k in one:
        torch.testing.assert_close(one[k], many[k], rtol=0, atol=0)
    # -inf entries (top-k / top-p truncation) and NaN fall back to the support-aware path; the reference
    # is the plain float64 loop (ref_exact) on the same float32 logits, not the fallback's exact_divergences
    a[:, :100] = -torch.inf
    b[3, 7] = torch.nan
    got = logit_divergences(a, b, kernel=kernel)
    ok = torch.arange(11) != 3
    ref = ref_exact(torch.log_softmax(a.double(), -1)[ok].numpy(), torch.log_softmax(b.double(), -1)[ok].numpy())
    tol = 500 * np.finfo(np.float32).eps  # the fallback works on float32 rows: V-term float32 sums
    for k in ("kl", "tv", "ent_roll", "ent_train"):
        np.testing.assert_allclose(got[k][ok].numpy(), ref[k], rtol=tol, atol=tol * 1e-3, err_msg=k)
    # q > 0 where p = 0 (the truncated tokens): KL(q || p) is +inf in every row with a value
    assert np.isinf(ref["kl_rev"]).all() and torch.equal(got["kl_rev"][ok], torch.from_numpy(ref["kl_rev"]))
    assert all(torch.isnan(got[k][3]) for k in ("kl", "kl_rev", "tv", "ent_train")), "NaN logits: no value"


@pytest.mark.parametrize("kernel", ["native", "inductor"])
def test_compiled_kernels_agree_with_eager(kernel):
    from trm_diag.math.divergence import logit_divergences

    g = torch.Generator().manual_seed(5)
    a = torch.randn(8, 4096, generator=g) * 6
    b = a + torch.randn(8, 4096, generator=g) * 0.01
    y = torch.randint(0, 4096, (8,), generator=g)
    eager = logit_divergences(a, b, token_ids=y, kernel="eager")
    comp = logit_divergences(a, b, token_ids=y, kernel=kernel)
    assert set(eager) == {"kl", "kl_rev", "tv", "ent_roll", "ent_train", "lp_roll", "lp_train"}
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("scale,noise", CASES)
def test_sampled_token_logprobs_from_unnormalised_logits_match_float64(scale, noise):
    """lp_roll / lp_train come from the kernel's row constants: no row is ever normalised."""
    from trm_diag.math.divergence import logit_divergences

    g = torch.Generator().manual_seed(int(scale * 10 + noise * 100) + 7)
    a = torch.randn(10, 2000, generator=g) * scale
    b = a + torch.randn(10, 2000, generator=g) * noise
    y = torch.randint(0, 2000, (10,), generator=g)
    y[:3] = a[:3].argmax(-1)  # the top token itself, and tokens far in the tail
    y[3:5] = a[3:5].argmin(-1)
    shift = torch.randn(10, 1, generator=g) * 50  # logits are only defined up to a constant per row
    got = logit_divergences(a + shift, b - shift, token_ids=y, kernel="eager")
    lp64, lq64 = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    for key, ref in (("lp_roll", lp64), ("lp_train", lq64)):
        want = ref.gather(-1, y[:, None]).squeeze(-1)
        # float32 logits carry ~6e-8 relative error at |logit| ~ 50: compare at that resolution
        torch.testing.assert_close(got[key], want, rtol=1e-6, atol=2e-5)


def test_fallback_rows_keep_their_sampled_token_logprobs():
    """Rows with -inf (truncated support) or NaN take the exact path, row by row, with the same outputs."""
    from trm_diag.math.divergence import logit_divergences

    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(6, 300, generator=g) * 3, torch.randn(6, 300, generator=g) * 3
    y = torch.full((6,), 200)
    a[1, :100] = -torch.inf  # truncated rollout support; y outside it is still allowed for q
    b[2, 5] = torch.nan
    got = logit_divergences(a, b, token_ids=y, kernel="eager")
    lp, lq = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    ok = torch.tensor([True, True, False, True, True, True])
    torch.testing.assert_close(got["lp_roll"][ok], lp[ok, 200])
    torch.testing.assert_close(got["lp_train"][ok], lq[ok, 200])
    assert torch.isnan(got["kl"][2]) and torch.isnan(got["lp_train"][2])
    assert torch.isfinite(got["kl"][ok]).all()


def test_kernel_is_chosen_by_name_and_environment(monkeypatch):
    from trm_diag.errors import UsageError
    from trm_diag.kernels import choice, compiled
    from trm_diag.kernels.eager import fused_rows
    from trm_diag.kernels.native import native_rows
    from trm_diag.math import divergence

    calls = []
    monkeypatch.setattr(compiled, "compiled_rows", lambda: lambda a, b, y: calls.append(1) or fused_rows(a, b, y))
    cpu = torch.device("cpu")
    assert native_rows() is not None, "the C kernel did not build: is a C compiler (cc/gcc) installed?"
    monkeypatch.setenv("TRM_DIAG_KERNEL", "eager")
    assert choice.kernel_for(64, cpu) == ("eager", fused_rows)
    monkeypatch.setenv("TRM_DIAG_KERNEL", "native")
    assert choice.kernel_for(64, cpu) == ("native", native_rows())
    assert choice.kernel_for(64, cpu, "auto") == ("native", native_rows())  # an argument beats the environment
    calls.clear()  # auto measured every kernel once (tests/kernels/test_choice.py)
    monkeypatch.setenv("TRM_DIAG_KERNEL", "nonsense")
    with pytest.raises(UsageError, match="TRM_DIAG_KERNEL"):
        choice.kernel_for(64, cpu)
    # auto where inductor measured fastest (a GPU, or no compiler): inductor by width, then by work done
    monkeypatch.setenv("TRM_DIAG_KERNEL", "auto")
    monkeypatch.setattr(choice, "_DECIDED", {"cpu": {"kernel": "inductor", "why": "measured"}})
    a, b = torch.randn(4, 64), torch.randn(4, 64)
    monkeypatch.setattr(choice, "EAGER_ENTRIES", [0])
    monkeypatch.setattr(choice, "COMPILE_AFTER_ENTRIES", 2 * 4 * 64)
    used: set[str] = set()
    divergence.logit_divergences(a, b, rows_per_chunk=2, used=used)
    divergence.logit_divergences(a, b, rows_per_chunk=2)
    assert len(calls) == 0 and used == {"eager"}  # two eager calls of 4 x 64 entries each
    divergence.logit_divergences(a, b, rows_per_chunk=2, used=used)
    assert len(calls) == 2 and used == {"eager", "inductor"}  # the eager budget is spent: compiled from now on
    monkeypatch.setattr(choice, "EAGER_ENTRIES", [0])
    monkeypatch.setattr(choice, "COMPILE_MIN_VOCAB", 64)
    divergence.logit_divergences(a, b, rows_per_chunk=2)
    assert len(calls) == 4
    divergence.logit_divergences(a, b, rows_per_chunk=2, kernel="inductor")
    assert len(calls) == 6


def test_every_kernel_writes_the_outputs_in_the_order_of_one_table():
    """kernels.OUTPUTS names the rows of every kernel: each row equals the named float64 reference."""
    from trm_diag.kernels import OUTPUTS
    from trm_diag.kernels.compiled import compiled_rows
    from trm_diag.kernels.eager import fused_rows
    from trm_diag.kernels.native import native_rows
    from trm_diag.math.divergence import gather_logprobs

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 300, generator=g) * 2, torch.randn(5, 300, generator=g) * 2
    y = torch.randint(0, 300, (5,), generator=g)
    ref = _ref64(a, b)
    ref["lp_roll"] = gather_logprobs(torch.log_softmax(a.double(), -1), y)
    ref["lp_train"] = gather_logprobs(torch.log_softmax(b.double(), -1), y)
    for fn in (fused_rows, native_rows(), compiled_rows()):
        got = fn(a, b, y)
        assert got.shape == (len(OUTPUTS), 5)
        for row, name in zip(got, OUTPUTS):
            torch.testing.assert_close(row, ref[name], rtol=1e-5, atol=1e-9)


def test_native_kernel_is_cached_and_refuses_bad_token_ids(tmp_path, monkeypatch):
    from trm_diag.kernels import native

    monkeypatch.setattr(native, "_LOADED", {})
    fn = native.native_rows()
    lib = native.library_path(native._compiler())
    assert lib.exists() and lib.parent.parent == native.cache_dir()
    a = torch.randn(3, 50)
    with pytest.raises(IndexError, match="token ids"):
        fn(a, a, torch.tensor([0, 50, 1]))
    assert fn(a[:0], a[:0], torch.zeros(0, dtype=torch.long)).shape == (7, 0)
    monkeypatch.setenv("TRM_DIAG_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-anywhere")
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler at all: None, and callers fall back
    monkeypatch.setattr(native, "_LOADED", {})
    assert native.native_rows() is None


@pytest.mark.parametrize("offset", [7.0, 50.0, -300.0])
@pytest.mark.parametrize("kernel", ["eager", "native", "inductor"])
def test_offset_between_the_sides_costs_no_precision(offset, kernel):
    """Logits are defined up to a constant per row, so one side may be shifted (log-probs against
    raw logits): b - a is then not exact in float32, and the kernel must not lose digits there."""
    from trm_diag.math.divergence import logit_divergences

    g = torch.Generator().manual_seed(11)
    a = torch.randn(16, 2048, generator=g) * 3
    b = a + offset + torch.randn(16, 2048, generator=g) * 0.01
    y = torch.randint(0, 2048, (16,), generator=g)
    got, ref = logit_divergences(a, b, token_ids=y, kernel=kernel), _ref64(a, b)
    for k in ref:
        rel = (got[k] - ref[k]).abs() / ref[k].abs()
        assert rel.max() < 1e-6, (k, float(rel.max()))


def test_compiled_kernel_takes_any_row_count():
    """Rows are dynamic in the compiled kernel: chunk tails are not left to the eager path, and a
    row's values do not depend on the chunk it was scored in."""
    from trm_diag.math.divergence import logit_divergences

    g = torch.Generator().manual_seed(9)
    a = torch.randn(23, 1000, generator=g) * 4
    b = a + torch.randn(23, 1000, generator=g) * 0.05
    y = torch.randint(0, 1000, (23,), generator=g)
    whole = logit_divergences(a, b, token_ids=y, kernel="inductor")
    for rows in (1, 2, 5, 8):  # a single row gets torch's own specialised kernel: rounding differs
        parts = logit_divergences(a, b, token_ids=y, rows_per_chunk=rows, kernel="inductor")
        for k in whole:
            torch.testing.assert_close(parts[k], whole[k], rtol=1e-12 if rows == 1 else 0, atol=0)
