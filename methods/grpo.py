"""GRPO: RL with a verifiable math reward (DeepSeekMath, Shao et al. 2024, eq. 3), the Stable-OPD paper's RL baseline.

Per step: P prompts x G samples y_i ~ pi_old(.|x); reward from the grader (common/grading.py)

    R_i = 1[boxed answer of y_i is correct] + format_reward * 1[y_i ends with EOS and has a \\boxed{}]

(`--rewards` sums other named terms instead: length / overlong penalties or a `module:function` hook, common/rewards.py)
and one group-relative advantage per response, broadcast to its tokens (s: --scale_rewards)

    A_i = (R_i - mean_group(R)) / (s + 1e-4),   s = std of the group | std of the global batch | 1 (none: Dr. GRPO)

with a PPO-clipped surrogate, asymmetric clip (DAPO), r_t = pi_theta(y_t|c_t) / pi_old(y_t|c_t), c_t = (x, y_<t):

    L = agg_t [ -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t ],
    k3_t = exp(d_t) - 1 - d_t,   d_t = log pi_ref(y_t|c_t) - log pi_theta(y_t|c_t)   (KL(pi_theta || pi_ref) >= 0)

agg = token mean over the whole global batch (DAPO, default) or per-response token mean then mean over responses.
Choices / deviations:
  1. epsilon_high = 0.28 (DAPO clip-higher): a low-probability token with A > 0 may grow to 1.28x its old
     probability before the clip stops it, which keeps exploration (entropy) alive; eps_low stays 0.2. With the
     default single update per batch r_t = 1 exactly and no clip is ever active.
  2. Groups whose rewards are all equal (A = 0) are dropped from the update (no forward, not in the normaliser),
     counted as grpo/zero_std_frac. group std is the sample std (ddof 1); batch std is over the GLOBAL batch.
  3. Group statistics are computed from the gathered global reward matrix: every rank holds the same numbers,
     and a prompt's G samples always live on one rank.
  4. One update per batch (ppo_epochs = num_minibatches = 1): pi_old = the detached current log-probs (on-policy,
     no extra forward). Otherwise the old log-probs are stored by one no-grad forward after the rollout.
  5. Truncated responses keep their graded reward in the group statistics; --mask_truncated drops them from the loss.
  6. beta = 0 (default): no reference model is loaded.
  7. Speed only: the lm_head computes the loss's gradient in its forward, from the per-token loss (`token_loss`;
     the backward checks it against the actual one and recomputes if they differ; common/logprobs.py).
  8. Memory only: `--micro_batch_tokens N` runs every forward on at most N tokens of rows (at least one row): the
     reference and the stored pi_old in blocks of rows, the update as micro-batches of whole prompt groups whose
     gradients accumulate in ONE optimizer step, exactly (weights normalised over the minibatch; opd.py).

Launch:
  python methods/grpo.py                                                   # CPU toy world (after scripts/demo.sh)
  accelerate launch methods/grpo.py --config my.yaml                       # 1 GPU
  accelerate launch --multi_gpu --num_processes 4 methods/grpo.py --config my.yaml
"""

import json
import math
import sys
import time
from dataclasses import field
from pathlib import Path
from typing import Literal

import torch
from accelerate.utils import gather_object

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from common.checkpoint import save_checkpoint, stop_requested
from common.cli import parse
from common.errors import error_boundary
from common.flags import (CheckpointFlags, DataFlags, EngineFlags, HubFlags, LoraFlags, ModelFlags, MonitorFlags, OptimFlags,
                          ReferenceFlags, RolloutFlags, RunFlags, flags)
from common.data import load_prompts, load_rows, row_options, shuffled_indices
from common.grading import grade_batch
from common.logprobs import completion_logps
from common.microbatch import group_rows, micro_batches, optimizer_step, scored_forward
from common.losses import k3
from common.rewards import compute_rewards, parse_rewards, resolve_spec, reward_metrics
from common.metrics import rollout_metrics
from common.lora import apply_lora, load_reference
from common.models import check_compatible, count_params, load_model, load_tokenizer, make_optimizer
from common.rollout import generate
from common.run import (engine_from_args, finish_rl_run, global_weights_BT, greedy_eval, log_eval, log_step, make_scheduler,
                        reduce_metrics, resume_run, start_run)
from common.tracking import progress

SCALES, AGGREGATIONS = ("group", "batch", "none"), ("token_mean", "seq_mean_token_mean")


