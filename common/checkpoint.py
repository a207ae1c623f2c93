"""Checkpoints: atomic save, keep-last-N, verified resume, on top of `accelerator.save_state`.

Layout (one directory per step, under the run directory):

    run_dir/checkpoints/step_00000120/
        model.safetensors  optimizer.bin  scheduler.bin  random_states_<rank>.pkl ...  (accelerate)
        config.json  generation_config.json  tokenizer files   (so the folder loads with plain transformers;
                                                                 a LoRA student: adapter_config.json, its adapters only)
        trainer_state.json   the script's `state` dict (step, data cursor, tracker run id, ...)
        logs.json            byte sizes of the run's metrics.jsonl / samples.jsonl / groups.jsonl at this step
        run_config.yaml      the run's config.yaml (method, run_id, settings): whose checkpoint it is, even when
                             copied out of its run folder (`common.rundir.check_run_dir` checks it before resuming)
        MANIFEST.json        {"format", "step", "num_processes", "files": {relpath: {size, sha256}}}

Accelerate writes model/optimizer/scheduler/RNG (random, numpy, torch, per rank) and handles FSDP and
DeepSpeed layouts (sub-directories are covered by the manifest). A save goes to `.tmp-step_<N>`; the
main process writes `trainer_state.json`, then `MANIFEST.json` (last: its presence marks completeness),
then renames the directory into place. A crash at any point leaves either a `.tmp-*` directory (ignored,
removed at the next save) or a complete checkpoint. Verification checks file sizes by default (a stat,
cheap enough to scan every checkpoint); `check_hash=True` also recomputes sha256 (reads every byte).
Files in a checkpoint directory that the manifest does not list (e.g. eval outputs) are ignored.
A failed save (disk full: torch's "unexpected pos ..." or ENOSPC) removes its temporary directory and raises
CheckpointError("disk full while writing checkpoint ...; earlier checkpoints kept ..."): older checkpoints are
only pruned after a new one is complete. Loading a checkpoint into a model of another shape raises
CheckpointError naming the checkpoint and the first mismatching tensor, not a state_dict traceback.
Assumes a filesystem shared by all ranks; every rank must call `save_checkpoint`/`load_checkpoint`.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import safe_open
from torch.nn.parallel import DistributedDataParallel

from common.errors import BadInput, is_disk_full
from common.tracking import log_sizes

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
LOG_SIZES = "logs.json"
RUN_CONFIG = "run_config.yaml"  # a copy of the run's config.yaml: its method, run_id and settings (common/cli.py)
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        if fsync:  # at save time: make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
    return h.hexdigest()


def _step_of(path: Path) -> int | None:
    m = re.search(r"step_(\d+)$", path.name)
    return int(m.group(1)) if m else None


def verify_checkpoint(path: str | Path, check_hash: bool = False) -> list[str]:
    """Return the problems of checkpoint `path` (empty list = complete); sha256 only if `check_hash`."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return [f"no {MANIFEST} (the save never finished)"]
    except (ValueError, KeyError, OSError) as e:
        return [f"unreadable {MANIFEST}: {e}"]
    problems = []
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"missing file {rel}")
        elif f.stat().st_size != meta["size"]:
            problems.append(f"{rel} has {f.stat().st_size} bytes, manifest says {meta['size']}")
        elif check_hash and _sha256(f) != meta["sha256"]:
            problems.append(f"{rel} sha256 mismatch")
    if not problems:
        try:
            if not isinstance(json.loads((path / TRAINER_STATE).read_text()), dict):
                problems.append(f"{TRAINER_STATE} is not a JSON object")
        except (ValueError, OSError) as e:
            problems.append(f"unreadable {TRAINER_STATE}: {e}")
    return problems


