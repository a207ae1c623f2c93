"""One GPU check command for a short lease on a bare GPU machine (issue 31); `--dry_run` runs the same items on CPU.

    python scripts/gpu_check.py --out $OUT              # on the GPU machine: ~9 min (--deadline 540)
    python scripts/gpu_check.py --dry_run --out /tmp/gc # on CPU (CI): tiny widths, the real vocabulary 151,936

Each item runs in its own subprocess under a per-item timeout and the global --deadline, and appends one JSON line
to OUT/results.jsonl as it finishes (status ok / failed / timeout / skipped, with its numbers); OUT/table.md is
rewritten after each item; OUT/env.json is the environment probe; OUT/log.txt the items' output. 4 files, nothing
installed, downloaded or checkpointed. Models are built from config directly on the device (torch.device context).
Items, in priority order (docs/GPU.md has the predictions each is checked against):
  a_fp32  Stable-OPD's step from methods/stable_opd.py's own objective (opd_advantages, reference_pass, token_terms,
          vocab_terms, objective; the fused head as in main()) on synthetic rollouts: fp32 weights + bf16
          autocast, checkpointing on
  a_bf16  the same with pure bf16 weights
  b       HF generation throughput with recorded log-probs (common.rollout.generate)
  c       chunked lm_head + chunked KL vs naive full logits: time, peak memory, error vs fp64 in fp32 / tf32 / bf16
  e       (a) with gradient checkpointing off (memory and time against a_bf16)
  f       8-bit AdamW (bitsandbytes) one step, only when bitsandbytes imports; skipped with its reason otherwise
Not done yet (recorded as skipped with that reason): d (FSDP2 save / resume), e's LoRA row.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ITEMS = ["a_fp32", "a_bf16", "b", "c", "e", "d", "f"]
TIMEOUT_S = {"a_fp32": 150, "a_bf16": 120, "b": 90, "c": 60, "e": 120, "d": 60, "f": 60}  # GPU per-item limits
COMMON = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6,
              rope_theta=1000000.0, max_position_embeddings=32768, use_sliding_window=False, attention_dropout=0.0,
              bos_token_id=151643, eos_token_id=151643, pad_token_id=151643, initializer_range=0.02, vocab_size=151936)
STUDENT = dict(COMMON, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, tie_word_embeddings=True)  # Qwen2.5-1.5B's shape
TEACHER = dict(COMMON, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False)  # Qwen2.5-7B's shape (vocabulary cut to the student's)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
EOS = 151643


def shapes(dry: bool) -> dict:
    """(a)'s and the other items' shapes: the issue's on the GPU, tiny widths (same vocabulary) in the dry run."""
    if dry:
        return dict(student=dict(STUDENT, **TINY), teacher=dict(TEACHER, **TINY), prompts=2, samples=2, length=48,
                    prompt_len=(8, 20), steps=2, gen=(4, 16), head_n=256)
    return dict(student=STUDENT, teacher=TEACHER, prompts=4, samples=4, length=4096, prompt_len=(128, 512), steps=3,
                gen=(16, 1024), head_n=8192)


