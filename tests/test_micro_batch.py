"""Micro-batching under a token budget (common/microbatch.py): scoring forwards equal one forward row for row, no
forward sees more rows than the budget allows, and the student's accumulated gradient of a minibatch equals the
one-forward gradient (fp32, 1e-6) for every OPD / Stable-OPD loss type, with LoRA and under 2 gloo ranks."""

import subprocess
import sys
import textwrap

import pytest
import torch

from common.logprobs import completion_forward, completion_logps
from common.microbatch import micro_batches, rows_per_micro, scored_forward
from common.models import load_model
from common.toy import build_toy_world, load_toy_tokenizer, toy_config_path
from tests.method_runs import ENV, ROOT


class _Acc:
    num_processes = 1


def test_rows_per_micro_holds_at_least_one_row_and_respects_the_budget():
    assert rows_per_micro(100, 0, 64) == 64  # 0: one pass
    assert rows_per_micro(100, 1, 64) == 1  # a row wider than the budget still runs, alone
    assert rows_per_micro(100, 450, 64) == 4
    assert rows_per_micro(100, 10**9, 64) == 64
    out = list(micro_batches(_Acc, torch.arange(10).chunk(2), group_tokens=30, budget=70))
    assert [(len(part), last) for _, part, last in out] == [(2, False), (2, False), (1, True)] * 2
    assert torch.equal(torch.cat([mb[part] for mb, part, _ in out]), torch.arange(10))


def _batch(B=5, prompt=4, T=6, vocab=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, prompt + T), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # left padding on one prompt
    attn[1, -2:] = 0  # a short completion
    return ids, attn, T


@pytest.mark.parametrize("kw", [{"hidden": True, "eos_id": 2}, {"logps": False, "hidden": True}, {"entropy": True}])
def test_scored_forward_equals_one_forward_and_never_exceeds_the_budget(kw):
    model = load_model(str(toy_config_path("student")), seed=0).eval()
    ids, attn, T = _batch()
    seen = []

    def spy(m, i, a, n, *args, **k):
        seen.append(len(i))
        return completion_forward(m, i, a, n, *args, **k)
    with torch.no_grad():
        one = completion_forward(model, ids, attn, T, **kw)
        for budget in (1, ids.shape[1] * 2, ids.shape[1] * 2 + 3):
            seen.clear()
            parts = scored_forward(model, ids, attn, T, micro_batch_tokens=budget, forward=spy, **kw)
            assert max(seen) == rows_per_micro(ids.shape[1], budget, len(ids)) and sum(seen) == len(ids)
            assert parts.keys() == one.keys()
            for k in one:
                # fp32 rounding only: a GEMM's reduction order depends on its row count (hidden states: ~10 ulps)
                tol = 1e-5 if k == "hidden" else 1e-6
                torch.testing.assert_close(parts[k], one[k], rtol=tol, atol=tol)
        rows = torch.tensor([True, False, True, True, False])  # the reference's rows= (only these run)
        torch.testing.assert_close(scored_forward(model, ids, attn, T, micro_batch_tokens=1, rows=rows)["logps"],
                                   completion_forward(model, ids, attn, T, rows=rows)["logps"], rtol=1e-6, atol=1e-6)
        lp = scored_forward(model, ids, attn, T, micro_batch_tokens=1, forward=completion_logps)["logps"]
        torch.testing.assert_close(lp, completion_logps(model, ids, attn, T)["logps"], rtol=1e-6, atol=1e-6)


def test_recomputed_sampler_logps_run_in_blocks_under_the_budget(monkeypatch):
    """--sampler_logps recompute (and vLLM's logps_source trainer): the teacher-forced pass over the rollout obeys the
    budget and equals the one-pass log-probs."""
    import common.rollout as rollout
    model = load_model(str(toy_config_path("student")), seed=0).eval()
    tok = load_toy_tokenizer()
    prompts = [tok(p)["input_ids"] for p in ("3+4=", "12-5=", "7*6=")]
    seen = []

    def spy(m, i, a, n, *args, **k):
        seen.append(len(i))
        return completion_logps(m, i, a, n, *args, **k)
    monkeypatch.setattr(rollout, "completion_logps", spy)
    kw = dict(max_new_tokens=6, num_samples=2, seed=3, return_logps=True, logps_from="recompute")
    one = rollout.generate(model, tok, prompts, **kw)
    assert seen == [6]
    seen.clear()
    width = one.prompt_ids.shape[1] + one.completion_ids.shape[1]
    micro = rollout.generate(model, tok, prompts, **kw, micro_batch_tokens=2 * width)
    assert seen == [2, 2, 2]
    torch.testing.assert_close(micro.sampler_logps, one.sampler_logps, rtol=1e-6, atol=1e-6)
    assert torch.equal(micro.completion_ids, one.completion_ids)


