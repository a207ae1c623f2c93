#!/usr/bin/env bash
# The collapse study on the toy world (issues 8, 35; docs/RESULTS.md): can OPD's length inflation and truncation
# collapse be reproduced, and do Stable-OPD and its components prevent it? After `bash scripts/demo.sh`.
#
#   bash scripts/collapse_toy.sh [steps] [out] [seeds] [configs] [lr]
#     steps    OPD steps per run (default 100), 16 prompts x 4 samples, cap $CAP tokens
#     seeds    default "0 1 2"; configs default "opd both mix ref adaptive tuned"; lr default 1e-3
#     (tuned = Stable-OPD with ten times the default coefficients: mixture 1.0, reference KL 0.1)
#   Finished runs are skipped, so rerunning resumes; seeds " " (a blank) only redraws the figures and table.
#   Environment (defaults: the study of issue 35, on the main job's models):
#     DEMO=runs/demo/main   base teacher / student (`bash scripts/demo.sh`; runs/demo/full: `--long`, issue 8)
#     CAP=192               rollout, golden and eval cap (re-checking solutions: median 60, 90th pct 184 tokens)
#     GOLDEN=data/toy_recheck/train.jsonl   Stable-OPD's golden responses (--golden_data); GOLDEN= (empty): the
#                           prompts' own clean `solution` (data/toy/train.jsonl), as the issue-8 study did
#     PAIR=$OUT             where the re-checking teacher / student are built (share one pair between sweeps)
#     EVAL_EVERY=25 EVAL_SAMPLES=100 SAVE_EVERY=50   val evaluations and checkpoints of each run
#   The issue-8 study (docs/LOG.md, superseded): DEMO=runs/demo/full CAP=256 GOLDEN= bash scripts/collapse_toy.sh
#
# 1. A "re-checking" world: solutions that restate their chain of equations Geometric(0.5) times ("Let me
#    check again. ..."; common/toy.py:with_rechecks), like the paper's long-reasoning teachers and the
#    R1-style data its student was SFT'd on. The demo teacher is fine-tuned on it 200 steps (it copies
#    readily from its own context), the demo student 150 steps (it picks up the style, copies worse).
# 2. scripts/probe_repetition.py: teacher vs student log-probs of another restatement, of the copy, of EOS.
# 3. OPD / Stable-OPD / each component alone / the adaptive controllers from that student, same budget.
# 4. Greedy test evaluation (cap $CAP), summary table and figures (scripts/plot_runs.py).
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
STEPS="${1:-100}"; OUT="${2:-runs/collapse}"; SEEDS="${3:-0 1 2}"; CONFIGS="${4:-opd both mix ref adaptive tuned}"; LR="${5:-1e-3}"
DEMO="${DEMO:-runs/demo/main}"; CAP="${CAP:-192}"; GOLDEN="${GOLDEN-data/toy_recheck/train.jsonl}"; PAIR="${PAIR:-$OUT}"
EVAL_EVERY="${EVAL_EVERY:-25}"; EVAL_SAMPLES="${EVAL_SAMPLES:-100}"; SAVE_EVERY="${SAVE_EVERY:-50}"
[ -f "$DEMO/student/final/config.json" ] || { echo "run 'bash scripts/demo.sh' first (needs $DEMO/{teacher,student}/final)"; exit 1; }
mkdir -p "$OUT" "$PAIR" data/toy_recheck
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: one thread per run is fastest on 2 cores
# bf16 SFT only where the CPU computes bf16 natively (emulated: ~27x slower; common/models.py cpu_has_fast_bf16)
BF16="$(python -c 'from common.models import cpu_has_fast_bf16; print(str(cpu_has_fast_bf16()).lower())')"

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

TEACHER="$PAIR/teacher_recheck"
if [ ! -f "$TEACHER/final_eval.json" ]; then
  python methods/sft.py --run_dir "$TEACHER" --model_name_or_path "$DEMO/teacher/final" \
    --train_data data/toy_recheck/train.jsonl --val_data data/toy/val.jsonl --test_data data/toy/test.jsonl \
    --max_completion_length "$CAP" --learning_rate 5e-4 --warmup_steps 20 --max_steps 200 --eval_every 100 \
    --eval_samples 100 --bf16 "$BF16" --save_every 50 --log_every 25
