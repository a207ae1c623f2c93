"""Evaluate a model on math benchmarks: sample n responses per problem, grade them, report.

Per benchmark, over P problems with n samples each (c_p of them correct for problem p):
    acc      = (1 / (P n)) sum_p c_p            avg@n; the paper's avg@32 (AIME, AMC) and pass@1 (n = 1)
    acc_std  = std over the n sample indices j of acc_j = (1 / P) sum_p correct[p, j]   (ddof = 1; 0 if n = 1)
    pass@k   = (1 / P) sum_p [1 - C(n - c_p, k) / C(n, k)]   unbiased (Chen et al. 2021), k = 1, 2, 4, ... <= n
plus the answer-extraction failure rate (no answer found), truncation rate (length cap hit without
EOS), repetition rate (the paper's zlib test, or our n-gram test for short responses: see
common/metrics.py) and response length stats (tokens). Grading is `common.grading.grade_batch`.

Outputs in --output_dir: `settings.json` (what the numbers depend on), per benchmark `<name>/samples.jsonl`
(one line per sample, with the extraction method) and `<name>/result.json` (written last and
atomically: it marks the benchmark finished), then `results.json` (every finished benchmark, the
generation settings, model, commit, date) and `results.md` (the markdown table, see eval/table.py).
Re-running the same command skips finished benchmarks; a folder written with different settings is
refused, never mixed into.

`--preset paper` (arXiv 2604.08527, Sec. 4): AIME24, AIME25, AMC23 avg@32 and MATH500, Minerva,
OlympiadBench pass@1 (one sample), temperature 0.6. The paper does not state top_p or the length cap;
we use top_p 0.95 (the DeepSeek-R1 / open-r1 evaluation convention) and max_new_tokens 8192 (its
training data keeps solutions of <= 8,192 tokens). Flags given with non-default values override it.

    python eval/evaluate.py --model_name_or_path runs/toy/teacher/final --benchmarks toy --max_new_tokens 256
    python eval/evaluate.py --model_name_or_path Qwen/Qwen2.5-Math-1.5B --preset paper --dtype bfloat16
    python eval/evaluate.py --model_name_or_path runs/opd/final --benchmarks aime24,amc23 --n_samples 32 --temperature 0.6

`common.evaluation.evaluate_rows(...)` is the same evaluation as a function (in-training eval on a fixed subset).
"""

import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # [plumbing] run from anywhere without installing

from common.data import COT_INSTRUCTION  # noqa: E402
from common.errors import BadInput  # noqa: E402
from common.evaluation import evaluate_rows  # noqa: E402
from eval.benchmarks import BENCHMARKS, REPO_ROOT, load_benchmark, resolve_names, rows_digest  # noqa: E402
from eval.table import markdown_table  # noqa: E402

PAPER_PRESET = {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 8192}
PAPER_N_SAMPLES = {"aime24": 32, "aime25": 32, "amc23": 32}  # avg@32; every other benchmark: pass@1, n = 1
# Everything the numbers depend on. batch_size, grade_timeout, output paths and labels are left out:
# they change speed or bookkeeping, not the evaluation protocol.
SETTING_KEYS = ("model_name_or_path", "tokenizer_name_or_path", "dtype", "backend", "preset", "n_samples",
                "temperature", "top_p", "top_k", "max_new_tokens", "prompt_template", "instruction", "seed", "limit")


