"""Stable-OPD (Luo et al., arXiv 2604.08527, section 3): on-policy distillation, stabilised.

    L = L_OPD(student rollouts) + lambda_gold * L_gold(golden responses) + beta_KL * KL(pi_theta || pi_ref)

L_OPD is exactly methods/opd.py's objective (per-token advantage A_t = log pi_T(y_t|c_t) - log pi_old(y_t|c_t),
PPO-clipped, or the exact full-vocabulary reverse KL with --loss_type full_kl). This file is opd.py plus the
blocks marked `# >>> stable-opd` / `# <<< stable-opd`; with --mix_coef 0 --ref_kl_coef 0 it is opd.py exactly
(no reference model loaded, no golden batch built; tests/test_ablation_equivalence.py).
  1. Rollout-mixture distillation: every update minibatch also carries one golden response per prompt (the
     dataset's `solution`, or a verified teacher-written one from scripts/make_golden.py);
     L_gold = token-mean NLL on the golden tokens (--mix_loss nll, the paper's choice), or teacher-forced
     distillation on them (--mix_loss forward_kl | reverse_kl: full-vocabulary KL to the teacher, chunked).
  2. Reference constraint: pi_ref = the frozen initial student; KL(pi_theta(.|s_t) || pi_ref(.|s_t)) over the
     full vocabulary (chunked) on the prefixes s_t visited by the rollouts (--ref_kl_on_golden adds the golden
     ones), aggregated like L_OPD; --ref_kl_type k3 uses the sampled estimator exp(d) - 1 - d, d = log pi_ref - log pi_theta.
Beyond the paper (its stated future work), both off by default, state saved in checkpoints:
  --adaptive_ref_kl: PPO's adaptive KL controller, once per step:
        beta_KL <- beta_KL * (1 + clip(KL / ref_kl_target - 1, -0.2, 0.2) / 10)
  --adaptive_mix: while max(rollout/truncated_frac, rollout/repetition_frac) (the logged, global values) > mix_target,
        lambda_gold <- min(2 lambda_gold, mix_max) (at least 0.01); once healthy,
        lambda_gold <- max(lambda_gold / 1.25, --mix_coef): back to the base value.
Deviations: the full-vocabulary reference KL costs one extra student forward per minibatch (kept separate so the
OPD code path is untouched); golden responses longer than max_completion_length are left out (counted).

Launch:
  python methods/stable_opd.py                                             # CPU toy world (after scripts/demo.sh)
  accelerate launch methods/stable_opd.py --config my.yaml                 # 1 GPU
  accelerate launch --multi_gpu --num_processes 4 methods/stable_opd.py --config my.yaml
"""

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # [plumbing] run from anywhere without installing

from common.checkpoint import install_stop_handler, load_checkpoint, resolve_resume, save_checkpoint, stop_requested
from common.cli import parse, save_config
from common.data import COT_INSTRUCTION, encode_prompts, filter_by_length, load_rows, shuffled_indices
from common.logprobs import completion_hidden, completion_logps
from common.losses import aggregation_weights, chunked_divergence_loss
# >>> stable-opd
from common.data import DataError
from common.losses import k3
from common.rollout import left_pad
# <<< stable-opd
from common.metrics import collapse_alarm, repeated_span_mask, rollout_metrics
from common.models import assert_replicas_in_sync, check_compatible, count_params, load_model, load_tokenizer, make_optimizer
from common.rollout import generate
from common.vllm_engine import make_rollout_engine
from common.tracking import end_run, init_tracking, log_metrics, log_samples, progress, tracker_names
from eval.evaluate import evaluate_rows


