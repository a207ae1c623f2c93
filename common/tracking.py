"""Experiment tracking: Accelerate trackers (wandb / tensorboard / none) and, always, local JSONL files.

Every run folder gets `metrics.jsonl` (one JSON object per logged step, with `step` and `time`) and
`samples.jsonl` (example generations), written by the main process only and flushed per line, so a
crashed run keeps everything it logged. The tracker run id is saved in checkpoints, so a resumed
run continues the same wandb run. Every checkpoint records the byte sizes of these files (`log_sizes`); a
resumed run first cuts them back to those sizes (`rewind_logs`), so the steps it re-runs after resuming
from an older checkpoint are logged once, not twice.
"""

import json
import math
import os
import time
import uuid
from pathlib import Path

from tqdm.auto import tqdm

TRACKERS = ("none", "wandb", "tensorboard")
LOG_FILES = ("metrics.jsonl", "samples.jsonl", "groups.jsonl")  # per-run JSONL logs, rewound on resume


def tracker_names(report_to: str) -> list[str] | None:
    """`log_with` for `Accelerator(...)` from a comma list like "wandb,tensorboard" (or "none")."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise ValueError(f"unknown tracker(s) {bad}; choose from {TRACKERS}")
    names = [n for n in names if n != "none"]
    return names or None


def init_tracking(accelerator, project: str, run_name: str, config: dict, run_id: str | None = None) -> str:
    """Start the Accelerate trackers (if any); returns the run id to store in checkpoints."""
    run_id = run_id or uuid.uuid4().hex[:12]
    if accelerator.log_with:
        init_kwargs = {"wandb": {"id": run_id, "name": run_name, "resume": "allow"}}
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
        accelerator.init_trackers(project, config=flat, init_kwargs=init_kwargs)
    return run_id


def _append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def log_metrics(accelerator, run_dir: str | Path, metrics: dict, step: int) -> None:
    """Log scalar metrics for `step` to the trackers and to `run_dir/metrics.jsonl` (main process)."""
    if not accelerator.is_main_process:
        return
    clean = {k: (float(v) if hasattr(v, "item") or isinstance(v, (int, float)) else v) for k, v in metrics.items()}
    _append_jsonl(Path(run_dir) / "metrics.jsonl", {"step": step, "time": round(time.time(), 3), **clean})
    if accelerator.log_with:
        accelerator.log({k: v for k, v in clean.items() if isinstance(v, float) and math.isfinite(v)}, step=step)


def log_samples(accelerator, run_dir: str | Path, rows: list[dict], step: int) -> None:
    """Append example generations (dicts of prompt / completion / grade ...) to `samples.jsonl`."""
    if not accelerator.is_main_process:
        return
    for row in rows:
        _append_jsonl(Path(run_dir) / "samples.jsonl", {"step": step, **row})


def read_jsonl(path: str | Path) -> list[dict]:
    """All rows of a JSONL file (a torn last line from a crash is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def log_sizes(run_dir: str | Path) -> dict[str, int]:
    """Byte size of each log file in `run_dir` (0 if absent): what a checkpoint records."""
    return {name: (Path(run_dir) / name).stat().st_size if (Path(run_dir) / name).is_file() else 0 for name in LOG_FILES}


def _rewrite_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rewind_logs(run_dir: str | Path, sizes: dict[str, int] | None = None, step: int | None = None) -> dict[str, int]:
    """Make the run's logs end where the run resumes (each file rewritten atomically), so every step is logged
    once: `sizes` (from the checkpoint): cut each file back to its recorded size; else `step` (a checkpoint
    from before sizes were recorded): drop the rows with a larger step; neither (a fresh start): empty them.
    Returns {file: rows dropped}. Call on the main process only."""
    dropped = {}
    for name in LOG_FILES:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if sizes is not None:
            keep = data[: sizes.get(name, 0)] if len(data) > sizes.get(name, 0) else data
            keep = keep[: keep.rfind(b"\n") + 1]  # never keep a torn last line
        elif step is not None:
            lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
            kept = []
            for line in lines:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError):
                    continue
            keep = "".join(kept).encode()
        else:
            keep = b""
        if keep != data:
            dropped[name] = data.count(b"\n") - keep.count(b"\n")
            _rewrite_atomic(path, keep)
    return dropped


def progress(accelerator, total: int, initial: int = 0, desc: str = "train"):
    """A tqdm bar on the main process only."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True)


def end_run(accelerator) -> None:
    """Close the trackers and, in a distributed run, the process group, while Python is still fully alive.

    Left to interpreter shutdown, gloo's destructor joins a worker thread that waits for the GIL to free
    a finished all-gather's tensors, and one rank hangs forever after its work is done.
    """
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        # Give gloo's worker threads the GIL to finish freeing completed collectives before the DDP reducer
        # is destroyed at exit (the same deadlock was still seen once in ~20 two-process runs without it).
        time.sleep(0.2)
    accelerator.state.destroy_process_group()