# ------------------------------------------------------------------------- the update: accumulated == one forward
DRIVER = textwrap.dedent("""
    import sys, torch, importlib
    sys.path.insert(0, {root!r})
    from common.cli import parse
    method, out = sys.argv[1], sys.argv[2]
    mod = importlib.import_module("methods." + method)
    real, grads = mod.optimizer_step, []
    def spy(accelerator, model, *a):  # the accumulated gradient each optimizer step sees
        grads.append({{n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}})
        return real(accelerator, model, *a)
    mod.optimizer_step = spy
    acc = mod.main(parse(mod.Args, sys.argv[3:]))
    import os
    torch.save(grads, out + "." + os.environ.get("RANK", "0"))
""")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    tok = load_toy_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        load_model(str(toy_config_path("student")), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = build_toy_world(root / "toy", n_train=64, n_val=8, n_test=8, max_steps=2)
    (root / "driver.py").write_text(DRIVER.format(root=str(ROOT)))
    return {"root": root, "student": root / "student", "teacher": root / "teacher", **data}


def _grads(world, tmp_path, method, budget, overrides, ranks=1):
    if overrides.get("rewards") == "REWARD":
        (tmp_path / "reward_hook.py").write_text(REWARD_HOOK)
        overrides = {**overrides, "rewards": f"{tmp_path / 'reward_hook.py'}:by_text"}
    args = {"run_dir": tmp_path / f"run{budget}", "model_name_or_path": world["student"],
            "teacher_name_or_path": world["teacher"],
            "train_data": world["train"], "val_data": "", "per_device_prompts": 4, "num_generations": 2,
            "max_completion_length": 24, "max_steps": 1, "eval_every": 0, "save_every": 0, "resume_from": "none",
            "max_grad_norm": 1e9, "micro_batch_tokens": budget, **overrides}
    if method == "grpo":
        del args["teacher_name_or_path"]
    argv = [x for k, v in args.items() for x in (f"--{k}", str(v))]
    out = str(tmp_path / f"grads{budget}")
    launch = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(ranks),
        "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run([*launch, str(world["root"] / "driver.py"), method, out, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recomputed" not in proc.stderr, proc.stderr[-3000:]  # the fused lm_head gradient stayed the loss's
    return [torch.load(f"{out}.{r}") for r in range(ranks)]


def _assert_same(a, b):
    assert len(a) == len(b) and len(a) >= 1
    for ga, gb in zip(a, b):
        assert ga.keys() == gb.keys() and len(ga)
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=0, atol=1e-6, msg=n)
        assert any(float(g.abs().max()) > 1e-4 for g in ga.values())  # a real gradient, not zeros


CASES = [
    ("opd", {}),  # sampled, seq_mean_token_mean (the paper)
    # seed 4: 1 of the 8 random-init rollouts stops before the cap (the others are masked; all masked = zero gradient)
    ("opd", {"aggregation": "token_mean", "mask_truncated": "true", "seed": 4}),
    ("opd", {"loss_type": "full_kl"}),
    ("opd", {"use_peft": "true", "num_minibatches": 2, "ppo_epochs": 2}),  # LoRA; clipped ratios, two minibatches
    ("stable_opd", {}),  # NLL mixture + exact reference KL (both terms)
    ("stable_opd", {"mix_loss": "forward_kl", "ref_kl_type": "k3", "aggregation": "token_mean"}),
    ("stable_opd", {"ref_kl_type": "k3"}),  # k3 in the fused head's per-position objective
    ("stable_opd", {"mix_loss": "reverse_kl", "ref_kl_on_golden": "true", "loss_type": "full_kl"}),
    ("stable_opd", {"use_peft": "true", "num_minibatches": 2}),
    # GRPO: a reward that varies within groups (random-init rollouts are all wrong), zero-std groups dropped
    ("grpo", {"rewards": "REWARD"}),
    ("grpo", {"rewards": "REWARD", "beta": 0.1, "aggregation": "seq_mean_token_mean", "num_minibatches": 2,
              "ppo_epochs": 2}),  # the reference's k3, stored pi_old, two minibatches
    ("grpo", {"rewards": "REWARD", "use_peft": "true", "beta": 0.1}),  # LoRA: the reference is the adapter-off policy
]

REWARD_HOOK = """
import zlib
def by_text(completions, answers, finish_reasons, token_counts, **kwargs):
    return [float(zlib.crc32(c.encode()) % 3) for c in completions]  # varies within a group, deterministic
"""


@pytest.mark.parametrize("method,overrides", CASES)
def test_accumulated_gradient_equals_one_forward(world, tmp_path, method, overrides):
    one = _grads(world, tmp_path, method, 0, overrides)
    micro = _grads(world, tmp_path, method, 1, overrides)  # budget 1 token: one prompt group per micro-batch
    _assert_same(one[0], micro[0])


def test_accumulated_gradient_two_gloo_ranks(world, tmp_path):
    one = _grads(world, tmp_path, "stable_opd", 0, {}, ranks=2)
    micro = _grads(world, tmp_path, "stable_opd", 1, {}, ranks=2)
    for a, b in zip(one, micro):
        _assert_same(a, b)


@pytest.mark.parametrize("method", ["opd", "stable_opd", "grpo"])
def test_negative_budget_is_a_clear_error(method, capsys):
    import importlib

    from common.cli import parse
    mod = importlib.import_module(f"methods.{method}")
    with pytest.raises(SystemExit) as e:
        parse(mod.Args, ["--micro_batch_tokens", "-1"])
    assert e.value.code == 2 and "micro_batch_tokens" in capsys.readouterr().err
    assert parse(mod.Args, ["--micro_batch_tokens", "4096"]).micro_batch_tokens == 4096
