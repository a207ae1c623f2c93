"""The HF backend's own exact draw (common/rollout.py `inverse_cdf_draw` inside `SamplingDistribution`):
never a zero-probability token (masked, truncated, or at the end of the row), the exact inverse-CDF index
for every uniform, the intended joint distribution of whole sequences (chi-square against the enumerated
probabilities of every 2-token completion of a tiny model), seeds that reproduce, log-probs equal to a
recompute at V = 151,936, greedy decoding = the argmax of a teacher-forced pass, and transformers'
`torch.multinomial` never called. tests/test_sampling.py holds the first-token distribution tests."""

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.rollout import SamplingDistribution, generate, inverse_cdf_draw, sequence_logps  # noqa: E402


class IdTokenizer:
    """The tokenizer fields `generate` reads, for a model whose ids mean nothing."""

    def __init__(self, eos: int, pad: int):
        self.eos_token_id, self.pad_token_id = eos, pad

    def batch_decode(self, seqs, skip_special_tokens=True):
        return ["" for _ in seqs]


def tiny_model(vocab: int, hidden: int = 16, seed: int = 0, scale: float = 1.0) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=2 * hidden, max_position_embeddings=64,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)  # spread or sharpen the next-token distributions
    return model


def reference_index(probs: torch.Tensor, u: float) -> int:
    """Inverse CDF by enumeration in float64: the first index whose cumulative mass exceeds u * total."""
    cdf = probs.double().cumsum(0)
    x = u * float(cdf[-1])
    return next(i for i, c in enumerate(cdf.tolist()) if c > x)


REAL_RAND = torch.rand


def fixed_uniform(monkeypatch, values: list[float]):
    """Make the draw's uniforms `values` (one per row), whatever the RNG state."""
    real = REAL_RAND

    def rand(*size, dtype=None, device=None, **kw):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, torch.Size)) else size
        if dtype == torch.float64 and tuple(shape) == (len(values), 1):
            return torch.tensor(values, dtype=torch.float64, device=device)[:, None]
        return real(*size, dtype=dtype, device=device, **kw)

    monkeypatch.setattr(torch, "rand", rand)


