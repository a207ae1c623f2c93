"""The memory / time model (common/plan.py) against bytes computed by hand for small shapes, parameter counts
against real transformers models, the chosen micro-batch budget, and the command's refusal (exit 2)."""

import dataclasses

import pytest

from common import plan as P

TINY = P.Shape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=10, tied=True)
ARGS = {"max_prompt_length": 6, "max_completion_length": 10, "per_device_prompts": 2, "num_generations": 2,
        "dtype": "float32", "bf16": False, "gradient_checkpointing": True, "optim": "adamw", "loss_type": "sampled",
        "rollout_backend": "hf", "micro_batch_tokens": 0, "ppo_epochs": 1, "num_minibatches": 1, "mix_coef": 0.0,
        "ref_kl_coef": 0.0}


def test_shape_counts_by_hand():
    # per layer: q, o 8x8 each; k, v 8x4 each; q/k/v biases 8 + 4 + 4; gate / up / down 8x16 each; 2 norms of 8
    layer = 2 * 64 + 2 * 32 + 16 + 3 * 128 + 16
    assert TINY.layer_params == layer == 608
    assert TINY.params == 2 * layer + 8 + 10 * 8  # + final norm + the tied embedding
    assert dataclasses.replace(TINY, tied=False).params == TINY.params + 80
    assert TINY.lora_params(2) == 2 * 2 * ((8 + 8) * 2 + (8 + 4) * 2 + (8 + 16) * 3)


@pytest.mark.parametrize("tied", [True, False])
def test_shape_counts_match_transformers(tied):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(cfg)
    assert P.shape_of(cfg).params == sum(p.numel() for p in model.parameters())
    assert P.shape_of(cfg.to_dict()).params == P.shape_of(cfg).params


def test_known_configs_are_the_published_sizes():
    assert round(P.shape_of("Qwen/Qwen2.5-Math-1.5B").params / 1e9, 2) == 1.54
    assert round(P.shape_of("Qwen/Qwen2.5-Math-7B").params / 1e9, 2) == 7.62
    assert P.shape_of("runs/paper/sft_7b/final") == P.shape_of("Qwen/Qwen2.5-Math-7B", "runs/paper/sft_7b/final")


def test_student_state_by_hand():
    n = TINY.params
    st = P._student_state(P._Ctx(ARGS, "opd", P.HARDWARE["cpu"], 1, "ddp", TINY, TINY, None, 0))
    assert (st["weights"], st["grads"], st["optimizer"], st["ddp_buckets"]) == (4 * n, 4 * n, 8 * n, 0)
    st = P._student_state(P._Ctx({**ARGS, "optim": "adamw8bit"}, "opd", P.HARDWARE["cpu"], 4, "ddp", TINY, None,
                                 None, 0))
    assert (st["optimizer"], st["ddp_buckets"]) == (2 * n, 4 * n)
    st = P._student_state(P._Ctx(ARGS, "opd", P.HARDWARE["cpu"], 4, "fsdp", TINY, None, None, 0))
    assert (st["weights"], st["grads"], st["optimizer"]) == (n + 4 * TINY.layer_params, n, 2 * n)
    st = P._student_state(P._Ctx({**ARGS, "use_peft": True, "lora_r": 2}, "opd", P.HARDWARE["cpu"], 1, "ddp", TINY,
                                 None, None, 0))
    assert (st["weights"], st["grads"]) == (4 * n + 4 * TINY.lora_params(2), 4 * TINY.lora_params(2))


def test_frozen_weights_by_dtype_and_quantization():
    s = P.shape_of("Qwen/Qwen2.5-Math-7B")
    assert P._frozen_bytes(s, "bfloat16", "none") == 2 * s.params
    rest = s.params - s.linear_params  # embeddings, lm_head, norms, biases stay in the dtype
    assert P._frozen_bytes(s, "bfloat16", "8bit") == int(1.02 * s.linear_params + 2 * rest)


def test_rl_phases_by_hand():
    """OPD on the CPU, hf rollouts, one pass: every part of the rollout and update phases computed here."""
    p = P.plan(ARGS, "opd", TINY, TINY, gpu="cpu", choose=False)
    ph = {x.name: x for x in p.phases}
    n, B, S, T, H, L = TINY.params, 4, 16, 10, 8, 2
    assert ph["rollout"].parts["kv cache"] == B * S * 2 * L * 4 * 4  # K and V of kv_dim 4, fp32
    assert ph["rollout"].parts["student weights"] == 4 * n
    assert ph["rollout"].parts["optimizer state"] == 8 * n
    assert "grads" not in ph["rollout"].parts  # zero_grad(set_to_none=True) before the next rollout
    layer_act = 4 * 6 * H + 4 * (9 * H + 2 * 4 + 4 * 16)
    up = ph["update"].parts
    assert up["activations"] == B * S * (L * 4 * H + layer_act)  # checkpointed inputs + one layer recomputed
    assert up["grads"] == 4 * n and up["head weight-grad buffer"] == 10 * H * 4
    assert up["head buffers"] == B * T * 10 * 4 * 2  # two [positions, V] fp32 buffers (positions < chunk)
    assert up["attention mask"] == B * S * S * 5  # bool mask + its fp32 copy in the CPU kernel
    assert ph["teacher"].parts["teacher"] == 4 * n
    assert p.peak == max(x.peak for x in p.phases) and p.fits


