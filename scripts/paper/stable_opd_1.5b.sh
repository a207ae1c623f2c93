#!/usr/bin/env bash
# Stable-OPD, the paper's headline run: Qwen2.5-Math-1.5B (SFT warm start) <- OpenThinker3-7B teacher.
#   L = L_OPD + lambda_gold * NLL(golden solutions, same minibatch) + beta_KL * KL(pi_theta || pi_ref = initial student)
# arXiv 2604.08527, sections 3-4; paper Table 3: 36.1 six-benchmark average (OPD 28.9, SFT 31.9, GRPO 30.1).
# Everything but the Stable-OPD block is identical to opd_1.5b.sh (diff the two files).
#
# Hardware: 4x H200 141 GB, one node (the paper's).
# Accelerate config: configs/accelerate/ddp.yaml with --num_processes 4 (4 x 16 = 64 prompts x 4 rollouts per step).
# Expected time: ~12 h for 200 steps with the vLLM rollout backend set below (8K-token sampling dominates);
#   several times longer with --rollout_backend hf (estimate, not measured).
#   On 1 GPU (not the paper's; untested): edit the launch line to configs/accelerate/single_gpu.yaml (no
#   --num_processes) and add --optim adamw8bit --teacher_quantization 4bit; the batch is then 16 prompts
#   (--per_device_prompts 64 restores 64, with 4x the sequences per optimizer step).
# Memory per GPU: fp32 student (+ grads, Adam) ~24 GB, fp32 teacher 30 GB, fp32 reference 6 GB; the vLLM engine
#   42 GB while sampling (asleep in the update); each optimizer step sees 16 x 4 / 4 = 16 sequences per GPU.
#   If it runs out of memory: --teacher_quantization 8bit (-22 GB), a lower --vllm_gpu_memory_utilization (fewer
#   sequences decoded at once), or a larger --num_minibatches (more, smaller PPO steps: a different schedule).
# Known gap: Qwen2.5-Math's configs have max_position_embeddings 4,096; prompt + 8,192-token rollouts run past it
#   (as in sft_*.sh; the paper does not say how it handled this). vLLM refuses such a max_model_len unless
#   VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, which this script exports. Nothing here has been run on a GPU yet.
# Inputs (env): STUDENT (the SFT checkpoint), TEACHER, DATA, RUN_ROOT.
#   bash scripts/paper/stable_opd_1.5b.sh [--flag value ...]          # extra flags override the ones below
set -euo pipefail
cd "$(dirname "$0")/../.."
# the engine's max_model_len, 1,024 + 8,192 = 9,216, exceeds Qwen2.5-Math's 4,096 positions: Known gap above
export VLLM_ALLOW_LONG_MAX_MODEL_LEN="${VLLM_ALLOW_LONG_MAX_MODEL_LEN:-1}"
DATA="${DATA:-data/openr1}"
RUN_ROOT="${RUN_ROOT:-runs/paper}"
STUDENT="${STUDENT:-$RUN_ROOT/sft_1.5b/final}"
TEACHER="${TEACHER:-open-thoughts/OpenThinker3-7B}"
INSTRUCTION='Please reason step by step, and put your final answer within \boxed{}.'

