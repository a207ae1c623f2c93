#!/usr/bin/env bash
# Issue 9's GPU check in one command, on a GPU machine (never on the CPU machines):
#   python -m venv .venv-gpu && . .venv-gpu/bin/activate && pip install -r requirements-gpu.txt
#   bash scripts/gpu_smoke.sh                      # engine check, one Stable-OPD step (HF and vLLM), each method
#   bash scripts/gpu_smoke.sh --part step --length 1024    # extra arguments go to scripts/gpu_smoke.py
# No download: random models from the real Qwen2.5-1.5B / 7B configs and a synthetic tokenizer.
# Prints one markdown table (also written to $WORK/table.md, and to $OUT/ when set) for docs/LOG.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # less fragmentation at 4k tokens
PY=${PYTHON:-python}
WORK=${WORK:-/tmp/gpu_smoke}
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null 2>&1; then
    echo "gpu_smoke.sh: no NVIDIA GPU here; issue 9's GPU checks cannot run (the CPU tests cover the glue)" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| cuda', torch.cuda.is_available())"
"$PY" -c "import vllm; print('vllm', vllm.__version__)" 2>/dev/null || echo "vllm: not installed (vLLM rows skipped)"
# 1. the backend glue's CPU tests, in this (GPU) environment too: same API, real vllm importable
OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_vllm_backend.py tests/test_gpu_scale.py
# 2. engine check, step benchmark, method runs
"$PY" scripts/gpu_smoke.py --work "$WORK" "$@"
