"""The exact-tier kernels: one computation (kernels/eager.py explains it), three implementations.

- eager.py: torch ops, any device (the reference implementation of the fused kernel);
- compiled.py: torch.compile of the eager kernel (three fused passes per row);
- native.py + rows_kernel.c: the same in C, one row at a time (the CPU default);
- choice.py: which one runs (TRM_DIAG_KERNEL, or auto by width and work done).

Every kernel maps rows a (rollout), b (training) [n, V] and token ids y [n] to a float64 [len(OUTPUTS), n]
tensor whose rows are OUTPUTS, in this order. A new output is added to OUTPUTS and to each
implementation (docs/extending.md).
"""

OUTPUTS = ("kl", "kl_rev", "tv", "ent_roll", "ent_train", "lp_roll", "lp_train")
DIVERGENCES = tuple(o for o in OUTPUTS if not o.startswith("lp_"))  # per-row divergences and entropies
