"""methods/sft.py end to end on the toy world: smoke, exact resume, 2 ranks, signals, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.toy import build_toy_world, toy_config_path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy_world(tmp_path_factory.mktemp("toy"), n_train=300, n_val=16, n_test=16, max_steps=3)


@pytest.fixture(scope="module")
def three_steps(toy, tmp_path_factory):
    """One run of 3 steps (1 rank, 8 sequences a step), shared: the one-process side of the 2-rank test and the
    first leg of the exact resume (which continues a copy of it). Tests only read it."""
    run_dir = tmp_path_factory.mktemp("sft_three_steps") / "run"
    run([sys.executable, "methods/sft.py", *sft_args(toy, run_dir, per_device_batch_size=8, max_steps=3)])
    return run_dir


def sft_args(toy, run_dir, **overrides):
    args = {"run_dir": run_dir, "model_name_or_path": toy_config_path("student"), "train_data": toy["train"],
            "val_data": toy["val"], "max_steps": 4, "per_device_batch_size": 8, "eval_every": 0, "eval_samples": 8,
            "max_completion_length": 48, "save_every": 0, "log_every": 1, "learning_rate": 3e-3, "warmup_steps": 0,
            "lr_scheduler_type": "constant"}
    args.update(overrides)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def run(cmd, timeout=180, check=True):
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def final_params(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_smoke_accelerate_launch(toy, tmp_path):
    run_dir = tmp_path / "run"
    run([*ACCELERATE, "--num_processes", "1", "--cpu", "methods/sft.py", *sft_args(toy, run_dir, report_to="tensorboard")])
    assert list(run_dir.rglob("events.out.tfevents.*")), "tensorboard wrote no event file"
    losses = [m["train/loss"] for m in metrics(run_dir) if "train/loss" in m]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    # every trainable parameter moved away from its (seeded) initialisation
    from common.models import load_model

    init = {k: v for k, v in load_model(str(toy_config_path("student")), seed=0).state_dict().items()}
    final = final_params(run_dir)
    for name, value in final.items():
        assert not torch.equal(value, init[name]), f"{name} did not change"
    evals = json.loads((run_dir / "final_eval.json").read_text())
    assert 0.0 <= evals["val"]["acc"] <= 1.0 and evals["step"] == 4
    # the exported model and tokenizer load with the plain transformers API
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(run_dir / "final")
    AutoTokenizer.from_pretrained(run_dir / "final")


def test_memory_options_run(toy, tmp_path):
    """bf16 autocast + gradient checkpointing + 8-bit AdamW + accumulation + linear decay: finite and learning."""
    run_dir = tmp_path / "run"
    run([sys.executable, "methods/sft.py", *sft_args(toy, run_dir, bf16="true", gradient_checkpointing="true", optim="adamw8bit",
                                                      gradient_accumulation_steps=2, per_device_batch_size=4,
                                                      lr_scheduler_type="linear", warmup_steps=1, max_steps=5)])
    losses = [m["train/loss"] for m in metrics(run_dir) if "train/loss" in m]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_exact_resume(toy, tmp_path, three_steps):
    """6 steps in one go == 3 steps, stop, resume, 3 more: identical parameters and optimizer state."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    run([sys.executable, "methods/sft.py", *sft_args(toy, straight, max_steps=6)])
    shutil.copytree(three_steps, split)  # the 3-step run (sft_args(toy, split, max_steps=3)), continued in a copy
    proc = run([sys.executable, "methods/sft.py", *sft_args(toy, split, max_steps=6)])
    assert "resumed from" in proc.stdout
    a, b = final_params(straight), final_params(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(straight / "checkpoints" / "step_00000006" / "optimizer.bin", weights_only=False)
    opt_b = torch.load(split / "checkpoints" / "step_00000006" / "optimizer.bin", weights_only=False)
    for sa, sb in zip(opt_a["state"].values(), opt_b["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    steps_b = [m["step"] for m in metrics(split) if "train/loss" in m]
    assert steps_b == [1, 2, 3, 4, 5, 6]


def test_two_processes_gloo_match_one_process(toy, tmp_path, three_steps):
    """2 ranks x 4 sequences == 1 rank x 8 sequences (same global batch): same parameters."""
    two, one = tmp_path / "two", three_steps  # one: sft_args(toy, one, per_device_batch_size=8, max_steps=3)
    env_cmd = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
    ENV2 = {**ENV, "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run([*ACCELERATE, *env_cmd, "methods/sft.py", *sft_args(toy, two, per_device_batch_size=4, max_steps=3)],
                          cwd=ROOT, env=ENV2, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "replicas in sync across 2 ranks" in proc.stdout
    a, b = final_params(two), final_params(one)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), k


def test_sigterm_writes_checkpoint_and_resumes(toy, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "methods/sft.py", *sft_args(toy, run_dir, max_steps=100000)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by signal" in out
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "MANIFEST.json").exists()
    stopped_at = json.loads((ckpts[-1] / "trainer_state.json").read_text())["step"]
    assert stopped_at >= 3
    proc = run([sys.executable, "methods/sft.py", *sft_args(toy, run_dir, max_steps=stopped_at + 1)])
    assert f"at step {stopped_at}" in proc.stdout


def test_corrupt_checkpoint_is_refused_and_previous_is_used(toy, tmp_path):
    run_dir = tmp_path / "run"
    run([sys.executable, "methods/sft.py", *sft_args(toy, run_dir, max_steps=4, save_every=2, keep_last=3)])
    newest = run_dir / "checkpoints" / "step_00000004"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a torn write
    proc = run([sys.executable, "methods/sft.py", *sft_args(toy, run_dir, max_steps=5, resume_from=newest)], check=False)
    assert proc.returncode != 0 and "step_00000004" in proc.stderr and "model.safetensors" in proc.stderr
    proc = run([sys.executable, "methods/sft.py", *sft_args(toy, run_dir, max_steps=5)])
    assert "step_00000002" in proc.stdout  # auto-resume skipped the corrupt one


@pytest.mark.parametrize("overrides, message", [
    ({"model_name_or_path": "runs/does/not/exist"}, "model path does not exist"),
    ({"train_data": "missing.jsonl"}, "dataset file not found"),
    ({"max_prompt_length": 5, "on_overflow": "error"}, "longer than max_prompt_length=5"),
    ({"optim": "sgdx"}, "invalid choice: 'sgdx'"),
])
def test_bad_input_fails_fast_with_a_clear_message(toy, tmp_path, overrides, message):
    t0 = time.time()
    proc = run([sys.executable, "methods/sft.py", *sft_args(toy, tmp_path / "run", **overrides)], check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert time.time() - t0 < 60


def test_unknown_flag_and_bad_row(toy, tmp_path):
    proc = run([sys.executable, "methods/sft.py", "--no_such_flag", "1"], check=False)
    assert proc.returncode == 2 and "no_such_flag" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "p", "answer": "1", "solution": "s"}\n{"problem": "p", "answer": "1"}\n')
    proc = run([sys.executable, "methods/sft.py", *sft_args(toy, tmp_path / "run", train_data=bad)], check=False)
    assert proc.returncode != 0 and "bad.jsonl:2: missing required field(s) ['solution']" in proc.stderr


def test_chunked_nll_and_its_gradient_equal_full_logits_cross_entropy():
    """methods/sft.py `nll` (prompts left-padded, the head in blocks with its gradient in the forward) against the
    brute force: each example alone, unpadded, the full [T, V] logits and torch's cross-entropy."""
    import torch.nn.functional as F

    import methods.sft as sft
    from common.models import load_model

    model = load_model(str(toy_config_path("student")), seed=0)  # fp32 (the head computes in fp32)
    examples = [([5, 6, 7], [8, 9, 2]), ([5, 6], [10, 11, 12, 13, 2]), ([4, 5, 6, 7, 8], [9, 2])]
    loss = sft.nll(model, sft.collate_BT(examples, pad_id=0), weight=0.25)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    brute = sum(F.cross_entropy(model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1], torch.tensor(c),
                                reduction="sum") for p, c in examples) * 0.25
    brute.backward()
    assert loss.item() == pytest.approx(brute.item(), rel=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(fused[name], p.grad, rtol=1e-4, atol=1e-5), name
