#!/usr/bin/env bash
# Sweep of Stable-OPD's two coefficients, beta_KL (--ref_kl_coef) x lambda_gold (--mix_coef), around the
# third-party defaults 0.01 x 0.1 (the paper: "KL strength needs tuning"), each run then evaluated on the six
# benchmarks; a table of the six-benchmark average and the peak rollout truncation ratio at the end.
# Every training flag comes from stable_opd_1.5b.sh; the sweep overrides only the two coefficients and run_dir.
# The pattern: one folder per grid point, finished points (results.json present) are skipped, so re-running
# the same command resumes the sweep; a failed point is logged and the sweep goes on.
#
# Hardware: 4x H200 141 GB, one node, one point at a time (Accelerate config: configs/accelerate/ddp.yaml, set in
#   stable_opd_1.5b.sh); evaluation on the same node.
# Expected time: 16 points x ~13 h (~12 h of training with the vLLM rollout backend set in stable_opd_1.5b.sh,
#   ~1 h of evaluation) (estimate, not measured): shrink the grid (BETAS, LAMBDAS) or pass --max_steps 100
#   (applies to every point) for a first look.
# Inputs (env): BETAS, LAMBDAS (space-separated values), TEACHER, STUDENT, DATA, RUN_ROOT, SWEEP (output folder).
#   BETAS="0 0.01" LAMBDAS="0.1 0.3" bash scripts/paper/sweep_stable_opd.sh [--flag value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN_ROOT="${RUN_ROOT:-runs/paper}"
SWEEP="${SWEEP:-$RUN_ROOT/sweep_stable_opd_1.5b}"
BETAS="${BETAS:-0 0.001 0.01 0.1}"
LAMBDAS="${LAMBDAS:-0 0.03 0.1 0.3}"
mkdir -p "$SWEEP"

for beta in $BETAS; do
  for lam in $LAMBDAS; do
    name="kl${beta}_mix${lam}"
    run="$SWEEP/$name"
    if [ -f "$run/eval_paper/results.json" ]; then echo "[sweep] $name done, skipped"; continue; fi
    echo "[sweep] beta_KL=$beta lambda_gold=$lam -> $run (log: $run.log)"
    bash scripts/paper/stable_opd_1.5b.sh --ref_kl_coef "$beta" --mix_coef "$lam" --run_dir "$run" "$@" > "$run.log" 2>&1 \
      || { echo "[sweep] $name: training failed, see $run.log"; continue; }
    MODEL="$run/final" LABEL="$name" OUT="$run/eval_paper" bash scripts/paper/eval_six.sh >> "$run.log" 2>&1 \
      || echo "[sweep] $name: evaluation failed, see $run.log"
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
