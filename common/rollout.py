"""Sampling completions: one call, `generate(...)`, whatever the backend.

Backend "hf" runs `transformers` `generate` on the (unwrapped) policy; with `engine=` (common/vllm_engine.py)
a colocated vLLM engine samples and the same `Rollout` comes back. Layout: prompt i's `num_samples`
completions are rows i*G .. i*G + G - 1 (groups are contiguous).

What is sampled, exactly: softmax(logits / temperature), restricted to the `top_k` most likely tokens
(0 = no restriction) and then to the nucleus of mass `top_p` (1.0 = no restriction), renormalised;
nothing else. Every other sampling knob is pinned neutral: transformers fills any field a
`GenerationConfig` leaves unset from the model folder's `generation_config.json` and then from its
global defaults (`top_k=50`!), so the HF backend samples under a pristine generation config with
temperature / top-k / top-p applied by our own logits processor (`SamplingDistribution`, built from
transformers' warpers), and vLLM gets every `SamplingParams` field explicitly.

How the HF backend draws: `generate` runs greedy (`do_sample=False`) and our processor, the last one,
draws the token itself by an exact inverse-CDF draw (one float64 uniform per row against the float64
cumulative sum of the probabilities, `inverse_cdf_draw`) and returns scores whose argmax is that token.
transformers' `torch.multinomial` over the [B, V] softmax never runs: on 2 CPU cores at B = 16, V = 151,936
it took ~42 ms a token, our whole sampler (exp, float64 cumsum, draw, log-prob) ~2.4 ms. The random
stream is therefore not the one `do_sample=True` would consume: a seed still reproduces a run exactly,
but none from before this sampler.

Sampler log-probs (`return_logps=True`) are log pi_old(y_t | c_t) of that same distribution, i.e.
of the *truncated* distribution actually sampled when top_k / top_p truncate (the quantity an
importance ratio pi_theta / pi_old needs). The HF backend records them during generation (the processor
computes the drawn token's from the same exponentials it draws from: no second forward); vLLM
returns them from its sampler (`logprobs_mode="processed_logprobs"`). `logps_from="recompute"` (a
debugging option) recomputes them with one teacher-forced pass instead, which only knows the
untruncated distribution, so it is refused unless top_k = 0 and top_p = 1. Greedy decoding records the
log-probs of the untruncated distribution at temperature 1.
"""

import ctypes
import os
import platform
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from common.data import left_pad
from common.logprobs import completion_logps
from common.microbatch import rows_per_micro


# glibc malloc's mmap threshold is dynamic: once a block of up to 32 MB served by mmap is freed, blocks of that
# size come from the heap. HF generate allocates several fresh [B, V] fp32 blocks per token (the logits, their
# fp32 copy, the processed scores; 9.7 MB each at B = 16, V = 152k; our sampler's own buffers live per call),
# interleaved with the KV cache's growing tensors: the heap fragments and keeps growing, every step's free
# space too scattered to reuse or give back (measured: +0.3-0.5 GB of RSS per 64-token rollout, which then
# sits under the teacher and student passes and set the peak). Pinning the threshold (which also turns the
# dynamic adjustment off) keeps blocks of MMAP_THRESHOLD_BYTES and more in their own mappings, returned to
# the OS when freed. Only the allocator changes, never a number; MALLOC_MMAP_THRESHOLD_ in the environment
# (glibc's own tunable) wins, and anything but glibc is left alone.
MMAP_THRESHOLD_BYTES = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
_mmap_threshold_pinned = False


