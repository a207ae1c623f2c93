"""A method script run in a subprocess, as the method tests run them: offline, one thread, from the repo root."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run_method(cmd, env=ENV, check=True):
    """Run `cmd` from the repo root; with `check`, a non-zero exit raises with the tails of its output. Every run fails
    if the lm_head's backward warned "recomputed": the gradient it computed in the forward (`token_loss`) was not the
    loss's."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    assert "recomputed" not in proc.stderr, proc.stderr[-3000:]
    return proc
