"""The run around every method's training loop, written once: start, resume, the rollout engine, greedy
eval, global loss weights, one-collective metrics, the per-step log and alarm, and the end of the run.

Plain functions, called in order from each method's `main()`, so the algorithm stays in view there:

    accelerator, run_dir, stop = start_run(args)             # nothing written to run_dir yet
    ... load models and data (errors here leave run_dir untouched) ...
    model, optimizer, scheduler = accelerator.prepare(...)
    state = resume_run(accelerator, args, run_dir, defaults)   # checkpoint, then config.yaml, logs, trackers
    while ...: ... m = reduce_metrics(accelerator, m); log_step(...)
    exit_if_interrupted(...); export_final(...)

A run folder belongs to one live process (common/runlock.py): `resume_run` takes its lock, `export_final` / the
exit-130 paths give it back, a second start on a held folder exits with status 2 having written nothing.
What a run wrote is never deleted without --overwrite_run_dir: the same command on a finished run has nothing to do
(exit 0, nothing changed); a run continued from an earlier step keeps its earlier end (final/, final_eval.json) and
its logs as they were in superseded_at_step_<N>/, and checkpoints newer than N in checkpoints/abandoned_after_step_<N>/.
"""

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from transformers import get_scheduler

from common.checkpoint import (CheckpointError, install_stop_handler, load_checkpoint, resolve_resume, saved_log_sizes,
                               set_aside_newer, stop_requested)
from common.cli import fail, save_config
from common.errors import is_disk_full
from common.evaluation import evaluate_rows
from common.flags import RolloutFlags
from common.hub import check_push_to_hub, log_completions, push_final
from common.preflight import plan_at_start, preflight
from common.runlock import LOCK_FILE, check_run_lock, lock_run_dir, release_run_dir  # noqa: F401
from common.lora import is_peft, save_merged, target_modules
from common.losses import aggregation_weights
from common.metrics import collapse_alarm
from common.models import assert_replicas_in_sync, check_positions, check_quantization, cpu_has_fast_bf16
from common.rundir import RUN_FILES, check_run_dir
from common.tracking import LOG_FILES, end_run, init_tracking, log_metrics, log_samples, rewind_logs, tracker_names
from common.vllm_engine import make_rollout_engine