def _final_dirs(ckpt_root: Path) -> list[Path]:
    """Final (non-.tmp) checkpoint directories, oldest step first."""
    if not ckpt_root.is_dir():
        return []
    dirs = [p for p in ckpt_root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(dirs, key=_step_of)


def latest_checkpoint(run_dir: str | Path, check_hash: bool = False) -> Path | None:
    """Newest complete checkpoint under `run_dir/checkpoints`, or None. Incomplete or corrupt ones are
    skipped with a warning naming them and what is wrong."""
    return _newest_complete(Path(run_dir) / "checkpoints", check_hash)


def _newest_complete(root: Path, check_hash: bool, before_step: int | None = None) -> Path | None:
    """Newest complete checkpoint directory in `root` (with step < `before_step` if given), warning on bad ones."""
    for d in reversed(_final_dirs(root)):
        if before_step is not None and _step_of(d) >= before_step:
            continue
        problems = verify_checkpoint(d, check_hash)
        if not problems:
            return d
        warnings.warn(f"skipping checkpoint {d}: {'; '.join(problems)}", stacklevel=3)
    return None


def _check_json_state(state: dict[str, Any]) -> str:
    """Serialise `state` or raise TypeError; done on every rank before any collective so no rank hangs."""
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    try:
        return json.dumps(state, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint state must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from e


def _write_manifest(tmp: Path, step: int, num_processes: int) -> None:
    """List every file with size and sha256, then write MANIFEST.json atomically (it marks completeness)."""
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[f.relative_to(tmp).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f, fsync=True)}
    manifest = {"format": 1, "step": step, "num_processes": num_processes, "files": files}
    (tmp / (MANIFEST + ".part")).write_text(json.dumps(manifest, indent=1))
    os.replace(tmp / (MANIFEST + ".part"), tmp / MANIFEST)


def save_checkpoint(
    accelerator: Accelerator, run_dir: str | Path, step: int, state: dict[str, Any], keep_last: int | None = 3, tokenizer=None
) -> Path:
    """Atomically save model/optimizer/scheduler/RNG (via accelerate) plus `state` as `checkpoints/step_<step>`.

    Call on every rank after `accelerator.prepare`. The weights are saved under the plain model's names (no DDP
    `module.` prefix) beside its config.json, generation_config.json and `tokenizer`'s files, so a checkpoint of a
    full model also loads with plain `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` (a LoRA student's
    holds its adapters only). Keeps the newest `keep_last` complete checkpoints
    (None or <= 0: keep all); older ones are deleted only after the new one is complete. Re-saving an
    existing step replaces it. Raises TypeError (before writing anything) if `state` is not JSON-able."""
    state_json = _check_json_state(state)
    if accelerator.project_configuration.automatic_checkpoint_naming:
        # save_state would ignore our directory and write project_dir/checkpoints/checkpoint_<i> instead
        raise ValueError("save_checkpoint needs ProjectConfiguration(automatic_checkpoint_naming=False)")
    root = Path(run_dir) / "checkpoints"
    tmp, final = root / f".tmp-step_{step:08d}", root / f"step_{step:08d}"
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            _clean_stale(root)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        # every rank writes its own RNG file (and its shards under FSDP/DeepSpeed); safetensors for weights
        # avoids pickle and handles tied embeddings
        hook = accelerator.register_save_state_pre_hook(_checkpoint_weights)
        try:
            accelerator.save_state(str(tmp), safe_serialization=True)
        finally:
            hook.remove()
        if accelerator.is_main_process:
            _write_model_files(accelerator, tmp, tokenizer)
            if (Path(run_dir) / "config.yaml").is_file():  # the run's method, run_id and settings travel with it
                shutil.copyfile(Path(run_dir) / "config.yaml", tmp / RUN_CONFIG)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(state_json)
            (tmp / LOG_SIZES).write_text(json.dumps(log_sizes(run_dir)))
            _write_manifest(tmp, step, accelerator.num_processes)
    except (OSError, RuntimeError, ValueError) as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # frees what the failed save wrote; nothing older is touched
        if is_disk_full(e):
            kept = [d.name for d in _final_dirs(root)]
            free = _free_mib(root)
            raise CheckpointError(f"disk full while writing checkpoint {final}; earlier checkpoints kept "
                                  f"({', '.join(kept) if kept else 'none yet'}) and the partial one removed "
                                  f"({free} MiB free on {root}): free space and resume") from e
        raise
    if accelerator.is_main_process:
        if final.exists():  # re-save of the same step: move the old one aside, publish, then delete it
            old = root / f".tmp-old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if keep_last and keep_last > 0:
            _prune(root, keep_last)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _clean_stale(root: Path) -> None:
    """Remove leftovers of interrupted saves/deletes; a `.tmp-old-step_N` whose step_N is missing (a crash
    between the two renames of a re-save) is the only copy of that step: put it back instead."""
    for stale in root.glob(".tmp-*"):
        if stale.name.startswith(".tmp-old-") and not (root / stale.name[len(".tmp-old-"):]).exists():
            os.replace(stale, root / stale.name[len(".tmp-old-"):])
            continue
        shutil.rmtree(stale)  # fail loudly if stuck


def _free_mib(path: Path) -> int | str:
    try:
        return shutil.disk_usage(path if path.exists() else path.parent).free // 2**20
    except OSError:
        return "?"


def _prune(root: Path, keep_last: int) -> None:
    """Delete every checkpoint older than the `keep_last`-th newest complete one (size check only)."""
    complete = [d for d in _final_dirs(root) if not verify_checkpoint(d)]
    if len(complete) <= keep_last:
        return
    oldest_kept = _step_of(complete[-keep_last])
    for d in _final_dirs(root):
        if _step_of(d) < oldest_kept:  # rename first: a crash mid-delete then leaves only .tmp-* junk
            trash = root / f".tmp-del-{d.name}"
            os.replace(d, trash)
            shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(accelerator: Accelerator, path: str | Path, check_hash: bool = False,
                    model_name: str | None = None) -> dict[str, Any]:
    """Verify `path`, restore model/optimizer/scheduler/RNG into the prepared objects, return the state dict.

    Raises CheckpointError naming the path, the problem, and the previous complete checkpoint if any; or,
    for a checkpoint of another model size, the checkpoint, `model_name` and the first mismatching tensor."""
    path = Path(path)
    problems = verify_checkpoint(path, check_hash)
    if problems:
        step = _step_of(path)
        prev = _newest_complete(path.parent, check_hash, before_step=step) if step is not None else None
        hint = f"; the previous complete checkpoint is {prev}" if prev else "; no earlier complete checkpoint found"
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: {'; '.join(problems)}{hint}")
    manifest = json.loads((path / MANIFEST).read_text())
    rng_file = f"random_states_{accelerator.process_index}.pkl"
    if manifest["num_processes"] != accelerator.num_processes or rng_file not in manifest["files"]:
        # accelerate silently skips a missing RNG file; say so, because sampling will not replay exactly
        warnings.warn(
            f"{path} was saved by {manifest['num_processes']} process(es), resuming with "
            f"{accelerator.num_processes}: RNG streams are not restored exactly",
            stacklevel=2,
        )
    partial = _check_trainable_only(accelerator, path)
    hook = accelerator.register_load_state_pre_hook(_load_unwrapped)
    try:
        accelerator.load_state(str(path), **({"strict": False} if partial else {}))
    except (RuntimeError, ValueError, KeyError) as e:
        detail = _mismatch(e)
        if detail is None:
            raise
        what = f"model {model_name}" if model_name else "this run's model"
        raise CheckpointError(f"checkpoint {path} does not fit {what} (saved from a model or optimizer of another size "
                              f"or architecture: {detail}); resume with the model it was saved from, or start a new --run_dir") from e
    finally:
        hook.remove()
    return json.loads((path / TRAINER_STATE).read_text())


def _checkpoint_weights(models, weights, output_dir) -> None:
    """save_state hook: the plain model's key names (DDP's `module.` prefix dropped: `_load_unwrapped` loads them
    back into the unwrapped model); a model with frozen parameters (a LoRA student) saves all but those."""
    for i, model in enumerate(models):
        if i >= len(weights):  # FSDP / DeepSpeed save their own layouts
            break
        frozen = _frozen_keys(model)
        # an OrderedDict, as accelerate's own: only then does its safetensors save drop tied aliases (lm_head)
        weights[i] = OrderedDict((_plain_key(k, model), v) for k, v in weights[i].items() if k not in frozen)


def _plain_key(key: str, model) -> str:
    return key.removeprefix("module.") if isinstance(model, DistributedDataParallel) else key


def _load_unwrapped(models, input_dir) -> None:
    """load_state hook: a DDP model loads the plain-named weights into its module (older checkpoints, saved with
    the `module.` prefix, into the DDP wrapper as before)."""
    for i, model in enumerate(models):
        if isinstance(model, DistributedDataParallel):
            file = Path(input_dir) / f"model{'_' + str(i) if i else ''}.safetensors"
            with safe_open(str(file), "pt") as f:
                prefixed = any(k.startswith("module.") for k in f.keys())
            if not prefixed:
                models[i] = model.module


def _write_model_files(accelerator, folder: Path, tokenizer) -> None:
    """config.json, generation_config.json and the tokenizer beside the weights (a LoRA student: its adapter
    config), so a checkpoint folder is a transformers model folder too."""
    model = accelerator.unwrap_model(accelerator._models[0]) if accelerator._models else None
    if not hasattr(model, "config") or accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return  # not a transformers model, or a sharded layout that is no model folder anyway
    if hasattr(model, "peft_config"):
        model.peft_config[model.active_adapter].save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _frozen_keys(model) -> set[str]:
    """state_dict keys holding a frozen parameter, tied aliases included (a tied lm_head is not a named parameter)."""
    ptrs = {p.data_ptr() for p in model.parameters() if not p.requires_grad}
    return {k for k, v in model.state_dict().items() if v.data_ptr() in ptrs} if ptrs else set()


def _check_trainable_only(accelerator, path: Path) -> bool:
    """For models with frozen parameters (LoRA), the saved tensors must be exactly the trainable ones (then they
    load with strict=False, the frozen base coming from the model folder); raises CheckpointError otherwise.
    Returns whether such a partial load is needed."""
    models = accelerator._models
    if not any(any(not p.requires_grad for p in m.parameters()) for m in models):
        return False
    for i, model in enumerate(models):
        model = getattr(model, "module", model)  # the names are the plain model's (see `_checkpoint_weights`)
        file = path / f"model{'_' + str(i) if i else ''}.safetensors"
        if not file.exists():
            raise CheckpointError(f"checkpoint {path} has no {file.name}: it was not saved by a run with these trainable parameters")
        with safe_open(str(file), "pt") as f:
            saved = set(f.keys())
        want = set(model.state_dict()) - _frozen_keys(model)
        if saved != want:
            extra, missing = sorted(saved - want)[:3], sorted(want - saved)[:3]
            raise CheckpointError(f"checkpoint {path} does not fit this run's trainable parameters (saved but not trained "
                                  f"here: {extra}; trained here but not saved: {missing}): a checkpoint of a run with another "
                                  "--use_peft / LoRA setting; resume with that setting, or start a new --run_dir")
    return True


def _mismatch(e: BaseException) -> str | None:
    """The first line that says why a state dict does not fit (size mismatch, missing / unexpected keys,
    optimizer parameter groups), or None if `e` is something else."""
    text = str(e)
    for pattern in (r"size mismatch for [^\n]*", r"Missing key\(s\) in state_dict: [^\n]{0,160}",
                    r"Unexpected key\(s\) in state_dict: [^\n]{0,160}", r"loaded state dict [^\n]*"):
        m = re.search(pattern, text)
        if m:
            return " ".join(m.group(0).split())
    return None


def saved_log_sizes(path: str | Path) -> dict[str, int] | None:
    """The byte sizes of the run's log files when checkpoint `path` was written (None for older checkpoints)."""
    try:
        sizes = json.loads((Path(path) / LOG_SIZES).read_text())
    except (OSError, ValueError):
        return None
    return sizes if isinstance(sizes, dict) else None


def set_aside_newer(run_dir: str | Path, step: int) -> Path | None:
    """After resuming from checkpoint `step` of this run: the checkpoints with a larger step belong to a timeline that
    is being abandoned (an explicit older --resume_from, or corrupt newer ones). Moved, not deleted, to
    checkpoints/abandoned_after_step_<step>/, where auto-resume and keep-last pruning never look. Returns that folder."""
    root = Path(run_dir) / "checkpoints"
    newer = [d for d in _final_dirs(root) if _step_of(d) > step]
    if not newer:
        return None
    dest = root / f"abandoned_after_step_{step:08d}"
    n = 1
    while dest.exists():
        dest, n = root / f"abandoned_after_step_{step:08d}_{n}", n + 1
    dest.mkdir()
    for d in newer:
        os.replace(d, dest / d.name)
    return dest


def resolve_resume(run_dir: str | Path, resume_from: str | None) -> Path | None:
    """Map a `--resume_from` value to a checkpoint: "auto" = newest complete one in `run_dir` (or None),
    "none"/""/None = start fresh, anything else = that checkpoint directory (CheckpointError if bad)."""
    if resume_from is None or resume_from.strip().lower() in ("", "none"):
        return None
    if resume_from.strip().lower() == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume_from).expanduser()
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointError(f"--resume_from {path}: not a complete checkpoint: {'; '.join(problems)}")
    return path


def install_stop_handler(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> threading.Event:
    """Turn Ctrl-C / SIGTERM (a scheduler's pre-kill notice) into a flag the training loop checks at
    step boundaries, so the final checkpoint is always taken between two complete optimizer steps.
    A second signal restores the default handler and acts at once (a stuck run can still be killed)."""
    event = threading.Event()

    def _request(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        event.set()
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
              "(send it again to stop at once)", flush=True)

    for s in signums:
        signal.signal(s, _request)
    return event


def stop_requested(accelerator: Accelerator, event: threading.Event) -> bool:
    """True on every rank if any rank received a stop signal (all ranks must leave the loop together)."""
    import torch

    flag = torch.tensor(float(event.is_set()), device=accelerator.device)
    return bool(accelerator.reduce(flag, "max").item()) if accelerator.num_processes > 1 else bool(flag.item())
