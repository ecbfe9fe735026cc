"""The library API: every public name of trm_diag resolves, and importing the package stays light."""

from __future__ import annotations

import subprocess
import sys


def test_every_public_name_resolves():
    import trm_diag

    for name in trm_diag.API:
        assert getattr(trm_diag, name) is not None, name
    assert set(trm_diag.__all__) == {"__version__", *trm_diag.API}


def test_import_loads_no_torch_and_no_engine():
    code = (
        "import sys, trm_diag; print(sorted(m for m in ('torch', 'transformers', 'vllm', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_the_documented_example_runs(tmp_path, dense_model):
    from trm_diag import CompareConfig, SamplingConfig, load_report, parse_spec, run_compare

    m = str(dense_model)
    cfg = CompareConfig(
        rollout=parse_spec(f"hf:dtype=bfloat16,model={m}"), train=parse_spec(f"hf:dtype=float32,model={m}"),
        model=m, out=str(tmp_path / "r"), num_prompts=2, sampling=SamplingConfig(max_new_tokens=8),
    )  # fmt: skip
    result = run_compare(cfg)
    report = load_report(result.out_dir)
    assert result.summary["command"] == "compare" and len(report["sequences"]) == 2
