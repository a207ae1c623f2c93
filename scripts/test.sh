#!/usr/bin/env bash
# The whole test suite, offline: bash scripts/test.sh [pytest args]
# The real-vLLM tests (CPU, their own .venv-vllm, built on first use): bash scripts/test.sh --vllm [pytest args]
set -uo pipefail
if [ "${1:-}" = "--vllm" ]; then
  shift
  . "$(dirname "$0")/setup_vllm_env.sh"
  set +e  # the setup turned -e on: keep pytest's exit status for the message below
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
  python -m pytest -q tests/vllm_real "$@"
  rc=$?
  if [ "$rc" -eq 5 ]; then echo "ERROR: pytest collected no tests"; fi
  exit "$rc"
fi
. "$(dirname "$0")/setup_env.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
# two pytest workers (pytest-xdist), one test file each at a time (module fixtures are built once);
# TEST_WORKERS=0 runs everything in this process
python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "ERROR: pytest collected no tests"; fi
exit "$rc"
