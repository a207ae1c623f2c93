"""The sampler draws from exactly softmax(logits / T) (top-k / top-p truncated only when asked), and the
sampler log-probs are those of the distribution actually sampled. Distribution tests, not shapes:
a sampler that silently keeps the top 50 tokens (transformers' default `top_k=50`) cannot pass.

`python tests/test_sampling.py` prints the measured distances and bounds per setting (docs/LOG.md).
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.models import load_model, load_tokenizer  # noqa: E402
from common.rollout import generate, sequence_logps  # noqa: E402
from common.toy import load_toy_tokenizer, toy_config_path  # noqa: E402

N_SAMPLES = 4000
N_BINS = 20
PROMPT = "What is 2 + 3?"


def spread_model():
    """The toy student (vocabulary 487), randomly initialised, final norm x2: its first-token
    distribution is spread over ~400 tokens (90% of the mass on 385; the top 50 hold 22%)."""
    model = load_model(str(toy_config_path("student")), seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    return model


def reference_probs(model, prompt_ids: list[int], temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The intended distribution, by brute force: softmax(logits / T), then the top-k, then the
    smallest set of most likely tokens whose mass reaches top_p, renormalised (float64)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1].double()
    p = torch.softmax(logits / temperature, -1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    mass_before = p[order].cumsum(0) - p[order]
    kept = mass_before < top_p
    if top_k > 0:
        kept &= torch.arange(len(p)) < top_k
    keep[order[kept]] = True
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper chi-square quantile by the Wilson-Hilferty approximation (z = 3.719: p = 1e-4)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def compare(counts: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
    """Empirical counts vs probabilities: chi-square over N_BINS equal-mass bins of the sorted support
    (with its p = 1e-4 critical value), samples outside the support, the mass outside the 50 most likely
    tokens (empirical, expected, 3 sigma), and the total-variation distance (with the ~4-sigma bound
    expected from sampling noise alone: E[TV] + 4 sd, estimated from 200 exact multinomial draws)."""
    n = int(counts.sum())
    freq = counts.double() / n
    order = probs.argsort(descending=True)
    support = order[probs[order] > 0]
    edges = torch.linspace(0, 1, N_BINS + 1)[1:-1].double()
    bin_of = torch.bucketize(probs[support].cumsum(0) - probs[support] / 2, edges)
    obs = torch.zeros(N_BINS, dtype=torch.float64).index_add_(0, bin_of, counts[support].double())
    exp = torch.zeros(N_BINS, dtype=torch.float64).index_add_(0, bin_of, probs[support] * n)
    used = exp > 0
    chi2 = float(((obs[used] - exp[used]) ** 2 / exp[used]).sum())
    top50 = order[:50]
    tail_p = float(1 - probs[top50].sum())
    tail_emp = float(1 - freq[top50].sum())
    null_tv = torch.stack([(torch.bincount(torch.multinomial(probs.float(), n, replacement=True,
                                                                generator=torch.Generator().manual_seed(s)),
                                           minlength=len(probs)).double() / n - probs).abs().sum() / 2 for s in range(200)])
    return {"n": n, "chi2": chi2, "chi2_bound": chi2_critical(int(used.sum()) - 1),
            "outside_support": int(counts.sum() - counts[support].sum()),
            "tail50_emp": tail_emp, "tail50_p": tail_p, "tail50_3sigma": 3 * math.sqrt(max(tail_p * (1 - tail_p), 1e-12) / n),
            "tv": float((freq - probs).abs().sum() / 2), "tv_bound": float(null_tv.mean() + 4 * null_tv.std())}


def first_token_counts(model, tok, prompt_ids, *, temperature, top_k=0, top_p=1.0, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of N_SAMPLES first tokens drawn by `generate`, and their recorded sampler log-probs."""
    out = generate(model, tok, [prompt_ids], max_new_tokens=1, num_samples=N_SAMPLES, temperature=temperature,
                   top_k=top_k, top_p=top_p, seed=seed, return_logps=True)
    first = out.completion_ids[:, 0]
    return torch.bincount(first, minlength=model.config.vocab_size), out.sampler_logps[:, 0], first


def assert_same_distribution(stats: dict) -> None:
    assert stats["outside_support"] == 0, stats
    assert stats["chi2"] < stats["chi2_bound"], stats
    assert abs(stats["tail50_emp"] - stats["tail50_p"]) <= stats["tail50_3sigma"], stats
    assert stats["tv"] < stats["tv_bound"], stats


SETTINGS = [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.0, top_p=0.9),
            dict(temperature=0.6, top_p=0.8), dict(temperature=1.0, top_k=100)]


def measure(setting: dict, model=None, tok=None) -> dict:
    tok = tok or load_toy_tokenizer()
    model = model or spread_model()
    prompt_ids = tok(PROMPT)["input_ids"]
    probs = reference_probs(model, prompt_ids, setting["temperature"], setting.get("top_k", 0), setting.get("top_p", 1.0))
    counts, logps, first = first_token_counts(model, tok, prompt_ids, **setting)
    stats = compare(counts, probs)
    stats["max_logp_err"] = float((logps.double() - probs[first].log()).abs().max())
    return stats


