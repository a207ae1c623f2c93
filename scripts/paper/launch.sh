#!/usr/bin/env bash
# The one launcher of the paper recipes (recipes/paper/<recipe>.yaml; the list and the order: README.md here).
#   bash scripts/paper/launch.sh <recipe> [--flag value ...]   # e.g. stable_opd_1.5b --max_steps 50
# runs the command on the recipe's "# launch:" line (accelerate launch with its config and process count, or
# python) with --config <the recipe layered on its bases> and then the flags given here, which win.
#   SMOKE=1 bash scripts/paper/launch.sh <recipe> [...]    # the same recipe for real on one CPU process:
#       stand-in models and data, 2 steps, short lengths (the overrides: scripts/paper/recipe.py); builds
#       its stand-ins once under SMOKE_ROOT (default runs/smoke), writes the runs there too
#   DRY_RUN=1 bash scripts/paper/launch.sh <recipe> [...]  # print the command and the resolved config only
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: [SMOKE=1] [DRY_RUN=1] $0 <recipe> [--flag value ...]; recipes:" \
    $(grep -l '^# launch:' recipes/paper/*.yaml | xargs -n1 basename | sed 's/\.yaml$//') >&2
  exit 2
fi
recipe=$1; shift
# Qwen2.5-Math's configs say 4,096 positions; prompt + response reach 9,216 in training and 10,240 in eval_six,
# which vLLM refuses unless this is set (a known gap: the paper does not say how it handled it)
export VLLM_ALLOW_LONG_MAX_MODEL_LEN="${VLLM_ALLOW_LONG_MAX_MODEL_LEN:-1}"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
smoke=()
if [[ ${SMOKE:-0} != 0 ]]; then smoke=(--smoke "${SMOKE_ROOT:-runs/smoke}"); fi
python scripts/paper/recipe.py "$recipe" --out "$work/$recipe.yaml" "${smoke[@]}" > "$work/command"
mapfile -t command < "$work/command"
echo "+ ${command[*]} $*" >&2
if [[ ${DRY_RUN:-0} != 0 ]]; then cat "$work/$recipe.yaml"; exit 0; fi
"${command[@]}" "$@"