@dataclass
class Args:
    # --- run
    run_dir: str = field(default="runs/stable_opd", metadata={"help": "Output folder: config, metrics, samples, checkpoints, final model."})
    seed: int = 0
    report_to: str = field(default="none", metadata={"help": "Trackers: none, wandb, tensorboard (comma list)."})
    project: str = "stable-opd"
    # --- models
    model_name_or_path: str = field(default="runs/demo/full/student/final", metadata={"help": "Student (the SFT checkpoint OPD starts from)."})
    teacher_name_or_path: str = field(default="runs/demo/full/teacher/final", metadata={"help": "Frozen teacher."})
    teacher_quantization: str = field(default="none", metadata={"help": "none, 4bit or 8bit (bitsandbytes) for the frozen teacher."})
    dtype: str = field(default="float32", metadata={"help": "Weight dtype of both models: float32 or bfloat16."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for forward/backward."})
    gradient_checkpointing: bool = False
    optim: str = field(default="adamw", metadata={"help": "adamw (torch) or adamw8bit (bitsandbytes: 8-bit moments)."})
    # --- rollout engine (docs/GPU.md)
    rollout_backend: str = field(default="hf", metadata={"help": "hf (transformers generate, CPU/GPU) or vllm (colocated engine, GPU)."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "vLLM: share of the GPU for its weights + KV cache."})
    vllm_sleep: int = field(default=1, metadata={"help": "vLLM: 0 never sleep; 1 offload weights + free KV cache during the update; 2 free both."})
    vllm_logps_source: str = field(default="sampler", metadata={"help": "Old log-probs: sampler (vLLM's) or trainer (recomputed)."})
    vllm_check_sync: bool = field(default=False, metadata={"help": "Debug: compare engine and trainer weights after every sync."})
    # --- data and rollouts
    train_data: str = field(default="data/toy/train.jsonl", metadata={"help": "Prompts: JSONL / Parquet / hub id with problem, answer."})
    val_data: str = field(default="data/toy/val.jsonl", metadata={"help": "Greedy eval set ('' to skip)."})
    prompt_template: str = field(default="chat", metadata={"help": "chat or plain."})
    instruction: str = COT_INSTRUCTION
    max_prompt_length: int = 256
    on_overflow: str = field(default="skip", metadata={"help": "skip (counted) or error on prompts over max_prompt_length."})
    per_device_prompts: int = field(default=16, metadata={"help": "P: prompts per step per process."})
    num_generations: int = field(default=4, metadata={"help": "G: student samples per prompt."})
    temperature: float = 1.0
    top_p: float = field(default=1.0, metadata={"help": "Nucleus mass of the rollout sampler (1.0 = off). Sampler log-probs are then those of the truncated distribution."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens only (0 = off, the full softmax)."})
    max_completion_length: int = field(default=128, metadata={"help": "Length cap of a rollout (tokens); hitting it = truncated."})
    # --- objective
    loss_type: str = field(default="sampled", metadata={"help": "sampled (PPO-clipped, A_t = log pi_T - log pi_old) or full_kl (exact reverse KL, chunked)."})
    aggregation: str = field(default="seq_mean_token_mean", metadata={"help": "seq_mean_token_mean (paper) or token_mean."})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range for the ratio pi_theta / pi_old."})
    ppo_epochs: int = field(default=1, metadata={"help": "Passes over each rollout batch."})
    num_minibatches: int = field(default=1, metadata={"help": "Optimizer steps per pass (the batch is split)."})
    mask_truncated: bool = field(default=False, metadata={"help": "Drop truncated responses from the loss."})
    chunk_size: int = field(default=1024, metadata={"help": "Positions per chunk in the full-vocabulary loss."})
    # --- optimisation
    learning_rate: float = field(default=2e-4, metadata={"help": "Toy default; the paper uses 1e-6 on Qwen2.5-Math."})
    weight_decay: float = 0.0
    lr_scheduler_type: str = field(default="constant", metadata={"help": "constant, cosine or linear (after warmup)."})
    warmup_steps: int = 0
    max_steps: int = field(default=150, metadata={"help": "Training steps (rollout batches)."})
    max_grad_norm: float = 1.0
    # --- monitoring: metrics of the failure mode and the truncation-collapse alarm
    rep_window_chars: int = field(default=200, metadata={"help": "Repetition metric: last L characters (toy 200; the paper 10,000)."})
    rep_threshold: float = field(default=4.0, metadata={"help": "Repetition metric: zlib ratio above tau (toy 4; the paper 10)."})
    alarm_threshold: float = field(default=0.5, metadata={"help": "Alarm when truncated / repetition fraction exceeds this..."})
    alarm_jump: float = field(default=0.3, metadata={"help": "...or rises by this much within alarm_window steps."})
    alarm_window: int = 10
    stop_on_alarm: bool = field(default=False, metadata={"help": "Stop at the alarm; the last (healthy) checkpoint is kept."})
    # --- eval, checkpoints, logging
    eval_every: int = field(default=20, metadata={"help": "Greedy eval on val_data every N steps (0 = only at the end)."})
    eval_samples: int = field(default=200, metadata={"help": "Val problems per eval (0 = all)."})
    save_every: int = 50
    keep_last: int = 2
    resume_from: str = field(default="auto", metadata={"help": "auto (newest complete in run_dir), none, or a checkpoint path."})
    log_every: int = 1
    samples_every: int = field(default=10, metadata={"help": "Write a few rollouts to samples.jsonl every N steps."})
    # >>> stable-opd
    mix_coef: float = field(default=0.1, metadata={"help": "lambda_gold: weight of the golden-response loss (0 = off)."})
    mix_loss: str = field(default="nll", metadata={"help": "nll (paper), forward_kl or reverse_kl (to the teacher, on golden tokens)."})
    ref_kl_coef: float = field(default=0.01, metadata={"help": "beta_KL: weight of KL(pi_theta || pi_ref) (0 = off, no reference loaded)."})
    ref_kl_type: str = field(default="full", metadata={"help": "full (exact, chunked) or k3 (sampled-token estimator)."})
    ref_kl_on_golden: bool = field(default=False, metadata={"help": "Also apply the reference KL on golden-response positions."})
    adaptive_ref_kl: bool = field(default=False, metadata={"help": "Move beta_KL to hold the reference KL near ref_kl_target."})
    ref_kl_target: float = 0.05
    adaptive_mix: bool = field(default=False, metadata={"help": "Raise lambda_gold while truncation / repetition is above mix_target."})
    mix_target: float = 0.1
    mix_max: float = 1.0
    golden_data: str = field(default="", metadata={"help": "JSONL / Parquet of golden responses (problem, solution), e.g. from scripts/make_golden.py; default: train_data's `solution`."})
    golden_overflow: str = field(default="skip", metadata={"help": "Golden responses over max_completion_length: skip (no golden for that prompt) or truncate."})
    ref_model_name_or_path: str = field(default="", metadata={"help": "Reference model (default: the student's start, as in the paper)."})
    ref_quantization: str = field(default="none", metadata={"help": "none, 4bit or 8bit (bitsandbytes) for the frozen reference."})
    # <<< stable-opd


def global_weights_BT(accelerator, mask_BT: torch.Tensor, mode: str) -> torch.Tensor:
    """Weights w with sum_ranks sum_bt w * loss_bt = aggregate over the GLOBAL batch, times the world
    size (DDP averages gradients over ranks, so each rank's sum must be world-size times its share)."""
    if mode == "token_mean":
        local = mask_BT.sum()
    else:  # seq_mean_token_mean: responses with no tokens (e.g. masked truncations) do not count
        local = (mask_BT.sum(-1) > 0).sum()
    total = accelerator.reduce(local.float().to(accelerator.device), "sum").clamp_min(1)
    return aggregation_weights(mask_BT, mode) * (local.float() / total) * accelerator.num_processes


def opd_surrogate_BT(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_BT: torch.Tensor, epsilon: float):
    """Per-token PPO-clipped loss -min(r A, clip(r, 1-eps, 1+eps) A), and whether the clip was active."""
    ratio = torch.exp(logp_BT - old_logp_BT)
    unclipped, clipped = ratio * adv_BT, ratio.clamp(1 - epsilon, 1 + epsilon) * adv_BT
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def token_evidence(adv_BT: torch.Tensor, mask_BT: torch.Tensor, completion_ids: torch.Tensor) -> dict[str, float]:
    """The paper's token-level evidence: share of tokens inside repeated spans, mean advantage on them vs the rest."""
    rep = torch.zeros_like(mask_BT, dtype=torch.bool)
    for i, (ids, m) in enumerate(zip(completion_ids.tolist(), mask_BT.tolist())):
        n = int(sum(m))
        rep[i, :n] = torch.tensor(repeated_span_mask(ids[:n]), dtype=torch.bool) if n else rep[i, :n]
    valid = mask_BT.bool()
    rep_tok, other = rep & valid, ~rep & valid
    mean = lambda sel: float(adv_BT[sel].mean()) if sel.any() else float("nan")  # noqa: E731
    return {"rollout/repeat_token_frac": float(rep_tok.sum() / valid.sum().clamp_min(1)),
            "opd/adv_repeat_tokens": mean(rep_tok), "opd/adv_other_tokens": mean(other)}


def greedy_eval(accelerator, model, tokenizer, rows: list[dict], args: Args, engine=None) -> dict[str, float]:
    """Greedy accuracy, length, truncation, repetition on `rows` (sharded over ranks, gathered)."""
    stats, _ = evaluate_rows(model, tokenizer, rows, greedy=True, max_new_tokens=args.max_completion_length,
                             prompt_template=args.prompt_template, instruction=args.instruction, accelerator=accelerator,
                             engine=engine)
    return stats


# >>> stable-opd
def golden_ids_for(rows: list[dict], golden_by_problem: dict[str, str], tokenizer, max_len: int, overflow: str):
    """Per prompt row, its golden response as token ids + EOS ([] if it has none), and counts of what was
    missing, over-long (skipped or truncated to max_len) and unparsable (no final answer we can extract)."""
    from common.grading import extract_answer

    out, counts = [], {"missing": 0, "over_long": 0, "unparsable": 0}
    for row in rows:
        text = golden_by_problem.get(row["problem"])
        if not text:
            counts["missing"] += 1
            out.append([])
            continue
        counts["unparsable"] += extract_answer(text)[0] is None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) > max_len:
            counts["over_long"] += 1
            ids = ids[:max_len] if overflow == "truncate" else []
        out.append(ids)
    return out, counts


def golden_batch(prompts: list[list[int]], golden: list[list[int]], pad_id: int):
    """Left-padded prompts + right-padded golden responses: (ids, attention mask, golden-token mask [P, T], T)."""
    g_ids, g_attn = left_pad(prompts, pad_id)
    T = max(1, max(len(g) for g in golden))
    comp, mask = torch.full((len(golden), T), pad_id, dtype=torch.long), torch.zeros((len(golden), T))
    for j, g in enumerate(golden):
        comp[j, : len(g)], mask[j, : len(g)] = torch.tensor(g, dtype=torch.long), 1.0
    return torch.cat([g_ids, comp], 1), torch.cat([g_attn, mask.long()], 1), mask, T


def adapt_ref_kl(coef: float, kl: float, target: float) -> float:
    """PPO's adaptive KL controller (Ziegler et al. 2019) with horizon 10 steps: move beta by at most 2% a step."""
    return coef * (1 + min(max(kl / target - 1, -0.2), 0.2) / 10)


def adapt_mix(coef: float, unhealthy: float, target: float, base: float, max_coef: float) -> float:
    """Double lambda_gold (at least to 0.01, at most max_coef) while unhealthy > target; else decay to base."""
    if unhealthy > target:
        return min(max(2 * coef, 0.01), max_coef)
    return max(coef / 1.25, base)


# <<< stable-opd
def main(args: Args) -> dict:
    # [plumbing] accelerator, seeds, run folder, tracking
    accelerator = Accelerator(
        mixed_precision="bf16" if args.bf16 else "no",
        log_with=tracker_names(args.report_to),
        project_dir=args.run_dir,
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step ourselves (global batches)
    )
    set_seed(args.seed)
    run_dir = Path(args.run_dir)
    if accelerator.is_main_process:
        save_config(args, run_dir)
    stop = install_stop_handler()  # Ctrl-C / SIGTERM: finish the current step, checkpoint, exit

    for name, choices in (("loss_type", ("sampled", "full_kl")), ("aggregation", ("seq_mean_token_mean", "token_mean"))):
        if getattr(args, name) not in choices:
            raise ValueError(f"--{name} must be one of {choices}, got {getattr(args, name)!r}")

    # Student (trained), teacher (frozen), and their compatibility: checked before step 1
    tokenizer = load_tokenizer(args.model_name_or_path)
    model = load_model(args.model_name_or_path, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing)
    teacher = load_model(args.teacher_name_or_path, dtype=args.dtype, quantization=args.teacher_quantization, trainable=False)
    vocab = check_compatible(tokenizer, load_tokenizer(args.teacher_name_or_path), model, teacher)
    if args.teacher_quantization == "none":  # bitsandbytes places quantized weights itself
        teacher.to(accelerator.device)
    rows = load_rows(args.train_data)
    prompts = encode_prompts(tokenizer, rows, args.prompt_template, args.instruction)
    rows, n_skipped = filter_by_length(rows, [len(p) for p in prompts], args.max_prompt_length, args.on_overflow)
    prompts = [p for p in prompts if len(p) <= args.max_prompt_length]
    val_rows = load_rows(args.val_data)[: args.eval_samples or None] if args.val_data else []
    # >>> stable-opd
    for name, choices in (("mix_loss", ("nll", "forward_kl", "reverse_kl")), ("ref_kl_type", ("full", "k3"))):
        if getattr(args, name) not in choices:
            raise ValueError(f"--{name} must be one of {choices}, got {getattr(args, name)!r}")
    use_mix, use_ref = args.mix_coef > 0 or args.adaptive_mix, args.ref_kl_coef > 0
    if args.adaptive_ref_kl and not use_ref:
        raise ValueError("--adaptive_ref_kl needs --ref_kl_coef > 0 (its starting value)")
    coefs = {"mix": args.mix_coef, "ref": args.ref_kl_coef}  # the effective coefficients (adaptive ones move)
    ref_path = args.ref_model_name_or_path or args.model_name_or_path
    if use_ref and ref_path != args.model_name_or_path:
        accelerator.print(f"WARNING: reference {ref_path} is not the student's start {args.model_name_or_path}: not the paper's setting")
    ref = load_model(ref_path, dtype=args.dtype, quantization=args.ref_quantization, trainable=False) if use_ref else None
    if ref is not None and args.ref_quantization == "none":
        ref.to(accelerator.device)
    golden = []  # one golden response (token ids + EOS) per prompt, [] where it has none
    if use_mix:
        if args.golden_overflow not in ("skip", "truncate"):
            raise ValueError(f"--golden_overflow must be skip or truncate, got {args.golden_overflow!r}")
        source = load_rows(args.golden_data) if args.golden_data else rows
        golden_by_problem = {r["problem"]: r.get("solution") for r in source if r.get("solution")}
        golden, counts = golden_ids_for(rows, golden_by_problem, tokenizer, args.max_completion_length, args.golden_overflow)
        if not any(golden):
            raise DataError(f"--mix_coef > 0 needs golden responses, and none of the {len(rows)} prompts has a usable one: add a "
                            f"`solution` field to {args.train_data}, or write a golden file with scripts/make_golden.py and pass "
                            f"--golden_data (and check --max_completion_length {args.max_completion_length}: {counts['over_long']} too long)")
        accelerator.print(f"golden responses: {sum(map(bool, golden))} / {len(golden)} prompts | {counts['missing']} missing, "
                          f"{counts['over_long']} over max_completion_length ({args.golden_overflow}), "
                          f"{counts['unparsable']} without a parsable final answer")
    # <<< stable-opd
    accelerator.print(f"student {count_params(model) / 1e6:.2f}M, teacher {count_params(teacher) / 1e6:.2f}M params | "
                      f"{len(prompts)} prompts ({n_skipped} skipped as too long) | {accelerator.num_processes} process(es)")

    optimizer = make_optimizer(model.parameters(), args.optim, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler("constant_with_warmup" if args.lr_scheduler_type == "constant" else args.lr_scheduler_type,
                              optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=args.max_steps * args.ppo_epochs * args.num_minibatches)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # resume (the saved state differs per method)
    step, cursor, run_id, history = 0, 0, None, []
    ckpt = resolve_resume(run_dir, args.resume_from)
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt)
        step, cursor, run_id, history = state["step"], state["cursor"], state.get("tracker_run_id"), state.get("history", [])
        # >>> stable-opd
        coefs = state.get("coefs", coefs)
        # <<< stable-opd
        accelerator.print(f"resumed from {ckpt} at step {step}")
    run_id = init_tracking(accelerator, args.project, run_dir.name, vars(args), run_id)
    # [plumbing] rollout engine: None for hf; vLLM is built here, after the resume, and synced from the model at once
    engine = make_rollout_engine(args.rollout_backend, accelerator.unwrap_model(model), tokenizer,
                                 max_model_len=args.max_prompt_length + args.max_completion_length,
                                 gpu_memory_utilization=args.vllm_gpu_memory_utilization, sleep_level=args.vllm_sleep,
                                 dtype="bfloat16" if args.bf16 or args.dtype == "bfloat16" else args.dtype, seed=args.seed,
                                 logps_source=args.vllm_logps_source, check_sync=args.vllm_check_sync,
                                 process_index=accelerator.process_index, num_processes=accelerator.num_processes)

    def checkpoint():
        state = {"step": step, "cursor": cursor, "tracker_run_id": run_id, "history": history[-2 * args.alarm_window - 5 :]}
        # >>> stable-opd
        state["coefs"] = coefs
        # <<< stable-opd
        save_checkpoint(accelerator, run_dir, step, state, args.keep_last)

    P, G, rank = args.per_device_prompts, args.num_generations, accelerator.process_index
    bar = progress(accelerator, args.max_steps, step, "opd")
    alarmed = False
    while step < args.max_steps and not stop_requested(accelerator, stop):
        # 1. eval (checkpoints at the end of the step)
        if val_rows and args.eval_every and step % args.eval_every == 0:
            stats = greedy_eval(accelerator, model, tokenizer, val_rows, args, engine)
            log_metrics(accelerator, run_dir, {f"eval/val/{k}": v for k, v in stats.items()}, step)
        t0 = time.time()

        # 2. rollout: this rank's P prompts of the global batch, G samples each (groups never split)
        idx = shuffled_indices(len(prompts), cursor, P * accelerator.num_processes, args.seed)[rank * P : (rank + 1) * P]
        out = generate(accelerator.unwrap_model(model), tokenizer, [prompts[i] for i in idx], max_new_tokens=args.max_completion_length,
                       num_samples=G, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed * 1_000_003 + step * 1009 + rank,
                       return_logps=True, engine=engine)
        if engine is not None:  # free the engine's GPU memory for scoring and the update
            engine.sleep()
        ids = torch.cat([out.prompt_ids, out.completion_ids], 1).to(accelerator.device)
        attn = torch.cat([out.prompt_mask, out.completion_mask], 1).to(accelerator.device)
        mask = out.completion_mask.to(accelerator.device).float()
        old_logp = out.sampler_logps.to(accelerator.device)
        T = out.completion_ids.shape[1]
        t_rollout = time.time() - t0

        # 3. score: the frozen teacher on every sampled position, one teacher-forced pass
        t1 = time.time()
        with torch.no_grad(), accelerator.autocast():
            scored = completion_logps(teacher, ids, attn, T, args.temperature, token_id=tokenizer.eos_token_id, vocab_limit=vocab)
        teacher_logp = scored["logps"] * mask
        t_teacher = time.time() - t1
        # >>> stable-opd
        # golden batch: this step's P prompts, each with its golden response (masked out where it has none)
        if use_mix:
            g_ids, g_attn, g_mask, g_T = (x.to(accelerator.device) if torch.is_tensor(x) else x for x in
                                          golden_batch([prompts[i] for i in idx], [golden[i] for i in idx], tokenizer.pad_token_id))
        if use_ref and args.ref_kl_type == "k3":
            with torch.no_grad(), accelerator.autocast():
                ref_logp = completion_logps(ref, ids, attn, T, args.temperature, vocab_limit=vocab)["logps"]
        mix_key = "mix/nll" if args.mix_loss == "nll" else "mix/kl"  # the golden-response loss, whichever it is
        stats_so = {mix_key: 0.0, "ref/kl": 0.0}
        # <<< stable-opd

        # 4. advantages: A_t = log pi_T - log pi_old (detached); loss mask
        adv = (teacher_logp - old_logp).detach() * mask
        truncated = torch.tensor([f == "length" for f in out.finish_reason], device=mask.device)
        loss_mask = mask * (~truncated).float()[:, None] if args.mask_truncated else mask

        # 5. update: ppo_epochs x num_minibatches optimizer steps on this rollout batch
        t2 = time.time()
        model.train()
        stats = {"loss": 0.0, "clip": 0.0, "grad_norm": 0.0}
        if args.loss_type == "sampled":  # full_kl never computes the student's sampled log-probs
            stats.update(entropy=0.0, student_eos=0.0)
        n_updates = args.ppo_epochs * args.num_minibatches
        for epoch in range(args.ppo_epochs):
            # minibatches of whole prompt groups: all G samples of a prompt are updated together
            groups = torch.randperm(P, generator=torch.Generator().manual_seed(args.seed + step * 31 + epoch))
            for mb_groups in groups.chunk(args.num_minibatches):
                mb = (mb_groups[:, None] * G + torch.arange(G)).flatten()
                weights = global_weights_BT(accelerator, loss_mask[mb], args.aggregation)
                with accelerator.autocast():
                    if args.loss_type == "sampled":
                        res = completion_logps(model, ids[mb], attn[mb], T, args.temperature, with_entropy=True,
                                               token_id=tokenizer.eos_token_id, vocab_limit=vocab)
                        per_token, clipped = opd_surrogate_BT(res["logps"], old_logp[mb], adv[mb], args.epsilon)
                        loss = (per_token * weights).sum()
                        stats["clip"] += float((clipped.float() * loss_mask[mb]).sum() / loss_mask[mb].sum().clamp_min(1)) / n_updates
                        stats["entropy"] += float((res["entropy"] * mask[mb]).sum() / mask[mb].sum().clamp_min(1)) / n_updates
                        stats["student_eos"] += float((res["token_logps"] * mask[mb]).sum() / mask[mb].sum().clamp_min(1)) / n_updates
                    else:  # exact per-token reverse KL(pi_theta || pi_T) over the full vocabulary, chunked
                        h_s, w_s = completion_hidden(model, ids[mb], attn[mb], T)
                        with torch.no_grad():
                            h_t, w_t = completion_hidden(teacher, ids[mb], attn[mb], T)
                        loss, _ = chunked_divergence_loss(h_s, w_s, h_t, w_t, weights, kind="reverse_kl", chunk_size=args.chunk_size,
                                                          temperature=args.temperature, vocab_limit=vocab)
                    # >>> stable-opd
                    if use_mix:  # L_gold on this minibatch's prompts' golden responses (token mean over golden tokens)
                        g_w = global_weights_BT(accelerator, g_mask[mb_groups], "token_mean")
                        if args.mix_loss == "nll":
                            g_lp = completion_logps(model, g_ids[mb_groups], g_attn[mb_groups], g_T, vocab_limit=vocab)["logps"]
                            l_gold = -(g_lp * g_w).sum()
                        else:
                            gh_s, gw_s = completion_hidden(model, g_ids[mb_groups], g_attn[mb_groups], g_T)
                            with torch.no_grad():
                                gh_t, gw_t = completion_hidden(teacher, g_ids[mb_groups], g_attn[mb_groups], g_T)
                            l_gold, _ = chunked_divergence_loss(gh_s, gw_s, gh_t, gw_t, g_w, kind=args.mix_loss,
                                                                chunk_size=args.chunk_size, vocab_limit=vocab)
                        loss = loss + coefs["mix"] * l_gold
                        stats_so[mix_key] += accelerator.reduce(l_gold.detach(), "sum").item() / accelerator.num_processes / n_updates
                    if use_ref:  # KL(pi_theta || pi_ref) on the rollouts' prefixes (and the golden ones, optionally)
                        parts = [(ids[mb], attn[mb], T, weights)]
                        if args.ref_kl_on_golden and use_mix and args.ref_kl_type == "full":  # k3 needs samples of pi_theta
                            parts.append((g_ids[mb_groups], g_attn[mb_groups], g_T, global_weights_BT(accelerator, g_mask[mb_groups], args.aggregation)))
                        l_ref = 0.0
                        for r_ids, r_attn, r_T, r_w in parts:
                            if args.ref_kl_type == "full":
                                rh_s, rw_s = completion_hidden(model, r_ids, r_attn, r_T)
                                with torch.no_grad():
                                    rh_r, rw_r = completion_hidden(ref, r_ids, r_attn, r_T)
                                l_part, _ = chunked_divergence_loss(rh_s, rw_s, rh_r, rw_r, r_w, kind="reverse_kl", chunk_size=args.chunk_size,
                                                                    temperature=args.temperature, vocab_limit=vocab)
                            else:  # k3 on the sampled tokens (rollout positions only)
                                lp = (res["logps"] if args.loss_type == "sampled"  # the OPD forward already computed them
                                      else completion_logps(model, r_ids, r_attn, r_T, args.temperature, vocab_limit=vocab)["logps"])
                                l_part = (k3(lp, ref_logp[mb]) * r_w).sum()
                            l_ref = l_ref + l_part
                        loss = loss + coefs["ref"] * l_ref
                        stats_so["ref/kl"] += accelerator.reduce(l_ref.detach(), "sum").item() / accelerator.num_processes / n_updates
                    # <<< stable-opd
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                stats["loss"] += accelerator.reduce(loss.detach(), "sum").item() / accelerator.num_processes / n_updates
                stats["grad_norm"] += (float(grad_norm) if grad_norm is not None else float("nan")) / n_updates
        t_update = time.time() - t2
        # >>> stable-opd
        stats_so.update({"coef/mix": coefs["mix"], "coef/ref_kl": coefs["ref"]})  # the coefficients used this step
        # <<< stable-opd

        # 6. sync weights to the rollout engine (every rank: collective under FSDP2 / ZeRO-3); the HF backend
        # samples from `model` itself
        if engine is not None:
            engine.sync_weights(accelerator.unwrap_model(model))
        step, cursor = step + 1, cursor + P * accelerator.num_processes
        bar.update(1)

        # 7. log: the failure-mode metrics, the token-level evidence, the alarm
        step_s = time.time() - t0
        m = rollout_metrics(out.lengths, out.finish_reason, out.texts, [ids_[: int(k)] for ids_, k in
                            zip(out.completion_ids.tolist(), out.completion_mask.sum(-1).tolist())],
                            window_chars=args.rep_window_chars, threshold=args.rep_threshold)
        m.update(token_evidence(adv.cpu(), mask.cpu(), out.completion_ids))
        n_tok = mask.sum().clamp_min(1)
        m.update({"opd/adv_mean": float(adv.sum() / n_tok), "opd/teacher_logp": float(teacher_logp.sum() / n_tok),
                  "opd/student_logp": float((old_logp * mask).sum() / n_tok), "opd/student_entropy": stats.get("entropy", float("nan")),
                  "opd/teacher_eos_logp": float((scored["token_logps"] * mask).sum() / n_tok), "opd/student_eos_logp": stats.get("student_eos", float("nan")),
                  "opd/clip_frac": stats["clip"], "train/loss": stats["loss"], "train/grad_norm": stats["grad_norm"],
                  "train/lr": scheduler.get_last_lr()[0], "perf/step_s": step_s, "perf/rollout_s": t_rollout,
                  "perf/teacher_s": t_teacher, "perf/update_s": t_update, "perf/tokens_per_s": float(mask.sum()) / step_s,
                  "perf/peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0})
        # >>> stable-opd
        m.update(stats_so)
        # <<< stable-opd
        m = {k: accelerator.reduce(torch.tensor(float(v), device=accelerator.device), "mean").item() for k, v in sorted(m.items())}
        # >>> stable-opd
        # the adaptive controllers (docstring), on this step's global metrics, the same values that are logged
        if args.adaptive_ref_kl:
            coefs["ref"] = adapt_ref_kl(coefs["ref"], m["ref/kl"], args.ref_kl_target)
        if args.adaptive_mix:
            unhealthy = max(m["rollout/truncated_frac"], m["rollout/repetition_frac"])
            coefs["mix"] = adapt_mix(coefs["mix"], unhealthy, args.mix_target, args.mix_coef, args.mix_max)
        # <<< stable-opd
        history.append({"step": step, **m})
        alarms = collapse_alarm(history, threshold=args.alarm_threshold, jump=args.alarm_jump, window=args.alarm_window)
        for msg in alarms:
            accelerator.print(f"\nstep {step}: {msg}")
        m["alarm/truncation"] = float(bool(alarms))
        if step % args.log_every == 0:
            log_metrics(accelerator, run_dir, m, step)
            bar.set_postfix(len=f"{m['rollout/len_mean']:.0f}", trunc=f"{m['rollout/truncated_frac']:.2f}", adv=f"{m['opd/adv_mean']:.3f}")
        if args.samples_every and step % args.samples_every == 0:
            log_samples(accelerator, run_dir, [{"completion": t, "finish": f, "length": n}
                                               for t, f, n in zip(out.texts[:4], out.finish_reason[:4], out.lengths[:4])], step)
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"non-finite loss at step {step}; lower --learning_rate")
        if alarms and args.stop_on_alarm:
            alarmed = True
            accelerator.print(f"--stop_on_alarm: stopping at step {step}; the last checkpoint (before the alarm) is kept")
            break
        if args.save_every and step % args.save_every == 0:
            checkpoint()
    bar.close()

    # interrupted: keep the progress, exit
    if not alarmed and step < args.max_steps:
        checkpoint()
        accelerator.print(f"stopped by signal at step {step}; checkpoint written to {run_dir}/checkpoints")
        end_run(accelerator)
        sys.exit(130)
    if not alarmed:
        checkpoint()

    # Final eval and export
    final = {"step": step, "alarmed": alarmed}
    if val_rows:
        final["val"] = greedy_eval(accelerator, model, tokenizer, val_rows, args, engine)
        log_metrics(accelerator, run_dir, {f"eval/val/{k}": v for k, v in final["val"].items()}, step)
    assert_replicas_in_sync(accelerator, model)
    accelerator.unwrap_model(model).save_pretrained(run_dir / "final", is_main_process=accelerator.is_main_process,
                                                    save_function=accelerator.save, state_dict=accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(run_dir / "final")
        (run_dir / "final_eval.json").write_text(json.dumps(final, indent=2))
    accelerator.print(f"done: {run_dir}/final | " + (f"val acc {final['val']['acc']:.3f}" if "val" in final else ""))
    end_run(accelerator)
    return final


if __name__ == "__main__":
    main(parse(Args))
