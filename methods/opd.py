"""On-policy distillation (OPD), as run by the Stable-OPD paper (arXiv 2604.08527, section 2).

Per step: P prompts x G student samples y ~ pi_old(.|x); the frozen teacher scores every sampled
position in one teacher-forced pass; per-token advantage (detached; minus the sampled reverse KL)

    A_t = log pi_T(y_t | c_t) - log pi_old(y_t | c_t),        c_t = (x, y_<t)

and a PPO-clipped importance-sampling surrogate with r_t = pi_theta(y_t|c_t) / pi_old(y_t|c_t):

    L_OPD = agg_t [ -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) ]

agg = token mean per response, then mean over responses (default, as the paper) or token mean over
the batch. With one update per rollout batch r_t = 1 and the gradient is E[-A_t grad log pi_theta],
whose expectation over y_t ~ pi is the gradient of the per-token reverse KL(pi_theta || pi_T).
`--loss_type full_kl` instead back-propagates the exact full-vocabulary per-token reverse KL
(supervised, GKD with beta = 1), computed in chunks so [B, T, V] logits never exist. No task reward.

Deviations / choices:
  1. Log-probs of student and teacher both use the sampling temperature (1.0 in the paper).
  2. Truncated responses stay in the loss (the paper's setting); `--mask_truncated` drops them.
  3. Aggregation is exact over the global batch (all ranks): the normaliser counts every rank's tokens.
  4. Speed only: the lm_head computes the sampled loss's gradient in its forward, from the objective per position
     (`objective(token_terms(...))`, the same function the loss sums; checked against autograd's in the backward,
     common/logprobs.py), so each block of logits is computed once, not twice.
  5. Memory only: `--micro_batch_tokens N` runs every forward on at most N tokens of rows (at least one row): the
     teacher scores in blocks of rows, the update accumulates the gradients of micro-batches of whole prompt groups
     in ONE optimizer step, exactly (the loss is a weighted sum whose weights are normalised over the minibatch).

Launch:
  python methods/opd.py                                                    # CPU toy world (after scripts/demo.sh)
  accelerate launch methods/opd.py --config my.yaml                        # 1 GPU
  accelerate launch --multi_gpu --num_processes 4 methods/opd.py --config my.yaml
"""
import math
import sys
import time
from dataclasses import field
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from common.checkpoint import save_checkpoint, stop_requested
from common.cli import parse
from common.errors import error_boundary
from common.flags import (CheckpointFlags, DataFlags, EngineFlags, HubFlags, LoraFlags, ModelFlags, MonitorFlags, OptimFlags,
                          RolloutFlags, RunFlags, TeacherServerFlags, flags)
from common.data import encode_prompts, load_prompts, load_rows, row_options, shuffled_indices
from common.logprobs import auto_chunk, completion_forward
from common.microbatch import group_rows, micro_batches, optimizer_step, scored_forward
from common.losses import chunked_divergence_loss
from common.metrics import repeated_span_mask, rollout_metrics
from common.lora import apply_lora
from common.models import check_compatible, count_params, load_frozen, load_model, load_tokenizer, make_optimizer, teacher_inputs
from common.rollout import generate
from common.run import (engine_from_args, exit_if_interrupted, finish_rl_run, global_weights_BT, greedy_eval, log_eval, log_step, make_scheduler,
                        reduce_metrics, resume_run, start_run)
from common.teacher_server import connect_teacher, server_flags, server_forward, teacher_failures
from common.tracking import progress