@dataclass
class Args:
    model_name_or_path: str = field(metadata={"help": "Model folder (save_pretrained) or hub id to evaluate."})
    tokenizer_name_or_path: str = field(default="", metadata={"help": "Defaults to the model's."})
    output_dir: str = field(default="", metadata={"help": "Results folder (default runs/eval/<label>). Re-running resumes it."})
    label: str = field(default="", metadata={"help": "Row name in tables (default: derived from the model path)."})
    benchmarks: str = field(default="all", metadata={"help": f"all (the paper's six) or a comma list of: {', '.join(BENCHMARKS)}."})
    data_dir: str = field(default="", metadata={"help": "Folder of <name>.jsonl benchmark files (default assets/benchmarks)."})
    preset: Literal["none", "paper"] = field(default="none", metadata={"help": "none, or paper: the paper's protocol (see the module docstring)."})
    n_samples: int = field(default=1, metadata={"help": "Samples per problem (avg@n, pass@k for k <= n).", "range": "[1, inf)"})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature; 0 = greedy (then n_samples must be 1).", "range": "[0, inf)"})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (ignored when greedy).", "range": "(0, 1]"})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens only (0 = off; ignored when greedy).", "range": "[0, inf)"})
    max_new_tokens: int = field(default=2048, metadata={"help": "Generation cap per response (the Qwen2.5-Math toolkit's default).", "range": "[1, inf)"})
    prompt_template: Literal["chat", "plain"] = field(default="chat", metadata={"help": "chat (the tokenizer's chat template) or plain (base models)."})
    instruction: str = field(default=COT_INSTRUCTION, metadata={"help": "Appended to every problem (Qwen2.5-Math CoT prompt)."})
    backend: Literal["hf", "vllm"] = field(default="hf", metadata={"help": "Generation backend: hf or vllm (GPU; vLLM loads the checkpoint itself)."})
    gpu_memory_utilization: float = field(default=0.85, metadata={"help": "vLLM: share of the GPU for weights + KV cache.", "range": "(0, 1]"})
    max_model_len: int = field(default=0, metadata={"help": "vLLM: longest prompt + response (0 = the model's context length).", "range": "[0, inf)"})
    dtype: Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = field(default="float32", metadata={"help": "Weight dtype: float32, or bfloat16 on GPUs."})
    batch_size: int = field(default=64, metadata={"help": "Sequences generated at once (prompts x samples).", "range": "[1, inf)"})
    seed: int = field(default=0, metadata={"help": "Sampling seed (samples are a function of seed, model and data).", "range": "[0, 4294967295]"})
    limit: int = field(default=0, metadata={"help": "Evaluate only the first N problems of each benchmark (0 = all); for smoke tests.", "range": "[0, inf)"})
    grade_timeout: float = field(default=5.0, metadata={"help": "Seconds per math-verify comparison before it counts as wrong.", "range": "(0, inf)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default). 1 is fastest for the toy "
                                                      "models: a second thread slows their tiny decode steps down.", "range": "[0, inf)"})


class ResultsFolderError(BadInput, ValueError):
    """A results folder that holds results computed with different settings."""


class EvalConfigError(BadInput, ValueError):
    """Flags that contradict each other or name something unknown."""


# ----------------------------------------------------------------------------- settings, resume, files


def apply_preset(args: Args) -> Args:
    """Args with the preset's values filled in where the flag was left at its default."""
    if args.preset not in ("none", "paper"):
        raise EvalConfigError(f"unknown preset {args.preset!r}; choose none or paper")
    if args.preset == "none":
        return args
    defaults = {f.name: f.default for f in dataclasses.fields(Args)}
    updates = {k: v for k, v in PAPER_PRESET.items() if getattr(args, k) == defaults[k]}
    return dataclasses.replace(args, **updates)


def n_samples_for(args: Args, name: str) -> int:
    """Samples per problem for benchmark `name`: the paper's 32 / 1 under the preset unless n_samples was set."""
    if args.preset == "paper" and args.n_samples == 1:
        return PAPER_N_SAMPLES.get(name, 1)
    return args.n_samples


def eval_settings(args: Args) -> dict:
    """The settings the numbers depend on; local model paths are made absolute so cwd does not matter."""
    settings = {k: getattr(args, k) for k in SETTING_KEYS}
    for key in ("model_name_or_path", "tokenizer_name_or_path"):
        if settings[key] and os.path.exists(settings[key]):
            settings[key] = str(Path(settings[key]).resolve())
    return settings


