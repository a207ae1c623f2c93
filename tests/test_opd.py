"""methods/opd.py: the surrogate's gradient, aggregation, and end-to-end runs on tiny toy models."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import methods.opd as opd
from common.losses import aggregation_weights, reverse_kl
from common.models import load_model
from common.toy import build_toy_world, load_toy_tokenizer, toy_config_path
from tests.method_runs import ENV
from tests.method_runs import run_method as run
from tests.realtok import assert_plain_reload


def test_sampled_surrogate_gradient_is_the_reverse_kl_gradient():
    """E_{y~pi}[grad of -A(y) r(y)] at r = 1 equals grad KL(pi_theta || pi_T), enumerated exactly over V."""
    torch.manual_seed(0)
    V = 7
    theta = torch.randn(V, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(V, dtype=torch.float64)
    logp = torch.log_softmax(theta, -1)
    old = logp.detach()
    adv = torch.log_softmax(teacher, -1) - old  # A(y) = log pi_T(y) - log pi_old(y) for every possible y
    per_token, _ = opd.opd_surrogate_BT(logp, old, adv, epsilon=0.2)
    (old.exp() * per_token).sum().backward()  # expectation over y ~ pi_old, probabilities held fixed
    expected = torch.autograd.grad(reverse_kl(theta[None], teacher[None]).sum(), theta)[0]
    assert torch.allclose(theta.grad, expected, atol=1e-10)


def test_surrogate_clips_like_ppo():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = opd.opd_surrogate_BT(logp, old, adv, epsilon=0.2)
    assert torch.allclose(loss, torch.tensor([-1.2, -0.5, 1.5, 0.8]))
    assert clipped.tolist() == [True, False, False, True]


def test_global_weights_single_process_equal_the_aggregation():
    class _Acc:  # a one-process stand-in for the Accelerator
        num_processes, device = 1, "cpu"

        @staticmethod
        def reduce(x, op):
            return x

    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]).float()
    for mode in ("seq_mean_token_mean", "token_mean"):
        assert torch.allclose(opd.global_weights_BT(_Acc, mask, mode), aggregation_weights(mask, mode))
    values = torch.arange(12.0).reshape(3, 4)
    assert (opd.global_weights_BT(_Acc, mask, "seq_mean_token_mean") * values).sum() == pytest.approx((1 + 2 + 0) / 3 / 2 + 4 / 2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny random student and teacher folders (pretrained format + tokenizer) and a small toy world."""
    root = tmp_path_factory.mktemp("opd")
    tok = load_toy_tokenizer()
    for name, config, seed in (("student", "student", 0), ("teacher", "student", 1)):
        load_model(str(toy_config_path(config)), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = build_toy_world(root / "toy", n_train=64, n_val=8, n_test=8, max_steps=2)
    return {"root": root, "student": root / "student", "teacher": root / "teacher", **data}


SAVE_ALL = {"save_every": 1, "keep_last": 0}  # a checkpoint every step, none deleted


@pytest.fixture(scope="module")
def two_steps(world, tmp_path_factory):
    """One 2-step run saving every step, shared: its folders reload with plain transformers, and the exact resume
    continues a copy of it. Tests only read it."""
    run_dir = tmp_path_factory.mktemp("opd_two_steps") / "run"
    run([sys.executable, "methods/opd.py", *opd_args(world, run_dir, **SAVE_ALL)])
    return run_dir


def opd_args(world, run_dir, **overrides):
    args = {"run_dir": run_dir, "model_name_or_path": world["student"], "teacher_name_or_path": world["teacher"],
            "train_data": world["train"], "val_data": world["val"], "per_device_prompts": 2, "num_generations": 2,
            "max_completion_length": 12, "max_steps": 2, "eval_every": 0, "eval_samples": 4, "save_every": 0,
            "learning_rate": 1e-3, "rep_window_chars": 50, "rep_threshold": 3.0}
    args.update(overrides)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


REQUIRED = ["rollout/len_mean", "rollout/len_max", "rollout/truncated_frac", "rollout/repetition_frac", "rollout/eos_frac",
            "opd/adv_mean", "opd/teacher_logp", "opd/student_logp", "opd/student_entropy", "opd/teacher_eos_logp",
            "opd/student_eos_logp", "rollout/repeat_token_frac", "opd/adv_repeat_tokens", "opd/adv_other_tokens",
            "train/loss", "train/grad_norm", "perf/step_s", "perf/rollout_s", "perf/teacher_s", "perf/update_s",
            "perf/tokens_per_s", "alarm/truncation"]


def test_smoke_accelerate_launch(world, tmp_path):
    run_dir = tmp_path / "run"
    run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "methods/opd.py",
         *opd_args(world, run_dir, eval_every=1)])
    rows = [m for m in metrics(run_dir) if "train/loss" in m]
    assert len(rows) == 2
    for key in REQUIRED:
        assert key in rows[0], key
    for key in ("train/loss", "opd/adv_mean", "opd/teacher_logp", "opd/student_logp", "perf/step_s"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    assert any("eval/val/acc" in m for m in metrics(run_dir))
    before, after = load_file(str(world["student"] / "model.safetensors")), load_file(str(run_dir / "final" / "model.safetensors"))
    for k in after:
        assert not torch.equal(before[k], after[k]), f"{k} did not change"


def test_in_process_teacher_frozen_and_full_kl(world, tmp_path, monkeypatch):
    loaded = []

    def recording_load_model(*a, **kw):
        m = load_model(*a, **kw)
        loaded.append(m)
        return m

    def recording_load_frozen(*a, **kw):
        from common.models import load_frozen

        m = load_frozen(*a, **kw)
        loaded.append(m)
        return m

    monkeypatch.setattr(opd, "load_model", recording_load_model)
    monkeypatch.setattr(opd, "load_frozen", recording_load_frozen)
    from common.cli import parse

    opd.main(parse(opd.Args, opd_args(world, tmp_path / "run", loss_type="full_kl", resume_from="none")))
    teacher = loaded[1]
    saved = load_file(str(world["teacher"] / "model.safetensors"))
    for name, p in teacher.named_parameters():
        if name in saved:
            assert torch.equal(p.detach(), saved[name]), f"teacher parameter {name} changed"
        assert not p.requires_grad
    rows = [m for m in metrics(tmp_path / "run") if "train/loss" in m]
    assert all(r["train/loss"] > 0 for r in rows)


@pytest.mark.parametrize("loss_type", ["sampled", "full_kl"])
def test_student_equal_to_teacher_gives_zero_loss(world, tmp_path, loss_type):
    run([sys.executable, "methods/opd.py", *opd_args(world, tmp_path / "run", teacher_name_or_path=world["student"], loss_type=loss_type,
                                                      max_steps=1)])
    row = [m for m in metrics(tmp_path / "run") if "train/loss" in m][0]
    assert abs(row["train/loss"]) < 1e-6 and abs(row["opd/adv_mean"]) < 1e-5


def test_incompatible_teacher_stops_before_step_one(world, tmp_path):
    bad = tmp_path / "bad_teacher"
    load_model(str(toy_config_path("student")), seed=3).save_pretrained(bad)
    tok = load_toy_tokenizer()
    tok.add_tokens(["<|zz|>"])
    tok.chat_template = "{{ messages[0]['content'] }}"
    tok.save_pretrained(bad)
    proc = run([sys.executable, "methods/opd.py", *opd_args(world, tmp_path / "run", teacher_name_or_path=bad)], check=False)
    assert proc.returncode != 0
    # an extra token the teacher's embedding cannot score: refused at start-up, before anything is trained
    assert "incompatible" in proc.stderr and "embedding" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_teacher_with_its_own_chat_template_trains(world, tmp_path):
    """Same vocabulary, another chat template: the teacher scores the student's completions after the prompt
    rendered in ITS template (the paper's R1-Distill pair; tests/test_real_tokenizers.py covers the real one)."""
    other = tmp_path / "templated_teacher"
    load_model(str(toy_config_path("student")), seed=3).save_pretrained(other)
    tok = load_toy_tokenizer()
    tok.chat_template = "<|im_start|>user: {{ messages[0]['content'] }}<|im_end|>assistant: "
    tok.save_pretrained(other)
    proc = run([sys.executable, "methods/opd.py", *opd_args(world, tmp_path / "run", teacher_name_or_path=other)])
    assert "teacher scores with its own chat template" in proc.stdout
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_exact_resume(world, tmp_path, two_steps):
    """4 steps in one go == 2 steps, stop, resume, 2 more (both saving every step): same parameters and losses."""
    a, b = tmp_path / "a", tmp_path / "b"
    run([sys.executable, "methods/opd.py", *opd_args(world, a, max_steps=4, **SAVE_ALL)])
    shutil.copytree(two_steps, b)  # the 2-step run (opd_args(world, b, max_steps=2, **SAVE_ALL)), continued in a copy
    proc = run([sys.executable, "methods/opd.py", *opd_args(world, b, max_steps=4, **SAVE_ALL)])
    assert "resumed from" in proc.stdout
    pa, pb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    la = [m["train/loss"] for m in metrics(a) if "train/loss" in m]
    lb = [m["train/loss"] for m in metrics(b) if "train/loss" in m]
    assert la == lb


def test_two_processes_gloo(world, tmp_path):
    """2 DDP ranks; their checkpoints are saved under the plain model's names (no `module.`), load with plain
    transformers, and resume on 2 ranks again."""
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
              "--mixed_precision", "no", "--dynamo_backend", "no", "methods/opd.py"]
    proc = run([*launch, *opd_args(world, tmp_path / "run", save_every=1)], env=env)
    assert "2 process(es)" in proc.stdout and "replicas in sync across 2 ranks" in proc.stdout
    assert assert_plain_reload(tmp_path / "run") == ["final", "step_00000001", "step_00000002"]
    proc = run([*launch, *opd_args(world, tmp_path / "run", max_steps=3)], env=env)
    assert "resumed from" in proc.stdout and "replicas in sync across 2 ranks" in proc.stdout


def test_final_and_every_checkpoint_load_with_plain_transformers(two_steps):
    assert assert_plain_reload(two_steps) == ["final", "step_00000001", "step_00000002"]
