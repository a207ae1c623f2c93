#!/usr/bin/env bash
# Stable-OPD, the paper's 7B run: Qwen2.5-Math-7B (SFT warm start) <- OpenThinker3-7B teacher.
#   L = L_OPD + lambda_gold * NLL(golden solutions, same minibatch) + beta_KL * KL(pi_theta || pi_ref = initial student)
# arXiv 2604.08527, sections 3-4; paper Table 1: 47.6 six-benchmark average (OPD 43.8, SFT 44.1, GRPO 45.5).
# Everything but the Stable-OPD block is identical to opd_7b.sh (diff the two files).
#
# Hardware: 4x H200 141 GB, one node (the paper's).
# Accelerate config: configs/accelerate/fsdp2.yaml with --num_processes 4 (overrides the file's 8). ddp.yaml cannot
#   hold it: 7.6B params x 16 bytes of fp32 weights + grads + Adam = 122 GB per GPU before activations. FSDP2
#   shards all three (~30 GB per GPU); zero3.yaml would shard the same, but needs DeepSpeed, clips gradients with
#   its own gradient_clipping instead of --max_grad_norm, and only FSDP2's vLLM weight gather is tested (CPU ranks).
# Expected time: ~24 h for 200 steps with the vLLM rollout backend set below (8K-token sampling dominates);
#   several times longer with --rollout_backend hf (estimate, not measured).
# Memory per GPU: fp32 student (+ grads, Adam) ~30 GB sharded over 4, fp32 teacher 30 GB and fp32 reference 30 GB
#   (both replicated); the vLLM engine 35 GB while sampling (asleep in the update); each optimizer step sees
#   16 x 4 / 4 = 16 sequences per GPU. The tightest recipe here.
#   If it runs out of memory: --ref_quantization 8bit or --teacher_quantization 8bit (-22 GB each), a lower
#   --vllm_gpu_memory_utilization (fewer sequences decoded at once), or a larger --num_minibatches (more,
#   smaller PPO steps: a different schedule).
# Known gap: Qwen2.5-Math's configs have max_position_embeddings 4,096; prompt + 8,192-token rollouts run past it
#   (as in sft_*.sh; the paper does not say how it handled this). vLLM refuses such a max_model_len unless
#   VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, which this script exports. Nothing here has been run on a GPU yet.
# Inputs (env): STUDENT (the SFT checkpoint), TEACHER, DATA, RUN_ROOT.
#   bash scripts/paper/stable_opd_7b.sh [--flag value ...]          # extra flags override the ones below
set -euo pipefail
cd "$(dirname "$0")/../.."
# the engine's max_model_len, 1,024 + 8,192 = 9,216, exceeds Qwen2.5-Math's 4,096 positions: Known gap above
export VLLM_ALLOW_LONG_MAX_MODEL_LEN="${VLLM_ALLOW_LONG_MAX_MODEL_LEN:-1}"
DATA="${DATA:-data/openr1}"
RUN_ROOT="${RUN_ROOT:-runs/paper}"
STUDENT="${STUDENT:-$RUN_ROOT/sft_7b/final}"
TEACHER="${TEACHER:-open-thoughts/OpenThinker3-7B}"
INSTRUCTION='Please reason step by step, and put your final answer within \boxed{}.'

args=(
  --run_dir "$RUN_ROOT/stable_opd_7b"
  --seed 0
  --report_to wandb
  --project stable-opd
  --model_name_or_path "$STUDENT"                      # (paper) the SFT warm-started student
  --teacher_name_or_path "$TEACHER"                    # (paper: its 7B runs' teacher is not in our sources) ours: OpenThinker3-7B
  --teacher_quantization none
  --dtype float32                                      # (ours) fp32 master weights: lr 1e-6 updates vanish in bf16
  --bf16 true                                          # (ours) bf16 autocast
  --gradient_checkpointing true
  --optim adamw                                        # (paper: Adam) fp32 moments; adamw8bit only if memory forces it
  --rollout_backend vllm                               # (ours) colocated vLLM engine; hf generate at 8K tokens: too slow
  --vllm_gpu_memory_utilization 0.25                   # (ours) 35/141 GB: 15 GB weights + 20 GB KV (~38 full sequences)
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
accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 4 methods/stable_opd.py "${args[@]}" "$@"
