"""Hugging Face transformers backend: sampling loop with KV cache and teacher-forced scoring.

Why a hand-written sampling loop instead of ``model.generate``: generate merges the
checkpoint's generation_config (top_k=50, repetition penalties, suppressed tokens ...)
into the sampler, so the distribution actually sampled from is hard to pin down. Here
every step samples from :func:`processed_logprobs` and records the sampled token's
log-prob at that decode step, which is exactly what an RL pipeline's engine reports.

Scoring runs the decoder once per batch and applies the output projection lazily, in
row chunks, to the response positions only: [T, V] logits are never materialised.

How the trainer batches is part of its numerics (bf16 kernels are not batch-invariant; MoE routers
see other neighbours), so the spec says it: ``batch_size`` (sequences per forward pass),
``padding_side`` (right, the default, or left: pads before the sequence, with position ids that
start at its first real token) and ``regroup_seed`` (a seeded permutation of the sequences of each
scoring call before they are cut into micro-batches; results come back in the original order).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trm_diag.backends import BATCH_KEYS
from trm_diag.backends.base import batches, first_line, run_seed, seed_for
from trm_diag.backends.capture import LayerCapture
from trm_diag.backends.checkpoint import spec_checkpoint
from trm_diag.config import BackendSpec, SamplingConfig
from trm_diag.errors import BackendFailure, ModelError, UsageError
from trm_diag.math.moe import moe_shape
from trm_diag.math.sampling import processed_logprobs, tempered_logprobs, tempered_scores
from trm_diag.types import Progress, Rollout, no_progress

TORCH_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}  # fmt: skip
# how transformers runs a float64 MoE model's experts: its per-expert loop (the default, grouped_mm, takes
# float32, bfloat16 and float16 only); dense models ignore it
FLOAT64_EXPERTS = "eager"
PADDING_SIDES = ("right", "left")  # spec key padding_side: where a scoring batch's pads go
REGROUP_BATCHES = 4  # regroup_seed: the permuted sequences of one scoring call fill this many micro-batches


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for src in (gen_eos, model.config.get_text_config().eos_token_id, tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


def _check_loading_info(path: str, info: dict[str, Any]) -> None:
    """Refuse a model transformers had to complete at random: missing, unexpected or misshapen tensors."""
    for key, what in (
        ("missing_keys", "lacks"),
        ("unexpected_keys", "has unexpected"),
        ("mismatched_keys", "has misshapen"),
    ):
        names = sorted(str(k) for k in info.get(key) or ())
        if names:
            raise ModelError(
                f"'{path}' {what} tensor(s) {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}: transformers "
                "would initialise them at random", "re-download or re-export the checkpoint",
            )  # fmt: skip


def check_spec(spec: BackendSpec) -> str:
    """The spec's device (cpu, cuda, cuda:N, auto; default cuda when torch sees one) and seed, refused in one line
    before any weights load or any output is written (torch would raise mid-load, the seed at the first sample)."""
    spec.get_int("seed", 0)
    dev = spec.options.get("device")
    if dev is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, colon, index = dev.lower().partition(":")
    if kind not in ("cpu", "cuda", "auto") or (colon and (kind != "cuda" or not index.isdigit())):
        raise UsageError(f"backend spec '{spec.text}': device={dev} is unknown", "use device=cpu, cuda, cuda:N or auto")
    if kind == "cuda" and int(index or 0) >= torch.cuda.device_count():
        seen = torch.cuda.device_count()
        raise UsageError(
            f"backend spec '{spec.text}': device={dev}, but torch sees {seen or 'no'} CUDA GPU{'s' if seen != 1 else ''}",
            "use device=cpu, or a GPU torch can see",
        )
    return dev.lower()


class _CastHead(torch.nn.Module):
    """An output head in its own dtype: casts the hidden states to it (spec key lm_head_dtype)."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head
        self.weight = head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.to(self.weight.dtype))