@flags
class Args(RunFlags, ModelFlags, LoraFlags, EngineFlags, TeacherServerFlags, DataFlags, RolloutFlags, OptimFlags, MonitorFlags,
           CheckpointFlags, HubFlags):
    """OPD: the student, the teacher, L_OPD (the shared flags: common/flags.py)."""
    run_dir: str = "runs/opd"
    model_name_or_path: str = field(default="runs/demo/full/student/final", metadata={"help": "Student (the SFT checkpoint OPD starts from)."})
    teacher_name_or_path: str = field(default="runs/demo/full/teacher/final", metadata={"help": "Frozen teacher."})
    teacher_template: Literal["auto", "student"] = field(default="auto", metadata={"help": "auto: the teacher reads the prompt in its own chat template when it differs from the student's; student: the student's prompt ids."})
    teacher_quantization: Literal["none", "4bit", "8bit"] = field(default="none", metadata={"help": "none, 4bit or 8bit (bitsandbytes) for the frozen teacher."})
    teacher_dtype: Literal["", "float32", "bfloat16", "float16"] = field(default="", metadata={"help": "Weight dtype of the frozen teacher ('' = --dtype). bfloat16 beside a float32 student halves its memory; the losses take its softmax in fp32."})
    teacher_model_init_kwargs: str = field(default="", metadata={"help": "Extra from_pretrained keywords of the teacher, a JSON object (dtype / quantization / attention have their own flags)."})
    loss_type: Literal["sampled", "full_kl"] = field(default="sampled", metadata={"help": "sampled (PPO-clipped, A_t = log pi_T - log pi_old) or full_kl (exact reverse KL, chunked)."})
    aggregation: Literal["seq_mean_token_mean", "token_mean"] = field(default="seq_mean_token_mean", metadata={"help": "seq_mean_token_mean (paper) or token_mean."})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range for the ratio pi_theta / pi_old.", "range": "(0, 1]"})
    ppo_epochs: int = field(default=1, metadata={"help": "Passes over each rollout batch.", "range": "[1, inf)"})
    num_minibatches: int = field(default=1, metadata={"help": "Optimizer steps per pass (the batch is split).", "range": "[1, per_device_prompts]", "divides": "per_device_prompts"})
    mask_truncated: bool = field(default=False, metadata={"help": "Drop truncated responses from the loss."})
    micro_batch_tokens: int = field(default=0, metadata={"help": "Token budget of one forward (prompt + completion tokens of its rows): teacher / reference scoring run in blocks of rows, the update accumulates gradients over micro-batches of whole prompt groups within one optimizer step (exact). 0 = no micro-batching (one pass) until a memory plan chooses it.", "range": "[0, inf)"})
    chunk_size: int = field(default=0, metadata={"help": "Positions per block of the lm_head in the update: log-probs and full-vocabulary losses (0 = from the vocabulary and a 256 MB budget).", "range": "[0, inf)"})
    sampler_logps: Literal["sampler", "recompute"] = field(default="sampler", metadata={"help": "log pi_old: recorded while sampling (HF and vLLM), or recompute (debug: one more forward; full softmax only)."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Toy default; the paper uses 1e-6 on Qwen2.5-Math.", "range": "(0, inf)"})


def opd_advantages(teacher_logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """A_t = log pi_T(y_t | c_t) - log pi_old(y_t | c_t), detached, 0 on padding."""
    return ((teacher_logp_BT - old_logp_BT) * mask_BT).detach()


def opd_surrogate_BT(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_BT: torch.Tensor, epsilon: float):
    """Per-token PPO-clipped loss -min(r A, clip(r, 1-eps, 1+eps) A), and whether the clip was active."""
    ratio = torch.exp(logp_BT - old_logp_BT)
    unclipped, clipped = ratio * adv_BT, ratio.clamp(1 - epsilon, 1 + epsilon) * adv_BT
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def token_terms(logp_BT, kl_BT, b: dict, args: Args) -> dict[str, torch.Tensor]:
    """The objective's terms at every position of the student forward, weighted by the aggregation weights b["w"]:
    L_OPD's sampled surrogate w_bt * -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t). full_kl is not a function of
    one position's log-prob: 0 here, it is in `vocab_terms`."""
    if args.loss_type != "sampled":
        return {"opd": torch.zeros(())}
    return {"opd": opd_surrogate_BT(logp_BT, b["old"], b["adv"], args.epsilon)[0] * b["w"]}


def vocab_terms(student: dict, b: dict, args: Args, vocab: int) -> dict[str, torch.Tensor]:
    """The terms summed over the full vocabulary from both models' final hidden states, in chunks (their gradient
    needs a second pass of the head): full_kl's L_OPD = sum_bt w_bt KL(pi_theta(.|c_t) || pi_T(.|c_t))."""
    if args.loss_type == "sampled":
        return {}
    return {"opd": vocab_kl(student, b["teacher"], b["w"], "reverse_kl", args, vocab, args.temperature)}


def vocab_kl(student: dict, other: dict, weights_BT, kind: str, args: Args, vocab: int, temperature: float = 1.0):
    """sum_bt w_bt D(pi_theta(.|c_t), q(.|c_t)) over the vocabulary, q from another model's hidden states and head."""
    chunk = args.chunk_size or auto_chunk(vocab, copies=5)
    return chunked_divergence_loss(student["hidden"], student["head"], other["hidden"], other["head"], weights_BT,
                                   kind=kind, chunk_size=chunk, temperature=temperature, vocab_limit=vocab)[0]


def fused_head(args: Args) -> bool:
    """Whether every term is in `token_terms` (none in `vocab_terms`): the lm_head then computes the objective's
    gradient in its forward from the per-position loss, one logits pass per block (common/logprobs.py)."""
    return args.loss_type == "sampled"


def initial_coefs(args: Args, saved: dict | None = None) -> dict[str, float]:
    """The objective's coefficients (`saved`: a checkpoint's, as Stable-OPD's controllers adapt them): L_OPD has none."""
    return {}


def objective(t: dict, coefs: dict) -> torch.Tensor:
    """L = L_OPD, from `token_terms` per position (the lm_head's gradient) or from the summed terms (the loss)."""
    return t["opd"]


def sampled_stats(student: dict, b: dict, mask_BT, loss_mask_BT, epsilon: float) -> dict[str, float]:
    """Means over the rollout rows: how often the PPO clip was active, the student's entropy and log-prob of EOS."""
    n, T = b["w"].shape  # the rollout rows (Stable-OPD's golden rows follow them)
    mean = lambda x, m: float((x[:n, :T].float() * m).sum() / m.sum().clamp_min(1))  # noqa: E731
    clipped = opd_surrogate_BT(student["logps"][:n, :T].detach(), b["old"], b["adv"], epsilon)[1]
    return {"opd/clip_frac": mean(clipped, loss_mask_BT), "opd/student_entropy": mean(student["entropy"], mask_BT),
            "opd/student_eos_logp": mean(student["eos_logps"], mask_BT)}


def token_evidence(adv_BT: torch.Tensor, mask_BT: torch.Tensor, span_masks: list[list[bool]]) -> dict[str, float]:
    """The paper's token-level evidence: mean advantage on tokens inside repeated spans vs the rest."""
    rep = torch.zeros_like(mask_BT, dtype=torch.bool)
    for i, span in enumerate(span_masks):
        rep[i, : len(span)] = torch.tensor(span, dtype=torch.bool)
    valid = mask_BT.bool()
    mean = lambda sel: float(adv_BT[sel].mean()) if sel.any() else float("nan")  # noqa: E731
    return {"opd/adv_repeat_tokens": mean(rep & valid), "opd/adv_other_tokens": mean(~rep & valid)}


def main(args: Args) -> dict:
    accelerator, run_dir, stop = start_run(args)

    # Student (trained), teacher (frozen), and their compatibility: checked before step 1
    tokenizer = load_tokenizer(args.model_name_or_path)
    model = apply_lora(load_model(args.model_name_or_path, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
                                  attn_implementation=args.attn_implementation, model_kwargs=args.model_init_kwargs), args)
    teacher_tok = load_tokenizer(args.teacher_name_or_path)
    if args.teacher_backend != "hf":  # a server or a colocated vLLM engine (common/teacher_server.py, vllm_teacher.py): no weights in torch
        teacher = connect_teacher(args.teacher_name_or_path, teacher_tok, args.temperature, args.max_prompt_length + args.max_completion_length,
                                  full_distribution=not fused_head(args), **server_flags(args))  # vocab_terms: refused
    else:
        teacher = load_frozen(args.teacher_name_or_path, args.teacher_dtype or args.dtype, args.teacher_quantization, accelerator.device,
                              attn_implementation=args.attn_implementation, model_kwargs=args.teacher_model_init_kwargs)
    compat = check_compatible(tokenizer, teacher_tok, model, teacher, allow_teacher_template=True)
    vocab = compat.vocab_limit
    accelerator.print(compat.describe())
    rows, prompts, n_skipped = load_prompts(args, tokenizer)
    # the teacher reads each prompt in its own chat template (when it differs) followed by the student's completion ids
    teacher_prompts = encode_prompts(teacher_tok, rows, args.prompt_template, args.instruction, args.system_prompt) if args.teacher_template == "auto" else prompts
    val_rows = load_rows(args.val_data, **row_options(args))[: args.eval_samples or None] if args.val_data else []
    accelerator.print(f"student {count_params(model) / 1e6:.2f}M, teacher {count_params(teacher) / 1e6:.2f}M params | "
                      f"{len(prompts)} prompts ({n_skipped} skipped as too long) | {accelerator.num_processes} process(es)")
    sampled = args.loss_type == "sampled"  # full_kl needs hidden states, not the sampled tokens' log-probs
    need = {"logps": sampled, "entropy": sampled, "hidden": not sampled,  # what the loss reads from the student forward
            "chunk_size": args.chunk_size or None}
    fused = fused_head(args)  # the lm_head computes the objective's gradient in its forward

    n_updates = args.ppo_epochs * args.num_minibatches
    optimizer = make_optimizer(model.parameters(), args.optim, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = make_scheduler(args, optimizer, n_updates)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = resume_run(accelerator, args, run_dir, {"step": 0, "cursor": 0, "history": []})
    step, cursor, history = state["step"], state["cursor"], state["history"]
    coefs = state["coefs"] = initial_coefs(args, state.get("coefs"))  # the objective's coefficients (as adapted so far)
    engine = engine_from_args(args, accelerator, model, tokenizer)

    def checkpoint():
        save_checkpoint(accelerator, run_dir, step, {**state, "step": step, "cursor": cursor,
                                                     "history": history[-2 * args.alarm_window - 5 :]}, args.keep_last, tokenizer)

    P, G, rank = args.per_device_prompts, args.num_generations, accelerator.process_index
    bar = progress(accelerator, args.max_steps, step, "opd")
    alarmed = False
    while step < args.max_steps and not stop_requested(accelerator, stop):
        # 1. eval (checkpoints at the end of the step)
        if val_rows and args.eval_every and step % args.eval_every == 0:
            log_eval(accelerator, run_dir, greedy_eval(accelerator, model, tokenizer, val_rows, args, engine)[0], step)
        t0 = time.time()

        # 2. rollout: this rank's P prompts of the global batch, G samples each (groups never split), with log pi_old
        idx = shuffled_indices(len(prompts), cursor, P * accelerator.num_processes, args.seed)[rank * P : (rank + 1) * P]
        out = generate(accelerator.unwrap_model(model), tokenizer, [prompts[i] for i in idx], max_new_tokens=args.max_completion_length,
                       num_samples=G, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, vocab_limit=vocab,
                       seed=args.seed * 1_000_003 + step * 1009 + rank, return_logps=True, logps_from=args.sampler_logps, engine=engine,
                       micro_batch_tokens=args.micro_batch_tokens)
        if engine is not None:  # free the engine's GPU memory for scoring and the update
            engine.sleep()
        ids = torch.cat([out.prompt_ids, out.completion_ids], 1).to(accelerator.device)
        attn = torch.cat([out.prompt_mask, out.completion_mask], 1).to(accelerator.device)
        mask = out.completion_mask.to(accelerator.device).float()
        old_logp = out.sampler_logps.to(accelerator.device)
        T = out.completion_ids.shape[1]
        t_rollout = time.time() - t0

        # 3. score: the frozen teacher on every sampled position, ONE teacher-forced pass per step (its hidden
        # states are kept for the full-vocabulary loss)
        t1 = time.time()
        t_ids, t_attn = (ids, attn) if not compat.needs_teacher_inputs else (x.to(accelerator.device) for x in teacher_inputs(
            [teacher_prompts[i] for i in idx], out.completion_ids, out.completion_mask, teacher_tok.pad_token_id, G, compat.stop_id_map))
        with torch.no_grad(), accelerator.autocast(), teacher_failures(accelerator, teacher) as failed:
            scored = scored_forward(teacher, t_ids, t_attn, T, args.temperature, eos_id=compat.teacher_eos_id, hidden=not sampled,
                                    vocab_limit=vocab, micro_batch_tokens=args.micro_batch_tokens,
                                    forward=server_forward if args.teacher_backend != "hf" else completion_forward)
        if failed["error"]:  # the teacher server failed past its retries: checkpoint the last complete step, exit 130
            exit_if_interrupted(accelerator, run_dir, step, checkpoint, True, engine, reason=f"the teacher server: {failed['error']}")
        t_teacher = time.time() - t1

        # 4. advantages: A_t = log pi_T - log pi_old (detached); loss mask
        adv = opd_advantages(scored["logps"], old_logp, mask)
        truncated = torch.tensor([f == "length" for f in out.finish_reason], device=mask.device)
        loss_mask = mask * (~truncated).float()[:, None] if args.mask_truncated else mask

        # 5. update: ppo_epochs x num_minibatches optimizer steps on this rollout batch, one student forward each
        t2 = time.time()
        model.train()
        group_tokens = G * ids.shape[1]  # tokens of one prompt group in the student's forward
        stats = {"train/loss": 0.0, "train/grad_norm": 0.0}
        if sampled:  # full_kl never computes the student's sampled log-probs
            stats.update({"opd/clip_frac": 0.0, "opd/student_entropy": 0.0, "opd/student_eos_logp": 0.0})
        for epoch in range(args.ppo_epochs):
            # minibatches of whole prompt groups: all G samples of a prompt are updated together
            groups = torch.randperm(P, generator=torch.Generator().manual_seed(args.seed + step * 31 + epoch))
            for mb_groups, part, last in micro_batches(accelerator, groups.chunk(args.num_minibatches), group_tokens, args.micro_batch_tokens):
                mb, in_mb = group_rows(mb_groups[part], G), group_rows(part, G)  # this micro-batch's rows (of ids; of the minibatch)
                weights = global_weights_BT(accelerator, loss_mask[group_rows(mb_groups, G)], args.aggregation)[in_mb]
                mb_ids, mb_attn, mb_T = ids[mb], attn[mb], T
                b = {"old": old_logp[mb], "adv": adv[mb], "w": weights,  # what the objective's terms read
                     "teacher": {"hidden": scored["hidden"][mb], "head": scored["head"]} if not sampled else None}
                with accelerator.autocast():
                    per_token = (lambda lp, kl: objective(token_terms(lp, kl, b, args), coefs)) if fused else None
                    student = completion_forward(model, mb_ids, mb_attn, mb_T, args.temperature, **need, kl_to=b.get("kl_to"),
                                                 eos_id=tokenizer.eos_token_id, vocab_limit=vocab, token_loss=per_token)
                    terms = {k: v.sum() for k, v in token_terms(student.get("logps"), student.get("kl"), b, args).items()}
                    terms.update(vocab_terms(student, b, args, vocab))
                    loss = objective(terms, coefs)
                accelerator.backward(loss)  # micro-batches accumulate their gradients: one optimizer step per minibatch
                if last:
                    stats["train/grad_norm"] += optimizer_step(accelerator, model, optimizer, scheduler, args.max_grad_norm) / n_updates
                stats["train/loss"] += float(loss.detach()) / n_updates
                for key, value in (sampled_stats(student, b, mask[mb], loss_mask[mb], args.epsilon) if sampled else {}).items():
                    stats[key] += value * len(part) / len(mb_groups) / n_updates  # micro-batch means, weighted by its share of groups
        t_update = time.time() - t2

        # 6. sync weights to the rollout engine (every rank: collective under FSDP2); the HF backend
        # samples from `model` itself
        if engine is not None:
            engine.sync_weights(accelerator.unwrap_model(model))
        step, cursor = step + 1, cursor + P * accelerator.num_processes
        bar.update(1)

        # 7. log: the failure-mode metrics, the token-level evidence, the alarm (one collective for all of them)
        step_s, n_tok = time.time() - t0, mask.sum().clamp_min(1)
        token_lists = out.token_lists
        span_masks = [repeated_span_mask(t) for t in token_lists]
        m = rollout_metrics(out.lengths, out.finish_reason, out.texts, token_lists, span_masks=span_masks,
                            window_chars=args.rep_window_chars, threshold=args.rep_threshold)
        m.update(token_evidence(adv.cpu(), mask.cpu(), span_masks))
        m.update(stats)
        m.update({"opd/adv_mean": float(adv.sum() / n_tok), "opd/teacher_logp": float((scored["logps"] * mask).sum() / n_tok),
                  "opd/student_logp": float((old_logp * mask).sum() / n_tok),
                  "opd/teacher_eos_logp": float((scored["eos_logps"] * mask).sum() / n_tok),
                  "train/lr": scheduler.get_last_lr()[0], "perf/step_s": step_s, "perf/rollout_s": t_rollout,
                  "perf/teacher_s": t_teacher, "perf/update_s": t_update, "perf/tokens_per_s": float(mask.sum()) / step_s,
                  "perf/peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0})
        m = reduce_metrics(accelerator, m)
        samples = [{"completion": t, "finish": f, "length": n} for t, f, n in zip(out.texts[:4], out.finish_reason[:4], out.lengths[:4])]
        alarms = log_step(accelerator, run_dir, args, m, step, history, bar, samples=samples, postfix={
            "len": f"{m['rollout/len_mean']:.0f}", "trunc": f"{m['rollout/truncated_frac']:.2f}", "adv": f"{m['opd/adv_mean']:.3f}"})
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
