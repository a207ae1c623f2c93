"""Supervised fine-tuning (SFT): next-token NLL on golden solutions, completion tokens only.

    L(theta) = - (1 / N) * sum_{(x, y) in batch} sum_{t=1..|y|} log pi_theta(y_t | x, y_<t)

x is the rendered prompt (chat template + problem + CoT instruction), y the golden solution plus
EOS, and N the number of completion tokens in the whole optimizer step (all micro-batches, all
ranks), so gradient accumulation and data parallelism give exactly the single-batch gradient.
In the paper (arXiv 2604.08527, section 4) SFT is both a baseline and the stage that produces the
student OPD starts from; on the toy world it trains the teacher (to high accuracy) and a weak student.

Deviations / choices:
  1. Data order is a seeded permutation per epoch, indexed by a global cursor, so resume is exact
     and ranks split each global batch without a DistributedSampler.
  2. Examples whose prompt or completion exceeds the length limits are skipped and counted (or
     raise, with --on_overflow error); nothing is truncated silently.

Launch:
  python methods/sft.py --run_dir runs/toy/teacher                                   # CPU, toy world
  accelerate launch methods/sft.py --config my.yaml                                  # 1 GPU
  accelerate launch --multi_gpu --num_processes 8 methods/sft.py --config my.yaml   # 8 GPUs (DDP)
"""

import contextlib
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
from common.flags import CheckpointFlags, DataFlags, HubFlags, LoraFlags, ModelFlags, OptimFlags, RunFlags, flags
from common.data import build_examples, golden_batch, load_rows, row_options, shuffled_indices
from common.logprobs import completion_forward
from common.lora import apply_lora
from common.models import count_params, load_model, load_tokenizer, make_optimizer
from common.run import exit_if_interrupted, export_final, greedy_eval, log_eval, make_scheduler, resume_run, start_run
from common.tracking import log_metrics, log_samples, progress


@flags
class Args(RunFlags, ModelFlags, LoraFlags, DataFlags, OptimFlags, CheckpointFlags, HubFlags):
    """SFT: the model, the batch, the solutions' length, early stopping (the shared flags: common/flags.py)."""
    run_dir: str = "runs/sft"
    model_name_or_path: str = field(default="assets/toy/teacher_config.json", metadata={
        "help": "Pretrained folder or hub id, or a config.json to start from random weights."})
    tokenizer_name_or_path: str = field(default="", metadata={
        "help": "Defaults to the model's (a config's: ./tokenizer beside it)."})
    test_data: str = field(default="", metadata={"help": "If set, a final greedy eval on it is written to final_eval.json."})
    max_completion_length: int = field(default=256, metadata={
        "help": "Solutions longer than this are skipped or an error; also the eval generation cap.", "range": "[1, inf)"})
    max_train_samples: int = field(default=0, metadata={"help": "Use only the first N training rows (0 = all).",
                                                        "range": "[0, inf)"})
    per_device_batch_size: int = field(default=32, metadata={"help": "Sequences per micro-batch per process.",
                                                             "range": "[1, inf)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step (per process).",
                                                                  "range": "[1, inf)"})
    eval_batch_size: int = field(default=64, metadata={"help": "Sequences per generate() call in the greedy evals.",
                                                       "range": "[1, inf)"})
    target_val_acc: float = field(default=0.0, metadata={
        "help": "Stop early once a periodic val eval reaches this greedy accuracy (0 = off); e.g. a weak student for "
                "OPD / GRPO.", "range": "[0, 1]"})
    # the shared flags' defaults for SFT
    learning_rate: float = 1e-3
    lr_scheduler_type: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 50
    max_steps: int = 1000
    eval_every: int = 200
    save_every: int = 500
    log_every: int = 10