def build(cfg: dict, dtype, device, seed: int, ckpt: bool = False):
    """A random model from config, initialised on `device` itself (no host-side init of 7B weights)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**cfg), dtype=dtype)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mem(device) -> dict:
    if device.type != "cuda":
        return {"max_alloc_GiB": None, "max_reserved_GiB": None}
    return {"max_alloc_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "max_reserved_GiB": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def synthetic_rollouts(P: int, G: int, T: int, prompt_len: tuple, vocab: int, seed: int):
    """P prompts x G samples: left-padded prompts of varied lengths, completions of T positions where about half
    the rows stop with EOS at a random point (mask covers the EOS), the rest run to T ("length")."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(prompt_len[0], prompt_len[1] + 1, (P,), generator=g)
    L = int(lens.max())
    p_ids, p_attn = torch.full((P * G, L), EOS), torch.zeros(P * G, L, dtype=torch.long)
    c_ids = torch.randint(10, vocab - 300, (P * G, T), generator=g)
    c_mask = torch.ones(P * G, T, dtype=torch.long)
    finish = []
    for b in range(P * G):
        n = int(lens[b // G])
        p_ids[b, L - n :] = torch.randint(10, vocab - 300, (n,), generator=g)
        p_attn[b, L - n :] = 1
        if b % 2 == 0:  # stops: EOS at a random position, padding after it
            stop = int(torch.randint(T // 4, T, (1,), generator=g))
            c_ids[b, stop], c_ids[b, stop + 1 :], c_mask[b, stop + 1 :] = EOS, EOS, 0
            finish.append("stop")
        else:
            finish.append("length")
    golden = torch.randint(10, vocab - 300, (P, T // 2), generator=g)
    golden[:, -1] = EOS
    return p_ids, p_attn, c_ids, c_mask, finish, golden, lens


def item_a(sh: dict, device, dtype_name: str, ckpt: bool) -> dict:
    """Stable-OPD's update on synthetic rollouts through methods/stable_opd.py's own loss functions, as its main()
    wires them (sampled loss, full reference KL, golden NLL, one minibatch over all rows, the fused lm_head gradient)."""
    from accelerate import Accelerator

    from common.logprobs import completion_forward, join_rows, stack_rows
    from common.models import make_optimizer
    from common.run import global_weights_BT
    from methods import stable_opd as so

    args = so.Args(bf16=True, dtype=dtype_name, gradient_checkpointing=ckpt, ref_kl_coef=0.01, mix_coef=0.1)
    acc = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    dtype = torch.float32 if dtype_name == "float32" else torch.bfloat16
    V = sh["student"]["vocab_size"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_build = time.time()
    model = build(sh["student"], dtype, device, 0, ckpt)
    teacher = build(sh["teacher"], torch.bfloat16, device, 1).eval().requires_grad_(False)
    ref = build(sh["student"], torch.bfloat16, device, 0).eval().requires_grad_(False)
    sync(device)
    t_build = time.time() - t_build
    opt = make_optimizer(model.parameters(), "adamw", lr=1e-6, weight_decay=0.0)
    P, G, T = sh["prompts"], sh["samples"], sh["length"]
    rows, n_warn = [], 0
    for step in range(sh["steps"]):
        p_ids, p_attn, c_ids, c_mask, finish, gold, lens = synthetic_rollouts(P, G, T, sh["prompt_len"], V, step)
        ids, attn = torch.cat([p_ids, c_ids], 1).to(device), torch.cat([p_attn, c_mask], 1).to(device)
        mask = c_mask.to(device).float()
        sync(device)
        t0 = time.time()
        with torch.no_grad(), acc.autocast():  # log pi_old: the sampler's log-probs (here the student's own)
            old_logp = completion_forward(model, ids, attn, T, logps=True, vocab_limit=V)["logps"]
            scored = completion_forward(teacher, ids, attn, T, eos_id=EOS, vocab_limit=V)
        sync(device)
        t_teacher, t1 = time.time() - t0, time.time()
        adv = so.opd_advantages(scored["logps"], old_logp, mask)
        g_ids = torch.cat([p_ids[::G], gold], 1).to(device)
        g_attn = torch.cat([p_attn[::G], torch.ones_like(gold)], 1).to(device)
        g_mask, g_T = torch.ones(P, gold.shape[1], device=device), gold.shape[1]
        weights = global_weights_BT(acc, mask, args.aggregation)
        b = {"old": old_logp, "adv": adv, "w": weights, "teacher": None,  # what the objective's terms read
             "gold_w": global_weights_BT(acc, g_mask, "token_mean"), "teacher_gold": None}
        mb_ids, mb_attn, mb_T = join_rows(ids, attn, T, g_ids, g_attn, g_T, EOS)
        b["ref_w"] = stack_rows(weights, torch.zeros_like(b["gold_w"]), mb_T)
        need = {"logps": True, "entropy": True, "hidden": False, "chunk_size": None}
        coefs = so.initial_coefs(args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            b["ref"], b["kl_to"] = so.reference_pass(acc, ref, mb_ids, mb_attn, mb_T, b["ref_w"], args, V)
            with acc.autocast():
                per_token = (lambda lp, kl: so.objective(so.token_terms(lp, kl, b, args), coefs)) if so.fused_head(args) else None
                student = completion_forward(model, mb_ids, mb_attn, mb_T, args.temperature, **need, kl_to=b["kl_to"],
                                             eos_id=EOS, vocab_limit=V, token_loss=per_token)
                terms = {k: v.sum() for k, v in so.token_terms(student["logps"], student.get("kl"), b, args).items()}
                terms.update(so.vocab_terms(student, b, args, V))
                loss = so.objective(terms, coefs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
        n_warn += sum("recomput" in str(w.message).lower() or "checkpoint" in str(w.message).lower() for w in caught)
        t_update = time.time() - t1
        n_tok = float(mask.sum())
        rows.append({"step_s": round(t_teacher + t_update, 2), "teacher_s": round(t_teacher, 2),
                     "update_s": round(t_update, 2), "tokens_per_s": round(n_tok / (t_teacher + t_update), 1),
                     "loss": round(float(loss.detach()), 5), "tokens": int(n_tok), "stopped": finish.count("stop")})
        assert torch.isfinite(loss), f"non-finite loss at step {step}"
    last = rows[-1]  # the first step warms up
    return {**last, "build_s": round(t_build, 1), "steps": rows, "recompute_warnings": n_warn,
            "shape": f"{P}x{G}x{T}", **mem(device)}


def item_b(sh: dict, device) -> dict:
    """HF generate with recorded log-probs: tokens/s of the sampler at (n prompts x max_new_tokens)."""
    from common.rollout import generate
    from scripts.gpu_smoke import synthetic_tokenizer

    tok = synthetic_tokenizer()
    model = build(sh["student"], torch.bfloat16, device, 0).eval()
    n, length = sh["gen"]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 150000, (64,), generator=g).tolist() for _ in range(n)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.time()
    out = generate(model, tok, prompts, max_new_tokens=length, num_samples=1, seed=0, return_logps=True)
    sync(device)
    dt = time.time() - t0
    n_tok = int(out.completion_mask.sum())
    assert out.sampler_logps.shape == out.completion_ids.shape
    return {"shape": f"{n}x{length}", "gen_s": round(dt, 2), "tokens": n_tok, "tokens_per_s": round(n_tok / dt, 1),
            **mem(device)}


def item_c(sh: dict, device) -> dict:
    """chunked_divergence_loss (reverse KL, chunked lm_head) vs naive full logits at N positions, H 1,536, V 151,936:
    time, peak memory and |error| against an fp64 reference, in fp32, tf32 and bf16."""
    from common.losses import chunked_divergence_loss

    N, H, V = sh["head_n"], 1536, 151936
    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(1, N, H, generator=g) * 0.5, torch.randn(1, N, H, generator=g) * 0.5
    ws, wt = torch.randn(V, H, generator=g) * 0.02, torch.randn(V, H, generator=g) * 0.02
    w = torch.full((1, N), 1.0 / N)

    def naive(a, wa, b, wb, weights):
        lp, lq = torch.log_softmax((a @ wa.T).float(), -1), torch.log_softmax((b @ wb.T).float(), -1)
        return ((lp.exp() * (lp - lq)).sum(-1) * weights).sum()

    ref = float(naive(hs.double(), ws.double(), ht.double(), wt.double(), w.double()))
    out = {"N": N, "H": H, "V": V, "fp64": ref}
    for prec in ("fp32", "tf32", "bf16"):
        dt = torch.bfloat16 if prec == "bf16" else torch.float32
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        x = [t.to(device, dt) for t in (hs, ws, ht, wt)] + [w.to(device)]
        chunked = lambda *a: chunked_divergence_loss(*a, kind="reverse_kl", chunk_size=1024)[0]  # noqa: E731
        for name, fn in (("naive", naive), ("chunked", chunked)):
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                sync(device)
                t0 = time.time()
                val = float(fn(*x))
                sync(device)
                out[f"{name}_{prec}"] = {"s": round(time.time() - t0, 4), "abs_err": abs(val - ref), **mem(device)}
            except torch.OutOfMemoryError as e:  # the naive [N, V] logits may not fit: that is a result too
                out[f"{name}_{prec}"] = {"error": f"OOM: {str(e)[:120]}"}
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def item_f(sh: dict, device) -> dict:
    """bitsandbytes 8-bit AdamW: one step on the student (common.models.make_optimizer's adamw8bit)."""
    from common.models import make_optimizer

    model = build(sh["student"], torch.float32, device, 0)
    opt = make_optimizer(model.parameters(), "adamw8bit", lr=1e-6, weight_decay=0.0)
    ids = torch.randint(10, 150000, (2, 64), device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return {"adamw8bit_step": "ok", **mem(device)}


def run_item(name: str, dry: bool) -> dict:
    device = torch.device("cpu" if dry else "cuda")
    sh = shapes(dry)
    if name == "a_fp32":
        return item_a(sh, device, "float32", ckpt=True)
    if name == "a_bf16":
        return item_a(sh, device, "bfloat16", ckpt=True)
    if name == "e":
        return {**item_a(sh, device, "bfloat16", ckpt=False), "gradient_checkpointing": False}
    if name == "b":
        return item_b(sh, device)
    if name == "c":
        return item_c(sh, device)
    if name == "f":
        return item_f(sh, device)
    raise ValueError(name)


def skip_reason(name: str) -> str | None:
    """Why an item is skipped before it starts (recorded in results.jsonl), or None."""
    import importlib.util

    if name == "d":
        return "not implemented yet (FSDP2 2 steps + checkpoint + resume: issue 31 follow-up)"
    if name == "f" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes not importable (carry its wheel to run this item)"
    return None


def probe(out: Path) -> dict:
    """Versions, device, free disk: OUT/env.json."""
    import accelerate
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "cuda_available": torch.cuda.is_available(),
           "cuda": torch.version.cuda, "free_disk_GiB": round(shutil.disk_usage(out).free / 2**30, 1)}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        env.update(gpu=torch.cuda.get_device_name(0), gpu_total_GiB=round(total / 2**30, 1),
                   gpu_free_GiB=round(free / 2**30, 1))
    for mod in ("peft", "bitsandbytes", "vllm", "safetensors", "tokenizers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001  (absent or broken: both are facts to record)
            env[mod] = f"not importable ({type(e).__name__})"
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    return env


def write_table(out: Path, results: list[dict]) -> None:
    lines = ["| item | status | s | key numbers |", "|---|---|---|---|"]
    for r in results:
        keys = {k: v for k, v in r.items() if k not in ("item", "status", "wall_s", "steps", "reason")}
        flat = lambda v: ("/".join(f"{x}={y:.3g}" if isinstance(y, float) else f"{x}={y}"  # noqa: E731
                                   for x, y in v.items()) if isinstance(v, dict) else v)
        text = r.get("reason") or ", ".join(f"{k} {flat(v)}" for k, v in keys.items())
        lines.append(f"| {r['item']} | {r['status']} | {r.get('wall_s', '')} | {text} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/gpu_check")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds for all items together")
    ap.add_argument("--dry_run", action="store_true", help="CPU, tiny widths, real vocabulary")
    ap.add_argument("--items", default=",".join(ITEMS))
    ap.add_argument("--item_timeout", type=float, default=0.0, help="override every per-item timeout (0 = table)")
    ap.add_argument("--item", default="", help=argparse.SUPPRESS)  # internal: run one item in this process
    a = ap.parse_args(argv)
    items = [x for x in a.items.split(",") if x]
    bad = [x for x in items if x not in ITEMS]
    if bad or a.deadline <= 0 or a.item_timeout < 0:
        ap.error(f"unknown items {bad} (known: {ITEMS})" if bad else "--deadline must be > 0, --item_timeout >= 0")
    if a.item:
        result = run_item(a.item, a.dry_run)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if not a.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device here: run with --dry_run on CPU")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("results.jsonl", "table.md", "log.txt"):
        (out / f).unlink(missing_ok=True)
    print(json.dumps(probe(out)), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    start, results = time.time(), []
    for name in items:
        left = a.deadline - (time.time() - start)
        reason = skip_reason(name) or (None if left > 5 else f"global deadline reached ({a.deadline:.0f} s)")
        row = {"item": name}
        if reason:
            row.update(status="skipped", reason=reason)
        else:
            limit = min(a.item_timeout or TIMEOUT_S[name], left)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--item", name] + (["--dry_run"] if a.dry_run else [])
            t0 = time.time()
            with open(out / "log.txt", "a") as log:
                log.write(f"=== {name} (limit {limit:.0f} s)\n")
                log.flush()
                try:
                    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                       timeout=limit)
                    log.write(p.stdout)
                    got = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                    if p.returncode == 0 and got:
                        row.update(status="ok", **json.loads(got[-1][7:]))
                    else:
                        row.update(status="failed", reason=f"exit {p.returncode} (see log.txt)")
                except subprocess.TimeoutExpired as e:
                    log.write(e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
                    row.update(status="timeout", reason=f"killed after {limit:.0f} s")
            row["wall_s"] = round(time.time() - t0, 1)
        results.append(row)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        write_table(out, results)
        print(json.dumps({k: row[k] for k in ("item", "status") if k in row} | {"wall_s": row.get("wall_s")}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