@flags
class Args(RunFlags, ModelFlags, LoraFlags, ReferenceFlags, EngineFlags, DataFlags, RolloutFlags, OptimFlags, MonitorFlags,
           CheckpointFlags, HubFlags):
    """GRPO: the policy, its reference, the reward, the clipped objective (the shared flags: common/flags.py)."""
    run_dir: str = "runs/grpo"
    model_name_or_path: str = field(default="runs/demo/full/student/final", metadata={"help": "Policy (the SFT checkpoint GRPO starts from)."})
    num_generations: int = field(default=4, metadata={"help": "G: samples per prompt (>= 2: the group baseline).", "range": "[2, inf)"})
    rewards: str = field(default="", metadata={"help": "Reward terms 'name[:weight],...' summed: correctness, format, length, overlong, or module:function[:weight] (common/rewards.py). '' = correctness + format_reward * format."})
    overlong_buffer: int = field(default=0, metadata={"help": "overlong reward: DAPO's soft penalty falls from 0 to -1 over the last N tokens before max_completion_length (0 = max_completion_length // 4).", "range": "[0, max_completion_length]"})
    format_reward: float = field(default=0.0, metadata={"help": "Coefficient of the format reward 1[ends with EOS and has a \\boxed{}] (0 = off).", "range": "[0, inf)"})
    strict_boxed: bool = field(default=True, metadata={"help": "Reward only a \\boxed{} answer (False: also 'the answer is X' / the last number, as eval)."})
    grade_timeout: float = field(default=5.0, metadata={"help": "Seconds per math-verify comparison before it counts as wrong.", "range": "(0, inf)"})
    scale_rewards: Literal["group", "batch", "none"] = field(default="group", metadata={"help": "Advantage scale: group (std of the group), batch (std of the global batch) or none (Dr. GRPO)."})
    epsilon_low: float = field(default=0.2, metadata={"help": "Lower clip: r >= 1 - epsilon_low.", "range": "[0, 1)"})
    epsilon_high: float = field(default=0.28, metadata={"help": "Upper clip: r <= 1 + epsilon_high (DAPO clip-higher; 0.2 = symmetric PPO).", "range": "[0, inf)"})
    aggregation: Literal["token_mean", "seq_mean_token_mean"] = field(default="token_mean", metadata={"help": "token_mean (DAPO: over the global batch) or seq_mean_token_mean."})
    micro_batch_tokens: int = field(default=0, metadata={"help": "Token budget of one scoring forward (prompt + completion tokens of its rows): the reference and the stored pi_old run in blocks of rows, the update accumulates gradients over micro-batches of whole prompt groups within one optimizer step (exact). 0 = one pass until a memory plan chooses it.", "range": "[0, inf)"})
    beta: float = field(default=0.0, metadata={"help": "Weight of the k3 KL(pi_theta || pi_ref) (0 = off, no reference loaded).", "range": "[0, inf)"})
    ppo_epochs: int = field(default=1, metadata={"help": "Passes over each rollout batch.", "range": "[1, inf)"})
    num_minibatches: int = field(default=1, metadata={"help": "Optimizer steps per pass (the batch is split by whole prompt groups).", "range": "[1, per_device_prompts]", "divides": "per_device_prompts"})
    mask_truncated: bool = field(default=False, metadata={"help": "Drop truncated responses from the loss (they still count in the group statistics)."})
    learning_rate: float = field(default=3e-5, metadata={"help": "Toy default (OPD's 2e-4 wrecks the toy policy under this noisier signal); paper scale ~1e-6.", "range": "(0, inf)"})
    log_groups: bool = field(default=False, metadata={"help": "Write every rank's per-group rewards and advantages to groups.jsonl (debugging)."})