def test_extreme_uniforms_never_land_past_the_end_or_on_a_zero(monkeypatch):
    """u = 0 and u = the largest double below 1, rows with zeros first, last and in between."""
    rows = torch.tensor([[0.0, 0.0, 0.3, 0.0, 0.7, 0.0, 0.0],
                         [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5],
                         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1e-30],
                         [1e-30, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    for u in (0.0, 1.0 - 2.0**-53, 0.5, 0.3):
        fixed_uniform(monkeypatch, [u] * 4)
        idx = inverse_cdf_draw(rows)[0]
        assert all(rows[r, int(i)] > 0 for r, i in enumerate(idx)), (u, idx)
        assert idx.tolist() == [reference_index(row, u) for row in rows], (u, idx)


def test_exact_index_for_every_uniform_on_a_grid(monkeypatch):
    """Exact enumeration: for 2,001 uniforms spanning [0, 1) the drawn index is the float64 inverse CDF's."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(9, generator=g) * (torch.rand(9, generator=g) > 0.3)
    probs[0] = 0.0
    us = [k / 2000 for k in range(2000)] + [1.0 - 2.0**-53]
    fixed_uniform(monkeypatch, us)
    idx = inverse_cdf_draw(probs.expand(len(us), -1).contiguous())[0]
    assert idx.tolist() == [reference_index(probs, u) for u in us]
    assert bool((probs[idx] > 0).all())


def test_float64_cumsum_keeps_the_tail_of_a_151936_way_row(monkeypatch):
    """One token at 1 - 1.5e-4 then 151,935 tokens at 1e-9: stored in fp32, the cumsum is flat over most of
    the tail (1e-9 is below an fp32 ulp near 1, ~6e-8), so those tokens could never be drawn and the rest
    would get an ulp each; the float64 cumsum gives every tail token its own mass."""
    v = 151_936
    probs = torch.full((1, v), 1e-9)
    probs[0, 0] = 1.0 - (v - 1) * 1e-9
    flat = int((probs.cumsum(-1).diff(dim=-1) == 0).sum())
    assert flat > 0.9 * v  # the fp32 trap is real
    for u in (1.0 - 5e-5, 1.0 - 1.2345e-4, 1.0 - 1e-7):  # inside the tail's mass
        fixed_uniform(monkeypatch, [u])
        idx = int(inverse_cdf_draw(probs)[0])
        assert idx > 0 and idx == reference_index(probs[0], u)


def test_masked_and_truncated_tokens_are_never_drawn_at_151936():
    """vocab_limit, top-k and top-p at V = 151,936: every drawn token is inside the kept set."""
    torch.manual_seed(0)
    v, rows = 151_936, 16
    logits = torch.randn(rows, v) * 4
    sorted_p, order = torch.softmax(logits.double(), -1).sort(-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    nucleus = torch.zeros(rows, v, dtype=torch.bool).scatter_(-1, order, mass_before < 0.3)
    top7 = torch.zeros(rows, v, dtype=torch.bool).scatter_(-1, order[:, :7], True)
    below = (torch.arange(v) < 1000).expand(rows, -1)
    for kw, allowed in ((dict(vocab_limit=1000), below), (dict(top_k=7), top7), (dict(top_p=0.3), nucleus)):
        proc = SamplingDistribution(**kw)
        for _ in range(5):
            out = proc(torch.zeros(rows, 1, dtype=torch.long), logits.clone())
            token = out.argmax(-1)
            assert bool((out.gather(-1, token[:, None]) == 0).all()) and int(torch.isfinite(out).sum()) == rows
            assert bool(allowed.gather(-1, token[:, None]).all()), kw
        assert torch.isfinite(torch.stack(proc.logps)).all()


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper chi-square quantile by the Wilson-Hilferty approximation (z = 3.719: p = 1e-4)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


@torch.no_grad()
def two_token_probs(model, prompt: list[int], temperature: float, top_k: int = 0) -> torch.Tensor:
    """[V * V] probability of every 2-token completion, by enumeration (float64), top-k renormalised."""
    v = model.config.vocab_size

    def dist(logits):
        logits = logits.double() / temperature
        if top_k:
            logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[..., -1:], float("-inf"))
        return torch.softmax(logits, -1)

    first = dist(model(torch.tensor([prompt])).logits[0, -1])
    seqs = torch.tensor([prompt + [a] for a in range(v)])
    second = dist(model(seqs).logits[:, -1])
    return (first[:, None] * second).reshape(-1)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0), (1.0, 5)])
def test_two_token_sequences_follow_the_enumerated_joint_distribution(temperature, top_k):
    """20,000 completions of 2 tokens from a vocabulary of 12 (144 outcomes): chi-square at p = 1e-4,
    no outcome of probability zero, and each recorded log-prob equal to the enumerated one."""
    v, n = 12, 20_000
    model = tiny_model(v, scale=3.0)
    tok = IdTokenizer(eos=v + 5, pad=0)  # an id never produced: every completion has 2 tokens
    prompt = [3, 1, 4]
    probs = two_token_probs(model, prompt, temperature, top_k)
    out = generate(model, tok, [prompt], max_new_tokens=2, num_samples=n, temperature=temperature, top_k=top_k,
                   seed=0, return_logps=True)
    assert out.completion_ids.shape == (n, 2) and int(out.completion_mask.sum()) == 2 * n
    code = out.completion_ids[:, 0] * v + out.completion_ids[:, 1]
    counts = torch.bincount(code, minlength=v * v).double()
    assert float(counts[probs == 0].sum()) == 0
    exp = probs * n
    big = exp >= 5  # pool the rare outcomes into one cell
    obs_c = torch.cat([counts[big], counts[~big].sum()[None]])
    exp_c = torch.cat([exp[big], exp[~big].sum()[None]])
    chi2 = float(((obs_c - exp_c) ** 2 / exp_c.clamp_min(1e-12)).sum())
    assert chi2 < chi2_critical(len(obs_c) - 1), (chi2, chi2_critical(len(obs_c) - 1))
    assert torch.allclose(out.sampler_logps.sum(-1).double(), probs[code].log(), atol=1e-5)


def test_seed_reproduces_and_leaves_the_global_rng_alone():
    model = tiny_model(50)
    tok = IdTokenizer(eos=49, pad=0)
    prompts = [[1, 2, 3], [4, 5]]
    state = torch.get_rng_state()
    a = generate(model, tok, prompts, max_new_tokens=16, num_samples=4, seed=7, return_logps=True)
    b = generate(model, tok, prompts, max_new_tokens=16, num_samples=4, seed=7, return_logps=True)
    c = generate(model, tok, prompts, max_new_tokens=16, num_samples=4, seed=8, return_logps=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.sampler_logps, b.sampler_logps)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_logps_equal_recompute_and_vocab_limit_holds_at_151936():
    """V = 151,936 (the Qwen2.5 vocabulary): recorded log-probs == a teacher-forced pass within 1e-5 (fp32),
    and with vocab_limit no id at or above it is ever generated."""
    v = 151_936
    model = tiny_model(v, hidden=8, scale=4.0)
    tok = IdTokenizer(eos=v - 1, pad=v - 2)
    prompts = [[11, 12, 13], [7, 8]]
    for temperature in (1.0, 0.7):
        out = generate(model, tok, prompts, max_new_tokens=8, num_samples=3, temperature=temperature, seed=1,
                       return_logps=True, batch_size=4)
        ref = sequence_logps(model, out, temperature=temperature)
        assert int(out.completion_mask.sum()) > 20
        assert torch.allclose(out.sampler_logps, ref, atol=1e-5), (out.sampler_logps - ref).abs().max()
    out = generate(model, tok, prompts, max_new_tokens=8, num_samples=8, seed=2, vocab_limit=500, return_logps=True)
    assert int(out.completion_ids[out.completion_mask.bool()].max()) < 500
    assert torch.isfinite(out.sampler_logps).all()


def test_greedy_is_the_argmax_of_a_teacher_forced_pass():
    model = tiny_model(40, scale=2.0)
    tok = IdTokenizer(eos=45, pad=0)
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6]]
    out = generate(model, tok, prompts, max_new_tokens=10, greedy=True, return_logps=True)
    with torch.no_grad():
        logits = model(torch.cat([out.prompt_ids, out.completion_ids], 1)).logits[:, out.prompt_ids.shape[1] - 1 : -1]
    assert torch.equal(out.completion_ids, logits.argmax(-1))
    assert torch.allclose(out.sampler_logps, torch.log_softmax(logits, -1).max(-1).values, atol=1e-5)


def test_transformers_multinomial_never_runs(monkeypatch):
    """The whole point: generate decodes greedily on our one-hot scores, its torch.multinomial is bypassed."""
    def refuse(*a, **k):
        raise AssertionError("torch.multinomial called")

    monkeypatch.setattr(torch, "multinomial", refuse)
    model = tiny_model(30)
    out = generate(model, IdTokenizer(eos=35, pad=0), [[1, 2]], max_new_tokens=6, num_samples=4, seed=0)
    assert out.completion_ids.shape == (4, 6)
