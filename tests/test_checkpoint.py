"""common/checkpoint.py: exact round trip, keep-last-N, partial/corrupt checkpoints, --resume_from, signals."""

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import json
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import Qwen2Config, Qwen2ForCausalLM

from common.checkpoint import (
    CheckpointError,
    install_stop_handler,
    stop_requested,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)

VOCAB = 64


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerator state is process-wide; each test (and each `setup`) starts from a clean one."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def setup(seed: int = 0):
    """A fresh tiny Qwen2 (tied embeddings, like Qwen2.5-Math-1.5B), AdamW, LambdaLR, prepared."""
    AcceleratorState._reset_state(True)
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64, vocab_size=VOCAB, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    acc = Accelerator(cpu=True)
    model, opt, sched = acc.prepare(model, opt, sched)
    return acc, model, opt, sched


def train(acc, model, opt, sched, n: int) -> None:
    """n steps whose batches come from all three RNGs, so an unrestored RNG changes the result."""
    for _ in range(n):
        x = torch.randint(0, VOCAB, (2, 8))
        x[0, random.randrange(8)] = int(np.random.randint(VOCAB))
        loss = model(input_ids=x, labels=x).loss
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()


def snapshot(model, opt, sched) -> dict:
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "opt": opt.state_dict(), "sched": sched.state_dict(),
            "draws": (torch.rand(3), random.random(), float(np.random.rand()))}