def pin_malloc_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Once per process: glibc's mallopt(M_MMAP_THRESHOLD, nbytes). True if it is (now) pinned by us."""
    global _mmap_threshold_pinned
    if _mmap_threshold_pinned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ \
            or os.environ.get("GLIBC_TUNABLES", "").find("mmap_threshold") >= 0:
        return False
    try:
        _mmap_threshold_pinned = bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False
    return _mmap_threshold_pinned


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [B, T] right-padded
    completion_mask: torch.Tensor  # [B, T] 1 on generated tokens up to and including EOS
    finish_reason: list[str]  # "stop" (ended with EOS) or "length" (hit max_new_tokens)
    texts: list[str]  # decoded completions, special tokens removed
    sampler_logps: torch.Tensor | None = None  # [B, T] log pi_old(y_t | c_t), 0 on padding

    @property
    def lengths(self) -> list[int]:
        return self.completion_mask.sum(-1).tolist()

    @property
    def token_lists(self) -> list[list[int]]:
        """Each completion's generated token ids, up to and including EOS."""
        return [ids[: int(n)] for ids, n in zip(self.completion_ids.tolist(), self.lengths)]


def completion_mask_and_reason(completion_ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, list[str]]:
    """Mask up to and including the first stop token; "stop" if one occurs, else "length"."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, dtype=completion_ids.dtype))
    after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0  # strictly after the first stop
    mask = (~after_stop).long()
    reasons = ["stop" if bool(row.any()) else "length" for row in is_stop]
    return mask, reasons


def inverse_cdf_draw(probs: torch.Tensor, work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One exact draw per row of `probs` [B, V] (non-negative, unnormalised, zeros allowed): the first index
    whose cumulative mass exceeds u * total, u ~ U[0, 1) in float64 (from the global / forked RNG). Returns
    the indices [B] and each row's total mass [B] (float64). `work`: a float64 [B, V] buffer to reuse.

    The cumulative sum is accumulated *and stored* in float64 (stored in fp32, over 151,936 terms its steps
    are quantised to ~6e-8 near 1: most tokens below that would get no mass, the rest an ulp); the threshold
    is scaled by the row's own last cumsum value (no renormalisation error) and kept strictly below it, so
    `searchsorted(right=True)` returns an index < V whose cumsum step is positive: a zero-probability
    (masked / truncated) token, whose step is flat, is never drawn."""
    if work is None:
        work = torch.empty(probs.shape, dtype=torch.float64, device=probs.device)
    cdf = work.copy_(probs).cumsum_(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=torch.float64, device=cdf.device)
    x = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1), total.squeeze(-1)


class SamplingDistribution(LogitsProcessor):
    """The sampler itself, run as the last logits processor of a *greedy* HF `generate` (so transformers'
    own warpers and its `torch.multinomial` never run): scores s = logits / temperature -> top-k -> top-p
    (transformers' warpers, in the same order as vLLM), ids >= `vocab_limit` at -inf; then one token per
    row, drawn by `inverse_cdf_draw` from e = exp(s - max s) (the argmax of s when `greedy`), its log-prob
    s_y - max s - log(sum e) recorded, and scores returned that are -inf everywhere but 0 on the chosen
    token, so generate's argmax takes exactly it. Its two [B, V] buffers (e, which then holds the returned
    scores, and the float64 cdf) are allocated once per generate call and reused at every step (and no
    log-softmax: the one exp pass serves the draw and the log-prob)."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, vocab_limit: int | None = None,
                 greedy: bool = False):
        self.warpers = ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + \
                       ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
        self.vocab_limit, self.greedy = vocab_limit, greedy
        self.logps: list[torch.Tensor] = []  # [B] fp32 log-prob of the token chosen at each call
        self._bufs: tuple[torch.Tensor, torch.Tensor | None] | None = None  # exp (then the output), float64 cdf

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.vocab_limit is not None and self.vocab_limit < scores.shape[-1]:
            scores = scores.clone()
            scores[:, self.vocab_limit :] = float("-inf")
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        scores = scores.float()
        if self._bufs is None or self._bufs[0].shape != scores.shape or self._bufs[0].device != scores.device:
            cdf = None if self.greedy else torch.empty_like(scores, dtype=torch.float64)
            self._bufs = (torch.empty_like(scores), cdf)
        exp, cdf = self._bufs
        top = scores.amax(-1, keepdim=True)
        torch.sub(scores, top, out=exp).exp_()
        if self.greedy:
            token, total = scores.argmax(-1), exp.sum(-1, dtype=torch.float64)  # the token generate's argmax picks
        else:
            token, total = inverse_cdf_draw(exp, cdf)
        logp = (scores.gather(-1, token[:, None]) - top).squeeze(-1).double() - total.log()
        self.logps.append(logp.float())
        return exp.fill_(float("-inf")).scatter_(-1, token[:, None], 0.0)  # generate only takes its argmax

    def sampled_logps(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] log-probs of `completion_ids` (the tokens generated in this call; positions after a row
        finished hold the drawn token's, not the pad's: mask them out)."""
        n = completion_ids.shape[1]
        assert len(self.logps) >= n, (len(self.logps), n)
        return torch.stack(self.logps[:n], 1)  # a deferred stop check (mps) may add undone steps at the end


