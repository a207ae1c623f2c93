#!/usr/bin/env bash
# The collapse study on the toy world (issue 8; docs/RESULTS.md): can OPD's length inflation and truncation
# collapse be reproduced, and do Stable-OPD and its components prevent it? After `bash scripts/demo.sh`.
#
#   bash scripts/collapse_toy.sh [steps] [out] [seeds] [configs]
#     steps    OPD steps per run (default 150), 16 prompts x 4 samples, cap 256 tokens
#     seeds    default "0 1 2"; configs default "opd both mix ref adaptive"
#
# 1. A "re-checking" teacher: the demo teacher fine-tuned 200 steps on solutions that restate their chain of
#    equations Geometric(0.5) times ("Let me check again. ..."; common/toy.py:with_rechecks), so it copies
#    readily from its own context, like the paper's long-reasoning teachers.
# 2. scripts/probe_repetition.py: teacher vs student log-probs of another restatement, of the copy, of EOS.
# 3. OPD / Stable-OPD / each component alone / the adaptive controllers from the demo's (clean) student.
# 4. Greedy test evaluation (cap 256) and figures (scripts/plot_runs.py).
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
STEPS="${1:-150}"; OUT="${2:-runs/collapse}"; SEEDS="${3:-0 1 2}"; CONFIGS="${4:-opd both mix ref adaptive}"
DEMO=runs/demo/full; CAP=256
[ -f "$DEMO/student/final/config.json" ] || { echo "run 'bash scripts/demo.sh' first (needs $DEMO/{teacher,student}/final)"; exit 1; }
mkdir -p "$OUT" data/toy_recheck
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: one thread per run is fastest on 2 cores

python - <<'PY'
import json
from pathlib import Path
from common.toy import with_rechecks
dest = Path("data/toy_recheck/train.jsonl")
if not dest.exists():
    rows = [json.loads(x) for x in Path("data/toy/train.jsonl").read_text().splitlines()]
    dest.write_text("".join(json.dumps(r) + "\n" for r in with_rechecks(rows, prob=0.5, seed=0)))
print(f"re-checking data: {dest}")
PY

TEACHER="$OUT/teacher_recheck"
if [ ! -f "$TEACHER/final_eval.json" ]; then
  python methods/sft.py --run_dir "$TEACHER" --model_name_or_path "$DEMO/teacher/final" \
    --train_data data/toy_recheck/train.jsonl --val_data data/toy/val.jsonl --test_data data/toy/test.jsonl \
    --max_completion_length "$CAP" --learning_rate 5e-4 --warmup_steps 20 --max_steps 200 --eval_every 100 \
    --eval_samples 100 --bf16 true --save_every 50 --log_every 25
fi
python scripts/probe_repetition.py --n 50 --max_k 4 --out "$OUT/probe.json" --model "clean teacher=$DEMO/teacher/final" \
  --model "re-checking teacher=$TEACHER/final" --model "student=$DEMO/student/final" | tee "$OUT/probe.md"

COMMON=(--model_name_or_path "$DEMO/student/final" --teacher_name_or_path "$TEACHER/final" --max_steps "$STEPS"
        --max_completion_length "$CAP" --save_every 50 --eval_every 25 --eval_samples 100)
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
    echo "[collapse] $cfg seed $seed ($(date +%T))"
    python "${cmd[@]}" --run_dir "$run" --seed "$seed" "${COMMON[@]}" > "$run.log" 2>&1 || { echo "failed: see $run.log"; continue; }
    python eval/evaluate.py --model_name_or_path "$run/final" --benchmarks toy --max_new_tokens "$CAP" --threads 1 \
      --output_dir "$run/eval" >> "$run.log" 2>&1
  done
done
args=()
for cfg in $CONFIGS; do
  case $cfg in opd) l=OPD ;; both) l=Stable-OPD ;; mix) l="+ mixture only" ;; ref) l="+ ref KL only" ;; adaptive) l="Stable-OPD adaptive" ;; esac
  ls -d "$OUT/${cfg}"_s* >/dev/null 2>&1 && args+=(--run "$l=$OUT/${cfg}_s*")
done
python scripts/plot_runs.py --out "$OUT/collapse" "${args[@]}" --baseline "SFT student=0.444"
python scripts/summarize_runs.py "$OUT" $CONFIGS
