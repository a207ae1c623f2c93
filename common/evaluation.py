"""The evaluation of a model on rows of problems, as functions: sample n responses per problem, grade them, aggregate.
Used by eval/evaluate.py (the benchmark harness: files, resume, tables) and by the methods' in-training eval
(`common.run.greedy_eval`). Per benchmark, over P problems with n samples each (c_p of them correct for problem p):
    acc      = (1 / (P n)) sum_p c_p            avg@n; the paper's avg@32 (AIME, AMC) and pass@1 (n = 1)
    acc_std  = std over the n sample indices j of acc_j = (1 / P) sum_p correct[p, j]   (ddof = 1; 0 if n = 1)
    pass@k   = (1 / P) sum_p [1 - C(n - c_p, k) / C(n, k)]   unbiased (Chen et al. 2021), k = 1, 2, 4, ... <= n
plus the answer-extraction failure rate, truncation, repetition and length stats (eval/evaluate.py's docstring).
"""

import math

import numpy as np
from tqdm.auto import tqdm

from common.data import COT_INSTRUCTION, encode_prompts
from common.grading import METHODS, grade_batch
from common.metrics import is_repetitive_ngram, is_repetitive_zlib, length_stats
from common.rollout import generate


# ----------------------------------------------------------------------------- metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n - c, k) / C(n, k), as the stable product 1 - prod_{i=n-c+1}^{n} (1 - k / i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _mean(flags: list[bool]) -> float:
    """Share of True (a float, JSON-friendly)."""
    return float(np.mean(flags))


def benchmark_metrics(samples: list[dict], n_samples: int) -> dict[str, float]:
    """Aggregate per-sample records (sorted by problem, then sample index) into the metrics above."""
    if not samples or len(samples) % n_samples:
        raise ValueError(f"{len(samples)} samples is not a positive multiple of n_samples={n_samples}")
    correct_PN = np.array([s["correct"] for s in samples], dtype=np.float64).reshape(-1, n_samples)
    n_problems = correct_PN.shape[0]
    out = {"n_problems": float(n_problems), "n_samples": float(n_samples), "acc": float(correct_PN.mean()),
           "acc_std": float(correct_PN.mean(0).std(ddof=1)) if n_samples > 1 else 0.0}
    counts = correct_PN.sum(1).astype(int)
    for k in (2 ** i for i in range(int(math.log2(n_samples)) + 1)):
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n_samples, int(c), k) for c in counts]))
    out["no_answer_frac"] = _mean([s["status"] == "no_answer" for s in samples])  # extraction failures
    out["timeout_frac"] = _mean([s["status"] == "timeout" for s in samples])
    out["error_frac"] = _mean([s["status"] == "error" for s in samples])
    for method in METHODS:
        out[f"method_{method}_frac"] = _mean([s["extract_method"] == method for s in samples])
    out["truncated_frac"] = _mean([s["finish_reason"] == "length" for s in samples])
    out["repetition_frac"] = _mean([s["repetitive_zlib"] or s["repetitive_ngram"] for s in samples])
    out["repetition_zlib_frac"] = _mean([s["repetitive_zlib"] for s in samples])
    out["repetition_ngram_frac"] = _mean([s["repetitive_ngram"] for s in samples])
    out.update(length_stats([s["n_tokens"] for s in samples]))
    return out


# ----------------------------------------------------------------------------- generation + grading


def _sample_shard(model, tokenizer, rows, row_indices, *, n_samples, greedy, temperature, top_p, top_k, max_new_tokens,
                  prompt_template, instruction, batch_size, seed, backend, grade_timeout, bar, engine=None,
                  system_prompt: str = "") -> list[dict]:
    """Per-sample records for `rows` (global indices `row_indices`): generate, then grade in one pool pass."""
    prompts = encode_prompts(tokenizer, rows, prompt_template, instruction, system_prompt)
    # Longest prompts first: similar lengths share a batch (less padding), and an out-of-memory batch fails at once.
    order = sorted(range(len(rows)), key=lambda i: -len(prompts[i]))
    per_call = max(1, batch_size // n_samples)  # prompts per generate() call; all n samples of a prompt together
    if engine is not None:  # vLLM schedules its own batches: one call with every prompt keeps it busiest
        per_call = len(rows)
    records = []
    for start in range(0, len(order), per_call):
        chunk = order[start : start + per_call]
        out = generate(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                       num_samples=n_samples, temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy,
                       seed=None if seed is None else seed + start, batch_size=batch_size, backend=backend, engine=engine)
        for j, (ids, mask) in enumerate(zip(out.completion_ids, out.completion_mask)):
            row_pos, tokens = chunk[j // n_samples], ids[mask.bool()].tolist()
            row = rows[row_pos]
            records.append({"row_index": row_indices[row_pos], "id": row.get("id"), "sample_index": j % n_samples,
                            "problem": row["problem"], "answer": row["answer"],
                            "response": out.texts[j], "n_tokens": len(tokens), "finish_reason": out.finish_reason[j],
                            "repetitive_zlib": is_repetitive_zlib(out.texts[j]),
                            "repetitive_ngram": is_repetitive_ngram(tokens)})
        bar.update(len(chunk) * n_samples)
    grades = grade_batch([r["response"] for r in records], [r["answer"] for r in records], timeout=grade_timeout)
    for record, grade in zip(records, grades):
        record.update(correct=grade.correct, extracted=grade.extracted, extract_method=grade.method, status=grade.status)
    return records


def evaluate_rows(model, tokenizer, rows: list[dict], *, n_samples: int = 1, greedy: bool = True,
                  temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256,
                  prompt_template: str = "chat", instruction: str = COT_INSTRUCTION, batch_size: int = 64,
                  seed: int | None = 0, backend: str = "hf", accelerator=None, grade_timeout: float = 5.0,
                  show_progress: bool = False, desc: str = "eval", engine=None,
                  system_prompt: str = "") -> tuple[dict[str, float], list[dict]]:
    """(metrics, per-sample records) for `rows` (dicts with `problem`, `answer`, optional `id`).

    With an `accelerator`, rows are sharded across ranks (rank r takes rows r, r + R, ...), each rank
    generates and grades its shard with its own seed, and the records are gathered: every rank returns
    the same metrics and records. Records are sorted by (row_index, sample_index). With a vLLM `engine`
    (common.rollout.make_rollout_engine; in training: synced with the policy) it samples instead of `model`.
    """
    if greedy and n_samples != 1:
        raise ValueError(f"greedy decoding gives {n_samples} identical samples; sample (temperature > 0) or use n_samples=1")
    if not rows:
        raise ValueError("evaluate_rows needs at least one row")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    policy = accelerator.unwrap_model(model) if accelerator is not None else model
    indices = list(range(rank, len(rows), world))
    bar = tqdm(total=len(indices) * n_samples, desc=desc, unit="sample", dynamic_ncols=True,
               disable=not show_progress or rank != 0)
    records = []
    if indices:
        records = _sample_shard(policy, tokenizer, [rows[i] for i in indices], indices, n_samples=n_samples, greedy=greedy,
                                temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                                prompt_template=prompt_template, instruction=instruction, batch_size=batch_size,
                                seed=None if seed is None else seed + 1_000_003 * rank, backend=backend,
                                grade_timeout=grade_timeout, bar=bar, engine=engine, system_prompt=system_prompt)
    bar.close()
    if accelerator is not None and world > 1:
        from accelerate.utils import gather_object

        records = gather_object(records)
    records.sort(key=lambda r: (r["row_index"], r["sample_index"]))
    return benchmark_metrics(records, n_samples), records