def collate_BT(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """The RL methods' row layout: prompts left-padded, solutions right-padded; input_ids / attention_mask [B, P + T]
    and completion_mask [B, T] = 1 on the solution's tokens (its EOS included)."""
    ids, attn, mask, _ = golden_batch([p for p, _ in examples], [c for _, c in examples], pad_id)
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": mask}


def nll(model, batch: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    """weight * sum over solution tokens of -log pi_theta(y_t | x, y_<t): L's numerator, scaled. The lm_head runs in
    blocks of positions and takes its gradient in the forward from the same per-token loss (common/logprobs.py), so no
    [B, T, V] logits exist at any vocabulary (the paper's 9,216-token rows at V = 151,936: ~17 GiB per row before)."""
    w_BT = weight * batch["completion_mask"]
    token_nll = lambda logp_BT, kl: -w_BT * logp_BT  # noqa: E731
    out = completion_forward(model, batch["input_ids"], batch["attention_mask"], w_BT.shape[1], token_loss=token_nll)
    return token_nll(out["logps"], None).sum()


def main(args: Args) -> dict:
    accelerator, run_dir, stop = start_run(args)

    # Model, tokenizer, data
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or args.model_name_or_path)
    model = apply_lora(load_model(args.model_name_or_path, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
                                  attn_implementation=args.attn_implementation, model_kwargs=args.model_init_kwargs), args)
    rows = load_rows(args.train_data, need_solution=True, limit=args.max_train_samples or None, **row_options(args))
    examples, n_skipped = build_examples(tokenizer, rows, args)
    val_rows = load_rows(args.val_data, **row_options(args))[: args.eval_samples or None] if args.val_data else []
    accelerator.print(f"model {args.model_name_or_path}: {count_params(model) / 1e6:.2f}M params | "
                      f"{len(examples)} train examples ({n_skipped} skipped as too long) | {len(val_rows)} val | "
                      f"{accelerator.num_processes} process(es)")

    # Optimizer and schedule
    optimizer = make_optimizer(model.parameters(), args.optim, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = make_scheduler(args, optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = resume_run(accelerator, args, run_dir, {"step": 0, "cursor": 0})
    step, cursor = state["step"], state["cursor"]

    def checkpoint():
        save_checkpoint(accelerator, run_dir, step, {**state, "step": step, "cursor": cursor}, args.keep_last, tokenizer)

    micro = args.per_device_batch_size
    global_batch = micro * accelerator.num_processes * args.gradient_accumulation_steps
    bar = progress(accelerator, args.max_steps, step, "sft")
    reached_target = False
    model.train()
    while step < args.max_steps and not stop_requested(accelerator, stop):
        t0 = time.time()
        # 1. data: this rank's micro-batches of the global batch at `cursor`
        idx = shuffled_indices(len(examples), cursor, global_batch, args.seed)
        micro_batches = [collate_BT([examples[j] for j in idx[s : s + micro]], tokenizer.pad_token_id)
                         for s in range(accelerator.process_index * micro, global_batch, micro * accelerator.num_processes)]
        # N = completion tokens in the whole optimizer step (all micro-batches, all ranks)
        local_tokens = sum(int(b["completion_mask"].sum()) for b in micro_batches)
        n_tokens = accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum").item()

        # 2. update: sum NLL / N; DDP averages gradients over ranks, so scale by the world size
        loss_sum = 0.0
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            accelerator.sync_gradients = i == len(micro_batches) - 1  # DeepSpeed steps inside backward at a sync
            sync = accelerator.no_sync(model) if i < len(micro_batches) - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                loss = nll(model, batch, accelerator.num_processes / n_tokens)
                accelerator.backward(loss)
            loss_sum += loss.item() / accelerator.num_processes
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step, cursor = step + 1, cursor + global_batch
        bar.update(1)

        # 3. log
        step_s = time.time() - t0
        if step % args.log_every == 0 or step == 1:
            loss_mean = accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum").item()
            metrics = {"train/loss": loss_mean, "train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0],
                       "perf/step_s": step_s, "perf/tokens_per_s": n_tokens / step_s, "data/skipped_long": n_skipped}
            log_metrics(accelerator, run_dir, metrics, step)
            bar.set_postfix(loss=f"{loss_mean:.3f}")
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"non-finite loss at step {step}; lower --learning_rate or check the data")

        # 4. eval and checkpoint
        if val_rows and args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            stats, _ = greedy_eval(accelerator, model, tokenizer, val_rows, args, batch_size=args.eval_batch_size)
            log_eval(accelerator, run_dir, stats, step)
            accelerator.print(f"\nstep {step}: val acc {stats['acc']:.3f} len {stats['len_mean']:.1f}")
            if args.target_val_acc and stats["acc"] >= args.target_val_acc:
                reached_target = True
                accelerator.print(f"val acc {stats['acc']:.3f} >= --target_val_acc {args.target_val_acc}: stopping at step {step}")
                break
        if args.save_every and step % args.save_every == 0:
            checkpoint()
    bar.close()

    exit_if_interrupted(accelerator, run_dir, step, checkpoint, interrupted=not reached_target and (stop.is_set() or step < args.max_steps))
    checkpoint()
    final = {"step": step, "stopped_at_target": reached_target}
    if val_rows:
        final["val"], samples = greedy_eval(accelerator, model, tokenizer, val_rows, args, batch_size=args.eval_batch_size)
        log_eval(accelerator, run_dir, final["val"], step)
        log_samples(accelerator, run_dir, samples[:8], step)
    if args.test_data:
        final["test"] = greedy_eval(accelerator, model, tokenizer, load_rows(args.test_data, **row_options(args)), args, batch_size=args.eval_batch_size)[0]
    return export_final(accelerator, run_dir, model, tokenizer, final, args=args)


if __name__ == "__main__":
    with error_boundary():  # an expected failure: one `error:` line, exit 2 (common/errors.py)
        main(parse(Args))