@pytest.fixture(scope="module")
def model_and_tok():
    return spread_model(), load_toy_tokenizer()


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_hf_samples_match_the_intended_distribution(model_and_tok, setting):
    model, tok = model_and_tok
    stats = measure(setting, model, tok)
    assert_same_distribution(stats)
    # the recorded log-probs are those of the (truncated, renormalised) distribution actually sampled
    assert stats["max_logp_err"] < 1e-4, stats


def test_a_top50_sampler_fails_the_test(model_and_tok):
    """The test's own power: the old behaviour (transformers' default top_k=50) is rejected."""
    model, tok = model_and_tok
    prompt_ids = tok(PROMPT)["input_ids"]
    counts, _, _ = first_token_counts(model, tok, prompt_ids, temperature=1.0, top_k=50)
    stats = compare(counts, reference_probs(model, prompt_ids, 1.0))
    with pytest.raises(AssertionError):
        assert_same_distribution(stats)
    assert stats["tail50_emp"] < 1e-9 and stats["tail50_p"] > 0.7


def test_model_folder_generation_config_does_not_leak(model_and_tok, tmp_path):
    """A folder's generation_config.json (Qwen checkpoints ship top_k / top_p / repetition_penalty /
    temperature) fills every field transformers sees unset: none may change what we sample."""
    model, tok = model_and_tok
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "generation_config.json").read_text())
    cfg.update(do_sample=True, top_k=5, top_p=0.5, temperature=0.1, repetition_penalty=2.0, min_p=0.2,
               no_repeat_ngram_size=1, suppress_tokens=list(range(40)), typical_p=0.3, min_new_tokens=3)
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    loaded = load_model(str(tmp_path))
    assert loaded.generation_config.top_k == 5  # the hostile values did load
    stats = measure(dict(temperature=1.0), loaded, load_tokenizer(str(tmp_path)))
    assert_same_distribution(stats)
    # and over several tokens (repetition penalty, no-repeat n-grams, min length would act there)
    prompts = [tok(PROMPT)["input_ids"]]
    a = generate(loaded, tok, prompts, max_new_tokens=12, num_samples=8, seed=3, return_logps=True)
    b = generate(model, tok, prompts, max_new_tokens=12, num_samples=8, seed=3, return_logps=True)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert loaded.generation_config.top_k == 5  # and the model's own config is left as it was


def test_recorded_logps_equal_recomputed(model_and_tok):
    """Sampler log-probs recorded during generation == one teacher-forced pass (fp32, 1e-5)."""
    model, tok = model_and_tok
    prompts = [tok(p)["input_ids"] for p in ("What is 2 + 3?", "Ann has 7 apples and eats 2. How many are left?")]
    for temperature in (1.0, 0.7):
        out = generate(model, tok, prompts, max_new_tokens=24, num_samples=3, temperature=temperature, seed=1,
                       return_logps=True, batch_size=4)
        ref = sequence_logps(model, out, temperature=temperature)
        assert out.completion_mask.sum() > 20
        assert torch.allclose(out.sampler_logps, ref, atol=1e-5), (out.sampler_logps - ref).abs().max()
        again = generate(model, tok, prompts, max_new_tokens=24, num_samples=3, temperature=temperature, seed=1,
                         return_logps=True, logps_from="recompute", batch_size=4)
        assert torch.equal(again.completion_ids, out.completion_ids)
        assert torch.allclose(again.sampler_logps, ref, atol=1e-6)


def test_recompute_refused_when_the_sampler_truncates(model_and_tok):
    model, tok = model_and_tok
    for kw in (dict(top_p=0.9), dict(top_k=20)):
        with pytest.raises(ValueError, match="truncate"):
            generate(model, tok, [[5, 6]], max_new_tokens=2, return_logps=True, logps_from="recompute", **kw)
    for kw in (dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(ValueError, match="sampling needs"):
            generate(model, tok, [[5, 6]], max_new_tokens=2, **kw)


def test_vocab_limit_is_never_sampled(model_and_tok):
    model, tok = model_and_tok
    counts, logps, first = first_token_counts(model, tok, tok(PROMPT)["input_ids"], temperature=1.0)
    assert int((first >= 400).sum()) > 0  # without the limit, ids >= 400 do get sampled
    out = generate(model, tok, [tok(PROMPT)["input_ids"]], max_new_tokens=4, num_samples=500, seed=0,
                   return_logps=True, vocab_limit=400)
    assert int(out.completion_ids[out.completion_mask.bool()].max()) < 400
    assert torch.isfinite(out.sampler_logps).all()


if __name__ == "__main__":
    print(f"HF backend, {N_SAMPLES} first-token samples, toy student x2 norm (vocabulary 487)")
    print("| setting | chi2 (bound) | mass outside top 50: emp / softmax (3 sigma) | TV (bound) | max |logp err| |")
    print("|---|---|---|---|---|")
    for s in SETTINGS:
        r = measure(s)
        print(f"| {s} | {r['chi2']:.1f} ({r['chi2_bound']:.1f}) | {r['tail50_emp']:.3f} / {r['tail50_p']:.3f} "
              f"({r['tail50_3sigma']:.3f}) | {r['tv']:.3f} ({r['tv_bound']:.3f}) | {r['max_logp_err']:.1e} |")
