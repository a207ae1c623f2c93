"""LoRA students (--use_peft, common/lora.py).

Units: the merged weights equal peft's own `merge_and_unload` (and the merged plain model computes the peft
model's logits); the adapter-disabled reference computes the untouched base's log-probs, costs no gradient
and leaves the student's graph intact; flag validation. End to end on the toy world: every method trains an
adapter, its checkpoints hold the adapter only, final/ is the merged model (plain AutoModelForCausalLM) and
final_adapter/ reloads with peft to the same logits; exact resume with both Stable-OPD terms on; a checkpoint
of another LoRA setting is refused by name.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common.logprobs import completion_logps
from common.lora import adapter_disabled_reference, apply_lora, merged_parameters, target_modules
from common.models import load_model
from common.toy import build_toy_world, load_toy_tokenizer, toy_config_path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def lora_args(**kw):
    base = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_modules": "all-linear"}
    return SimpleNamespace(**{**base, **kw})


def lora_student(seed: int = 0, **kw):
    """A toy student with LoRA adapters whose B matrices are random (peft starts them at 0: no update yet)."""
    model = apply_lora(load_model(str(toy_config_path("student")), seed=seed), lora_args(**kw))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def batch(vocab: int = 400, B: int = 3, P: int = 5, T: int = 7):
    ids = torch.randint(1, vocab, (B, P + T), generator=torch.Generator().manual_seed(3))
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # a left-padded prompt
    return ids, attn, T


def test_merged_parameters_equal_peft_merge_and_unload():
    model = lora_student()
    merged = dict(merged_parameters(model))
    reference = copy.deepcopy(model).merge_and_unload()  # peft's own merge (modifies the copy)
    want = dict(reference.named_parameters())
    assert set(merged) == set(want) and len(merged) == len(want)
    assert max(float((merged[k] - want[k]).abs().max()) for k in want) < 1e-6
    ids, attn, _ = batch()
    with torch.no_grad():
        assert torch.allclose(reference(input_ids=ids, attention_mask=attn).logits,
                              model(input_ids=ids, attention_mask=attn).logits, atol=1e-5)


def test_only_targeted_layers_change_and_names_are_the_plain_models():
    model = lora_student(lora_target_modules="q_proj,v_proj")
    plain = load_model(str(toy_config_path("student")), seed=0)
    merged = dict(merged_parameters(model))
    assert set(merged) == {k for k, _ in plain.named_parameters()}
    changed = {k for k, p in plain.named_parameters() if not torch.equal(merged[k], p)}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_adapter_disabled_reference_is_the_base_and_leaves_the_student_graph():
    base = load_model(str(toy_config_path("student")), seed=0, trainable=False)
    model = lora_student()
    ids, attn, T = batch()
    ref = adapter_disabled_reference(model)
    assert list(ref.parameters()) == []  # no copy of the weights
    want = completion_logps(base, ids, attn, T)["logps"]
    got = completion_logps(ref, ids, attn, T)["logps"]
    assert torch.allclose(got, want, atol=1e-6) and not got.requires_grad

    def grads(with_ref: bool):
        model.zero_grad()
        student = completion_logps(model, ids, attn, T)["logps"]
        if with_ref:
            completion_logps(ref, ids, attn, T)  # between the student's forward and its backward, as in Stable-OPD
        student.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, student.detach()

    (g0, s0), (g1, _) = grads(False), grads(True)
    assert (s0 - want).abs().max() > 1e-3  # the student is not the base
    assert all(torch.equal(g0[n], g1[n]) for n in g0) and any(g.abs().sum() > 0 for g in g0.values())
    assert all("lora_" in n for n in g0)  # only the adapters train


def test_target_module_flags_are_checked():
    assert target_modules("all-linear") == "all-linear" and target_modules(" q_proj, v_proj ") == ["q_proj", "v_proj"]
    for bad in ("lm_head", "q_proj,embed_tokens", " , "):
        with pytest.raises(ValueError, match="--lora_target_modules"):
            target_modules(bad)
    with pytest.raises(ValueError, match="--lora_target_modules 'no_such_layer'"):
        apply_lora(load_model(str(toy_config_path("student")), seed=0), lora_args(lora_target_modules="no_such_layer"))


# ---------------------------------------------------------------- end to end on the toy world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tok = load_toy_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        load_model(str(toy_config_path("student")), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = build_toy_world(root / "toy", n_train=64, n_val=8, n_test=8, max_steps=2)
    # GRPO's reward: the completion's length in characters, which differs within a group whether or not any
    # completion stops (a token-count reward is constant when none of a group hits EOS in 12 tokens)
    (root / "reward_hook.py").write_text("def text_length(completions, answers, finish_reasons, token_counts, **kw):\n"
                                         "    return [len(c) / 50 for c in completions]\n")
    return {"root": root, "student": root / "student", "teacher": root / "teacher", **data}


COMMON = {"per_device_prompts": 2, "max_steps": 2, "eval_every": 0, "eval_samples": 4, "save_every": 1, "learning_rate": 1e-2,
          "use_peft": "true", "lora_r": 4, "lora_alpha": 8}
RL = {"num_generations": 2, "max_completion_length": 12, "rep_window_chars": 50, "rep_threshold": 3.0}
METHODS = {
    "sft": {},
    "opd": {**RL, "loss_type": "full_kl"},
    "stable_opd": {**RL, "mix_coef": 0.5, "ref_kl_coef": 0.5, "golden_overflow": "truncate"},
    "grpo": {**RL, "beta": 0.5, "num_generations": 4},  # a text-length reward (method_cmd): groups differ from step 1
}


def method_cmd(world, method: str, run_dir: Path, **overrides) -> list[str]:
    args = {"run_dir": run_dir, "model_name_or_path": world["student"], "train_data": world["train"], "val_data": world["val"],
            **COMMON, **METHODS[method], **overrides}
    if method in ("opd", "stable_opd"):
        args["teacher_name_or_path"] = world["teacher"]
    if method == "grpo":
        args["rewards"] = f"{world['root'] / 'reward_hook.py'}:text_length"
    if method == "sft":
        args["per_device_batch_size"] = args.pop("per_device_prompts")
    return [sys.executable, f"methods/{method}.py", *[x for k, v in args.items() for x in (f"--{k}", str(v))]]


def run(cmd, check=True):
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_exported(world, run_dir: Path) -> None:
    """Checkpoints hold the adapter only; final/ is the merged model (plain transformers), equal to the base +
    final_adapter/ reloaded with peft, trained away from the start, with the frozen base untouched."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpts = list((run_dir / "checkpoints").glob("step_*"))
    assert ckpts
    for ckpt in ckpts:
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys[:5]
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    start = AutoModelForCausalLM.from_pretrained(world["student"])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["student"]), run_dir / "final_adapter")
    ids, attn, _ = batch()
    with torch.no_grad():
        a = merged(input_ids=ids, attention_mask=attn).logits
        b = reloaded(input_ids=ids, attention_mask=attn).logits
        c = start(input_ids=ids, attention_mask=attn).logits
    assert torch.allclose(a, b, atol=1e-5) and (a - c).abs().max() > 1e-4
    emb = dict(merged.named_parameters())["model.embed_tokens.weight"]
    assert torch.equal(emb, dict(start.named_parameters())["model.embed_tokens.weight"])


