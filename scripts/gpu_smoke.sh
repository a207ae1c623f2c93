#!/usr/bin/env bash
# The GPU check (issue 31): one command that fits a short lease on a bare GPU machine; see docs/GPU.md section 7.
#   bash scripts/gpu_smoke.sh --out "$OUT"          # = python scripts/gpu_check.py --out "$OUT"
#   bash scripts/gpu_smoke.sh --dry_run             # CPU: tiny widths, the real vocabulary
# The older engine / HF-vs-vLLM / method runs (long leases, vLLM machines): python scripts/gpu_smoke.py --part ...
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