def assert_same(a, b) -> None:
    """Exact (bitwise) equality of nested dicts/lists/tensors."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def save_n(run_dir: Path, steps, keep_last=3) -> None:
    acc, model, opt, sched = setup()
    for s in steps:
        save_checkpoint(acc, run_dir, s, {"step": s}, keep_last=keep_last)


def test_exact_round_trip(tmp_path):
    acc, model, opt, sched = setup(seed=0)
    train(acc, model, opt, sched, 2)
    state = {"step": 2, "cursor": 17, "tracker_run_id": "abc", "nested": {"x": [1.5, None]}}
    path = save_checkpoint(acc, tmp_path, 2, state)
    assert path == tmp_path / "checkpoints" / "step_00000002"
    assert (path / "model.safetensors").is_file() and (path / "random_states_0.pkl").is_file()
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert "trainer_state.json" in manifest["files"] and "optimizer.bin" in manifest["files"]
    assert verify_checkpoint(path, check_hash=True) == []
    train(acc, model, opt, sched, 2)
    expected = snapshot(model, opt, sched)

    acc, model, opt, sched = setup(seed=123)  # different init: everything must come from the checkpoint
    random.seed(5)
    np.random.seed(5)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt == path
    assert load_checkpoint(acc, ckpt) == state
    train(acc, model, opt, sched, 2)
    assert_same(snapshot(model, opt, sched), expected)


def test_keep_last_and_resave(tmp_path):
    save_n(tmp_path, [1, 2, 3, 4, 5], keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005"]
    acc, *_ = setup()
    save_checkpoint(acc, tmp_path, 5, {"step": 5, "again": True}, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005"]
    assert json.loads((root / "step_00000005" / "trainer_state.json").read_text())["again"] is True
    save_checkpoint(acc, tmp_path, 6, {"step": 6}, keep_last=None)
    assert len(list(root.iterdir())) == 3


def test_partial_checkpoints_skipped_and_refused(tmp_path):
    save_n(tmp_path, [2, 4])
    root = tmp_path / "checkpoints"
    (root / "step_00000004" / "MANIFEST.json").unlink()  # crashed before the manifest
    shutil.copytree(root / "step_00000002", root / ".tmp-step_00000006")  # crashed mid-save
    (root / ".tmp-step_00000006" / "MANIFEST.json").unlink()
    with pytest.warns(UserWarning, match="step_00000004"):
        assert latest_checkpoint(tmp_path) == root / "step_00000002"
    with pytest.raises(CheckpointError, match=r"step_00000004.*MANIFEST.*previous complete checkpoint is .*step_00000002"):
        load_checkpoint(setup()[0], root / "step_00000004")
    with pytest.raises(CheckpointError, match=r"\.tmp-step_00000006.*MANIFEST.*step_00000002"), pytest.warns(UserWarning):
        load_checkpoint(setup()[0], root / ".tmp-step_00000006")
    assert load_checkpoint(setup()[0], root / "step_00000002") == {"step": 2}
    acc, *_ = setup()
    save_checkpoint(acc, tmp_path, 8, {"step": 8})
    assert not list(root.glob(".tmp-*"))  # stale temp dirs are cleaned by the next save


def test_corrupt_checkpoints_refused(tmp_path):
    save_n(tmp_path, [2, 4, 6])
    root = tmp_path / "checkpoints"
    weights = root / "step_00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="step_00000006.*model.safetensors"):
        assert latest_checkpoint(tmp_path) == root / "step_00000004"
    with pytest.raises(CheckpointError, match=r"step_00000006.*model\.safetensors has 100 bytes.*step_00000004"):
        load_checkpoint(setup()[0], root / "step_00000006")
    state_file = root / "step_00000004" / "trainer_state.json"
    state_file.write_text("x" * state_file.stat().st_size)  # same size, not JSON
    with pytest.raises(CheckpointError, match=r"unreadable trainer_state\.json.*step_00000002"):
        load_checkpoint(setup()[0], root / "step_00000004")
    opt_file = root / "step_00000002" / "optimizer.bin"
    data = bytearray(opt_file.read_bytes())
    data[-10] ^= 0xFF  # bit flip: same size, only the hash sees it
    opt_file.write_bytes(bytes(data))
    assert verify_checkpoint(root / "step_00000002") == []
    assert verify_checkpoint(root / "step_00000002", check_hash=True) == ["optimizer.bin sha256 mismatch"]


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, "auto") is None  # nothing saved yet
    save_n(tmp_path, [3, 7])
    root = tmp_path / "checkpoints"
    assert resolve_resume(tmp_path, "auto") == root / "step_00000007"
    assert resolve_resume(tmp_path, "none") is None and resolve_resume(tmp_path, "") is None
    assert resolve_resume(tmp_path, str(root / "step_00000003")) == root / "step_00000003"
    with pytest.raises(CheckpointError, match="step_00000009"):
        resolve_resume(tmp_path, str(root / "step_00000009"))
    (root / "step_00000007" / "optimizer.bin").unlink()
    with pytest.raises(CheckpointError, match="missing file optimizer.bin"):
        resolve_resume(tmp_path, str(root / "step_00000007"))


def test_non_serialisable_state_is_type_error(tmp_path):
    acc, *_ = setup()
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(acc, tmp_path, 1, {"tensor": torch.zeros(1)})
    with pytest.raises(TypeError, match="dict"):
        save_checkpoint(acc, tmp_path, 1, [1, 2])
    assert not (tmp_path / "checkpoints").exists()  # refused before writing anything


def test_sigterm_sets_the_stop_flag():
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        event = install_stop_handler()
        assert not event.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):
            if event.is_set():
                break
            time.sleep(0.01)
        assert event.is_set()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second SIGTERM kills at once
        acc, *_ = setup()
        assert stop_requested(acc, event)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def test_a_checkpoint_carries_its_runs_config(tmp_path):
    """The run's config.yaml (method, run_id, settings) is copied into every checkpoint and covered by its manifest, so
    a checkpoint copied out of its run folder still says whose it is; without a config.yaml (library use) none is."""
    save_n(tmp_path / "bare", [1])
    assert not (tmp_path / "bare" / "checkpoints" / "step_00000001" / "run_config.yaml").exists()
    (tmp_path / "config.yaml").write_text("method: opd\nrun_id: 0123456789ab\nlearning_rate: 0.001\n")
    save_n(tmp_path, [1])
    ckpt = tmp_path / "checkpoints" / "step_00000001"
    assert (ckpt / "run_config.yaml").read_text() == (tmp_path / "config.yaml").read_text()
    assert "run_config.yaml" in json.loads((ckpt / "MANIFEST.json").read_text())["files"]
    size = (ckpt / "run_config.yaml").stat().st_size
    (ckpt / "run_config.yaml").write_text("method: sft\n")  # tampered: the size check sees it
    assert verify_checkpoint(ckpt) == [f"run_config.yaml has 12 bytes, manifest says {size}"]
