#!/usr/bin/env bash
# Stable-OPD ablation on the toy world (after `bash scripts/demo.sh --long`): OPD, mixture only, reference KL only,
# both (Stable-OPD), and both with the adaptive controllers; same budget (steps) each, 3 seeds.
#   bash scripts/ablate_toy.sh [steps] [out] [seeds] [configs]
#     -> out/<config>_s<seed>/{metrics.jsonl,final,eval/results.json}, out/ablate_{dynamics,evidence,final}.png
#     seeds default "0 1 2", configs default "opd mix ref both adaptive"; finished runs are skipped, so parallel
#     streams (e.g. "0" "opd mix both" beside "0" "ref adaptive") and reruns resume. One thread per run.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
STEPS="${1:-100}"; OUT="${2:-runs/ablate_toy}"; SEEDS="${3:-0 1 2}"; CONFIGS="${4:-opd mix ref both adaptive}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: one thread per run is fastest on 2 cores
mkdir -p "$OUT"
COMMON=(--max_steps "$STEPS" --save_every 0 --eval_every 25 --eval_samples 100)
for seed in $SEEDS; do
  for cfg in $CONFIGS; do
    run="$OUT/${cfg}_s${seed}"
    [ -f "$run/eval/results.json" ] && continue
    case $cfg in
      opd)      cmd=(methods/opd.py) ;;
      mix)      cmd=(methods/stable_opd.py --ref_kl_coef 0) ;;
      ref)      cmd=(methods/stable_opd.py --mix_coef 0) ;;
      both)     cmd=(methods/stable_opd.py) ;;
      adaptive) cmd=(methods/stable_opd.py --adaptive_ref_kl true --adaptive_mix true) ;;
      *) echo "unknown config $cfg"; exit 2 ;;
    esac
    echo "[ablate] $cfg seed $seed"
    python "${cmd[@]}" --run_dir "$run" --seed "$seed" "${COMMON[@]}" > "$run.log" 2>&1 || { echo "failed: see $run.log"; continue; }
    python eval/evaluate.py --model_name_or_path "$run/final" --benchmarks toy --max_new_tokens 256 --threads 1 --output_dir "$run/eval" >> "$run.log" 2>&1
  done
done
python scripts/summarize_runs.py "$OUT" opd mix ref both adaptive
python scripts/plot_runs.py --out "$OUT/ablate" --run "OPD=$OUT/opd_s*" --run "+ mixture only=$OUT/mix_s*" \
  --run "+ ref KL only=$OUT/ref_s*" --run "Stable-OPD=$OUT/both_s*" --run "Stable-OPD adaptive=$OUT/adaptive_s*"
