#!/usr/bin/env bash
# The CPU main job on the toy world: bash scripts/demo.sh [--quick | --long] [--out runs/demo] [--force] [--jobs N]
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
python scripts/demo.py "$@"