def check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse a folder holding results whose settings.json differs from `settings`. Read-only: settings.json is
    written with the first result (`save_benchmark`), so a run that fails before it leaves the folder as it was."""
    path = out_dir / "settings.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise ResultsFolderError(f"--output_dir {out_dir} is a file, not a folder: choose another --output_dir")
    if path.is_file() and any(out_dir.glob("*/result.json")):  # a folder with no finished benchmark has nothing to protect
        try:
            old = json.loads(path.read_text())
        except ValueError as e:
            raise ResultsFolderError(f"{path} is not valid JSON ({e}), and the folder holds results: use another "
                                     "--output_dir, or restore the file") from e
        diff = {k: (old.get(k), settings.get(k)) for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)}
        if diff:
            lines = "\n".join(f"  {k}: folder has {a!r}, this run has {b!r}" for k, (a, b) in diff.items())
            raise ResultsFolderError(f"{out_dir} holds results computed with different settings:\n{lines}\n"
                                     "Use another --output_dir (or delete this one); results are never mixed.")
        return


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def finished_result(out_dir: Path, name: str, settings: dict, digest: str) -> dict | None:
    """The benchmark's result.json if it was finished with these settings on this data, else None."""
    path = out_dir / name / "result.json"
    if not path.is_file() or not (out_dir / name / "samples.jsonl").is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("settings") != settings or result.get("data_sha256") != digest:
        raise ResultsFolderError(f"{path} was computed with other settings or data; use another --output_dir")
    return result


def save_benchmark(out_dir: Path, name: str, result: dict, samples: list[dict]) -> None:
    """settings.json (what the folder's results depend on), samples.jsonl, then result.json (the finished marker),
    each written atomically."""
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "settings.json", json.dumps(result["settings"], indent=2) + "\n")
    lines = [json.dumps({"benchmark": name, **s}, ensure_ascii=False) + "\n" for s in samples]
    write_atomic(folder / "samples.jsonl", "".join(lines))
    write_atomic(folder / "result.json", json.dumps(result, indent=2) + "\n")


def repo_commit() -> str:
    """`git rev-parse HEAD` of this repo (suffix -dirty with uncommitted changes), or "unknown"."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _now() -> str:
    """UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def default_label(model: str) -> str:
    """A short row name: the model folder's name, with its parent for `final` / `step_N` exports."""
    path = Path(model.rstrip("/"))
    if path.name == "final" or path.name.startswith("step_"):
        return f"{path.parent.name}/{path.name}"
    return path.name or model


# ----------------------------------------------------------------------------- main


def load_policy(args: Args):
    """Tokenizer, frozen model (on the GPU when there is one) and, for --backend vllm, the engine.

    vLLM loads a checkpoint folder itself (the HF model is then not loaded: model is None); a config.json
    (random weights) is built with transformers and its weights synced into the engine.
    """
    import torch

    from common.models import load_model, load_tokenizer
    from common.vllm_engine import make_rollout_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or args.model_name_or_path)
    engine = None
    if args.backend == "vllm" and not args.model_name_or_path.endswith(".json"):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model_name_or_path)
        engine = make_rollout_engine("vllm", args.model_name_or_path, tokenizer, dtype=args.dtype, seed=args.seed,
                                     gpu_memory_utilization=args.gpu_memory_utilization, sleep_level=0,
                                     max_model_len=args.max_model_len or None)
        model = None
    else:
        model = load_model(args.model_name_or_path, dtype=args.dtype, trainable=False, seed=args.seed)
        config = model.config
        if torch.cuda.is_available():
            model = model.to("cuda")
        if args.backend == "vllm":
            engine = make_rollout_engine("vllm", model, tokenizer, dtype=args.dtype, seed=args.seed,
                                         gpu_memory_utilization=args.gpu_memory_utilization, sleep_level=0,
                                         max_model_len=args.max_model_len or None)
    context = getattr(config, "max_position_embeddings", None)
    if context and args.max_new_tokens >= context:  # e.g. Qwen2.5-Math-1.5B (4096) under --preset paper (8192)
        print(f"warning: max_new_tokens={args.max_new_tokens} reaches the model's max_position_embeddings={context}; "
              "long responses run past the positions it was trained on")
    return model, tokenizer, engine


