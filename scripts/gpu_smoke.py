"""GPU smoke test and measurements for issue 9 ("GPU scale"). GPU only; nothing here runs on CPU machines.

No download: models are randomly initialised from the real Qwen2.5-1.5B / Qwen2.5-7B configs (below),
with a synthetic word-level tokenizer of the real vocabulary size. Three parts; one table at the end:

  engine   (vLLM only) the colocated engine against the trainer on the 1.5B student: sampler log-probs vs
           a teacher-forced recompute of the same tokens (bf16: expect mean |diff| ~1e-2), seeded repeats
           identical, an update invisible to the engine until sync_weights, and the debug weight check.
  step     one Stable-OPD-shaped step in-process, built from common/ only (so it does not depend on how
           the methods are wired): rollout (HF generate, or the colocated vLLM engine with sleep / wake),
           teacher and reference scoring, the student update (sampled-token OPD surrogate + k3 reference
           KL + golden NLL, micro-batched, gradient checkpointing), the weight sync and its debug check.
           Default shape = the issue's: 1.5B student, 7B teacher, 1.5B reference, bf16, 4 prompts x 4
           samples x 4,096 tokens. Reports step time, tokens/s, rollout tokens/s and peak GPU memory.
  methods  each method file for a few steps through `accelerate launch` (HF backend, and vLLM where it is
           installed), with the flags the issue-9 wiring adds (--rollout_backend, --vllm_*, --optim); a
           method that does not know a flag yet is reported as "not wired", not as a failure.

    bash scripts/gpu_smoke.sh                        # all three parts (plus the CPU tests of the glue)
    python scripts/gpu_smoke.py --part step --backends hf,vllm
    python scripts/gpu_smoke.py --part methods --methods sft,opd,stable_opd,grpo --steps 3
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.rollout import generate  # noqa: E402
from common.vllm_engine import make_rollout_engine  # noqa: E402

COMMON = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6,
              rope_theta=1000000.0, max_position_embeddings=131072, max_window_layers=28, use_sliding_window=False,
              sliding_window=131072, attention_dropout=0.0, bos_token_id=151643, eos_token_id=151643,
              initializer_range=0.02)
QWEN25_1_5B = dict(COMMON, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
QWEN25_7B = dict(COMMON, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
N_WORDS = 151643  # regular tokens of the Qwen2.5 tokenizer; id 151643 is <|endoftext|> (EOS and PAD)


def synthetic_tokenizer():
    """Word-level tokenizer "w0".."w151642" + <|endoftext|>: ids line up with a Qwen2.5-sized vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(N_WORDS)}
    vocab["<|endoftext|>"] = N_WORDS
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="w0", padding_side="left")