def pristine_generation_config(**fields) -> GenerationConfig:
    """A `GenerationConfig` with every logits-changing field pinned neutral, then `fields` applied.
    Together with sampling under `_pristine_defaults`, nothing from a model folder leaks in."""
    neutral = dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0,
                   eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                   length_penalty=1.0, num_beams=1, num_return_sequences=1, min_length=0, min_new_tokens=None,
                   bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
                   forced_eos_token_id=None, exponential_decay_length_penalty=None, renormalize_logits=False,
                   remove_invalid_values=False, use_cache=True)
    if not fields.get("do_sample", False):
        neutral["top_k"] = None  # greedy: no warper runs, and a pinned top_k=0 only draws transformers' "not valid" warning
    return GenerationConfig(**{**neutral, **fields})


@torch.no_grad()
def _generate_hf(model, prompt_ids, prompt_mask, gen_config, sampler: SamplingDistribution) -> torch.Tensor:
    """Completion ids [b, T] from HF `generate` under `gen_config` alone: the model's own
    `generation_config` (a folder's generation_config.json) is swapped for a pristine one meanwhile,
    so no field we leave unset is filled from it."""
    was_training, saved = model.training, model.generation_config
    model.eval()
    model.generation_config = GenerationConfig()
    try:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_config,
                             logits_processor=LogitsProcessorList([sampler]))
    finally:
        model.train(was_training)
        model.generation_config = saved
    return out[:, prompt_ids.shape[1] :]


