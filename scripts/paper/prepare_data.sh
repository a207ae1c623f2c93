#!/usr/bin/env bash
# The paper's training data: OpenR1-Math-220k (default config, 93,733 problems) -> generations of <= 8,192
# student tokens that Math-Verify judges correct -> one golden per problem -> seeded split into the SFT set
# (the rest, ~33K in the paper) and the OPD set (13K, with golden solutions). arXiv 2604.08527, section 4.
#
# Hardware: CPU only (16 cores assumed by --num_proc); ~4 GB download, ~10 GB of datasets cache.
# Accelerate config: none (plain python).
# Expected time: ~15 min with --verify dataset, ~45 min with --verify both (estimate, not measured).
# Output: $DATA/{sft,opd}.jsonl (+ .parquet), $DATA/report.{json,md} with the counts after every filter.
#   bash scripts/paper/prepare_data.sh [--flag value ...]      # extra flags override the ones below
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-data/openr1}"

args=(
  --source open-r1/OpenR1-Math-220k     # (paper) the public dataset
  --subset default                      # (paper) the 94K-problem subset ("94K -> 46K")
  --split train
  --revision ""                         # (ours) newest; pin a commit for an exact rebuild
  --cache_dir ""
  --tokenizer Qwen/Qwen2.5-Math-1.5B    # (paper: "8,192 tokens", tokenizer not named) ours: the student's
  --max_tokens 8192                     # (paper)
  --verify dataset                      # (paper: Math-Verify) the dataset's own Math-Verify flags; `both` adds our grader
  --grade_workers 16
  --grade_timeout 5.0
  --golden first                        # (paper silent: "their filtered generations") ours: first kept, length-neutral
  --sft_solutions golden                # (paper silent) ours: one solution per SFT problem
  --opd_size 13000                      # (paper) 13K OPD prompts
  --opd_frac 0.0
  --sft_size 0                          # (paper: 33K = the rest of ~46K) ours: all the rest
  --seed 0
  --out_dir "$DATA"
  --parquet true
  --num_proc 16
  --limit 0
)
python scripts/prepare_openr1.py "${args[@]}" "$@"
