"""The run folder: one folder, one run (the start-up check `check_run_dir`, read-only, before anything loads).

A run folder belongs to one run. `config.yaml` records the method and every setting; resuming with another
method is refused, and so is resuming with different identity settings: everything except `RESUME_FREE`
(bookkeeping, eval, monitoring, memory/engine knobs and `max_steps`, which may change when resuming).
`--force_resume true` continues with the new settings anyway (the old config is kept as
config.before_step_<N>.yaml); `--overwrite_run_dir true` deletes the old run's files and starts afresh.
Neither touches the folder before the models and data have loaded (`common.run.resume_run`).
`config.yaml` also records a `run_id` (made once per run), and every checkpoint carries a copy of it
(run_config.yaml), so a checkpoint says whose it is even when copied out of its folder: --resume_from refuses one of
another method, of another run (run_id) than the one in --run_dir, or one recording no run outside a run folder
(unless --force_resume). A run with logs or final/ but no intact checkpoint left is refused (not restarted from 0).
"""

import dataclasses
import json
import re
import warnings
from pathlib import Path

import yaml

from common.checkpoint import RUN_CONFIG, _final_dirs, _newest_complete, _step_of, verify_checkpoint
from common.cli import method_name, plain_values
from common.errors import BadInput
from common.tracking import LOG_FILES


class RunDirError(BadInput, ValueError):
    """A --run_dir that holds another run (another method, other settings, or no config to tell)."""


# Settings that may differ when a run is resumed: where and how it resumes, how long it runs, bookkeeping,
# evaluation, monitoring, and memory / engine knobs that leave the numbers alone. Every other setting (model,
# teacher, data, seed, learning rate and schedule, batch shape, objective, lengths, dtype...) is the run's
# identity: a new field is identity unless listed here.
RESUME_FREE = frozenset({
    "run_dir", "resume_from", "overwrite_run_dir", "force_resume", "max_steps", "dry_run", "plan_gpu",
    "push_to_hub", "hub_model_id", "hub_private", "attn_implementation",
    "report_to", "project", "log_every", "samples_every", "log_groups", "save_every", "keep_last",
    "eval_every", "eval_samples", "eval_batch_size", "val_data", "test_data", "target_val_acc",
    "alarm_threshold", "alarm_jump", "alarm_window", "stop_on_alarm",
    "rollout_backend", "vllm_gpu_memory_utilization", "vllm_sleep", "vllm_check_sync",
    "gradient_checkpointing", "chunk_size", "micro_batch_tokens",  # memory knobs: the same gradients (tested)
    "teacher_backend", "teacher_url", "teacher_timeout", "teacher_retries", "teacher_backoff", "teacher_concurrency",
    "teacher_vllm_gpu_memory_utilization",
})
RUN_FILES = ("config.yaml", "final_eval.json", *LOG_FILES)  # plus checkpoints/, final/, final_adapter/, config.before_step_*.yaml


@dataclasses.dataclass
class RunDirPlan:
    """What `check_run_dir` found: the saved config (None if none), whether the folder holds a run, the identity
    settings that differ (name -> (saved, now)), and whether the old run is to be deleted first."""

    run_dir: Path
    saved: dict | None
    has_run: bool
    changed: dict
    overwrite: bool


def _has_checkpoints(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.is_dir() and re.match(r"^step_\d+$", p.name) for p in root.iterdir())


def _contents(run_dir: Path) -> list[str]:
    """What of a run the folder holds (names, for messages)."""
    out = []
    if (run_dir / "config.yaml").is_file():
        out.append("config.yaml")
    if _has_checkpoints(run_dir):
        out.append("checkpoints")
    if (run_dir / "final").exists():
        out.append("final/")
    out += [n for n in LOG_FILES if (run_dir / n).is_file() and (run_dir / n).stat().st_size > 0]
    return out


