"""common/models.py, common/logprobs.py, common/rollout.py, common/tracking.py on tiny models."""

import json
import time

import pytest
import torch

from common.logprobs import completion_forward, completion_hidden, completion_logps, entropy_from_logits, selective_log_softmax
from common.models import ModelLoadError, load_model, load_tokenizer
from common.data import left_pad
from common.rollout import completion_mask_and_reason, generate, sequence_logps
from common.toy import load_toy_tokenizer, toy_config_path


def test_selective_log_softmax_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    index = torch.randint(0, 11, (3, 5))
    ref = torch.log_softmax(logits, -1).gather(-1, index[..., None]).squeeze(-1)
    for chunk in (1, 4, 100):
        assert torch.allclose(selective_log_softmax(logits, index, chunk).double(), ref, atol=1e-6)
    bf = selective_log_softmax(logits.bfloat16(), index)
    assert bf.dtype == torch.float32 and torch.allclose(bf.double(), ref, atol=0.1)
    # gradients flow to the logits
    x = logits.clone().float().requires_grad_()
    selective_log_softmax(x, index, 2).sum().backward()
    x2 = logits.clone().float().requires_grad_()
    torch.log_softmax(x2, -1).gather(-1, index[..., None]).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)


def test_entropy_matches_reference():
    torch.manual_seed(1)
    logits = torch.randn(2, 7, 9)
    p = torch.softmax(logits.double(), -1)
    ref = -(p * p.log()).sum(-1)
    assert torch.allclose(entropy_from_logits(logits, 3).double(), ref, atol=1e-5)
    uniform = torch.zeros(4, 9)
    assert torch.allclose(entropy_from_logits(uniform), torch.full((4,), float(torch.log(torch.tensor(9.0)))))


def test_missing_model_path_fails_fast(tmp_path):
    t0 = time.time()
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "no_such_model"))
    with pytest.raises(ModelLoadError, match="not in the hub cache"):
        load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(ModelLoadError):
        load_tokenizer("./nowhere/tokenizer")
    assert time.time() - t0 < 10
    with pytest.raises(ValueError, match="only supported for frozen"):
        load_model(str(toy_config_path("student")), quantization="4bit")


def _tiny():
    tok = load_toy_tokenizer()
    model = load_model(str(toy_config_path("student")), seed=0)
    return tok, model


def test_frozen_model_and_pretrained_round_trip(tmp_path):
    tok, model = _tiny()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    frozen = load_model(str(tmp_path / "m"), trainable=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    for a, b in zip(model.parameters(), frozen.parameters()):
        assert torch.equal(a, b)
    reloaded = load_tokenizer(str(tmp_path / "m"))
    assert reloaded.padding_side == "left"
    # an exported model folder (config.json says qwen2) must tokenize exactly as the toy tokenizer
    probe = "Ann has 12 apples. 12 + 7 = 19. The answer is \\boxed{19}.<|im_end|>"
    assert reloaded(probe)["input_ids"] == tok(probe)["input_ids"]
    assert reloaded.eos_token_id == tok.eos_token_id and reloaded.pad_token_id == tok.pad_token_id
    assert reloaded.chat_template == tok.chat_template


def test_completion_mask_and_reason():
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 5, 5, 5, 5], [2, 7, 2, 7, 7]])
    mask, reasons = completion_mask_and_reason(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert reasons == ["stop", "length", "stop"]
    ids, m = left_pad([[1, 2], [3], [4, 5, 6]], 0)
    assert ids.tolist() == [[0, 1, 2], [0, 0, 3], [4, 5, 6]] and m.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]


def test_generate_shapes_seed_and_logps():
    tok, model = _tiny()
    prompts = [tok("Ann has 3 apples.")["input_ids"], tok("Ben has 12 pens. He buys 2 more.")["input_ids"]]
    out = generate(model, tok, prompts, max_new_tokens=12, num_samples=3, temperature=1.0, seed=7, return_logps=True)
    B = 6
    assert out.completion_ids.shape[0] == B and out.completion_ids.shape[1] <= 12
    assert len(out.texts) == B and len(out.finish_reason) == B
    assert set(out.finish_reason) <= {"stop", "length"}
    assert (out.prompt_ids[:3] == out.prompt_ids[0]).all()  # a prompt's samples are contiguous
    # pure function of the seed, and the global RNG is untouched
    torch.manual_seed(123)
    again = generate(model, tok, prompts, max_new_tokens=12, num_samples=3, seed=7)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(again.completion_ids, out.completion_ids) and torch.equal(after, torch.rand(1))
    # sampler log-probs: <= 0 on real tokens, 0 on padding, equal to a teacher-forced recomputation
    lp = out.sampler_logps
    assert lp.shape == out.completion_ids.shape and (lp[out.completion_mask == 1] <= 0).all()
    assert (lp[out.completion_mask == 0] == 0).all()
    assert torch.allclose(lp, sequence_logps(model, out), atol=1e-5)
    # micro-batched generation gives the same greedy result as one batch
    g1 = generate(model, tok, prompts, max_new_tokens=8, greedy=True)
    g2 = generate(model, tok, prompts, max_new_tokens=8, greedy=True, batch_size=1)
    assert g1.texts == g2.texts