def summarise(out_dir: Path, args: Args, settings: dict) -> dict:
    """results.json and results.md from every finished benchmark in the folder (registry order)."""
    benchmarks = {}
    for name in BENCHMARKS:
        path = out_dir / name / "result.json"
        if path.is_file():
            benchmarks[name] = json.loads(path.read_text())
    results = {"model": settings["model_name_or_path"], "label": args.label or default_label(args.model_name_or_path),
               "commit": repo_commit(), "date": _now(),
               "settings": settings, "batch_size": args.batch_size, "grade_timeout": args.grade_timeout,
               "benchmarks": benchmarks}
    scores = [b["metrics"]["acc"] for b in benchmarks.values()]
    results["average_acc"] = float(np.mean(scores)) if scores else None
    write_atomic(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(out_dir / "results.md", markdown_table([results]))
    return results


def main(args: Args) -> dict:
    args = apply_preset(args)
    for flag, allowed in (("backend", ("hf", "vllm")), ("prompt_template", ("chat", "plain"))):
        value = getattr(args, flag)
        if value not in allowed:
            raise EvalConfigError(f"--{flag} {value!r}: choose one of {allowed}")
    greedy = args.temperature == 0
    names = resolve_names(args.benchmarks)
    if greedy and any(n_samples_for(args, n) > 1 for n in names):
        raise EvalConfigError("--temperature 0 is greedy decoding, which gives identical samples; "
                              "set --temperature > 0 for n_samples > 1")
    data = {name: load_benchmark(name, args.data_dir or None) for name in names}  # missing data fails before model loading
    label = args.label or default_label(args.model_name_or_path)
    out_dir = Path(args.output_dir or REPO_ROOT / "runs" / "eval" / label.replace("/", "_"))
    settings = eval_settings(args)
    check_settings(out_dir, settings)

    model = tokenizer = engine = None
    loaded = False
    for name, (rows, source) in data.items():
        rows = rows[: args.limit or None]
        digest = rows_digest(rows)
        if finished_result(out_dir, name, settings, digest) is not None:
            print(f"{name}: already finished in {out_dir / name}, skipped")
            continue
        if not loaded:
            model, tokenizer, engine = load_policy(args)
            loaded = True
        n = n_samples_for(args, name)
        start = time.perf_counter()
        metrics, samples = evaluate_rows(
            model, tokenizer, rows, n_samples=n, greedy=greedy, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            max_new_tokens=args.max_new_tokens, prompt_template=args.prompt_template, instruction=args.instruction,
            batch_size=args.batch_size, seed=args.seed, backend=args.backend, grade_timeout=args.grade_timeout,
            show_progress=True, desc=name, engine=engine)
        result = {"benchmark": name, "source": source, "data_sha256": digest, "n_samples": n, "settings": settings,
                  "metrics": metrics, "seconds": round(time.perf_counter() - start, 2),
                  "finished_at": _now()}
        save_benchmark(out_dir, name, result, samples)
        print(f"{name}: acc {metrics['acc']:.4f} (n={n}) | no answer {metrics['no_answer_frac']:.3f} | "
              f"truncated {metrics['truncated_frac']:.3f} | {result['seconds']:.1f}s")
    results = summarise(out_dir, args, settings)
    print(markdown_table([results]), end="")
    print(f"wrote {out_dir / 'results.json'}")
    return results


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry: an expected failure prints one `error:` line and exits with status 2 (common/errors.py)."""
    from common.cli import parse
    from common.errors import error_boundary

    with error_boundary():
        main(parse(Args, argv))


if __name__ == "__main__":
    cli()
