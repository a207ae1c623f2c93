#!/usr/bin/env bash
# GRPO baseline: Qwen2.5-Math-7B (SFT warm start) with a Math-Verify 0/1 reward on the OPD prompts.
# arXiv 2604.08527, section 4; paper Table 1: GRPO 45.5 six-benchmark average. The paper gives only the shared
# setup (batch 64, 4 rollouts, temperature 1.0, Adam lr 1e-6); the GRPO-specific values are "(ours)".
#
# Hardware: 4x H200 141 GB, one node (the paper's).
# Accelerate config: configs/accelerate/fsdp2.yaml with --num_processes 4 (being added by issue 8; ddp.yaml cannot
#   hold it: 7.6B params x 16 bytes of fp32 weights + grads + Adam = 122 GB per GPU before activations).
# Expected time: ~45 h for 200 steps with the hf rollout backend; a few hours once vLLM rollouts land
#   (estimate, not measured). No teacher: cheaper per step than OPD.
# Flags: the set agreed while methods/grpo.py was being written; its other fields keep their defaults. Once it is
#   merged, also spell out --max_prompt_length 1024 --rep_window_chars 10000 --rep_threshold 10 (as opd_*.sh).
# Inputs (env): STUDENT (the SFT checkpoint), DATA, RUN_ROOT.
#   bash scripts/paper/grpo_7b.sh [--flag value ...]         # extra flags override the ones below
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-data/openr1}"
RUN_ROOT="${RUN_ROOT:-runs/paper}"
STUDENT="${STUDENT:-$RUN_ROOT/sft_7b/final}"

args=(
  --run_dir "$RUN_ROOT/grpo_7b"
  --seed 0
  --report_to wandb
  --model_name_or_path "$STUDENT"                      # (paper silent on GRPO's start) ours: the SFT student, as OPD
  --ref_model_name_or_path "$STUDENT"                  # only loaded when --beta > 0
  --train_data "$DATA/opd.jsonl"                       # (paper silent) ours: the 13K OPD prompts, as OPD
  --val_data assets/benchmarks/math500.jsonl
  --per_device_prompts 16                              # (paper: batch 64; read as prompts) 4 GPUs x 16
  --num_generations 4                                  # (paper) 4 rollouts per prompt
  --max_completion_length 8192                         # (paper silent) ours: the data's length cap
  --temperature 1.0                                    # (paper)
  --scale_rewards group                                # (ours) divide by the group std, as the original GRPO
  --epsilon_low 0.2                                    # (ours) symmetric clip, as the original GRPO
  --epsilon_high 0.2
  --aggregation seq_mean_token_mean                    # (ours) the original GRPO's per-sequence mean
  --beta 0.0                                           # (ours) no KL to the reference, no reference loaded
  --format_reward 0                                    # (ours) off: correctness reward only
  --mask_truncated false                               # (ours) truncated rollouts get reward 0 and stay in the loss
  --ppo_epochs 1                                       # (ours)
  --num_minibatches 4                                  # (ours) as the OPD recipe
  --learning_rate 1e-6                                 # (paper) Adam, 1e-6
  --max_steps 200                                      # (ours) as the OPD recipe
  --eval_every 25
  --eval_samples 200
  --save_every 25
  --bf16 true                                          # (ours) bf16 autocast
  --dtype float32                                      # (ours) fp32 master weights
  --gradient_checkpointing true
)
accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 4 methods/grpo.py "${args[@]}" "$@"