def _same_value(key: str, a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b:  # the same local path spelt two ways
        try:
            return Path(a).exists() and Path(a).resolve() == Path(b).resolve()
        except OSError:
            return False
    return False


def read_saved_config(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise RunDirError(f"--run_dir {run_dir}: its config.yaml is unreadable ({' '.join(str(e).split())[:200]}); "
                          "cannot tell whose run it is: choose another --run_dir, or --overwrite_run_dir true") from e
    if not isinstance(data, dict):
        raise RunDirError(f"--run_dir {run_dir}: its config.yaml is not a mapping; choose another --run_dir, or --overwrite_run_dir true")
    return data


def identity_changes(args, saved: dict) -> dict:
    """{name: (saved value, current value)} for the identity settings (not in RESUME_FREE) that differ.
    A setting missing from an older config counts as its default."""
    now, changed = plain_values(args), {}
    defaults = {f.name: f.default for f in dataclasses.fields(args) if f.default is not dataclasses.MISSING}
    for key, value in now.items():
        if key in RESUME_FREE:
            continue
        old = saved.get(key, _plain_value(defaults.get(key)))
        if not _same_value(key, old, value):
            changed[key] = (old, value)
    return changed


def _plain_value(v):
    return json.loads(json.dumps(v, default=str))


def _saved_method(saved: dict, args) -> str | None:
    """The method recorded in a config.yaml; for configs written before it was recorded, this method if every
    saved key is one of its fields, else None (another method)."""
    if "method" in saved and "method" not in {f.name for f in dataclasses.fields(args)}:
        return str(saved["method"])
    names = {f.name for f in dataclasses.fields(args)}
    return method_name(args) if set(saved) <= names else None


def _fmt_changes(changed: dict, limit: int = 6) -> str:
    items = [f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in list(changed.items())[:limit]]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(items) + more


def _short(v) -> str:
    s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= 60 else s[:28] + "..." + s[-28:]


def check_run_dir(args, method: str | None = None) -> RunDirPlan:
    """Read-only: may this run use `args.run_dir`? Raises RunDirError (one line) when the folder holds another
    method's run, a run with other identity settings (unless --force_resume), a run that --resume_from none
    would restart and mix into (unless --overwrite_run_dir), or run files without a config.yaml. Also checks an
    explicit --resume_from checkpoint's own run. Returns the plan for `common.run.resume_run`."""
    method = method or method_name(args)
    if not str(args.run_dir).strip():  # Path("") is the current folder: a run would be written into it
        raise RunDirError("--run_dir '': give the run's folder (e.g. runs/my_run)")
    run_dir = Path(args.run_dir)
    in_the_way = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise RunDirError(f"--run_dir {run_dir}: {in_the_way} is a file, not a folder: choose another --run_dir")
    overwrite, force = bool(args.overwrite_run_dir), bool(args.force_resume)
    resume_from = (args.resume_from or "none").strip()
    fresh = resume_from.lower() in ("", "none")
    contents = _contents(run_dir) if run_dir.is_dir() else []
    has_run = bool(contents)
    saved = None
    explicit = None if fresh or resume_from.lower() == "auto" else Path(resume_from).expanduser()
    if explicit is not None:
        _check_complete(explicit)
    if overwrite:
        if explicit is not None and _inside(explicit, run_dir):
            raise RunDirError(f"--overwrite_run_dir true would delete --resume_from {explicit}: resume from a checkpoint "
                              "outside --run_dir, or drop one of the two flags")
        if explicit is not None:
            _check_checkpoint_run(args, method, explicit, force)
        return RunDirPlan(run_dir, None, has_run, {}, overwrite=has_run)
    if not has_run:
        if explicit is not None:
            _check_checkpoint_run(args, method, explicit, force)
        return RunDirPlan(run_dir, None, False, {}, overwrite=False)
    where = f"--run_dir {run_dir}"
    saved = read_saved_config(run_dir)
    if saved is None:
        raise RunDirError(f"{where} holds {', '.join(contents)} but no config.yaml, so it cannot tell whose run they are: "
                          "choose another --run_dir, or --overwrite_run_dir true to delete them and start afresh")
    saved_method = _saved_method(saved, args)
    finished = " finished" if (run_dir / "final").exists() else ""
    if saved_method != method:
        what = f"a{finished} {saved_method} run" if saved_method else "a run of another method (its config.yaml has other settings)"
        raise RunDirError(f"{where} holds {what} ({', '.join(contents)}); {method} will not resume, overwrite or mix into it: "
                          "choose another --run_dir, or --overwrite_run_dir true to delete it and start afresh")
    changed = identity_changes(args, saved)
    if changed and not force:
        raise RunDirError(f"{where} holds a{finished} {method} run with other settings: {_fmt_changes(changed)}; resume it "
                          f"with its own settings (--config {run_dir / 'config.yaml'}), --force_resume true to continue it "
                          "with these, --overwrite_run_dir true to start afresh, or choose another --run_dir")
    if fresh and any(c != "config.yaml" for c in contents):
        raise RunDirError(f"{where} holds a{finished} {method} run ({', '.join(contents)}) and --resume_from {resume_from or 'none'} "
                          "would restart it from step 0 and mix the two runs' logs and checkpoints: resume it (--resume_from auto), "
                          "--overwrite_run_dir true to start afresh, or choose another --run_dir")
    if explicit is not None:
        _check_checkpoint_run(args, method, explicit, force, saved, inside=_inside(explicit, run_dir))
    elif resume_from.lower() == "auto":
        intact, bad = _newest_intact(run_dir)
        if intact is None and any(c != "config.yaml" for c in contents):
            found = "; ".join(f"{run_dir.name}/checkpoints/{name}: {problem}" for name, problem in bad)
            wrote = ", ".join(c for c in contents if c != "checkpoints")
            raise RunDirError(f"{where} holds a{finished} {method} run ({wrote}) but no intact checkpoint to resume it "
                              f"from ({found or 'no checkpoint was ever completed'}); starting it again from step 0 "
                              "would replace what it wrote, so nothing was changed: restore a checkpoint or "
                              "--resume_from a good one, or --overwrite_run_dir true to delete this run and start "
                              "afresh")
        if intact is not None:
            _check_checkpoint_run(args, method, intact, force, saved, inside=True)
    return RunDirPlan(run_dir, saved, True, changed, overwrite=False)


def _newest_intact(run_dir: Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """(the newest complete checkpoint of the folder or None, [(name, first problem)] of the newer ones that are
    not): the size check of `common.checkpoint.verify_checkpoint`, without its warnings."""
    bad = []
    for d in reversed(_final_dirs(run_dir / "checkpoints")):
        problems = verify_checkpoint(d)
        if not problems:
            return d, bad
        bad.append((d.name, problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")))
    return None, bad


def _check_complete(ckpt: Path) -> None:
    """An explicit --resume_from must be a complete checkpoint: refused before anything loads."""
    problems = verify_checkpoint(ckpt)
    if problems:
        step = _step_of(ckpt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-line error says it all
            prev = (_newest_complete(ckpt.parent, False, before_step=step)
                    if step is not None and ckpt.parent.is_dir() else None)
        hint = f"; the previous complete checkpoint is {prev}" if prev else ""
        raise RunDirError(f"--resume_from {ckpt}: not a complete checkpoint: {'; '.join(problems)}{hint}")


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _checkpoint_config(ckpt: Path) -> dict | None:
    """The run a checkpoint belongs to: its own copy of the run's config.yaml (common/checkpoint.py RUN_CONFIG), or, for
    a checkpoint saved before it carried one, the config.yaml of the run folder it sits in; None if neither."""
    own = ckpt / RUN_CONFIG
    if own.is_file():
        try:
            data = yaml.safe_load(own.read_text())
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            why = " ".join(str(e).split())[:200]
            raise RunDirError(f"--resume_from {ckpt}: its {RUN_CONFIG} is unreadable ({why})") from e
        return data if isinstance(data, dict) else None
    return read_saved_config(ckpt.parent.parent) if ckpt.parent.name == "checkpoints" else None


def _check_checkpoint_run(args, method: str, ckpt: Path, force: bool, run_saved: dict | None = None,
                          inside: bool = False) -> None:
    """The checkpoint to resume must be this method's, of the run in --run_dir if that holds one (same run_id), and,
    from another folder, of the same identity settings (unless --force_resume). A checkpoint from another folder that
    records no run at all is refused unless --force_resume (nothing can vouch for it)."""
    saved = _checkpoint_config(ckpt)
    if saved is None:
        if inside or force:
            return  # an older checkpoint of this folder's run (its config.yaml says whose), or forced
        raise RunDirError(f"--resume_from {ckpt} records no run (no run_config.yaml, and not in a run folder's "
                          f"checkpoints/): nothing says it is a {method} checkpoint of these settings; --force_resume "
                          "true to resume it anyway")
    saved_method = _saved_method(saved, args)
    if saved_method != method:
        raise RunDirError(f"--resume_from {ckpt} is a checkpoint of a {saved_method or 'another method'} run; {method} cannot resume it")
    ours, theirs = (run_saved or {}).get("run_id"), saved.get("run_id")
    if ours and theirs and ours != theirs:
        raise RunDirError(f"--resume_from {ckpt} is a checkpoint of another run (run_id {theirs}), not of the run in "
                          f"--run_dir {args.run_dir} (run_id {ours}): resuming it there would mix two runs' logs and "
                          "checkpoints; resume it into a new --run_dir, or --overwrite_run_dir true to replace this "
                          "run")
    if inside:
        return  # this run's own checkpoint: --force_resume may have changed settings since it was saved
    changed = identity_changes(args, saved)
    if changed and not force:
        raise RunDirError(f"--resume_from {ckpt} comes from a run with other settings: {_fmt_changes(changed)}; "
                          "--force_resume true to continue it with these")