@pytest.mark.parametrize("method", ["sft", "opd", "grpo"])
def test_each_method_trains_an_adapter_and_exports_the_merged_model(world, tmp_path, method):
    run_dir = tmp_path / method
    run(method_cmd(world, method, run_dir))
    check_exported(world, run_dir)
    if method == "opd":  # the same run folder resumed with adapters on other modules: refused, naming why
        proc = run(method_cmd(world, method, run_dir, max_steps=3, lora_target_modules="q_proj,v_proj", force_resume="true"),
                   check=False)
        assert proc.returncode != 0 and "does not fit this run's trainable parameters" in proc.stdout + proc.stderr


def test_stable_opd_with_lora_resumes_exactly(world, tmp_path):
    """Both terms on, the reference = the adapter-disabled start (its KL is 0 at step 1, then grows)."""
    a, b = tmp_path / "a", tmp_path / "b"
    run(method_cmd(world, "stable_opd", a, max_steps=4))
    run(method_cmd(world, "stable_opd", b, max_steps=2))
    proc = run(method_cmd(world, "stable_opd", b, max_steps=4))
    assert "resumed from" in proc.stdout
    check_exported(world, a)
    pa, pb = (load_file(str(d / "final_adapter" / "adapter_model.safetensors")) for d in (a, b))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    keys = ("train/loss", "ref/kl", "mix/nll")
    la = [[m[k] for k in keys] for m in metrics(a) if "train/loss" in m]
    assert la == [[m[k] for k in keys] for m in metrics(b) if "train/loss" in m]
    assert la[0][1] == pytest.approx(0.0, abs=1e-7) and la[-1][1] > 0 and la[-1][2] > 0