def start_run(args):
    """(accelerator, run_dir, stop event): the start-up checks, then mixed precision, trackers, seeds, Ctrl-C /
    SIGTERM handling (finish the current step, checkpoint, exit 130). Writes nothing: see `resume_run`.

    Checks, before anything loads (each a one-line error, exit status 2; common/cli.py): the run folder belongs
    to this run (`check_run_dir`), prompt + completion fit the models' positions (`check_positions`), and a
    requested bitsandbytes quantization / 8-bit optimizer works on this machine (`check_quantization`).
    Errors found later (a data, model, checkpoint or run-folder error) are raised; the entry point's
    `common.errors.error_boundary` prints them as one `error:` line, exit status 2 (STABLE_OPD_TRACEBACK=1: the
    traceback). With --dry_run these checks and the rest of a start-up run as a preflight instead
    (common/preflight.py): a pass / fail line each, then exit 0 / 2, nothing written."""
    if args.dry_run:
        raise SystemExit(preflight(args))
    try:
        tracker_names(args.report_to)
        check_run_lock(args.run_dir)  # a live run holds the folder: refuse before reading anything else
        check_run_dir(args)
        check_positions(args)
        check_quantization(args)
        check_push_to_hub(args)
        if args.use_peft:
            target_modules(args.lora_target_modules)
    except ValueError as e:
        fail(str(e))
    accelerator = Accelerator(
        mixed_precision="bf16" if args.bf16 else "no",
        log_with=tracker_names(args.report_to),
        project_dir=args.run_dir,
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step ourselves (global batches)
    )
    if args.bf16 and accelerator.device.type == "cpu" and not cpu_has_fast_bf16():
        accelerator.print("warning: --bf16 on a CPU without native bf16 (no AVX512-BF16 / AMX): autocast is emulated, "
                          "measured ~27x slower than fp32 here; pass --bf16 false (common/models.py cpu_has_fast_bf16)")
    if args.use_peft and accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        fail(f"--use_peft is offered on one process or DDP, not under {accelerator.distributed_type.value} (common/lora.py)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, args)
    plan_at_start(accelerator, args)  # the memory plan (common/plan.py): printed; on a GPU it may refuse or pick budgets
    set_seed(args.seed)
    stop = install_stop_handler()
    _STOP[str(Path(args.run_dir))] = stop
    return accelerator, Path(args.run_dir), stop


_STOP: dict[str, object] = {}  # run_dir -> its stop event (read by export_final)


def configure_deepspeed(accelerator, args) -> None:
    """DeepSpeed (configs/accelerate/zero2.yaml) takes its micro-batch size from a prepared dataloader and the
    methods prepare none: set it (one optimizer step's sequences per rank; DeepSpeed only checks and logs it) before
    `accelerator.prepare`, and clip at --max_grad_norm (DeepSpeed clips inside its step; `clip_grad_norm_` then
    only returns the norm)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    micro = (args.per_device_prompts * args.num_generations // args.num_minibatches if isinstance(args, RolloutFlags)
             else args.per_device_batch_size)  # SFT's
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_clipping"] = args.max_grad_norm


def make_scheduler(args, optimizer, updates_per_step: int = 1):
    """The learning-rate schedule over max_steps x updates_per_step optimizer steps ("constant" keeps the warmup)."""
    name = "constant_with_warmup" if args.lr_scheduler_type == "constant" else args.lr_scheduler_type
    return get_scheduler(name, optimizer, num_warmup_steps=args.warmup_steps,
                         num_training_steps=args.max_steps * updates_per_step)


def resume_run(accelerator, args, run_dir: Path, defaults: dict) -> dict:
    """Once models and data have loaded: load the newest complete checkpoint (per --resume_from) into the
    prepared objects, and only then write to the run folder: --overwrite_run_dir's deletion of the old run,
    the logs cut back to the checkpoint (every step logged once), config.yaml, the trackers. Returns the saved
    state (step, cursor, the method's own keys), or `defaults` on a fresh start, with "tracker_run_id" set."""
    run_dir = Path(run_dir)
    held = lock_run_dir(accelerator, run_dir)  # from here to the end of the run, no other process may use the folder
    try:
        return _resume_locked(accelerator, args, run_dir, defaults)
    except BaseException:
        if held:  # a failed start (a bad checkpoint, a refusal) leaves the folder as it found it, lock file included
            release_run_dir(run_dir)
        raise


def _resume_locked(accelerator, args, run_dir: Path, defaults: dict) -> dict:
    try:
        plan = check_run_dir(args)  # again, holding the lock: the folder may have changed while the models loaded
    except ValueError as e:
        fail(str(e))
    if plan.overwrite and accelerator.is_main_process:
        removed = remove_run_files(run_dir)
        accelerator.print(f"--overwrite_run_dir: removed {', '.join(removed)} from {run_dir}")
    accelerator.wait_for_everyone()
    state = {**defaults, "tracker_run_id": None}
    run_id = (plan.saved or {}).get("run_id") if not plan.overwrite else None
    ckpt = resolve_resume(run_dir, args.resume_from)
    if ckpt is not None:
        state.update(load_checkpoint(accelerator, ckpt, model_name=args.model_name_or_path))
        accelerator.print(f"resumed from {ckpt} at step {state['step']}")
        if args.lr_scheduler_type != "constant" and plan.saved and plan.saved.get("max_steps") != args.max_steps:
            accelerator.print(f"note: --max_steps {plan.saved.get('max_steps')} -> {args.max_steps} stretches the "
                              f"{args.lr_scheduler_type} learning-rate schedule from step {state['step']} on")
    same_run = ckpt is not None and _inside_dir(ckpt, run_dir)
    if same_run and _finished_at(run_dir, state["step"], args.max_steps):
        accelerator.print(f"{run_dir} holds a run that finished at step {state['step']} (final/, final_eval.json; "
                          f"--max_steps {args.max_steps}): nothing to do, nothing changed; raise --max_steps to "
                          "continue it, or --overwrite_run_dir true to start afresh")
        end_run(accelerator)
        sys.exit(0)  # resume_run gives the folder back
    if accelerator.is_main_process:
        aside = set_aside_newer(run_dir, state["step"]) if same_run else None
        if aside is not None:
            accelerator.print(f"checkpoints newer than step {state['step']} moved to {aside} (not resumed, not deleted)")
        start = state["step"] if ckpt is not None else 0
        kept, dropped = keep_superseded(run_dir, start, saved_log_sizes(ckpt) if same_run else None,
                                        state["step"] if ckpt is not None else None)
        if dropped:
            accelerator.print(f"logs rewound to step {state['step'] if ckpt else 0} (rows logged after it dropped: "
                              + ", ".join(f"{k} {v}" for k, v in dropped.items()) + ")")
        if kept is not None:
            names = ", ".join(sorted(p.name for p in kept.iterdir()))
            accelerator.print(f"kept in {kept} (not deleted): {names}, as the run had written them before it resumed "
                              f"from step {start}")
        if plan.changed:
            keep = run_dir / f"config.before_step_{state['step']}.yaml"
            shutil.copyfile(run_dir / "config.yaml", keep)
            accelerator.print(f"--force_resume: continuing with changed settings ({', '.join(plan.changed)}); "
                              f"the previous config is kept as {keep.name}")
        save_config(args, run_dir, run_id=run_id or uuid.uuid4().hex[:12])
    accelerator.wait_for_everyone()
    state["tracker_run_id"] = init_tracking(accelerator, args.project, run_dir.name, vars(args), state["tracker_run_id"])
    return state


def _finished_at(run_dir: Path, step: int, max_steps: int) -> bool:
    """The run ended at checkpoint `step` (final/ and final_eval.json were written there) and would train no further."""
    try:
        final_step = json.loads((run_dir / "final_eval.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return False
    return (run_dir / "final").is_dir() and final_step == step and step >= max_steps


SUPERSEDED = "superseded_at_step_"  # superseded_at_step_<N>/: what a run had written past N when it resumed from N


def keep_superseded(run_dir: Path, step: int, sizes: dict | None, by_step: int | None) -> tuple[Path | None, dict]:
    """Before a run continues from `step`: cut the logs back to it (`rewind_logs`: every step logged once), keeping a
    copy of each log as it was if rows are dropped, and move an earlier end of the run (final/, final_adapter/,
    final_eval.json) aside: all into run_dir/superseded_at_step_<step>/ (only --overwrite_run_dir deletes it).
    Returns (that folder or None if nothing was superseded, {log: rows dropped})."""
    dest, n = run_dir / f"{SUPERSEDED}{step:08d}", 1
    while dest.exists():
        dest, n = run_dir / f"{SUPERSEDED}{step:08d}_{n}", n + 1
    ends = [name for name in ("final", "final_adapter", "final_eval.json") if (run_dir / name).exists()]
    logs = [name for name in LOG_FILES if (run_dir / name).is_file() and (run_dir / name).stat().st_size]
    if ends or logs:
        dest.mkdir()
    for name in logs:  # copied first: a crash from here on leaves the copy, never a lost row
        shutil.copy2(run_dir / name, dest / name)
    dropped = rewind_logs(run_dir, sizes, by_step)
    for name in logs:
        if name not in dropped:
            (dest / name).unlink()  # unchanged: the run's own file is the copy
    for name in ends:
        os.replace(run_dir / name, dest / name)
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    return (dest if dest.is_dir() else None), dropped


def _inside_dir(path: Path, folder: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(Path(folder).resolve())
    except OSError:
        return False


def remove_run_files(run_dir: Path) -> list[str]:
    """Delete a run's own files from `run_dir` (config, checkpoints, logs, final/, final_adapter/,
    superseded_at_step_*/): --overwrite_run_dir. Other files in the folder are left alone."""
    removed = []
    kept = sorted(p.name for p in [*run_dir.glob("config.before_step_*.yaml"), *run_dir.glob(f"{SUPERSEDED}*")])
    for name in [*RUN_FILES, *kept, "checkpoints", "final", "final_adapter"]:
        path = run_dir / name
        if path.is_dir():
            trash = run_dir / f".tmp-del-{name}"
            os.replace(path, trash)  # rename first: a crash mid-delete leaves only .tmp-* junk
            shutil.rmtree(trash, ignore_errors=True)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def engine_from_args(args, accelerator, model, tokenizer):
    """The rollout engine of --rollout_backend: None for hf (generate samples from the model itself); a vLLM
    engine built from the (prepared) model and synced from it at once (collective under FSDP2)."""
    if args.rollout_backend == "hf":
        return None
    return make_rollout_engine(args.rollout_backend, accelerator.unwrap_model(model), tokenizer,
                               max_model_len=args.max_prompt_length + args.max_completion_length,
                               gpu_memory_utilization=args.vllm_gpu_memory_utilization, sleep_level=args.vllm_sleep,
                               dtype="bfloat16" if args.bf16 or args.dtype == "bfloat16" else args.dtype, seed=args.seed,
                               check_sync=args.vllm_check_sync, process_index=accelerator.process_index,
                               num_processes=accelerator.num_processes)


def greedy_eval(accelerator, model, tokenizer, rows: list[dict], args, engine=None, batch_size: int = 64):
    """(stats, records): greedy accuracy, length, truncation, repetition on `rows` (sharded over ranks, gathered)."""
    return evaluate_rows(model, tokenizer, rows, greedy=True, max_new_tokens=args.max_completion_length,
                         prompt_template=args.prompt_template, instruction=args.instruction, batch_size=batch_size,
                         system_prompt=args.system_prompt,
                         accelerator=accelerator, engine=engine)


def log_eval(accelerator, run_dir: Path, stats: dict, step: int, split: str = "val") -> None:
    log_metrics(accelerator, run_dir, {f"eval/{split}/{k}": v for k, v in stats.items()}, step)


def global_weights_BT(accelerator, mask_BT: torch.Tensor, mode: str) -> torch.Tensor:
    """Weights w with sum_ranks sum_bt w * loss_bt = the aggregate over the GLOBAL batch, times the world
    size (DDP averages gradients over ranks, so each rank's sum must be world-size times its share)."""
    if mode == "token_mean":
        local = mask_BT.sum()
    else:  # seq_mean_token_mean: responses with no tokens (e.g. masked truncations) do not count
        local = (mask_BT.sum(-1) > 0).sum()
    total = accelerator.reduce(local.float().to(accelerator.device), "sum").clamp_min(1)
    return aggregation_weights(mask_BT, mode) * (local.float() / total) * accelerator.num_processes


def reduce_metrics(accelerator, means: dict, sums: dict | None = None) -> dict[str, float]:
    """Metrics over all ranks in ONE collective: `means` averaged over ranks, `sums` summed (float64)."""
    sums = sums or {}
    keys = sorted(means) + sorted(sums)
    R = accelerator.num_processes
    local = torch.tensor([float(means[k]) / R for k in sorted(means)] + [float(sums[k]) for k in sorted(sums)],
                         dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, "sum") if R > 1 else local
    return dict(zip(keys, total.tolist()))


def log_step(accelerator, run_dir: Path, args, m: dict, step: int, history: list[dict], bar, postfix: dict[str, str],
             samples: list[dict]) -> list[str]:
    """The end of an RL step: the collapse alarm on the history (printed, logged as alarm/truncation), the
    metrics every --log_every steps, a few rollouts every --samples_every. Returns the alarm messages."""
    history.append({"step": step, **m})
    msgs = collapse_alarm(history, threshold=args.alarm_threshold, jump=args.alarm_jump, window=args.alarm_window)
    for msg in msgs:  # a run that starts truncated gets a NOTE, not an ALARM
        accelerator.print(f"\nstep {step}: {msg}")
    alarms = [msg for msg in msgs if msg.startswith("ALARM")]
    m["alarm/truncation"] = float(bool(alarms))
    if step % args.log_every == 0:
        log_metrics(accelerator, run_dir, m, step)
        bar.set_postfix(postfix)
    if args.samples_every and step % args.samples_every == 0:
        log_samples(accelerator, run_dir, samples, step)
        log_completions(accelerator, samples, step)  # a wandb table when wandb is a tracker
    return alarms


def close_engine(engine) -> None:
    """Shut a rollout engine down before the process group goes (vLLM made its own in this process)."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def exit_if_interrupted(accelerator, run_dir: Path, step: int, checkpoint, interrupted: bool, engine=None,
                        reason: str = "signal") -> None:
    """Stopped by a signal before the last step: write a checkpoint and exit with status 130. (A signal during
    the last step or the final eval: `export_final` exits 130 after that checkpoint.) `reason`: what stopped it (a
    teacher server that failed past its retries stops the same way, common/teacher_server.py)."""
    if interrupted:
        checkpoint()
        accelerator.print(f"stopped by {reason} at step {step}; checkpoint written to {run_dir}/checkpoints")
        close_engine(engine)
        end_run(accelerator)
        release_run_dir(run_dir)
        sys.exit(130)


def export_final(accelerator, run_dir: Path, model, tokenizer, final: dict, engine=None, args=None) -> dict:
    """final/ (save_pretrained model + tokenizer, after checking the replicas agree), final_eval.json, then
    the trackers and process group are closed. A stop signal that arrived during the final eval ends the run
    here instead, with status 130 (the last checkpoint is already written; rerunning the command finishes it).
    Disk full while writing final/ says so (the checkpoints are kept)."""
    stop = _STOP.get(str(Path(run_dir)))
    if stop is not None and stop_requested(accelerator, stop):
        accelerator.print(f"stopped by signal at step {final.get('step', '?')} (during the final evaluation); the last checkpoint is "
                          f"in {run_dir}/checkpoints, final/ not written: rerun the same command to finish")
        close_engine(engine)
        end_run(accelerator)
        release_run_dir(run_dir)
        sys.exit(130)
    assert_replicas_in_sync(accelerator, model)
    try:
        if is_peft(model):  # final/ = the merged model, final_adapter/ = the adapter (common/lora.py)
            save_merged(accelerator.unwrap_model(model), run_dir / "final", accelerator.is_main_process, accelerator.save)
        else:
            accelerator.unwrap_model(model).save_pretrained(run_dir / "final", is_main_process=accelerator.is_main_process,
                                                            save_function=accelerator.save, state_dict=accelerator.get_state_dict(model))
        if accelerator.is_main_process:
            tokenizer.save_pretrained(run_dir / "final")
            (run_dir / "final_eval.json").write_text(json.dumps(final, indent=2))
    except (OSError, RuntimeError) as e:
        if is_disk_full(e):
            raise CheckpointError(f"disk full while writing {run_dir / 'final'}; the checkpoints in {run_dir}/checkpoints are "
                                  "kept: free space and rerun the same command") from e
        raise
    accelerator.print(f"done: {run_dir}/final | " + " | ".join(f"{k} acc {v['acc']:.3f}" for k, v in final.items()
                                                               if isinstance(v, dict) and "acc" in v))
    push_final(accelerator, args, run_dir, final)  # --push_to_hub: model card + upload (main process)
    close_engine(engine)
    end_run(accelerator)
    release_run_dir(run_dir)
    return final


def finish_rl_run(accelerator, args, run_dir: Path, model, tokenizer, step: int, checkpoint, alarmed: bool,
                  val_rows: list[dict], engine=None) -> dict:
    """The end of an RL method (GRPO, OPD, Stable-OPD): exit 130 with a checkpoint if a signal stopped it early;
    else a last checkpoint (not after --stop_on_alarm: the healthy one before the alarm stays the newest), the
    final greedy eval on val_rows and final/ (see `export_final`)."""
    exit_if_interrupted(accelerator, run_dir, step, checkpoint, interrupted=not alarmed and step < args.max_steps, engine=engine)
    if not alarmed:
        checkpoint()
    final = {"step": step, "alarmed": alarmed}
    if val_rows:
        final["val"] = greedy_eval(accelerator, model, tokenizer, val_rows, args, engine)[0]
        log_eval(accelerator, run_dir, final["val"], step)
    return export_final(accelerator, run_dir, model, tokenizer, final, engine, args)