def write_assets(work: Path, n_rows: int = 64, prompt_len: int = 64, solution_len: int = 256, seed: int = 0) -> dict:
    """Config folders (config.json + tokenizer/) for student and teacher, and a JSONL of synthetic rows."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(10, n_ids(), (n,), generator=g))  # noqa: E731
    tok = synthetic_tokenizer()
    paths = {}
    for name, cfg in (("student", QWEN25_1_5B), ("teacher", QWEN25_7B)):
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(cfg, indent=1))
        tok.save_pretrained(folder / "tokenizer")
        paths[name] = str(folder / "config.json")
    rows = [{"id": str(i), "problem": words(prompt_len), "answer": "1",
             "solution": words(solution_len) + " \\boxed{1}"} for i in range(n_rows)]
    paths["data"] = str(work / "train.jsonl")
    Path(paths["data"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def random_model(cfg: dict, seed: int, trainable: bool, grad_ckpt: bool = False, device: str = "cuda"):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes for 7B on the CPU
        model = AutoModelForCausalLM.from_config(Qwen2Config(**cfg), dtype=torch.bfloat16)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


def gib(x: float) -> float:
    return round(x / 2**30, 1)


def device_used() -> float:
    if not torch.cuda.is_available():
        return 0.0
    free, total = torch.cuda.mem_get_info()
    return total - free


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def n_ids() -> int:
    """Token ids to draw prompts and golden responses from (all regular words of both vocabularies)."""
    return min(N_WORDS, QWEN25_1_5B["vocab_size"], QWEN25_7B["vocab_size"])


def bench_step(a, backend: str) -> dict:
    """Two steps (the first warms up); the second one's timings and the peak memory over both."""
    from common.logprobs import completion_logps
    from common.models import make_optimizer

    dev = a.device
    tok = synthetic_tokenizer()
    student = random_model(QWEN25_1_5B, 0, trainable=True, grad_ckpt=True, device=dev)
    teacher = random_model(QWEN25_7B, 1, trainable=False, device=dev)
    ref = random_model(QWEN25_1_5B, 0, trainable=False, device=dev)
    opt = make_optimizer(student.parameters(), a.optim, lr=1e-6)
    engine = None
    if backend == "vllm":
        engine = make_rollout_engine("vllm", student, tok, max_model_len=a.prompt_len + a.length + 8,
                                     gpu_memory_utilization=a.vllm_gpu_memory_utilization, sleep_level=a.vllm_sleep,
                                     check_sync=True, workdir=str(Path(a.work) / "engine"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, n_ids(), (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
    golden = torch.randint(10, n_ids(), (a.prompts, a.length), generator=g)
    B, mb = a.prompts * a.samples, a.micro_batch
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    peak_used, row = device_used(), {}
    for step in range(2):
        cuda_sync()
        t0 = time.time()
        out = generate(student, tok, prompts, max_new_tokens=a.length, num_samples=a.samples, seed=step,
                       return_logps=True, engine=engine, logps_batch_size=mb)
        if engine is not None:
            peak_used = max(peak_used, device_used())
            engine.sleep()
        cuda_sync()
        t_roll = time.time() - t0
        ids = torch.cat([out.prompt_ids, out.completion_ids], 1).to(dev)
        attn = torch.cat([out.prompt_mask, out.completion_mask], 1).to(dev)
        mask, T = out.completion_mask.to(dev).float(), out.completion_ids.shape[1]
        old = out.sampler_logps.to(dev)
        t1 = time.time()
        with torch.no_grad():
            t_lp = torch.cat([completion_logps(teacher, ids[s : s + mb], attn[s : s + mb], T)["logps"] for s in range(0, B, mb)])
            r_lp = torch.cat([completion_logps(ref, ids[s : s + mb], attn[s : s + mb], T)["logps"] for s in range(0, B, mb)])
        cuda_sync()
        t_score, t2 = time.time() - t1, time.time()
        adv, n_tok = (t_lp - old) * mask, mask.sum().clamp_min(1)
        for s in range(0, B, mb):  # OPD surrogate (r = 1 at the first update) + k3 reference KL, token mean
            lp = completion_logps(student, ids[s : s + mb], attn[s : s + mb], T)["logps"]
            d = r_lp[s : s + mb] - lp
            loss = ((-torch.exp(lp - old[s : s + mb]) * adv[s : s + mb] + 0.01 * (d.exp() - 1 - d)) * mask[s : s + mb]).sum() / n_tok
            loss.backward()
        g_ids = torch.cat([torch.tensor(prompts), golden], 1).to(dev)
        for s in range(0, a.prompts, mb):  # golden NLL (lambda_gold = 0.1)
            lp = completion_logps(student, g_ids[s : s + mb], torch.ones_like(g_ids[s : s + mb]), a.length)["logps"]
            (-0.1 * lp.sum() / (a.prompts * a.length)).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        cuda_sync()
        t_update, t3 = time.time() - t2, time.time()
        peak_used = max(peak_used, device_used())
        check = "-"
        if engine is not None:
            engine.sync_weights(student)
            check = f"max|diff| {max(engine.last_check.values()):.1e} on {len(engine.last_check)}"
        cuda_sync()
        t_sync = time.time() - t3
        step_s = time.time() - t0
        n = float(mask.sum())
        row = {"part": "step", "what": f"stable-opd step, {backend}", "shape": f"{a.prompts}x{a.samples}x{a.length}",
               "step_s": round(step_s, 1), "rollout_s": round(t_roll, 1), "score_s": round(t_score, 1),
               "update_s": round(t_update, 1), "sync_s": round(t_sync, 2), "tokens_per_s": round(n / step_s),
               "rollout_tokens_per_s": round(n / t_roll), "mean_len": round(n / B),
               "peak_alloc_GiB": gib(torch.cuda.max_memory_allocated() if dev == "cuda" else 0), "peak_device_GiB": gib(peak_used),
               "sync_check": check}
    del student, teacher, ref, opt, engine
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def check_engine(a) -> dict:
    """The real engine against the trainer: sampler log-probs vs a teacher-forced recompute on the same
    tokens, seeded reproducibility, and that an update reaches the engine only through sync_weights."""
    from common.rollout import sequence_logps

    tok = synthetic_tokenizer()
    student = random_model(QWEN25_1_5B, 0, trainable=False)
    engine = make_rollout_engine("vllm", student, tok, max_model_len=a.prompt_len + 264, sleep_level=a.vllm_sleep,
                                 gpu_memory_utilization=a.vllm_gpu_memory_utilization, check_sync=True,
                                 workdir=str(Path(a.work) / "engine_check"))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, n_ids(), (a.prompt_len,), generator=g).tolist() for _ in range(4)]
    kw = dict(max_new_tokens=256, num_samples=4, seed=7, return_logps=True, engine=engine)
    out, again = generate(student, tok, prompts, **kw), generate(student, tok, prompts, **kw)
    recomputed = sequence_logps(student, out, batch_size=2)
    m = out.completion_mask.bool()
    diff = (out.sampler_logps - recomputed)[m].abs()
    with torch.no_grad():
        for p_ in student.parameters():
            p_.mul_(1.5)
    stale = generate(student, tok, prompts, **kw)
    engine.sync_weights(student)
    fresh = generate(student, tok, prompts, **kw)
    row = {"part": "engine", "what": "vLLM vs trainer", "shape": "4x4x256",
           "logp_absdiff_mean": round(float(diff.mean()), 4), "logp_absdiff_max": round(float(diff.max()), 3),
           "seeded_repeat_identical": bool(torch.equal(out.completion_ids, again.completion_ids)),
           "stale_until_sync": bool(torch.equal(stale.completion_ids, out.completion_ids)),
           "changed_after_sync": not torch.equal(fresh.completion_ids, out.completion_ids),
           "sync_check": f"max|diff| {max(engine.last_check.values()):.1e} on {len(engine.last_check)}"}
    del student, engine
    torch.cuda.empty_cache()
    return row


METHOD_FLAGS = {  # beyond the shared ones below; per-method shapes kept small (a smoke run)
    "sft": ["--per_device_batch_size", "2", "--optim", "{optim}"],
    "grpo": ["--per_device_prompts", "2", "--num_generations", "2", "--ref_model_name_or_path", "{student}",
             "--beta", "0.01"],
    "opd": ["--per_device_prompts", "2", "--num_generations", "2", "--teacher_name_or_path", "{teacher}"],
    "stable_opd": ["--per_device_prompts", "2", "--num_generations", "2", "--teacher_name_or_path", "{teacher}",
                   "--ref_model_name_or_path", "{student}"],
}
ROLLOUT_FLAGS = {"hf": ["--rollout_backend", "hf"],
                 "vllm": ["--rollout_backend", "vllm", "--vllm_gpu_memory_utilization", "{util}", "--vllm_sleep", "1",
                          "--vllm_check_sync", "true"]}


def bench_method(a, method: str, backend: str, paths: dict) -> dict:
    run_dir = Path(a.work) / "runs" / f"{method}_{backend}"
    fmt = {"student": paths["student"], "teacher": paths["teacher"], "optim": a.optim, "util": str(a.vllm_gpu_memory_utilization)}
    flags = ["--run_dir", str(run_dir), "--model_name_or_path", paths["student"], "--train_data", paths["data"],
             "--val_data", "", "--prompt_template", "plain", "--max_steps", str(a.steps), "--eval_every", "0",
             "--save_every", "0", "--resume_from", "none", "--dtype", "bfloat16", "--bf16", "true",
             "--gradient_checkpointing", "true", "--max_prompt_length", "128", "--max_completion_length", str(a.method_length),
             "--learning_rate", "1e-6", "--report_to", "none"]
    flags += [f.format(**fmt) for f in METHOD_FLAGS[method]]
    if method != "sft":
        flags += [f.format(**fmt) for f in ROLLOUT_FLAGS[backend]] + ["--optim", a.optim]
    cmd = ["accelerate", "launch", "--config_file", str(ROOT / "configs/accelerate/single_gpu.yaml"),
           str(ROOT / "methods" / f"{method}.py"), *flags]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.method_timeout)
    row = {"part": "methods", "what": f"{method}, {backend}", "shape": f"2x2x{a.method_length}", "wall_s": round(time.time() - t0)}
    log = proc.stdout + proc.stderr
    (Path(a.work) / f"{method}_{backend}.log").write_text(log)
    if proc.returncode != 0:
        unknown = [line for line in log.splitlines() if "unrecognized arguments" in line or "not wired" in line]
        row["status"] = ("not wired: " + unknown[-1][-120:]) if unknown else f"FAILED rc={proc.returncode} (see {method}_{backend}.log)"
        return row
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [m for m in metrics if "perf/step_s" in m][-1]
    row.update(status="ok", step_s=round(last["perf/step_s"], 2), tokens_per_s=round(last.get("perf/tokens_per_s", 0)),
               peak_alloc_GiB=round(last.get("perf/peak_gpu_mem_gib", float("nan")), 1))
    return row