args=(
  --run_dir "$RUN_ROOT/stable_opd_1.5b"
  --seed 0
  --report_to wandb
  --project stable-opd
  --model_name_or_path "$STUDENT"                      # (paper) the SFT warm-started student
  --teacher_name_or_path "$TEACHER"                    # (paper) OpenThinker3-7B (or DeepSeek-R1-Distill-Qwen-7B)
  --teacher_quantization none
  --dtype float32                                      # (ours) fp32 master weights: lr 1e-6 updates vanish in bf16
  --bf16 true                                          # (ours) bf16 autocast
  --gradient_checkpointing true
  --optim adamw                                        # (paper: Adam) fp32 moments; adamw8bit only if memory forces it
  --rollout_backend vllm                               # (ours) colocated vLLM engine; hf generate at 8K tokens: too slow
  --vllm_gpu_memory_utilization 0.3                    # (ours) 42/141 GB: 3 GB weights + KV (64 x 9,216 tokens: ~17 GB)
  --vllm_sleep 1                                       # (ours) weights to CPU RAM, KV cache freed in the update; none lost
  --vllm_logps_source trainer                          # (ours) pi_old recomputed by the trainer, as with hf: one extra
                                                       # forward, no vLLM-vs-transformers kernel gap in A_t or the ratio
  --vllm_check_sync false                              # debug only: engine vs trainer weights after every sync
  --train_data "$DATA/opd.jsonl"                       # (paper) the 13K OPD prompts
  --val_data assets/benchmarks/math500.jsonl           # (paper validates on MATH500)
  --prompt_template chat
  --instruction "$INSTRUCTION"
  --max_prompt_length 1024                             # (ours)
  --on_overflow skip
  --per_device_prompts 16                              # (paper: batch 64; read as prompts) 4 GPUs x 16
  --num_generations 4                                  # (paper) 4 rollouts per prompt
  --temperature 1.0                                    # (paper)
  --top_p 1.0                                          # (ours) plain sampling
  --max_completion_length 8192                         # (paper silent) ours: the data's length cap
  --loss_type sampled                                  # (paper) PPO-clipped sampled-token surrogate
  --aggregation seq_mean_token_mean                    # (paper, GRPO-style)
  --epsilon 0.2                                        # (paper silent) ours: the usual PPO clip
  --ppo_epochs 1                                       # (paper silent) ours
  --num_minibatches 4                                  # (paper silent) ours: 4 optimizer steps per rollout batch
  --mask_truncated false                               # (paper) truncated rollouts stay in the loss
  --chunk_size 1024
  --learning_rate 1e-6                                 # (paper) Adam, 1e-6
  --weight_decay 0.0                                   # (paper: Adam)
  --lr_scheduler_type constant                         # (paper silent) ours
  --warmup_steps 0                                     # (paper silent) ours
  --max_steps 200                                      # (paper silent) ours: ~1 pass over 13K prompts at 64 per step
  --max_grad_norm 1.0                                  # (paper silent) ours
  --rep_window_chars 10000                             # (paper) repetition metric: last 10,000 characters...
  --rep_threshold 10.0                                 # (paper) ...with zlib compression ratio > 10
  --alarm_threshold 0.5
  --alarm_jump 0.3
  --alarm_window 10
  --stop_on_alarm false                                # (ours) runs on through an alarm, as OPD does
  --eval_every 25                                      # (ours)
  --eval_samples 200                                   # (ours) greedy, 200 of MATH500
  --save_every 25                                      # (ours) keep checkpoints from before the collapse
  --keep_last 4
  --resume_from auto
  --log_every 1
  --samples_every 10
  # >>> stable-opd
  --mix_coef 0.1                                       # lambda_gold = 0.1 (third-party "Luo et al. default"; paper.md section 3)
  --mix_loss nll                                       # (paper) SFT / NLL term on the golden solutions
  --ref_kl_coef 0.01                                   # beta_KL = 0.01 (third-party "Luo et al. default")
  --ref_kl_type full                                   # (paper: exact or sampled not known) ours: exact, chunked
  --ref_kl_on_golden false                             # (paper) KL on the prefixes the rollouts visit
  --adaptive_ref_kl false                              # beyond the paper, off
  --ref_kl_target 0.05
  --adaptive_mix false                                 # beyond the paper, off
  --mix_target 0.1
  --mix_max 1.0
  --golden_data "$DATA/opd.jsonl"                      # (paper) golden = the prompts' own filtered generations
  --golden_overflow skip                               # golden solutions over max_completion_length: none for that prompt
  --ref_model_name_or_path "$STUDENT"                  # (paper) pi_ref = the initial (SFT) student
  --ref_quantization none                              # (ours) exact pi_ref; 8bit only if memory forces it
  # <<< stable-opd
)
accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 4 methods/stable_opd.py "${args[@]}" "$@"