@dataclass
class HiddenRows:
    """Response hidden states [T, H]; rows() applies the head and the sampling processing."""

    hidden: torch.Tensor  # (T, H)
    backend: HFBackend
    sampling: SamplingConfig
    routing: torch.Tensor | None = None  # (moe layers, T, E) router logits, MoE models only
    normalized: bool = False  # scores() skip the normalisation

    @property
    def length(self) -> int:
        return int(self.hidden.shape[0])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.backend.logits_from_hidden(self.hidden[start:stop])  # (n, V)
            return tempered_logprobs(logits, self.sampling)

    def scores(self, start: int, stop: int) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.backend.logits_from_hidden(self.hidden[start:stop])  # (n, V)
            return tempered_scores(logits, self.sampling)

    @staticmethod
    def joint_scores(pieces: list[tuple[HiddenRows, int, int]]) -> torch.Tensor:
        """scores() of row ranges of several responses in one head call (hidden states joined, not logits)."""
        first = pieces[0][0]
        with torch.inference_mode():
            hidden = torch.cat([rows.hidden[a:b] for rows, a, b in pieces])  # (n, H)
            return tempered_scores(first.backend.logits_from_hidden(hidden), first.sampling)


class HFBackend:
    """transformers AutoModelForCausalLM; spec keys: model, dtype, attn, device, lm_head_dtype, seed and the
    batch shape: batch_size, padding_side, regroup_seed (module docstring)."""

    name = "hf"

    def __init__(self, spec: BackendSpec, *, trust_remote_code: bool = False, allow_pickle: bool = False):
        self.spec = spec
        self.model_path, _ = spec_checkpoint(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # trm-diag shows its own progress

        device = check_spec(spec)  # checked before the weights load
        self._batching(spec)
        kwargs: dict[str, Any] = {
            "dtype": TORCH_DTYPES.get(spec.dtype, "auto"),
            "trust_remote_code": trust_remote_code,
            "use_safetensors": None if allow_pickle else True,
        }
        if "attn" in spec.options:
            kwargs["attn_implementation"] = spec.options["attn"]
        if spec.dtype == "float64":  # the grouped expert matmul has no float64 kernel: one expert at a time
            kwargs["experts_implementation"] = FLOAT64_EXPERTS
        if device == "auto":
            kwargs["device_map"] = "auto"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.model, trust_remote_code=trust_remote_code)
            model, info = AutoModelForCausalLM.from_pretrained(spec.model, output_loading_info=True, **kwargs)
        except (OSError, ValueError, ImportError, KeyError) as e:
            raise ModelError(
                f"transformers could not load '{spec.model}': {first_line(e)}", "check the folder and the spec keys"
            ) from None
        _check_loading_info(spec.model, info)
        if device != "auto":
            model = model.to(device)
        model.eval()
        self.model = model
        self.device = next(model.parameters()).device
        text_cfg = model.config.get_text_config()
        self.vocab_width = int(text_cfg.vocab_size)
        self.max_model_len = getattr(text_cfg, "max_position_embeddings", None)  # positions the model was built for
        self.eos_ids = _eos_ids(model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0))
        self._decoder = getattr(model, model.base_model_prefix, None)
        self._head = model.get_output_embeddings()
        if self._decoder is None or self._head is None:
            raise ModelError(
                f"'{spec.model}' is not a causal LM with a separate output head", "use a *ForCausalLM checkpoint"
            )
        head_dtype = spec.options.get("lm_head_dtype")
        if head_dtype is not None:  # e.g. an fp32 head on a bf16 body; a copy, so tied embeddings keep their dtype
            if head_dtype not in TORCH_DTYPES:
                raise UsageError(
                    f"backend spec '{spec.text}': lm_head_dtype={head_dtype} is not supported",
                    f"use one of: {', '.join(TORCH_DTYPES)}",
                )
            self._head = _CastHead(copy.deepcopy(self._head).to(TORCH_DTYPES[head_dtype]))
            model.set_output_embeddings(self._head)  # generate() samples through the same head
        # Final logit transforms some architectures apply after the head (kept explicit).
        self._softcap = getattr(text_cfg, "final_logit_softcapping", None)
        self._logit_scale = getattr(text_cfg, "logit_scale", None)
        self._logits_scaling = getattr(text_cfg, "logits_scaling", None)
        self.description = spec.describe()
        self.moe = moe_shape(text_cfg)  # (num_experts, experts_per_token) or None
        self.routing_note: str | None = None

    # ------------------------------------------------------------------ batch shape
    def _batching(self, spec: BackendSpec) -> None:
        """The spec's batch shape: micro-batch size, padding side, regrouping; ``batch_size`` is the number of
        sequences per scoring call (REGROUP_BATCHES micro-batches when regrouping, so sequences change batch)."""
        self.micro_batch = spec.get_int("batch_size", 8, minimum=1)
        side = spec.options.get("padding_side", "right").lower()
        if side not in PADDING_SIDES:
            raise UsageError(
                f"backend spec '{spec.text}': padding_side={side} is unknown", f"use one of: {', '.join(PADDING_SIDES)}"
            )
        self.padding_side = side
        self.regroup_seed = spec.get_int("regroup_seed", 0, minimum=0) if "regroup_seed" in spec.options else None
        self.batch_size = self.micro_batch * (REGROUP_BATCHES if self.regroup_seed is not None else 1)

    def rebatched(self, spec: BackendSpec) -> HFBackend | None:
        """This engine under another batch shape, sharing its weights (no second load): when ``spec`` differs from
        this one's only in BATCH_KEYS; else None."""
        mine = {k: v for k, v in self.spec.options.items() if k not in BATCH_KEYS}
        theirs = {k: v for k, v in spec.options.items() if k not in BATCH_KEYS}
        if spec.name != self.spec.name or mine != theirs:
            return None
        other = copy.copy(self)
        other.spec, other.description, other.routing_note = spec, spec.describe(), None
        other._batching(spec)
        return other

    def _order(self, n: int) -> list[int]:
        """The order sequences are batched in: as given, or a seeded permutation (never the identity for n >= 2,
        so regrouping always moves something)."""
        if self.regroup_seed is None or n < 2:
            return list(range(n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.regroup_seed)).tolist()
        return perm if perm != sorted(perm) else perm[1:] + perm[:1]

    # ------------------------------------------------------------------ helpers
    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [n, V] from final hidden states [n, H], cut to config.vocab_size columns."""
        logits = self._head(hidden)
        if self._logit_scale:
            logits = logits * self._logit_scale
        if self._logits_scaling:
            logits = logits / self._logits_scaling
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits[..., : self.vocab_width]

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompts: Sequence[list[int]],
        sampling: SamplingConfig,
        progress: Progress = no_progress,
        prompt_indices: Sequence[int] | None = None,
    ) -> list[Rollout]:
        idx = list(prompt_indices) if prompt_indices is not None else list(range(len(prompts)))
        n = sampling.samples_per_prompt
        jobs = [(pi, si) for pi in range(len(prompts)) for si in range(n)]
        out: list[Rollout] = []
        for s in range(0, len(jobs), self.micro_batch):
            chunk = jobs[s : s + self.micro_batch]
            # one generator per sequence, seeded by its global (prompt, sample) index: a rollout does
            # not depend on batching, chunking, resuming or sharding
            gens = [
                torch.Generator(device=self.device).manual_seed(
                    seed_for(run_seed(self.spec, sampling), idx[pi] * n + si)
                )
                for pi, si in chunk
            ]
            ids, lps, reasons, tops = self._generate_batch([prompts[pi] for pi, _ in chunk], sampling, gens)
            for (pi, si), resp, lp, why, top in zip(chunk, ids, lps, reasons, tops):
                extra = {"topk": top, "topk_k": sampling.topk} if sampling.topk else {}
                out.append(Rollout(len(out), idx[pi], si, list(prompts[pi]), resp, lp, why, extra))
            progress(len(chunk))
        return out

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: list[list[int]], sampling: SamplingConfig, gens: list[torch.Generator]
    ) -> tuple[list[list[int]], list[list[float]], list[str], list[list[dict[int, float]]]]:
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        resp: list[list[int]] = [[] for _ in range(b)]
        lps: list[list[float]] = [[] for _ in range(b)]
        tops: list[list[dict[int, float]]] = [[] for _ in range(b)]
        done = [False] * b
        for step in range(sampling.max_new_tokens):
            logits = out.logits[:, -1, : self.vocab_width]  # forward() already applied softcap/scales
            logp = processed_logprobs(logits, sampling)  # (B, V)
            if not torch.isfinite(logp).any(dim=-1).all():
                raise BackendFailure("the hf backend produced NaN logits while generating", "try dtype=float32")
            if sampling.greedy:
                tok = logp.argmax(dim=-1)
            else:
                probs = logp.exp()
                tok = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])
            lp = logp.gather(-1, tok[:, None]).squeeze(-1)
            tok_l, lp_l = tok.tolist(), lp.tolist()
            if sampling.topk:  # top-K plus the sampled token, as vLLM reports its log-probs
                top_v, top_i = logp.topk(min(sampling.topk, logp.shape[-1]), dim=-1)
                top_v, top_i = top_v.tolist(), top_i.tolist()
            for i in range(b):
                if not done[i]:
                    resp[i].append(tok_l[i])
                    lps[i].append(lp_l[i])
                    if sampling.topk:
                        d = dict(zip(top_i[i], top_v[i]))
                        d.setdefault(tok_l[i], lp_l[i])
                        tops[i].append(d)
                    done[i] = tok_l[i] in self.eos_ids
            if all(done) or step == sampling.max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones((b, 1))], dim=-1)
            pos = pos[:, -1:] + 1
            out = self.model(
                input_ids=tok[:, None],
                attention_mask=mask,
                position_ids=pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        reasons = ["stop" if d else "length" for d in done]
        return resp, lps, reasons, tops

    # ------------------------------------------------------------------ score
    def score(self, seqs: Sequence[tuple[list[int], list[int]]], sampling: SamplingConfig) -> list[HiddenRows]:
        if not seqs:
            return []
        order = self._order(len(seqs))
        rows = [row for batch in batches([seqs[i] for i in order], self.micro_batch)
                for row in self._score_batch(batch, sampling)]  # fmt: skip
        out: list[HiddenRows] = [rows[0]] * len(rows)
        for j, i in enumerate(order):  # back to the caller's order
            out[i] = rows[j]
        return out

    @torch.inference_mode()
    def _score_batch(self, seqs: Sequence[tuple[list[int], list[int]]], sampling: SamplingConfig) -> list[HiddenRows]:
        full = [list(p) + list(r) for p, r in seqs]
        b, width = len(full), max(len(x) for x in full)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        left = self.padding_side == "left"
        starts = [width - len(x) if left else 0 for x in full]  # where each sequence's first token sits
        for i, x in enumerate(full):  # right: pads never precede a scored position; left: positions start at 0
            ids[i, starts[i] : starts[i] + len(x)] = torch.tensor(x)
            mask[i, starts[i] : starts[i] + len(x)] = 1
        kwargs: dict[str, Any] = {"output_router_logits": True} if self.moe else {}
        if left:  # position ids count real tokens only, as in an unpadded pass
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(self.device)
        res = self._decoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        hidden = res.last_hidden_state
        router = None
        if self.moe and getattr(res, "router_logits", None):
            router = torch.stack([x.float().view(b, width, -1) for x in res.router_logits])  # (layers, B, L, E)
        elif self.moe:
            self.routing_note = "this transformers model returns no router_logits"
        out = []
        for i, (p, r) in enumerate(seqs):
            # hidden state at position j predicts token j+1: response token t uses len(p)-1+t
            sl = slice(starts[i] + len(p) - 1, starts[i] + len(p) - 1 + len(r))
            out.append(HiddenRows(hidden[i, sl], self, sampling, None if router is None else router[:, i, sl].cpu()))
        return out

    # ------------------------------------------------------------------ locate
    @torch.inference_mode()
    def capture_layers(self, ids: list[int], positions: list[int]) -> LayerCapture:
        """Teacher-forced pass over ids keeping each layer's states at ``positions`` (backends/capture.py)."""
        cap = LayerCapture(positions, self.moe[0] if self.moe else None)
        cap.install(self._decoder)
        try:
            self._decoder(input_ids=torch.tensor([ids], device=self.device))
        finally:
            cap.remove()
        return cap

    def close(self) -> None:
        self.model = None
        self._decoder = None
        self._head = None
