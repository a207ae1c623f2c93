#!/usr/bin/env bash
# Stable-OPD ablation (paper Table 2: Qwen2.5-Math-1.5B student, DeepSeek-R1-Distill-Qwen-7B teacher):
#   opd     OPD alone                        paper 28.0   (stable_opd.py with both off == methods/opd.py, tested)
#   kl      OPD + reference KL               paper 29.7
#   kl_mix  OPD + reference KL + mixture     paper 35.7   (= Stable-OPD)
#   mix     OPD + mixture only               not in the paper
# Every flag comes from stable_opd_1.5b.sh; this script overrides only the teacher, the two coefficients and run_dir.
#
# Hardware: 4x H200 141 GB, one node (the paper's). Accelerate config: configs/accelerate/ddp.yaml, 4 processes
#   (set in stable_opd_1.5b.sh).
# Expected time: ~10-12 h per variant with the vLLM rollout backend set in stable_opd_1.5b.sh
#   (estimate, not measured); the variants without the reference KL skip the reference's forward.
# Inputs (env): VARIANT (or the first argument), TEACHER, STUDENT, DATA, RUN_ROOT.
#   bash scripts/paper/stable_opd_ablation.sh kl [--flag value ...]   # extra flags override the recipe's
set -euo pipefail
cd "$(dirname "$0")/../.."
VARIANT="${VARIANT:-kl_mix}"
if [[ $# -gt 0 && $1 != --* ]]; then VARIANT=$1; shift; fi
RUN_ROOT="${RUN_ROOT:-runs/paper}"
export TEACHER="${TEACHER:-deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}"  # (paper) the ablation's teacher

case "$VARIANT" in
  opd)    coefs=(--mix_coef 0 --ref_kl_coef 0) ;;
  kl)     coefs=(--mix_coef 0 --ref_kl_coef 0.01) ;;
  mix)    coefs=(--mix_coef 0.1 --ref_kl_coef 0) ;;
  kl_mix) coefs=(--mix_coef 0.1 --ref_kl_coef 0.01) ;;
  *) echo "unknown variant '$VARIANT': choose opd, kl, mix or kl_mix" >&2; exit 2 ;;
esac
bash scripts/paper/stable_opd_1.5b.sh "${coefs[@]}" --run_dir "$RUN_ROOT/ablation_r1distill_1.5b/$VARIANT" "$@"