def print_table(rows: list[dict]) -> str:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="engine,step,methods", help="engine, step and/or methods (comma list)")
    p.add_argument("--backends", default="hf,vllm", help="hf and/or vllm (vllm is skipped where not installed)")
    p.add_argument("--methods", default="sft,opd,stable_opd,grpo")
    p.add_argument("--work", default="/tmp/gpu_smoke")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--length", type=int, default=4096, help="max new tokens per response (random models rarely stop)")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--micro_batch", type=int, default=2, help="sequences per forward in scoring and update")
    p.add_argument("--optim", default="adamw", help="adamw or adamw8bit")
    p.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.3)
    p.add_argument("--vllm_sleep", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="steps per method run")
    p.add_argument("--method_length", type=int, default=256)
    p.add_argument("--method_timeout", type=int, default=1200)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: the tests' dry run of the step code
    a = p.parse_args(argv)
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_smoke.py needs a CUDA GPU (issue 9's checks are GPU-only; the CPU tests cover the glue)")
    backends = a.backends.split(",")
    try:
        import vllm  # noqa: F401
    except ImportError:
        if "vllm" in backends:
            print("vllm is not installed here: the vLLM rows are skipped (pip install -r requirements-gpu.txt)")
        backends = [b for b in backends if b != "vllm"]
    Path(a.work).mkdir(parents=True, exist_ok=True)
    print(f"device: {torch.cuda.get_device_name()} ({gib(torch.cuda.mem_get_info()[1])} GiB), torch {torch.__version__}")
    rows = []
    if "engine" in a.part and "vllm" in backends:
        try:
            rows.append(check_engine(a))
        except Exception as e:
            rows.append({"part": "engine", "what": "vLLM vs trainer", "status": f"FAILED {type(e).__name__}: {str(e)[:160]}"})
        print(json.dumps(rows[-1]), flush=True)
    if "step" in a.part:
        for backend in backends:
            try:
                rows.append(bench_step(a, backend))
            except Exception as e:  # keep going: one failing row must not hide the others
                rows.append({"part": "step", "what": f"stable-opd step, {backend}", "status": f"FAILED {type(e).__name__}: {str(e)[:160]}"})
            print(json.dumps(rows[-1]), flush=True)
        by = {r["what"].split(", ")[1]: r for r in rows if r["part"] == "step" and "rollout_tokens_per_s" in r}
        if "hf" in by and "vllm" in by:
            print(f"vLLM / HF rollout throughput: {by['vllm']['rollout_tokens_per_s'] / by['hf']['rollout_tokens_per_s']:.1f}x")
    if "methods" in a.part:
        paths = write_assets(Path(a.work))
        for method in a.methods.split(","):
            for backend in (["hf"] if method == "sft" else backends):
                try:
                    rows.append(bench_method(a, method, backend, paths))
                except Exception as e:
                    rows.append({"part": "methods", "what": f"{method}, {backend}", "status": f"FAILED {type(e).__name__}: {str(e)[:160]}"})
                print(json.dumps(rows[-1]), flush=True)
    table = print_table(rows)
    (Path(a.work) / "table.md").write_text(table + "\n")
    out = os.environ.get("OUT")
    if out:
        (Path(out) / "gpu_smoke_table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