def test_micro_batch_budget_bounds_the_rows():
    p = P.plan({**ARGS, "micro_batch_tokens": 16}, "opd", TINY, TINY, gpu="cpu")
    one = P.plan({**ARGS, "micro_batch_tokens": 0}, "opd", TINY, TINY, gpu="cpu", choose=False)
    acts = lambda q: {x.name: x for x in q.phases}["update"].parts["activations"]  # noqa: E731
    assert acts(p) * 2 == acts(one)  # one prompt group (2 rows) of the 2 per micro-batch


def test_choose_micro_batch_tokens_is_the_largest_fitting_budget():
    args = {**ARGS, "per_device_prompts": 8, "max_completion_length": 2000, "gradient_checkpointing": False}
    s = P.Shape(hidden=256, intermediate=1024, layers=4, heads=4, kv_heads=2, vocab=1000, tied=True)
    small = dataclasses.replace(P.HARDWARE["cpu"], memory=2 * P.GiB)
    budget = P.choose_micro_batch_tokens(args, "opd", s, s, gpu=small)
    S = 6 + 2000
    assert budget % S == 0
    peak = lambda b: P.plan({**args, "micro_batch_tokens": b}, "opd", s, s, gpu=small).peak  # noqa: E731
    fits = lambda b: peak(b) <= 0.9 * small.memory  # noqa: E731
    assert fits(budget) and not fits(budget + 2 * S)  # the next whole prompt group does not fit
    assert P.plan(args, "opd", s, s, gpu=small).micro_batch_tokens == budget


def test_refusal_names_the_phase_and_the_flags():
    big = {**ARGS, "per_device_prompts": 16, "num_generations": 4, "max_prompt_length": 1024,
           "max_completion_length": 8192, "micro_batch_tokens": 0}
    p = P.plan(big, "opd", "Qwen/Qwen2.5-Math-7B", "Qwen/Qwen2.5-Math-7B", gpu="h100-80gb", choose=False)
    assert not p.fits
    msg = p.refusal()
    assert f"phase '{p.peak_phase.name}'" in msg and "--micro_batch_tokens" in msg
    assert P.plan({**big, "per_device_prompts": 1, "num_generations": 1, "max_completion_length": 64}, "opd",
                  TINY, TINY, gpu="h100-80gb").refusal() is None


def test_command_exit_codes(capsys):
    assert P.main(["--config", "recipes/paper/stable_opd_1.5b.yaml", "--gpu", "h200-141gb"]) == 0
    out = capsys.readouterr().out
    assert "stable_opd on 4 x h200-141gb (ddp)" in out and "fits" in out
    assert P.main(["--config", "recipes/paper/opd_7b.yaml", "--gpu", "h100-80gb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m common.plan: error: predicted peak")
    assert P.main(["--config", "recipes/paper/eval_six.yaml"]) == 2
    assert "not a training method" in capsys.readouterr().err


@pytest.mark.parametrize("method", P.METHODS)
def test_plan_for_args_reads_every_method_args(method):
    args = P.method_args(method, {"model_name_or_path": "assets/toy/student_config.json",
                                  **({"teacher_name_or_path": "assets/toy/teacher_config.json"}
                                     if method in ("opd", "stable_opd") else {})})
    p = P.plan_for_args(args, method, gpu="cpu", num_processes=1, strategy="ddp")
    assert p.fits and p.peak > P.HARDWARE["cpu"].reserved and p.step_seconds > 0
    assert "memory / time plan" in p.summary()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["d1", "d2"])
def test_memory_model_matches_the_os_peak_rss(name, tmp_path_factory):
    """The plan's peak ("cpu" entry) within 15% of the OS's peak RSS of a real 2-step run (scripts/bench_plan.py)."""
    from scripts import bench_plan

    cache = tmp_path_factory.getbasetemp() / "bench_plan"
    measured = bench_plan.measure(name, cache, steps=2)["peak_gib"]
    predicted = bench_plan.predict(name, cache, steps=2).peak / P.GiB
    assert abs(predicted / measured - 1) <= 0.15, (name, predicted, measured)
