"""The memory / time model (common/plan.py, the "cpu" entry) against measurement on this machine (issue 29 item 3).

    python scripts/bench_plan.py                      # every configuration of CONFIGS (~10 min on 2 cores)
    python scripts/bench_plan.py --only c1,c6 --steps 2
    python scripts/bench_plan.py --save m.json; python scripts/bench_plan.py --measured m.json   # re-predict only

Each configuration runs methods/<method>.py as a subprocess for --steps steps on random-init Qwen2 models built from
config (student / teacher hidden x layers, vocabulary 1,000 with the toy tokenizer or 151,936 with the real Qwen
tokenizer of tests/realtok.py), the toy world's prompts, HF rollouts, no eval, no checkpoints, and reports its peak
RSS from the OS (/usr/bin/time, as scripts/bench_opd_step.py) and the median perf/step_s of steps 2.. . The plan is
the same Args through `common.plan.plan(..., gpu="cpu")`, with the prompt width set to the longest prompt of the
data (the batches are padded to their longest prompt; the plan's worst case is max_prompt_length). Targets: memory
within +-15% on every configuration, time within +-30% once calibrated (the "cpu" entry's constants).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import plan as P  # noqa: E402

# name: (method, vocab, student hidden x layers, teacher hidden x layers, completion tokens, P, G, extra flags)
CONFIGS = {
    "c0": ("opd", 1000, (32, 1), (32, 1), 8, 1, 2, []),  # calibration: tensors ~1 MB, its RSS = the process base
    "c1": ("opd", 1000, (128, 2), (256, 4), 64, 4, 4, []),
    "c2": ("stable_opd", 1000, (128, 2), (256, 4), 64, 4, 4, []),  # both Stable-OPD terms on (the defaults)
    "c3": ("opd", 151936, (128, 2), (256, 4), 64, 4, 4, []),
    "c4": ("stable_opd", 151936, (128, 2), (256, 4), 64, 2, 2, ["--use_peft", "true"]),
    "c5": ("opd", 1000, (512, 4), (512, 4), 256, 4, 4, ["--loss_type", "full_kl"]),
    "c6": ("opd", 1000, (1024, 8), (256, 4), 64, 2, 2, []),
    "c7": ("opd", 1000, (256, 2), (256, 2), 2048, 1, 4, ["--gradient_checkpointing", "true"]),
    "c8": ("opd", 1000, (128, 2), (256, 4), 128, 16, 4, ["--micro_batch_tokens", "2048"]),
    "c9": ("stable_opd", 1000, (256, 4), (256, 4), 256, 4, 4, ["--mix_coef", "0", "--use_peft", "true"]),
    "c10": ("grpo", 1000, (256, 2), (256, 2), 64, 4, 4, ["--beta", "0.04", "--num_minibatches", "2"]),  # no teacher
}
# tests/test_plan.py's drift check: a toy run (the process base dominates) and a parameter-heavy one (~0.6 GB of
# student weights, gradients and AdamW state), a few seconds each
DRIFT_CONFIGS = {
    "d1": ("opd", 1000, (128, 2), (256, 4), 32, 2, 2, []),
    "d2": ("opd", 1000, (1024, 4), (128, 2), 16, 1, 2, []),
}
CONFIGS.update(DRIFT_CONFIGS)


def shape_for(vocab: int, hidden: int, layers: int) -> dict:
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


def model_dir(cache: Path, vocab: int, hidden: int, layers: int) -> Path:
    """A random-init Qwen2 folder (config, weights, tokenizer), built once."""
    out = cache / f"v{vocab}_h{hidden}_l{layers}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from common.models import load_tokenizer

    if vocab == 151936:
        sys.path.insert(0, str(ROOT / "tests"))
        from realtok import write_tokenizer

        tok_dir = cache / "qwen_tokenizer"
        if not tok_dir.exists():
            write_tokenizer("math", tok_dir)
        tok = load_tokenizer(str(tok_dir))
    else:
        from common.toy import load_toy_tokenizer

        tok = load_toy_tokenizer()
    cfg = Qwen2Config(**shape_for(vocab, hidden, layers), max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(hidden * 31 + layers)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def train_file(cache: Path) -> Path:
    path = cache / "toy" / "train.jsonl"
    if not path.exists():
        from common.toy import build_toy_world

        build_toy_world(cache / "toy", n_train=256, n_val=8, n_test=8, max_steps=2)
    return path


def prompt_width(student: Path, train: Path, max_prompt_length: int) -> int:
    """The longest prompt (tokens, chat template) of the data that fits max_prompt_length."""
    from common.data import COT_INSTRUCTION, encode_prompts, load_rows
    from common.models import load_tokenizer

    tok = load_tokenizer(str(student))
    lengths = [len(p) for p in encode_prompts(tok, load_rows(str(train)), "chat", COT_INSTRUCTION)]
    return max(n for n in lengths if n <= max_prompt_length)


def flags_of(name: str, cache: Path, steps: int) -> tuple[str, dict, list]:
    method, vocab, (sh, sl), (th, tl), T, prompts, G, extra = CONFIGS[name]
    student, teacher, train = model_dir(cache, vocab, sh, sl), model_dir(cache, vocab, th, tl), train_file(cache)
    flags = {"model_name_or_path": str(student), "teacher_name_or_path": str(teacher), "train_data": str(train),
             "val_data": "", "max_steps": steps, "per_device_prompts": prompts, "num_generations": G,
             "max_completion_length": T, "save_every": 0, "eval_every": 0, "resume_from": "none",
             "learning_rate": 1e-12, "max_prompt_length": 512}
    if method not in ("opd", "stable_opd"):
        del flags["teacher_name_or_path"]
    return method, flags, extra


def measure(name: str, cache: Path, steps: int) -> dict:
    """Peak RSS (GiB, from the OS) and the median perf/* seconds of steps 2.. of one configuration's run."""
    method, flags, extra = flags_of(name, cache, steps)
    words = [w for k, v in flags.items() for w in (f"--{k}", str(v))] + extra
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "methods" / f"{method}.py"), "--run_dir", tmp, *words]
        rss = Path(tmp) / "maxrss.txt"
        with (Path(tmp) / "stderr.txt").open("w") as err:
            proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss), *cmd], stdout=subprocess.DEVNULL,
                                  stderr=err, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: {' '.join(cmd)}\n{(Path(tmp) / 'stderr.txt').read_text()[-3000:]}")
        peak_gib = int(rss.read_text().split()[-1]) * 1024 / P.GiB
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/step_s" in r and r["step"] >= 2]
    # GRPO logs its reference pass as perf/ref_s, not perf/teacher_s
    scoring = lambda r, k: r.get(f"perf/{k}", r.get("perf/ref_s", 0.0))  # noqa: E731
    out = {k: statistics.median(scoring(r, k) for r in rows) for k in ("step_s", "rollout_s", "teacher_s", "update_s")}
    return {**out, "peak_gib": peak_gib, "load": os.getloadavg()[0]}


def predict(name: str, cache: Path, steps: int = 3) -> P.Plan:
    """The plan of the same Args on the "cpu" entry, at the data's longest prompt."""
    method, flags, extra = flags_of(name, cache, steps)
    values = dict(flags)
    for k, v in zip(extra[::2], extra[1::2]):
        values[k.lstrip("-")] = {"true": True, "false": False}.get(v, int(v) if v.isdigit() else v)
    args = P.method_args(method, values)
    args.max_prompt_length = prompt_width(Path(flags["model_name_or_path"]), Path(flags["train_data"]), 512)
    teacher = P.shape_of(flags["teacher_name_or_path"]) if "teacher_name_or_path" in flags else None
    return P.plan(args, method, P.shape_of(flags["model_name_or_path"]), teacher, gpu="cpu", choose=False)


SHORT = {"--use_peft true": "LoRA", "--loss_type full_kl": "full_kl", "--gradient_checkpointing true": "ckpt",
         "--mix_coef 0": "no mix", "--num_minibatches 2": "2 minibatches", "--micro_batch_tokens 2048": "budget 2048"}


def short_flags(extra: list) -> str:
    pairs = [" ".join(extra[i : i + 2]) for i in range(0, len(extra), 2)]
    return ", ".join(SHORT.get(x, x.lstrip("-").replace("_", " ")) for x in pairs)


def row(name: str, m: dict, p: P.Plan) -> str:
    """One line of the table (<= 120 characters: it goes into docs/LOG.md)."""
    method, vocab, (sh, sl), (th, tl), T, prompts, G, extra = CONFIGS[name]
    pred_gib = p.peak / P.GiB
    teacher = f" / {th}x{tl}" if method != "grpo" else ""
    return (f"| {name} | {method} | {vocab:,} | {sh}x{sl}{teacher} | {T} | {prompts}x{G} | {short_flags(extra)} | "
            f"{pred_gib:.2f} / {m['peak_gib']:.2f} ({pred_gib / m['peak_gib'] - 1:+.0%}) | "
            f"{p.step_seconds:.1f} / {m['step_s']:.1f} ({p.step_seconds / m['step_s'] - 1:+.0%}) | {m['load']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma list of CONFIGS names (default: all)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cache", default=str(ROOT / "runs" / "bench_fixtures" / "plan"))
    ap.add_argument("--save", default="", help="write the measurements (JSON) here")
    ap.add_argument("--measured", default="", help="re-predict these saved measurements instead of running")
    a = ap.parse_args()
    cache = Path(a.cache)
    saved = json.loads(Path(a.measured).read_text()) if a.measured else {}
    names = a.only.split(",") if a.only else list(saved or (k for k in CONFIGS if k not in DRIFT_CONFIGS))
    print("| cfg | method | V | student / teacher | T | PxG | flags | peak GiB pred / meas | step s pred / meas "
          "| load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        m = saved[name] if name in saved else measure(name, cache, a.steps)
        saved[name] = m
        print(row(name, m, predict(name, cache, a.steps)), flush=True)
        if a.save:
            Path(a.save).write_text(json.dumps(saved, indent=1))


if __name__ == "__main__":
    main()