def _rows(model) -> float:
    """The model's output rows (inf when unknown): a vocab_limit at or above it restricts nothing."""
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None) or float("inf")


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    seed: int | None = None,
    return_logps: bool = False,
    logps_from: str = "sampler",
    vocab_limit: int | None = None,
    batch_size: int | None = None,
    stop_token_ids: list[int] | None = None,
    backend: str = "hf",
    engine=None,  # a common.vllm_engine.VLLMEngine (it imports this module, not the other way round)
    logps_batch_size: int | None = None,
    micro_batch_tokens: int = 0,
) -> Rollout:
    """Sample `num_samples` completions for each prompt (token id lists); see the module docstring.

    `seed` makes the samples a pure function of (seed, model, prompts) without touching the global
    RNG. `batch_size` bounds how many sequences the HF backend generates at once (vLLM batches itself).
    `logps_from`: "sampler" (recorded while sampling) or "recompute" (a teacher-forced pass in batches of
    `logps_batch_size`, default `batch_size`, else as many rows as `micro_batch_tokens` tokens allow; with an engine,
    through the trainer's `model`).
    `vocab_limit`: sample only ids below it (a vocabulary shared with a teacher whose embedding is
    padded differently; vLLM gets it as `allowed_token_ids`).
    """
    if backend not in ("hf", "vllm"):
        raise ValueError(f"unknown rollout backend {backend!r}; choose hf or vllm")
    if backend == "vllm" and engine is None:
        raise ValueError("backend='vllm' needs an engine: engine = make_rollout_engine('vllm', model, tokenizer, ...)")
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    if not greedy and not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
        raise ValueError(f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0 (0 = off); got "
                         f"temperature={temperature}, top_p={top_p}, top_k={top_k}")
    if logps_from not in ("sampler", "recompute"):
        raise ValueError(f"logps_from must be sampler or recompute, got {logps_from!r}")
    if return_logps and logps_from == "recompute" and not greedy and (top_k > 0 or top_p < 1):
        raise ValueError("recomputed sampler log-probs are those of the full softmax, but top_k / top_p truncate the "
                         "distribution actually sampled: use logps_from='sampler' (recorded while sampling)")
    stop_ids = list(stop_token_ids or [tokenizer.eos_token_id])
    recompute = return_logps and (logps_from == "recompute" or getattr(engine, "logps_source", "sampler") == "trainer")
    if greedy:
        temperature, top_k, top_p = 1.0, 0, 1.0  # the log-probs of greedy decoding: the untruncated softmax
    if engine is not None:
        rollout = engine.generate(tokenizer, prompts, max_new_tokens=max_new_tokens, num_samples=num_samples,
                                  temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy, seed=seed,
                                  return_logps=return_logps and not recompute, stop_token_ids=stop_ids,
                                  vocab_limit=vocab_limit if vocab_limit and vocab_limit < _rows(model) else None)
        if recompute:
            rollout.sampler_logps = sequence_logps(model, rollout, temperature=temperature,
                                                   batch_size=logps_batch_size or batch_size, micro_batch_tokens=micro_batch_tokens)
        return rollout
    device = next(model.parameters()).device
    if device.type == "cpu":
        pin_malloc_mmap_threshold()  # the [B, V] blocks of every step live in host memory
    rows = [p for p in prompts for _ in range(num_samples)]
    # generate itself always decodes greedily: our processor draws the token and hands it an argmax
    gen_config = pristine_generation_config(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                            pad_token_id=tokenizer.pad_token_id)
    prompt_ids, prompt_mask = left_pad(rows, tokenizer.pad_token_id)
    step = batch_size or len(rows)
    chunks, logp_chunks = [], []
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        if seed is not None:
            torch.manual_seed(seed)
        for s in range(0, len(rows), step):
            sampler = SamplingDistribution(temperature, top_k, top_p, vocab_limit, greedy=greedy)
            c = _generate_hf(model, prompt_ids[s : s + step].to(device), prompt_mask[s : s + step].to(device), gen_config, sampler)
            chunks.append(c.cpu())
            logp_chunks.append(sampler.sampled_logps(c).cpu() if return_logps and not recompute else None)
    width = max(c.shape[1] for c in chunks)
    completion_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    sampler_logps = torch.zeros((len(rows), width)) if return_logps else None
    row = 0
    for c, lp in zip(chunks, logp_chunks):
        completion_ids[row : row + c.shape[0], : c.shape[1]] = c
        if lp is not None:
            sampler_logps[row : row + c.shape[0], : c.shape[1]] = lp
        row += c.shape[0]
    completion_mask, reasons = completion_mask_and_reason(completion_ids, stop_ids)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(completion_ids, completion_mask)], skip_special_tokens=True)
    rollout = Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, reasons, texts)
    if return_logps:
        rollout.sampler_logps = (sequence_logps(model, rollout, temperature=temperature, batch_size=logps_batch_size or batch_size,
                                                micro_batch_tokens=micro_batch_tokens)
                                 if recompute else sampler_logps.masked_fill(completion_mask == 0, 0.0))
    return rollout


@torch.no_grad()
def sequence_logps(model, rollout: Rollout, temperature: float = 1.0, batch_size: int | None = None,
                   micro_batch_tokens: int = 0) -> torch.Tensor:
    """Teacher-forced log-probs [B, T] of the rollout's completion tokens under `model` (0 on padding), `batch_size`
    rows per forward (default: as many as `micro_batch_tokens` tokens allow; all of them when it is 0)."""
    device = next(model.parameters()).device
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    step = batch_size or rows_per_micro(ids.shape[1], micro_batch_tokens, ids.shape[0])
    n = rollout.completion_ids.shape[1]
    was_training = model.training
    model.eval()
    try:
        parts = [completion_logps(model, ids[s : s + step].to(device), mask[s : s + step].to(device), n, temperature)["logps"].cpu()
                 for s in range(0, ids.shape[0], step)]
    finally:
        model.train(was_training)
    return torch.cat(parts) * rollout.completion_mask
