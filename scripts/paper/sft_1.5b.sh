#!/usr/bin/env bash
# SFT warm start: Qwen2.5-Math-1.5B on the paper's SFT set (~33K OpenR1-Math-220k R1 solutions, <= 8,192 tokens).
# Both a baseline (paper Table 3: 31.9 six-benchmark average) and the student every OPD / Stable-OPD / GRPO
# recipe here starts from. arXiv 2604.08527, section 4. The paper gives no SFT hyperparameters: all "(ours)".
#
# Hardware: 4x H200 141 GB, one node (the paper's machine); fits 4x H100 80 GB too.
# Accelerate config: configs/accelerate/ddp.yaml with --num_processes 4 (global batch 4 x 1 x 16 = 64 sequences).
# Expected time: ~3 h for 1,550 steps (~3 epochs) (estimate, not measured).
# Memory: fp32 master weights (lr is small: bf16 weights would round most updates away) + bf16 autocast +
#   gradient checkpointing; ~30 GB per GPU before activations. On 1 GPU: single_gpu.yaml and
#   --gradient_accumulation_steps 64 (~12 h), or add --optim adamw8bit.
# Known gap: Qwen2.5-Math-1.5B's config has max_position_embeddings 4096; prompt + 8,192-token solutions run past
#   it (the paper does not say how it handled this; eval/evaluate.py prints the same warning).
# Inputs (env): DATA (scripts/paper/prepare_data.sh output), RUN_ROOT.
#   bash scripts/paper/sft_1.5b.sh [--flag value ...]          # extra flags override the ones below
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-data/openr1}"
RUN_ROOT="${RUN_ROOT:-runs/paper}"
INSTRUCTION='Please reason step by step, and put your final answer within \boxed{}.'

args=(
  --run_dir "$RUN_ROOT/sft_1.5b"
  --seed 0
  --report_to wandb
  --project stable-opd
  --model_name_or_path Qwen/Qwen2.5-Math-1.5B          # (paper) student
  --tokenizer_name_or_path ""
  --dtype float32                                      # (ours) fp32 master weights
  --bf16 true                                          # (ours) bf16 autocast
  --gradient_checkpointing true
  --train_data "$DATA/sft.jsonl"                       # (paper) the 33K SFT set
  --val_data assets/benchmarks/math500.jsonl           # (paper validates on MATH500)
  --test_data ""
  --prompt_template chat
  --instruction "$INSTRUCTION"                         # the OpenR1 generation prompt and the eval prompt
  --max_prompt_length 1024                             # (ours) longer problems are skipped and counted
  --max_completion_length 8192                         # (paper) the data's length cap; also the eval cap
  --on_overflow skip
  --max_train_samples 0
  --learning_rate 5e-5                                 # (ours) usual for long-CoT SFT of Qwen2.5-Math
  --weight_decay 0.0
  --lr_scheduler_type cosine                           # (ours)
  --warmup_steps 50                                    # (ours) ~3% of the steps
  --max_steps 1550                                     # (ours) ~3 epochs of 33K at 64 per step
  --per_device_batch_size 1
  --gradient_accumulation_steps 16                     # (ours) 4 GPUs x 1 x 16 = 64 sequences per step
  --max_grad_norm 1.0
  --optim adamw                                        # (paper silent) ours: fp32 moments; adamw8bit if memory forces it
  --eval_every 250
  --eval_samples 200                                   # (ours) greedy, 200 of MATH500 per eval
  --eval_batch_size 64
  --target_val_acc 0.0
  --save_every 250
  --keep_last 2
  --resume_from auto
  --log_every 10
)
accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 4 methods/sft.py "${args[@]}" "$@"
