#!/usr/bin/env bash
# Sweep of Stable-OPD's two coefficients, beta_KL (--ref_kl_coef) x lambda_gold (--mix_coef), around the
# third-party defaults 0.01 x 0.1 (paper s5 limitations: "KL strength needs tuning"): each grid point is the
# stable_opd_1.5b recipe with the two coefficients and run_dir changed, then evaluated with the eval_six recipe;
# a table of the six-benchmark average and the peak rollout truncation ratio at the end. Finished points
# (results.json present) are skipped, so re-running resumes the sweep; a failed point is logged and skipped.
#
# Hardware: 4x H200 141 GB, one point at a time (DDP, from the recipe); evaluation on the same node.
# Expected time: 16 points x ~13 h (~12 h training with vLLM rollouts, ~1 h eval) (estimate, not measured):
#   shrink the grid (BETAS, LAMBDAS) or pass --max_steps 100 (every point) for a first look.
# Env: BETAS, LAMBDAS (space-separated), SWEEP (output folder); SMOKE=1 runs every point in smoke mode.
#   BETAS="0 0.01" LAMBDAS="0.1 0.3" bash scripts/paper/sweep_stable_opd.sh [--flag value ...]   # flags: training
set -euo pipefail
cd "$(dirname "$0")/../.."
SWEEP="${SWEEP:-runs/paper/sweep_stable_opd_1.5b}"
BETAS="${BETAS:-0 0.001 0.01 0.1}"
LAMBDAS="${LAMBDAS:-0 0.03 0.1 0.3}"
mkdir -p "$SWEEP"

for beta in $BETAS; do
  for lam in $LAMBDAS; do
    name="kl${beta}_mix${lam}"
    run="$SWEEP/$name"
    if [ -f "$run/eval_paper/results.json" ]; then echo "[sweep] $name done, skipped"; continue; fi
    echo "[sweep] beta_KL=$beta lambda_gold=$lam -> $run (log: $run.log)"
    bash scripts/paper/launch.sh stable_opd_1.5b --ref_kl_coef "$beta" --mix_coef "$lam" --run_dir "$run" "$@" \
      > "$run.log" 2>&1 || { echo "[sweep] $name: training failed, see $run.log"; continue; }
    bash scripts/paper/launch.sh eval_six --model_name_or_path "$run/final" --label "$name" --output_dir "$run/eval_paper" \
      >> "$run.log" 2>&1 || echo "[sweep] $name: evaluation failed, see $run.log"
  done
done

python - "$SWEEP" <<'PY'
import json, sys
from pathlib import Path
rows = []
for run in sorted(Path(sys.argv[1]).glob("kl*_mix*")):
    if not run.is_dir():
        continue
    res = run / "eval_paper" / "results.json"
    acc = json.loads(res.read_text()).get("average_acc") if res.is_file() else None
    metrics = run / "metrics.jsonl"
    trunc = [json.loads(l).get("rollout/truncated_frac") for l in metrics.read_text().splitlines()] if metrics.is_file() else []
    trunc = [t for t in trunc if t is not None]
    rows.append((run.name, acc, max(trunc) if trunc else None))
print("| run | six-benchmark avg | max rollout/truncated_frac |\n|---|---|---|")
for name, acc, trunc in rows:
    print(f"| {name} | {'-' if acc is None else f'{100 * acc:.1f}'} | {'-' if trunc is None else f'{trunc:.2f}'} |")
PY