def group_advantages_PG(rewards_PG: torch.Tensor, scale_rewards: str, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [P, G], zero_std [P]) for P groups of G rewards: A = (R - group mean) / (s + eps), s per
    `scale_rewards` (group: group std; batch: std of every reward given; none: no scaling). Groups whose
    rewards are all equal get A = 0 exactly. Pass the GLOBAL reward matrix: the batch std is over all of it."""
    if rewards_PG.shape[-1] < 2:
        raise ValueError("group-relative advantages need at least 2 samples per prompt")
    centred = rewards_PG - rewards_PG.mean(-1, keepdim=True)
    if scale_rewards == "group":
        adv = centred / (rewards_PG.std(-1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        adv = centred / (rewards_PG.std() + eps)
    elif scale_rewards == "none":
        adv = centred
    else:
        raise ValueError(f"scale_rewards must be one of {SCALES}, got {scale_rewards!r}")
    zero_std = rewards_PG.amax(-1) == rewards_PG.amin(-1)
    return adv.masked_fill(zero_std[:, None], 0.0), zero_std


def grpo_loss_BT(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_B: torch.Tensor, eps_low: float, eps_high: float,
                 beta: float = 0.0, ref_logp_BT: torch.Tensor | None = None):
    """Per-token loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3(pi_theta, pi_ref), where the
    clip was active (the clipped term was the smaller one), and the per-token k3 (zeros without a reference)."""
    ratio = torch.exp(logp_BT - old_logp_BT)
    adv = adv_B[:, None].to(logp_BT.dtype)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    kl = k3(logp_BT, ref_logp_BT) if ref_logp_BT is not None else torch.zeros_like(loss)
    return loss + beta * kl if beta else loss, clipped < unclipped, kl


def main(args: Args) -> dict:
    accelerator, run_dir, stop = start_run(args)
    reward_terms = parse_rewards(resolve_spec(args.rewards, args.format_reward))  # the default: correctness + format

    # Policy (trained) and, only with beta > 0, the frozen reference (the policy's start by default)
    tokenizer = load_tokenizer(args.model_name_or_path)
    model = apply_lora(load_model(args.model_name_or_path, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
                                  attn_implementation=args.attn_implementation, model_kwargs=args.model_init_kwargs), args)
    ref, vocab = None, None
    if args.beta > 0:
        ref_path = args.ref_model_name_or_path or args.model_name_or_path
        ref = load_reference(args, model, ref_path, accelerator.device, accelerator.print)  # LoRA: the adapter-disabled policy
        vocab = check_compatible(tokenizer, load_tokenizer(ref_path), model, getattr(ref, "peft_model", ref)).vocab_limit
        accelerator.print(f"reference {ref_path} ({count_params(getattr(ref, 'peft_model', ref)) / 1e6:.2f}M params), beta {args.beta}")
    rows, prompts, n_skipped = load_prompts(args, tokenizer)
    val_rows = load_rows(args.val_data, **row_options(args))[: args.eval_samples or None] if args.val_data else []
    accelerator.print(f"policy {count_params(model) / 1e6:.2f}M params | {len(prompts)} prompts ({n_skipped} skipped as too long) | "
                      f"{accelerator.num_processes} process(es)")

    n_updates = args.ppo_epochs * args.num_minibatches
    optimizer = make_optimizer(model.parameters(), args.optim, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = make_scheduler(args, optimizer, n_updates)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = resume_run(accelerator, args, run_dir, {"step": 0, "cursor": 0, "history": []})
    step, cursor, history = state["step"], state["cursor"], state["history"]
    engine = engine_from_args(args, accelerator, model, tokenizer)

    def checkpoint():
        save_checkpoint(accelerator, run_dir, step, {**state, "step": step, "cursor": cursor,
                                                     "history": history[-2 * args.alarm_window - 5 :]}, args.keep_last, tokenizer)

    P, G, R, rank = args.per_device_prompts, args.num_generations, accelerator.num_processes, accelerator.process_index
    bar = progress(accelerator, args.max_steps, step, "grpo")
    alarmed = False
    while step < args.max_steps and not stop_requested(accelerator, stop):
        # 1. eval (checkpoints at the end of the step)
        if val_rows and args.eval_every and step % args.eval_every == 0:
            log_eval(accelerator, run_dir, greedy_eval(accelerator, model, tokenizer, val_rows, args, engine)[0], step)
        t0 = time.time()

        # 2. rollout: this rank's P prompts of the global batch, G samples each (groups never split)
        idx = shuffled_indices(len(prompts), cursor, P * R, args.seed)[rank * P : (rank + 1) * P]
        out = generate(accelerator.unwrap_model(model), tokenizer, [prompts[i] for i in idx], max_new_tokens=args.max_completion_length,
                       num_samples=G, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, vocab_limit=vocab,
                       seed=args.seed * 1_000_003 + step * 1009 + rank, engine=engine)
        if engine is not None:  # free the engine's GPU memory for scoring and the update
            engine.sleep()
        ids = torch.cat([out.prompt_ids, out.completion_ids], 1).to(accelerator.device)
        attn = torch.cat([out.prompt_mask, out.completion_mask], 1).to(accelerator.device)
        mask = out.completion_mask.to(accelerator.device).float()
        T = out.completion_ids.shape[1]
        t_rollout = time.time() - t0

        # 3. score: grade every response once; gather the global reward matrix [R * P, G] (rank-major)
        t1 = time.time()
        answers = [rows[i]["answer"] for i in idx for _ in range(G)]
        grades = grade_batch(out.texts, answers, strict=args.strict_boxed, timeout=args.grade_timeout)
        rewards, reward_parts = compute_rewards(reward_terms, out.texts, answers, out.finish_reason, out.lengths,
                                                correct=[g.correct for g in grades], problems=[rows[i]["problem"] for i in idx for _ in range(G)],
                                                max_completion_length=args.max_completion_length, overlong_buffer=args.overlong_buffer, step=step)
        rewards_all = accelerator.gather(rewards.view(P, G).to(accelerator.device)).cpu()
        t_reward = time.time() - t1
        t_ref, ref_logp = 0.0, None
        if ref is not None:  # log pi_ref on every sampled position, one teacher-forced pass
            t1 = time.time()
            with torch.no_grad(), accelerator.autocast():
                ref_logp = scored_forward(ref, ids, attn, T, args.temperature, vocab_limit=vocab, forward=completion_logps,
                                          micro_batch_tokens=args.micro_batch_tokens)["logps"]
            t_ref = time.time() - t1

        # 4. advantages from the global reward matrix (identical on every rank); this rank's slice; loss mask
        adv_all, zero_std_all = group_advantages_PG(rewards_all, args.scale_rewards)
        adv = adv_all[rank * P : (rank + 1) * P].flatten().to(accelerator.device)
        informative_RP = ~zero_std_all.view(R, P)  # zero-std groups are dropped from the update
        truncated = torch.tensor([f == "length" for f in out.finish_reason], device=mask.device)
        loss_mask = mask * (~truncated).float()[:, None] if args.mask_truncated else mask

        # 5. update: ppo_epochs x num_minibatches optimizer steps on the informative groups of this batch
        t2 = time.time()
        old_logp = None
        if n_updates > 1:  # stored pi_old for the later minibatches / epochs (the first one is on-policy)
            with torch.no_grad(), accelerator.autocast():
                old_logp = scored_forward(accelerator.unwrap_model(model), ids, attn, T, args.temperature, vocab_limit=vocab,
                                          forward=completion_logps, micro_batch_tokens=args.micro_batch_tokens)["logps"]
        model.train()
        means = {"train/loss": 0.0, "train/grad_norm": 0.0}
        sums = {"clip": 0.0, "entropy": 0.0, "ref_kl": 0.0, "tokens": 0.0}  # token-weighted over the step, all ranks
        updates, group_tokens = 0, G * ids.shape[1]  # tokens of one prompt group in the policy's forward
        for epoch in range(args.ppo_epochs):
            # minibatches of whole prompt groups; the permutation is the same on every rank (seeded by step)
            groups = torch.randperm(P, generator=torch.Generator().manual_seed(args.seed + step * 31 + epoch))
            for mb_groups, part, last in micro_batches(accelerator, groups.chunk(args.num_minibatches), group_tokens, args.micro_batch_tokens):
                if not informative_RP[:, mb_groups].any():  # no rank has signal here: every rank skips it
                    if last:
                        scheduler.step()
                    continue
                if part[0] == 0:  # the minibatch's weights, normalised over all of it (zero-std groups weigh 0)
                    mb_mask_all = loss_mask[group_rows(mb_groups, G)] * informative_RP[rank, mb_groups].repeat_interleave(G).float().to(mask.device)[:, None]
                    weights_all = global_weights_BT(accelerator, mb_mask_all, args.aggregation)
                keep = part[informative_RP[rank, mb_groups[part]]]  # this micro-batch's informative groups
                keep = keep if len(keep) else part[:1]  # DDP: every rank joins every backward (at weight 0)
                mb, in_mb = group_rows(mb_groups[keep], G), group_rows(keep, G)  # rows of ids; of the minibatch
                weights, mb_mask = weights_all[in_mb], mb_mask_all[in_mb]
                old_mb, ref_mb = (None if x is None else x[mb] for x in (old_logp, ref_logp))
                surrogate = lambda lp: grpo_loss_BT(lp, lp.detach() if old_mb is None else old_mb, adv[mb],  # noqa: E731
                                                    args.epsilon_low, args.epsilon_high, args.beta, ref_mb)
                with accelerator.autocast():  # token_loss: the lm_head computes the loss's gradient in its forward (opd.py)
                    res = completion_logps(model, ids[mb], attn[mb], T, args.temperature, with_entropy=True, vocab_limit=vocab,
                                           token_loss=lambda lp, _kl: surrogate(lp)[0] * weights)
                    per_token, clipped, kl = surrogate(res["logps"])
                    loss = (per_token * weights).sum()
                accelerator.backward(loss)  # micro-batches accumulate their gradients: one optimizer step per minibatch
                for key, val in (("clip", clipped.float()), ("entropy", res["entropy"]), ("ref_kl", kl.detach())):
                    sums[key] += float((val * mb_mask).sum())
                sums["tokens"] += float(mb_mask.sum())
                means["train/loss"] += float(loss.detach())
                if last:
                    means["train/grad_norm"] += optimizer_step(accelerator, model, optimizer, scheduler, args.max_grad_norm)
                    updates += 1
        means = {k: v / max(updates, 1) for k, v in means.items()}
        t_update = time.time() - t2

        # 6. sync weights to the rollout engine (every rank: collective under FSDP2); the HF backend
        # samples from `model` itself
        if engine is not None:
            engine.sync_weights(accelerator.unwrap_model(model))
        step, cursor = step + 1, cursor + P * R
        bar.update(1)

        # 7. log: reward, group statistics, the failure-mode metrics, the alarm (one collective for all of them)
        step_s = time.time() - t0
        m = rollout_metrics(out.lengths, out.finish_reason, out.texts, out.token_lists,
                            window_chars=args.rep_window_chars, threshold=args.rep_threshold)
        m.update(means)
        m.update({"rollout/reward_mean": float(rewards.mean()), "rollout/correct_frac": sum(g.correct for g in grades) / len(grades),
                  "rollout/grade_failures": float(sum(g.status in ("timeout", "error") for g in grades)),
                  "grpo/zero_std_frac": float(zero_std_all.float().mean()), "grpo/adv_abs_mean": float(adv_all.abs().mean()),
                  "grpo/updates": updates, "train/lr": scheduler.get_last_lr()[0],
                  "perf/step_s": step_s, "perf/rollout_s": t_rollout, "perf/reward_s": t_reward, "perf/update_s": t_update,
                  "perf/tokens_per_s": float(mask.sum()) / step_s,
                  "perf/peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0})
        if ref is not None:
            m["perf/ref_s"] = t_ref
        m.update(reward_metrics(reward_parts))
        m = reduce_metrics(accelerator, m, sums)
        n_tok = max(m.pop("tokens"), 1.0)
        m.update({"grpo/clip_frac": m.pop("clip") / n_tok, "grpo/entropy": m.pop("entropy") / n_tok})
        ref_kl = m.pop("ref_kl") / n_tok
        if ref is not None:
            m["grpo/ref_kl"] = ref_kl
        samples = [{"prompt": rows[idx[j // G]]["problem"], "completion": t, "finish": f, "length": n, "reward": float(r),
                    "advantage": float(a)} for j, (t, f, n, r, a) in
                   enumerate(zip(out.texts[:4], out.finish_reason[:4], out.lengths[:4], rewards[:4], adv[:4]))]
        alarms = log_step(accelerator, run_dir, args, m, step, history, bar, samples=samples, postfix={
            "reward": f"{m['rollout/reward_mean']:.2f}", "len": f"{m['rollout/len_mean']:.0f}",
            "trunc": f"{m['rollout/truncated_frac']:.2f}", "zero_std": f"{m['grpo/zero_std_frac']:.2f}"})
        if args.log_groups:  # each rank's view of its groups and of the global reward matrix
            mine = {"rank": rank, "prompt_idx": idx, "rewards": rewards.view(P, G).tolist(), "adv": adv.view(P, G).tolist(),
                    "global_rewards": rewards_all.tolist(), "zero_std_frac": float(zero_std_all.float().mean())}
            views = gather_object([mine])
            if accelerator.is_main_process:
                with (run_dir / "groups.jsonl").open("a") as f:
                    f.write(json.dumps({"step": step, "ranks": views}) + "\n")
        if not math.isfinite(m["train/loss"]):
            raise FloatingPointError(f"non-finite loss at step {step}; lower --learning_rate")
        if alarms and args.stop_on_alarm:
            alarmed = True
            accelerator.print(f"--stop_on_alarm: stopping at step {step}; the last checkpoint (before the alarm) is kept")
            break
        if args.save_every and step % args.save_every == 0:
            checkpoint()
    bar.close()

    return finish_rl_run(accelerator, args, run_dir, model, tokenizer, step, checkpoint, alarmed, val_rows, engine)


if __name__ == "__main__":
    with error_boundary():  # an expected failure: one `error:` line, exit 2 (common/errors.py)
        main(parse(Args))