def test_left_padding_does_not_change_logps():
    tok, model = _tiny()
    model.eval()
    p = tok("Ann has 3 apples.")["input_ids"]
    c = tok(" She buys 2 more.")["input_ids"]
    alone = completion_logps(model, torch.tensor([p + c]), torch.ones(1, len(p + c), dtype=torch.long), len(c))["logps"]
    ids, mask = left_pad([p + c, [5] * (len(p) + len(c) + 4)], tok.pad_token_id)
    limit = int(ids.max()) + 1  # slice off the unused top of the vocabulary (a padded embedding's rows)
    out = completion_logps(model, ids, mask, len(c), with_entropy=True, eos_id=tok.eos_token_id, vocab_limit=limit)
    assert torch.allclose(alone, completion_logps(model, ids, mask, len(c))["logps"][:1], atol=1e-5)
    # extras: entropy and EOS log-probs over the first `limit` vocabulary entries
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    logp = torch.log_softmax(logits[:, -len(c) - 1 : -1, :limit], -1)
    assert torch.allclose(out["logps"], logp.gather(-1, ids[:, -len(c):, None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(out["eos_logps"], logp[..., tok.eos_token_id], atol=1e-5)
    assert torch.allclose(out["entropy"], -(logp.exp() * logp).sum(-1), atol=1e-4)
    # the hidden states + head give the same logits as the model
    hidden, weight = completion_hidden(model, ids, mask, len(c))
    assert torch.allclose(hidden @ weight.T, logits[:, -len(c) - 1 : -1], atol=1e-4)


def test_tracking_writes_jsonl(tmp_path):
    from accelerate import Accelerator

    from common.tracking import log_metrics, log_samples, read_jsonl, tracker_names

    assert tracker_names("none") is None and tracker_names("wandb, tensorboard") == ["wandb", "tensorboard"]
    with pytest.raises(ValueError, match="unknown tracker"):
        tracker_names("mlflowx")
    acc = Accelerator(cpu=True)
    log_metrics(acc, tmp_path, {"train/loss": torch.tensor(1.5), "x": 2}, step=3)
    log_samples(acc, tmp_path, [{"completion": "hi"}], step=3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "torn')  # a crash mid-line must not break readers
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[0]["step"] == 3 and rows[0]["train/loss"] == 1.5 and len(rows) == 1
    assert json.loads((tmp_path / "samples.jsonl").read_text())["completion"] == "hi"


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_frozen_model_loads_and_runs(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = load_toy_tokenizer()
    # bitsandbytes' CPU 4-bit kernel needs layer widths divisible by its block size (the toy's 344 is not)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "m")
    q = load_model(str(tmp_path / "m"), quantization=bits, trainable=False)
    ids = torch.tensor([tok("Ann has 3 apples.")["input_ids"]])
    with torch.no_grad():
        ref, got = model(ids).logits, q(ids).logits
    assert torch.isfinite(got).all()
    assert torch.corrcoef(torch.stack([ref.flatten(), got.float().flatten()]))[0, 1] > 0.9  # close to the fp32 model


@pytest.mark.parametrize("temperature, vocab_limit, chunk", [(1.0, None, 3), (0.7, 9, 4), (1.3, None, 100)])
def test_chunked_head_logps_matches_brute_force_values_and_gradients(temperature, vocab_limit, chunk):
    """log p(target), entropy, log p(eos) and the gradients w.r.t. hidden and head weight equal the full
    [N, V] log-softmax computed by hand (float64), for any block size; the rows past vocab_limit get no gradient."""
    from common.logprobs import chunked_head_logps

    torch.manual_seed(0)
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    V = vocab_limit or 11
    targets = torch.randint(0, V, (2, 5))
    g = torch.randn(2, 5, dtype=torch.float64)
    logps, ent, eos, _ = chunked_head_logps(h, w, targets, temperature, vocab_limit, eos_id=2, chunk_size=chunk)
    (logps.double() * g).sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.log_softmax((h2 @ w2[:V].T) / temperature, -1)
    ref_logps = ref.gather(-1, targets[..., None]).squeeze(-1)
    (ref_logps * g).sum().backward()
    assert torch.allclose(logps.double(), ref_logps, atol=1e-5)
    assert torch.allclose(ent.double(), -(ref.exp() * ref).sum(-1), atol=1e-5)
    assert torch.allclose(eos.double(), ref[..., 2], atol=1e-5)
    assert torch.allclose(h.grad, h2.grad, atol=1e-5) and torch.allclose(w.grad, w2.grad, atol=1e-5)
    assert not ent.requires_grad and not eos.requires_grad


@pytest.mark.parametrize("temperature, vocab_limit, chunk, with_valid", [(1.0, None, 3, False), (0.7, 9, 4, True),
                                                                      (1.3, None, 100, False), (1.0, None, 2, True)])
def test_chunked_head_kl_shares_the_block_logits_and_matches_brute_force(temperature, vocab_limit, chunk, with_valid):
    """The fused reverse KL to another (frozen) model: values KL(p || q) at the masked positions (0 elsewhere) and the
    gradients of any sum a * log p(target) + b * KL w.r.t. hidden and head equal the full [N, V] float64 formulas
    (also when a block holds KL rows and non-KL rows); the other model gets no gradient. With `valid` (padding), the
    skipped positions give 0 in every output and no gradient."""
    from common.logprobs import chunked_head_logps

    torch.manual_seed(1)
    h = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    h_ref, w_ref = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)  # padded vocabulary
    V = vocab_limit or 11
    targets = torch.randint(0, V, (3, 5))
    mask = torch.rand(3, 5) < 0.6
    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    valid = torch.rand(3, 5) < 0.7 if with_valid else torch.ones(3, 5, dtype=torch.bool)
    logps, ent, eos, kl = chunked_head_logps(h, w, targets, temperature, vocab_limit, chunk_size=chunk, eos_id=1,
                                             kl_to={"hidden": h_ref, "head": w_ref, "mask": mask},
                                             valid=valid if with_valid else None)
    ((logps.double() * a).sum() + (kl.double() * b).sum()).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logp = torch.log_softmax((h2 @ w2[:V].T) / temperature, -1)
    logq = torch.log_softmax((h_ref @ w_ref[:V].T) / temperature, -1)
    ref_kl = (logp.exp() * (logp - logq)).sum(-1) * mask * valid
    ref_logps = logp.gather(-1, targets[..., None]).squeeze(-1) * valid
    ((ref_logps * a).sum() + (ref_kl * b).sum()).backward()
    assert torch.allclose(kl.double(), ref_kl, atol=1e-5) and (kl[~mask] == 0).all()
    assert torch.allclose(logps.double(), ref_logps, atol=1e-5)
    assert torch.allclose(ent.double(), -(logp.exp() * logp).sum(-1) * valid, atol=1e-5)
    assert torch.allclose(eos.double(), logp[..., 1] * valid, atol=1e-5)
    assert torch.allclose(h.grad, h2.grad, atol=1e-5) and torch.allclose(w.grad, w2.grad, atol=1e-5)
    assert w.grad[V:].abs().sum() == 0


@pytest.mark.parametrize("scale, honest", [(1.0, True), (3.0, True), (1.0, False)])
def test_gradient_in_the_forward_equals_brute_force_and_skips_the_backward_pass(monkeypatch, scale, honest):
    """`token_loss` (the loss per position as a function of log p(target) and KL, here a PPO-clipped surrogate times
    weights plus a weighted KL): the head computes the gradient in its forward and the backward returns it without
    recomputing any logits; the gradients equal the full [N, V] float64 formulas, also when the loss is scaled after
    (x3, as a loss scaler would). A token_loss that is not the actual loss is caught in the backward: a warning, and the
    gradient recomputed (still exact)."""
    import warnings

    import common.logprobs as lp_mod

    torch.manual_seed(3)
    h = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    h_ref, w_ref = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64)
    targets, mask, valid = torch.randint(0, 9, (3, 5)), torch.rand(3, 5) < 0.6, torch.rand(3, 5) < 0.8
    old, adv, wt, b = (torch.randn(3, 5, dtype=torch.float64) for _ in range(4))
    old = old - 2.0  # log pi_old: some ratios outside the clip range, so the clip is active at some positions

    def surrogate(logp, kl):
        ratio = torch.exp(logp - old)
        return -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv) * wt + 0.5 * kl * b

    calls = {"n": 0}
    real = lp_mod._block_logits
    monkeypatch.setattr(lp_mod, "_block_logits", lambda *a: calls.__setitem__("n", calls["n"] + 1) or real(*a))
    hint = surrogate if honest else (lambda logp, kl: surrogate(logp, kl) + kl)
    logps, _, _, kl = lp_mod.chunked_head_logps(h, w, targets, 0.7, 9, chunk_size=4, valid=valid, token_loss=hint,
                                                kl_to={"hidden": h_ref, "head": w_ref, "mask": mask})
    forward_calls = calls["n"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (surrogate(logps.double(), kl.double()).sum() * scale).backward()
    recomputed = [x for x in caught if "recomputed" in str(x.message)]
    assert (calls["n"] == forward_calls and not recomputed) if honest else (calls["n"] > forward_calls and recomputed)
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logp = torch.log_softmax((h2 @ w2[:9].T) / 0.7, -1)
    logq = torch.log_softmax((h_ref @ w_ref[:9].T) / 0.7, -1)
    ref_kl = (logp.exp() * (logp - logq)).sum(-1) * mask * valid
    (surrogate(logp.gather(-1, targets[..., None]).squeeze(-1) * valid, ref_kl).sum() * scale).backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-5) and torch.allclose(w.grad, w2.grad, atol=1e-5)
    assert w.grad[9:].abs().sum() == 0


def test_chunked_head_kl_under_bf16_autocast_stays_fp32():
    """Under bf16 mixed precision (the paper recipes' --bf16) the head's softmax math and the KL stay fp32: the same
    values and gradients as without autocast (a bf16 row-dot once broke the KL's index put)."""
    from common.logprobs import chunked_head_logps

    torch.manual_seed(2)
    h, w = torch.randn(2, 5, 6, requires_grad=True), torch.randn(11, 6, requires_grad=True)
    kl_to = {"hidden": torch.randn(2, 5, 4), "head": torch.randn(11, 4), "mask": torch.rand(2, 5) < 0.6}
    targets = torch.randint(0, 11, (2, 5))
    outs = []
    for amp in (False, True):
        h.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logps, ent, _, kl = chunked_head_logps(h, w, targets, chunk_size=3, kl_to=kl_to)
        assert logps.dtype == ent.dtype == kl.dtype == torch.float32
        (logps.sum() + kl.sum()).backward()
        outs.append((logps.detach(), kl.detach(), h.grad.clone(), w.grad.clone()))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5)


def test_fused_reference_kl_equals_the_separate_chunked_divergence_on_models():
    """Stable-OPD's reference KL through the student's forward (`kl_to`, one head pass per block for log-probs and KL)
    == the separate `chunked_divergence_loss` it replaced, in value and in the gradients of every student parameter,
    with a log-prob term beside it (as in the method's loss); weight-0 positions cost nothing and give 0."""
    from common.losses import chunked_divergence_loss

    tok, model = _tiny()
    ref = load_model(str(toy_config_path("student")), seed=1, trainable=False)
    ids = torch.tensor([tok("What is 2 + 3? The answer is 5.")["input_ids"]] * 3)
    attn = torch.ones_like(ids)
    weights = torch.rand(3, 6)
    weights[1, 2:] = 0
    with torch.no_grad():
        r = completion_forward(ref, ids, attn, 6, 0.8, logps=False, hidden=True)
    out = completion_forward(model, ids, attn, 6, 0.8, kl_to={**r, "mask": weights != 0})
    ((out["kl"] * weights).sum() - 0.3 * out["logps"].sum()).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sep = completion_forward(model, ids, attn, 6, 0.8, hidden=True)
    loss, values = chunked_divergence_loss(sep["hidden"], sep["head"], r["hidden"], r["head"], weights, temperature=0.8)
    (loss - 0.3 * sep["logps"].sum()).backward()
    assert torch.allclose(out["kl"], values, atol=1e-6) and (out["kl"][weights == 0] == 0).all()
    rows = torch.tensor([True, False, True])  # the reference on some rows only: the same numbers there, zeros elsewhere
    with torch.no_grad():
        part = completion_forward(ref, ids, attn, 6, 0.8, logps=True, hidden=True, rows=rows)
        whole = completion_forward(ref, ids, attn, 6, 0.8, logps=True, hidden=True)
    assert torch.allclose(part["hidden"][rows], whole["hidden"][rows], atol=1e-6) and (part["hidden"][~rows] == 0).all()
    assert torch.allclose(part["logps"][rows], whole["logps"][rows], atol=1e-6) and (part["logps"][~rows] == 0).all()
    for n, p in model.named_parameters():
        assert torch.allclose(fused[n], p.grad, atol=1e-6, rtol=1e-4), n


def test_completion_logps_never_builds_full_logits_and_equals_the_model():
    """completion_logps (chunked head) == log_softmax of the model's own logits, for a trained model (through its
    forward) and a frozen one (base model only, no logits at all)."""
    tok, model = _tiny()
    ids = torch.tensor([tok("What is 2 + 3? The answer is 5.")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0, -6:-1].float(), -1).gather(-1, ids[0, -5:, None]).squeeze(-1)
    got = completion_logps(model, ids, mask, 5)["logps"][0]
    model.requires_grad_(False)
    frozen = completion_logps(model, ids, mask, 5)["logps"][0]
    assert torch.allclose(got, ref, atol=1e-5) and torch.allclose(frozen, ref, atol=1e-5)
