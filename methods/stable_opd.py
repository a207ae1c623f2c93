"""Stable-OPD (Luo et al., arXiv 2604.08527, section 3): on-policy distillation, stabilised.

    L = L_OPD(student rollouts) + lambda_gold * L_gold(golden responses) + beta_KL * KL(pi_theta || pi_ref)

The objective is written once, `objective`, from named terms that `token_terms` gives per position:
  opd   L_OPD, methods/opd.py's objective exactly (imported with its flags, advantages and statistics).
  gold  Rollout-mixture distillation: every update minibatch also carries one golden response per prompt (the
        dataset's `solution`, or a verified teacher-written one, scripts/make_golden.py); L_gold = their token-mean NLL.
  ref   Reference constraint: pi_ref = the frozen initial student; KL(pi_theta(.|s_t) || pi_ref(.|s_t)) over the full
        vocabulary (chunked) on the prefixes s_t the rollouts visit (`reference_pass`), aggregated like L_OPD.
The loss is `objective` of the summed terms; the lm_head's gradient (computed in its forward, one logits pass per block)
is that of `objective` per position: one definition for both. Terms that are no function of a position's log-prob
(full_kl's L_OPD, a KL --mix_loss) come from `vocab_terms` instead, and the head then runs twice (`fused_head`).
ONE student forward per minibatch feeds all three terms: golden rows join the rollouts (`join_rows`); the lm_head gives
the log-probs and the reference KL from the same block logits (`kl_to`).
main() is opd.py's main() plus the blocks marked `# >>> stable-opd` / `# <<< stable-opd` (tests/test_stable_opd.py);
with --mix_coef 0 --ref_kl_coef 0 it runs as opd.py exactly (no reference model loaded, no golden batch built;
tests/test_ablation_equivalence.py).
Beyond the paper, off by default: --mix_loss forward_kl | reverse_kl (distil the teacher on golden tokens); --ref_kl_type k3;
--ref_kl_on_golden; the controllers --adaptive_ref_kl (PPO's, `adapt_ref_kl`) and --adaptive_mix (`adapt_mix`; in checkpoints).
Deviations: over-long golden responses are left out (counted); the golden NLL uses --temperature (default 1.0).
Memory: `--micro_batch_tokens` micro-batches every forward (teacher, golden scoring, reference, the update with its
golden rows) as in opd.py; the accumulated gradient of a minibatch is the one-forward gradient
(tests/test_micro_batch.py).

Launch:
  python methods/stable_opd.py                                             # CPU toy world (after scripts/demo.sh)
  accelerate launch methods/stable_opd.py --config my.yaml                 # 1 GPU
  accelerate launch --multi_gpu --num_processes 4 methods/stable_opd.py --config my.yaml
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
from common.flags import ReferenceFlags, flags
from common.data import encode_prompts, golden_batch, load_golden, load_prompts, load_rows, row_options, shuffled_indices
from common.logprobs import completion_forward, join_rows, split_rows, stack_rows
from common.lora import apply_lora, load_reference
from common.losses import k3
from common.metrics import repeated_span_mask, rollout_metrics
from common.microbatch import group_rows, micro_batches, optimizer_step, scored_forward
from common.models import check_compatible, count_params, load_frozen, load_model, load_tokenizer, make_optimizer, teacher_inputs
from common.rollout import generate
from common.run import (engine_from_args, exit_if_interrupted, finish_rl_run, global_weights_BT, greedy_eval, log_eval, log_step, make_scheduler,
                        reduce_metrics, resume_run, start_run)
from common.teacher_server import connect_teacher, server_flags, server_forward, teacher_failures
from common.tracking import progress
from methods import opd
from methods.opd import opd_advantages, sampled_stats, token_evidence  # L_OPD's advantages and statistics


@flags
class Args(opd.Args, ReferenceFlags):
    """Stable-OPD: the golden-response mixture and the reference constraint (then opd.py's flags)."""
    run_dir: str = "runs/stable_opd"
    mix_coef: float = field(default=0.1, metadata={"help": "lambda_gold: weight of the golden-response loss (0 = off).", "range": "[0, inf)"})
    ref_kl_coef: float = field(default=0.01, metadata={"help": "beta_KL: weight of KL(pi_theta || pi_ref) (0 = off, no reference loaded).", "range": "[0, inf)",
                                                        "range_if": {"adaptive_ref_kl": "(0, inf)"}})
    golden_data: str = field(default="", metadata={"help": "JSONL / Parquet of golden responses (problem, solution), e.g. from scripts/make_golden.py; default: train_data's `solution`."})
    golden_overflow: Literal["skip", "truncate"] = field(default="skip", metadata={"help": "Golden responses over max_completion_length: skip (no golden for that prompt) or truncate."})
    # beyond the paper (off by default)
    mix_loss: Literal["nll", "forward_kl", "reverse_kl"] = field(default="nll", metadata={"help": "nll (paper), forward_kl or reverse_kl (to the teacher, on golden tokens)."})
    ref_kl_type: Literal["full", "k3"] = field(default="full", metadata={"help": "full (exact, chunked) or k3 (sampled-token estimator).",
                                                                  "choices_if": {"ref_kl_on_golden": ["full"]}})
    ref_kl_on_golden: bool = field(default=False, metadata={"help": "Also apply the (full) reference KL on golden-response positions."})
    adaptive_ref_kl: bool = field(default=False, metadata={"help": "Move beta_KL to hold the reference KL near ref_kl_target."})
    ref_kl_target: float = field(default=0.05, metadata={"help": "--adaptive_ref_kl: the KL to hold (nats per token).", "range": "(0, inf)"})
    adaptive_mix: bool = field(default=False, metadata={"help": "Raise lambda_gold while truncation / repetition is above mix_target."})
    mix_target: float = field(default=0.1, metadata={"help": "--adaptive_mix: the truncated / repetition fraction counted as healthy.", "range": "[0, 1]"})
    mix_max: float = field(default=1.0, metadata={"help": "--adaptive_mix: the largest lambda_gold.", "range": "[0, inf)",
                                                  "range_if": {"adaptive_mix": "[mix_coef, inf)"}})


def adapt_ref_kl(coef: float, kl: float, target: float) -> float:
    """PPO's adaptive KL controller (Ziegler et al. 2019) with horizon 10 steps: move beta by at most 2% a step."""
    return coef * (1 + min(max(kl / target - 1, -0.2), 0.2) / 10)


def adapt_mix(coef: float, unhealthy: float, target: float, base: float, max_coef: float) -> float:
    """Double lambda_gold (at least to 0.01, at most max_coef) while unhealthy > target; else decay to base."""
    if unhealthy > target:
        return min(max(2 * coef, 0.01), max_coef)
    return max(coef / 1.25, base)


def reference_pass(accelerator, ref, ids, attn, T: int, weights_BT, args: Args, vocab: int) -> tuple[dict, dict | None]:
    """The frozen reference over the minibatch's rows (no grad), before the student's forward, and the student forward's `kl_to`:
    k3 needs its log-probs (kl_to None); full its final hidden states + head at the weighted positions (kl_to = them)."""
    with torch.no_grad(), accelerator.autocast():
        r = scored_forward(ref, ids, attn, T, args.temperature, logps=args.ref_kl_type == "k3", hidden=args.ref_kl_type == "full",
                           vocab_limit=vocab, rows=(weights_BT != 0).any(-1), micro_batch_tokens=args.micro_batch_tokens)  # not the golden rows
    r["mask"] = weights_BT != 0
    return r, (r if args.ref_kl_type == "full" else None)


def initial_coefs(args: Args, saved: dict | None = None) -> dict[str, float]:
    """The objective's coefficients lambda_gold ("gold", flag --mix_coef) and beta_KL ("ref"), adapted by the
    controllers: `saved` (a checkpoint's, as adapted so far; before 2026-12-08 lambda_gold was "mix") or the flags'."""
    if saved:
        return {"gold": saved["gold"] if "gold" in saved else saved["mix"], "ref": saved["ref"]}
    return {"gold": args.mix_coef, "ref": args.ref_kl_coef}


def objective(t: dict, coefs: dict) -> torch.Tensor:
    """L = L_OPD + lambda_gold * L_gold + beta_KL * KL(pi_theta || pi_ref), from `token_terms` per position (the
    lm_head's gradient) or from the summed terms (the loss)."""
    return t["opd"] + coefs["gold"] * t["gold"] + coefs["ref"] * t["ref"]


def token_terms(logp_BT, kl_BT, b: dict, args: Args) -> dict[str, torch.Tensor]:
    """The objective's terms at every position of the student forward's rows: the rollouts, then (with L_gold) one
    golden row per prompt (`join_rows`). Each is weighted by its aggregation weights and 0 on the other rows:
      opd   L_OPD's sampled surrogate on the rollouts (methods/opd.py `token_terms`)
      gold  -w*_bt log pi_theta(y*_t | c*_t) on the golden rows: the NLL (the paper; --mix_loss *_kl: `vocab_terms`)
      ref   w_bt KL(pi_theta(.|c_t) || pi_ref(.|c_t)): full = the exact KL from this forward's block logits (`kl_to`),
            k3 = the estimator at the sampled token."""
    zero = torch.zeros(())
    if logp_BT is None:  # full_kl without the NLL or the reference: every term is in `vocab_terms`
        return {"opd": zero, "gold": zero, "ref": zero}
    n, T = b["w"].shape
    t = {"opd": opd.token_terms(logp_BT[:n, :T], None, b, args)["opd"], "gold": zero, "ref": zero}
    if "gold_w" in b:  # the golden rows follow the rollouts: every term on the joined rows
        gold_lp = logp_BT[n:, : b["gold_w"].shape[1]]
        gold = -b["gold_w"] * gold_lp if args.mix_loss == "nll" else torch.zeros_like(gold_lp)
        rows = lambda x, y: stack_rows(x, y, logp_BT.shape[1])  # noqa: E731
        t["opd"] = rows(t["opd"], torch.zeros_like(gold)) if t["opd"].dim() else zero
        t["gold"] = rows(torch.zeros_like(b["w"]), gold)
    if "ref_w" in b:
        t["ref"] = (k3(logp_BT, b["ref"]["logps"]) if args.ref_kl_type == "k3" else kl_BT) * b["ref_w"]
    return t


def vocab_terms(student: dict, b: dict, args: Args, vocab: int) -> dict[str, torch.Tensor]:
    """The terms summed over the full vocabulary from final hidden states, in chunks (their gradient needs a second
    pass of the head): full_kl's L_OPD (methods/opd.py) and, for --mix_loss forward_kl / reverse_kl, L_gold = that KL
    between the teacher and pi_theta at the golden positions."""
    if "gold_w" not in b:
        return opd.vocab_terms(student, b, args, vocab)
    rollouts, golden = split_rows(student, *b["w"].shape, b["gold_w"].shape[1])
    t = opd.vocab_terms(rollouts, b, args, vocab)
    if args.mix_loss != "nll":
        t["gold"] = opd.vocab_kl(golden, b["teacher_gold"], b["gold_w"], args.mix_loss, args, vocab)
    return t


def fused_head(args: Args) -> bool:
    """Every term in `token_terms` (methods/opd.py): sampled L_OPD, and L_gold the NLL (or off)."""
    return opd.fused_head(args) and (args.mix_loss == "nll" or (args.mix_coef == 0 and not args.adaptive_mix))


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
    # >>> stable-opd
    use_mix, use_ref = args.mix_coef > 0 or args.adaptive_mix, args.ref_kl_coef > 0
    need["logps"] |= (use_mix and args.mix_loss == "nll") or (use_ref and args.ref_kl_type == "k3")
    need["hidden"] |= use_mix and args.mix_loss != "nll"
    mix_key = "mix/nll" if args.mix_loss == "nll" else "mix/kl"  # the golden-response loss, whichever it is
    ref_path = args.ref_model_name_or_path or args.model_name_or_path  # a LoRA student's reference: its adapter-disabled base
    ref = load_reference(args, model, ref_path, accelerator.device, accelerator.print) if use_ref else None
    golden, counts = load_golden(args, rows, tokenizer) if use_mix else ([], {})  # per prompt: golden ids + EOS, or []
    if use_mix:
        accelerator.print(f"golden responses: {sum(map(bool, golden))} / {len(golden)} prompts; counts {counts} ({args.golden_overflow} over-long)")
    # <<< stable-opd

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
        # >>> stable-opd
        if use_mix:  # golden batch: this step's P prompts, each with its golden response (masked out where it has none)
            g_ids, g_attn, g_mask, g_T = (x.to(accelerator.device) if torch.is_tensor(x) else x for x in
                                          golden_batch([prompts[i] for i in idx], [golden[i] for i in idx], tokenizer.pad_token_id))
            if args.mix_loss != "nll":  # the teacher on the golden responses (in its own template), once per step
                tg_ids, tg_attn = (x.to(accelerator.device) for x in teacher_inputs(
                    [teacher_prompts[i] for i in idx], g_ids[:, -g_T:].cpu(), g_mask.long().cpu(), teacher_tok.pad_token_id,
                    stop_id_map=compat.stop_id_map))
                with torch.no_grad(), accelerator.autocast():
                    teacher_gold = scored_forward(teacher, tg_ids, tg_attn, g_T, logps=False, hidden=True, micro_batch_tokens=args.micro_batch_tokens)
            group_tokens = (G + 1) * (max(ids.shape[1] - T, g_ids.shape[1] - g_T) + max(T, g_T))  # G rollouts + the golden row, joined
        stats.update({mix_key: 0.0, "ref/kl": 0.0, "coef/mix": coefs["gold"], "coef/ref_kl": coefs["ref"]})
        # <<< stable-opd
        for epoch in range(args.ppo_epochs):
            # minibatches of whole prompt groups: all G samples of a prompt are updated together
            groups = torch.randperm(P, generator=torch.Generator().manual_seed(args.seed + step * 31 + epoch))
            for mb_groups, part, last in micro_batches(accelerator, groups.chunk(args.num_minibatches), group_tokens, args.micro_batch_tokens):
                mb, in_mb = group_rows(mb_groups[part], G), group_rows(part, G)  # this micro-batch's rows (of ids; of the minibatch)
                weights = global_weights_BT(accelerator, loss_mask[group_rows(mb_groups, G)], args.aggregation)[in_mb]
                mb_ids, mb_attn, mb_T = ids[mb], attn[mb], T
                b = {"old": old_logp[mb], "adv": adv[mb], "w": weights,  # what the objective's terms read
                     "teacher": {"hidden": scored["hidden"][mb], "head": scored["head"]} if not sampled else None}
                # >>> stable-opd
                if use_mix:  # the golden responses of this micro-batch's prompts join the rollouts in ONE student forward
                    mg = mb_groups[part]  # their golden rows' weights are normalised over the minibatch (and all ranks)
                    b["gold_w"] = global_weights_BT(accelerator, g_mask[mb_groups], "token_mean")[part]
                    b["teacher_gold"] = None if args.mix_loss == "nll" else {"hidden": teacher_gold["hidden"][mg], "head": teacher_gold["head"]}
                    mb_ids, mb_attn, mb_T = join_rows(mb_ids, mb_attn, T, g_ids[mg], g_attn[mg], g_T, tokenizer.pad_token_id)
                if use_ref:  # the reference first: the student's forward then gives KL(pi_theta || pi_ref) from its own block logits
                    on_gold = global_weights_BT(accelerator, g_mask[mb_groups], args.aggregation)[part] if args.ref_kl_on_golden else None
                    b["ref_w"] = stack_rows(weights, torch.zeros_like(b["gold_w"]) if on_gold is None else on_gold, mb_T) if use_mix else weights
                    b["ref"], b["kl_to"] = reference_pass(accelerator, ref, mb_ids, mb_attn, mb_T, b["ref_w"], args, vocab)
                # <<< stable-opd
                with accelerator.autocast():
                    per_token = (lambda lp, kl: objective(token_terms(lp, kl, b, args), coefs)) if fused else None
                    student = completion_forward(model, mb_ids, mb_attn, mb_T, args.temperature, **need, kl_to=b.get("kl_to"),
                                                 eos_id=tokenizer.eos_token_id, vocab_limit=vocab, token_loss=per_token)
                    terms = {k: v.sum() for k, v in token_terms(student.get("logps"), student.get("kl"), b, args).items()}
                    terms.update(vocab_terms(student, b, args, vocab))
                    loss = objective(terms, coefs)
                # >>> stable-opd
                stats[mix_key] += float(terms["gold"]) / n_updates
                stats["ref/kl"] += float(terms["ref"]) / n_updates
                # <<< stable-opd
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
        # >>> stable-opd
        if args.adaptive_ref_kl:  # the adaptive controllers (docstring), on this step's global metrics, as logged
            coefs["ref"] = adapt_ref_kl(coefs["ref"], m["ref/kl"], args.ref_kl_target)
        if args.adaptive_mix:
            coefs["gold"] = adapt_mix(coefs["gold"], max(m["rollout/truncated_frac"], m["rollout/repetition_frac"]), args.mix_target, args.mix_coef, args.mix_max)
        # <<< stable-opd
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