fi
STUDENT="$PAIR/student_recheck"
if [ ! -f "$STUDENT/final_eval.json" ]; then
  python methods/sft.py --run_dir "$STUDENT" --model_name_or_path "$DEMO/student/final" \
    --train_data data/toy_recheck/train.jsonl --val_data data/toy/val.jsonl --test_data data/toy/test.jsonl \
    --max_completion_length "$CAP" --learning_rate 1e-3 --warmup_steps 10 --max_steps 150 --eval_every 0 \
    --eval_samples 100 --bf16 "$BF16" --save_every 50 --log_every 25
fi
[ -f "$PAIR/probe.md" ] || python scripts/probe_repetition.py --n 50 --max_k 8 --out "$PAIR/probe.json" \
  --model "clean teacher=$DEMO/teacher/final" --model "re-checking teacher=$TEACHER/final" \
  --model "clean student=$DEMO/student/final" --model "re-checking student=$STUDENT/final" | tee "$PAIR/probe.md"

COMMON=(--model_name_or_path "$STUDENT/final" --teacher_name_or_path "$TEACHER/final" --max_steps "$STEPS"
        --learning_rate "$LR" --max_completion_length "$CAP" --save_every "$SAVE_EVERY" --eval_every "$EVAL_EVERY"
        --eval_samples "$EVAL_SAMPLES")
GOLD=(); [ -n "$GOLDEN" ] && GOLD=(--golden_data "$GOLDEN")  # Stable-OPD's golden responses (OPD has no such flag)
for seed in $SEEDS; do
  for cfg in $CONFIGS; do
    run="$OUT/${cfg}_s${seed}"
    [ -f "$run/eval/results.json" ] && continue
    case $cfg in
      opd)      cmd=(methods/opd.py) ;;
      mix)      cmd=(methods/stable_opd.py --ref_kl_coef 0 "${GOLD[@]}") ;;
      ref)      cmd=(methods/stable_opd.py --mix_coef 0) ;;
      both)     cmd=(methods/stable_opd.py "${GOLD[@]}") ;;
      adaptive) cmd=(methods/stable_opd.py --adaptive_ref_kl true --adaptive_mix true "${GOLD[@]}") ;;
      tuned)    cmd=(methods/stable_opd.py --mix_coef 1.0 --ref_kl_coef 0.1 "${GOLD[@]}") ;;
      *) echo "unknown config $cfg"; exit 2 ;;
    esac
    echo "[collapse] $cfg seed $seed ($(date +%T))"
    python "${cmd[@]}" --run_dir "$run" --seed "$seed" "${COMMON[@]}" > "$run.log" 2>&1 || { echo "failed: see $run.log"; continue; }
    python eval/evaluate.py --model_name_or_path "$run/final" --benchmarks toy --max_new_tokens "$CAP" --threads 1 \
      --output_dir "$run/eval" >> "$run.log" 2>&1
  done
done
# figures and table of every configuration present in $OUT (also those of earlier invocations, e.g. parallel
# streams run as `bash scripts/collapse_toy.sh 100 runs/collapse "0 1 2" "opd both"`); the labels are
# scripts/summarize_runs.py's LABELS
mapfile -t args < <(python - "$OUT" <<'PY'
import sys
from pathlib import Path
from scripts.summarize_runs import LABELS
out = Path(sys.argv[1])
for cfg, label in LABELS.items():
    if any(out.glob(f"{cfg}_s*")):
        print("--run")
        print(f"{label}={out}/{cfg}_s*")
PY
)
python scripts/plot_runs.py --out "$OUT/collapse" "${args[@]}" --baseline "SFT student=$(python -c "import json;print(json.load(open('$STUDENT/final_eval.json'))['test']['acc'])")"
python scripts/summarize_runs.py "$OUT"
