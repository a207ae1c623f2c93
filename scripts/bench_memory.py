"""Memory of the teacher load options, measured on real-vocabulary fixtures: an fp32 vs a bf16 (vs 8/4-bit) teacher
beside an fp32 student, and the attention implementation.

Models (tests/realtok.py `write_model`, random init, the real Qwen tokenizers; nothing downloaded):
  teacher  "instruct" kind: vocabulary 152,064 rows, untied head (Qwen2.5-7B-Instruct's shape), --hidden x --layers
  student  "math" kind:     vocabulary 151,936 rows, tied head (Qwen2.5-Math-1.5B's shape), --student_hidden x --layers
Cases, each in a fresh subprocess (peaks do not mix), through common.models.load_model / load_frozen:
  teacher:<dtype>[:<attn>]   load the teacher, then one no-grad teacher-forced pass (B x T, hidden states of the
                             last T/2 positions kept, as OPD's scoring pass does)
  step:<dtype>               fp32 student + teacher of <dtype>: the teacher's pass, then the student's forward and
                             chunked full-vocabulary reverse-KL loss (common.losses.chunked_divergence_loss) + backward
Reported: parameter bytes (exact; split into embedding + lm_head and the transformer layers: bitsandbytes
quantizes only the layers' Linear weights, and at these sizes the 152k-row vocabulary dominates; at 7B the layers
are ~86%), RSS after the load with every weight touched (minus the RSS after imports), the peak RSS of the pass / step
over the RSS before it (Linux: /proc/self/clear_refs resets the peak), wall time of the pass / step. 8bit / 4bit
(bitsandbytes) are tried on the device given; where they cannot run the error is reported.

    python scripts/bench_memory.py                      # hidden 1024 x 4 layers teacher, 512 student, B=2 x T=256
    python scripts/bench_memory.py --quick              # hidden 64 x 1 layer: checks that it runs (~1 min)
    python scripts/bench_memory.py --device cuda --cases teacher:float32,teacher:bfloat16,teacher:8bit,teacher:4bit
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CASES = ("teacher:float32,teacher:bfloat16,teacher:float32:eager,teacher:bfloat16:eager,"
                 "teacher:8bit,teacher:4bit,step:float32,step:bfloat16")


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024, help="teacher hidden size")
    p.add_argument("--student_hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--T", type=int, default=256, help="sequence length of the pass (the last T/2 are the completion)")
    p.add_argument("--chunk_size", type=int, default=64, help="positions per chunk of the distillation loss")
    p.add_argument("--cases", default=DEFAULT_CASES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint_dtype", default="bfloat16",
                   help="dtype the teacher checkpoint is saved in (published Qwen2.5 / R1-Distill checkpoints: bfloat16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--work_dir", default="/tmp/stable_opd_bench_memory", help="where the fixture models are written (reused)")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="hidden 64 / 32, 1 layer, B=1 x T=32")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args()
    if args.quick:
        args.hidden, args.student_hidden, args.layers, args.B, args.T = 64, 32, 1, 1, 32
    return args


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) in MB from /proc/self/status."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def fixtures(args) -> dict[str, Path]:
    """The teacher and student folders for these sizes (written once under --work_dir)."""
    from tests.realtok import write_model, write_tokenizer

    root = Path(args.work_dir)
    paths = {"teacher": root / f"instruct_h{args.hidden}_l{args.layers}_{args.checkpoint_dtype}",
             "student": root / f"math_h{args.student_hidden}_l{args.layers}"}
    tok = root / "tokenizer_instruct"
    if not (tok / "tokenizer.json").is_file():
        write_tokenizer("instruct", tok)
    for (role, path), (kind, hidden) in zip(paths.items(), (("instruct", args.hidden), ("math", args.student_hidden))):
        if not (path / "model.safetensors").is_file():
            write_model(kind, path, seed=0, hidden=hidden, layers=args.layers, tokenizer_dir=tok)
            if role == "teacher" and args.checkpoint_dtype != "float32":  # re-saved as published
                import torch
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, args.checkpoint_dtype))
                model.save_pretrained(path)
    return paths


def _param_mb(model, vocab_only: bool | None = None) -> float:
    """Parameter bytes in MB: all, only the embedding + lm_head (vocab_only=True), or only the rest (False)."""
    embeds = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if vocab_only is None or (id(p) in embeds) == vocab_only) / 2**20


def _mem(device) -> tuple[float, float]:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    return rss_mb()


def _reset(device) -> None:
    import torch

    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak()


def run_case(args, case: str) -> dict:
    import torch

    from common.logprobs import completion_hidden
    from common.losses import aggregation_weights, chunked_divergence_loss
    from common.models import load_frozen, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    kind, dtype, *rest = case.split(":")
    attn = rest[0] if rest else None
    paths = fixtures(args)
    quant = dtype if dtype in ("8bit", "4bit") else "none"
    t_dtype = "bfloat16" if quant != "none" else dtype  # compute dtype of a quantized teacher
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151_000, (args.B, args.T), generator=gen).to(dev)
    attn_mask = torch.ones_like(ids)
    n = args.T // 2
    load_model(str(paths["student"]), "float32", trainable=False)  # warm-up (freed at once): the loading code's imports
    _reset(dev)
    base, _ = _mem(dev)
    t0 = time.perf_counter()
    teacher = load_frozen(str(paths["teacher"]), t_dtype, quant, dev, attn_implementation=attn)
    load_s = time.perf_counter() - t0
    with torch.no_grad():  # fault in every page (weights still mmap'd from the checkpoint count once touched), no copy
        for p in teacher.parameters():
            p.sum()
    gc.collect()
    after_load, load_peak = _mem(dev)
    out = {"case": case, "param_mb": _param_mb(teacher), "vocab_param_mb": _param_mb(teacher, True),
           "layer_param_mb": _param_mb(teacher, False),
           "params_m": sum(p.numel() for p in teacher.parameters()) / 1e6, "load_mb": after_load - base,
           "load_peak_mb": load_peak - base, "load_s": load_s, "attn": teacher.config._attn_implementation,
           "teacher_dtype": str(next(teacher.parameters()).dtype).replace("torch.", "")}
    student = None
    if kind == "step":
        student = load_model(str(paths["student"]), "float32").to(dev)
        out["student_param_mb"] = _param_mb(student)
    gc.collect()
    before, _ = _mem(dev)
    _reset(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        h_t, w_t = completion_hidden(teacher, ids, attn_mask, n)
    if student is not None:
        h_s, w_s = completion_hidden(student, ids, attn_mask, n)
        weights = aggregation_weights(torch.ones(args.B, n, device=dev), "token_mean")
        loss, _ = chunked_divergence_loss(h_s, w_s, h_t, w_t, weights, kind="reverse_kl", chunk_size=args.chunk_size,
                                          vocab_limit=151_936)
        loss.backward()
        out["loss"] = float(loss.detach())
    out["pass_s"] = time.perf_counter() - t0
    _, peak = _mem(dev)
    out["pass_peak_mb"] = peak - before
    out["teacher_hidden_dtype"] = str(h_t.dtype).replace("torch.", "")
    return out


def main():
    args = parse()
    if args.case:
        print(json.dumps(run_case(args, args.case)))
        return
    print(f"teacher: Qwen2 vocab 152,064 untied, hidden {args.hidden} x {args.layers} layers | student: vocab 151,936 "
          f"tied, hidden {args.student_hidden} x {args.layers} layers, fp32 | pass: B={args.B} x T={args.T} "
          f"(completion {args.T // 2}) | device {args.device}")
    fixtures(args)  # written once, outside the measured subprocesses
    passthrough = [a for a in sys.argv[1:] if a != "--quick"] + (["--quick"] if args.quick else [])
    rows = []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough, "--case", case],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{case}: not measured (rc {proc.returncode}): {err[:300]}")
            rows.append({"case": case, "error": err[:1000]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"\n{'case':24} {'attn':6} {'params_M':>8} {'param_MB':>9} {'(vocab':>7} {'layers)':>8} {'load_MB':>8} "
          f"{'load_peak':>9} {'pass_peak':>9} {'load_s':>7} {'pass_s':>7}")
    for r in rows:
        if "error" in r:
            continue
        print(f"{r['case']:24} {r['attn']:6} {r['params_m']:8.1f} {r['param_mb']:9.1f} {r['vocab_param_mb']:7.1f} "
              f"{r['layer_param_mb']:8.1f} {r['load_mb']:8.1f} {r['load_peak_mb']:9.1f} {r['pass_peak_mb']:9.1f} "
              f"{r['load_s']:7.2f} {r['pass_s']:7.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "case"}, "rows": rows},
                                             indent=2))


if __name__ == "__main__":
    main()
