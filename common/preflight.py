"""`--dry_run`: a method's preflight, on CPU in seconds, loading configs and tokenizers only (no weights).

Every method's `start_run` hands a run with `--dry_run true` to `preflight`, which runs the start-up checks a real
run makes, each on its own, and prints one line per check: `ok`, `FAIL` (with the error a real run would stop on)
or `skip` (its input failed above). Then it exits: 0 when nothing failed, 2 otherwise. It writes nothing (no run
folder, no lock, no config; loading a hub id still uses the hub / datasets caches as a run would).

    flags         the settings, parsed and range-checked by common/cli.py `parse` before we get here
    run folder    check_run_lock + check_run_dir: a new run, the checkpoint it would resume from, or the refusal
    positions     check_positions, check_quantization, the trackers and --push_to_hub
    student       its tokenizer (size, EOS, chat template) and config, built on the meta device (shapes, no
                  memory), with the LoRA adapter when --use_peft (its target modules must exist)
    weights       each model's weight files: safetensors headers read and checked against the file sizes (a
                  truncated file fails here, not after the teacher has loaded); a config.json means random init
    teacher       opd / stable_opd: tokenizer + config, check_compatible (ids, stop ids, templates); --teacher_backend
                  server: the server probed instead of the weight files (common/teacher_server.py check_server)
    reference     grpo --beta > 0, stable_opd --ref_kl_coef > 0: the frozen reference, unless it is the LoRA
                  student's adapter-disabled base
    train data    the rows and prompts as the method reads them (load_prompts; SFT: build_examples)
    val data      the greedy-eval rows (and SFT's --test_data)
    golden        stable_opd with --mix_coef > 0: load_golden (check_golden_answers for --golden_data)
    rewards       grpo: the --rewards spec
    memory plan   common/plan.py for --plan_gpu (auto: this GPU, or one H100 80 GB): fails naming the phase and
                  the flags that would fix it; its per-phase table is printed below the checks
    grader        a few dataset answers, boxed, graded correct against themselves (the grader reads this format)
With --teacher_backend server the teacher's weights are not checked: the server is probed instead (teacher server).
With --teacher_backend vllm its weight files are, and the engine's flags and vLLM's presence (teacher engine).
`plan_at_start` prints the same plan at the start of every real run (on a GPU it may refuse or choose the budget).
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import sys
from pathlib import Path

from common.checkpoint import resolve_resume
from common.cli import fail, method_name
from common.data import build_examples, load_golden, load_prompts, load_rows, row_options
from common.flags import ReferenceFlags
from common.grading import grade_batch
from common.hub import check_push_to_hub
from common.lora import apply_lora
from common.models import (check_compatible, check_positions, check_quantization, count_params,
                           load_tokenizer, meta_model)
from common.plan import GiB, detect_gpu, plan_for_args
from common.rewards import parse_rewards, resolve_spec
from common.rundir import check_run_dir
from common.runlock import check_run_lock
from common.teacher_server import check_server, server_flags
from common.tracking import tracker_names
from common.vllm_teacher import preflight_check

GRADED_ANSWERS = 8  # dataset answers the grader check reads, per data file


def model_folder(name: str) -> Path | None:
    """The folder holding a model's files: the local folder, or a hub id's cached snapshot; None if neither."""
    if os.path.isdir(name):
        return Path(name)
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(name, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None


def safetensors_values(path: Path) -> int:
    """The number of values a .safetensors file holds, read from its header; ValueError if the file is shorter than
    its header says (truncated) or the header is not one."""
    size = path.stat().st_size
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from e
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated ({size} bytes; its header needs {8 + n + end}): copy or download it again")
    return sum(math.prod(v["shape"]) for v in tensors.values())


def check_weights(name: str) -> str:
    """What from_pretrained would read: a config.json (random init), or the folder's weight files, headers checked."""
    if name.endswith(".json"):
        return "a config.json: random initial weights (seeded by --seed)"
    folder = model_folder(name)
    if folder is None:
        return f"{name}: hub id not in the cache; its weight files are not checked"
    files = sorted(folder.glob("*.safetensors"))
    if files:
        values = sum(safetensors_values(p) for p in files)
        return f"{len(files)} safetensors file(s), {params(values)} values, sizes match their headers"
    if list(folder.glob("pytorch_model*.bin")):
        return "pytorch_model*.bin (pickled weights: not checked before loading)"
    raise ValueError(f"{folder} has a config but no weight files (*.safetensors or pytorch_model*.bin): from_pretrained "
                     "would fail; pass its config.json for random initial weights, or the folder of a saved model")


def grade_own_answers(rows: list[dict], source: str, strict: bool = True) -> str:
    """Each of a few rows' answers, written as `\\boxed{answer}`, must be graded correct against itself: answers the
    grader cannot read (an object, a format it does not parse) would make every reward 0."""
    picked = [r for r in rows if r.get("answer") not in (None, "")][:GRADED_ANSWERS]
    if not picked:
        raise ValueError(f"{source}: no row has an answer to grade")
    golds = [str(r["answer"]) for r in picked]
    grades = grade_batch([f"So the answer is \\boxed{{{g}}}." for g in golds], golds, strict=strict)
    wrong = [(g, x.status) for g, x in zip(golds, grades) if not x.correct]
    if wrong:
        raise ValueError(f"{source}: {len(wrong)} of {len(golds)} answers graded wrong against themselves, e.g. "
                         f"{wrong[0][0]!r} ({wrong[0][1]}): the grader cannot read this answer format (--answer_format, "
                         "--answer_column)")
    return f"{len(golds)} / {len(golds)} of {source}'s answers graded correct against themselves"


def preflight(args) -> int:
    """Run every check for this method's `args` (see the module docstring), print one line each, return 0 / 2."""
    method = method_name(args)
    fields = {f.name for f in dataclasses.fields(args)}
    found: dict = {}  # what the checks loaded, for the checks after them
    results: list[tuple[str, str, str]] = []

    def check(name: str, fn, *needs: str, keep: str = ""):
        """Run one check; `keep`: fn returns (what later checks need, the text) and the first is kept."""
        missing = [n for n in needs if n not in found]
        if missing:
            results.append(("skip", name, f"needs the {' and the '.join(missing)} (failed above)"))
            return
        try:
            out = fn()
            if keep:
                found[keep], out = out
            results.append(("ok", name, out))
        except (ValueError, OSError, ImportError, RuntimeError, KeyError) as e:  # what a run would stop on
            results.append(("FAIL", name, " ".join(str(e).split()) or type(e).__name__))

    check("flags", lambda: f"{len(fields)} settings parsed and range-checked")
    check("run folder", lambda: run_folder(args))
    check("positions", lambda: positions(args))
    check("quantization", lambda: check_quantization(args) or "bitsandbytes not needed, or usable here")
    check("trackers", lambda: trackers(args))
    role = "student" if "teacher_name_or_path" in fields else "model"  # the trained model: opd's student
    student = (args.tokenizer_name_or_path if "tokenizer_name_or_path" in fields else "") or args.model_name_or_path
    check(f"{role} tokenizer", lambda: tokenizer(student), keep="student tokenizer")
    check(role, lambda: student_model(args), keep="student model")
    check(f"{role} weights", lambda: check_weights(args.model_name_or_path))
    if "teacher_name_or_path" in fields:
        teacher = args.teacher_name_or_path
        check("teacher tokenizer", lambda: tokenizer(teacher), keep="teacher tokenizer")
        check("teacher", lambda: frozen_model(teacher, args.teacher_model_init_kwargs,
                                                    args.teacher_dtype or args.dtype, args.teacher_quantization),
              keep="teacher model")
        full_distribution = args.loss_type == "full_kl" or ("mix_loss" in fields and args.mix_loss != "nll")
        if args.teacher_backend == "server":  # served elsewhere: the server probed, no weights here
            max_len = args.max_prompt_length + args.max_completion_length
            check("teacher server", lambda: check_server(
                teacher, found["teacher tokenizer"], args.temperature, max_len, full_distribution=full_distribution,
                meta=found["teacher model"], **server_flags(args))[1], "teacher tokenizer", "teacher model")
        else:
            check("teacher weights", lambda: check_weights(teacher))
        if args.teacher_backend == "vllm":  # a colocated engine (common/vllm_teacher.py): not built
            check("teacher engine", lambda: preflight_check(full_distribution, args.teacher_quantization,
                args.teacher_model_init_kwargs, args.teacher_url, args.temperature))
        check("teacher compatible", lambda: check_compatible(
            found["student tokenizer"], found["teacher tokenizer"], found["student model"], found["teacher model"],
            allow_teacher_template=True).describe().removeprefix("teacher compatible: "),
            "student tokenizer", "teacher tokenizer", "student model", "teacher model")
    reference = reference_path(args)
    if reference:
        check("reference", lambda: reference_check(args, reference, found), "student tokenizer", "student model")
    check("train data", lambda: train_data(args, method, found["student tokenizer"]), "student tokenizer",
          keep="train rows")
    if args.val_data:
        check("val data", lambda: rows_of(args.val_data, args), keep="val rows")
    if "test_data" in fields and args.test_data:
        check("test data", lambda: rows_of(args.test_data, args)[1])
    if "mix_coef" in fields and (args.mix_coef > 0 or args.adaptive_mix):
        check("golden", lambda: golden(args, found["train rows"], found["student tokenizer"]), "train rows",
              "student tokenizer")
    if "rewards" in fields:
        check("rewards", lambda: rewards(args))
    check("memory plan", lambda: memory_plan(args, method, found))
    strict = args.strict_boxed if "strict_boxed" in fields else True  # GRPO's reward; eval's grader is lenient
    check("grader (train)", lambda: grade_own_answers(found["train rows"], args.train_data, strict), "train rows")
    if "val rows" in found:
        check("grader (val)", lambda: grade_own_answers(found["val rows"], args.val_data, strict=False))
    return report(f"{method}.py", results, found.get("plan"))


def params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def tokenizer(name: str):
    tok = load_tokenizer(name)
    template = "a chat template" if getattr(tok, "chat_template", None) else "no chat template"
    return tok, f"{name}: {len(tok)} tokens, EOS {tok.eos_token!r} ({tok.eos_token_id}), pad {tok.pad_token_id}, {template}"


def student_model(args):
    model = meta_model(args.model_name_or_path, args.model_init_kwargs)
    lora = ""
    if args.use_peft:
        model = apply_lora(model, args)
        lora = f", LoRA r={args.lora_r} on {args.lora_target_modules}"
    return model, f"{args.model_name_or_path}: {params(count_params(model))} parameters{lora} (meta device)"


def frozen_model(name: str, model_kwargs: str, dtype: str, quantization: str):
    model = meta_model(name, model_kwargs)
    return model, f"{name}: {params(count_params(model))} parameters, {dtype}, quantization {quantization}"


def positions(args) -> str:
    """check_positions, with its warning (VLLM_ALLOW_LONG_MAX_MODEL_LEN=1: past the trained positions) as the text."""
    warned = io.StringIO()
    with contextlib.redirect_stderr(warned):
        check_positions(args)
    return " ".join(warned.getvalue().split()) or "prompt + completion within every model's positions"


def trackers(args) -> str:
    names = tracker_names(args.report_to)
    check_push_to_hub(args)
    return f"--report_to {args.report_to}: {', '.join(names) if names else 'none'}"


def rows_of(source: str, args):
    rows = load_rows(source, **row_options(args))
    return rows, f"{source}: {len(rows)} rows"


def rewards(args) -> str:
    return ", ".join(t.name for t in parse_rewards(resolve_spec(args.rewards, args.format_reward)))


def run_folder(args) -> str:
    check_run_lock(args.run_dir)
    plan = check_run_dir(args)
    if plan.overwrite:
        return f"{args.run_dir}: holds a run, which --overwrite_run_dir true would delete"
    if not plan.has_run:
        return f"{args.run_dir}: a new run"
    ckpt = resolve_resume(Path(args.run_dir), args.resume_from)
    return f"{args.run_dir}: resumes from {ckpt}" if ckpt else f"{args.run_dir}: holds a run, no checkpoint to resume"


def reference_path(args) -> str:
    """The frozen reference a run would load, or '' (none, or the LoRA student's adapter-disabled base)."""
    if not isinstance(args, ReferenceFlags) or args.use_peft:
        return ""
    if (args.beta if method_name(args) == "grpo" else args.ref_kl_coef) == 0:
        return ""
    return args.ref_model_name_or_path or args.model_name_or_path


def reference_check(args, path: str, found: dict) -> str:
    same = path == args.model_name_or_path  # the paper's reference is the student's start: its shapes are built
    ref = found["student model"] if same else meta_model(path, args.model_init_kwargs)
    check_weights(path)
    if method_name(args) == "grpo":  # grpo scores the policy's ids with it (stable_opd's is the student's start)
        check_compatible(found["student tokenizer"], load_tokenizer(path), found["student model"], ref)
    return f"{path}: {params(count_params(ref))} parameters, quantization {args.ref_quantization}"


def train_data(args, method: str, tok):
    if method == "sft":
        rows = load_rows(args.train_data, need_solution=True, limit=args.max_train_samples or None, **row_options(args))
        examples, skipped = build_examples(tok, rows, args)
        return rows, f"{args.train_data}: {len(examples)} examples ({skipped} skipped as too long)"
    rows, prompts, skipped = load_prompts(args, tok)
    return rows, f"{args.train_data}: {len(prompts)} prompts ({skipped} skipped as longer than --max_prompt_length)"


def golden(args, rows: list[dict], tok) -> str:
    ids, counts = load_golden(args, rows, tok)
    source = args.golden_data or f"{args.train_data}'s solutions"
    return f"{source}: {sum(map(bool, ids))} / {len(ids)} prompts have one; counts {counts}"


def report(prog: str, results: list[tuple[str, str, str]], plan=None) -> int:
    """Print the one-screen table (and the memory plan's phases); 2 if a check failed, else 0."""
    if os.environ.get("RANK", "0") == "0":
        width = max(len(name) for _, name, _ in results)
        print(f"{prog} --dry_run: configs and tokenizers only, no weights loaded, nothing written")
        for status, name, text in results:
            print(f"  {status:<4}  {name:<{width}}  {text}")
        if plan is not None:
            print("\n".join("  " + line for line in plan.summary().splitlines()))
        failed = sum(s == "FAIL" for s, _, _ in results)
        skipped = sum(s == "skip" for s, _, _ in results)
        verdict = f"{failed} failed: exit 2" if failed else "all passed: exit 0"
        print(f"{prog} --dry_run: {len(results) - failed - skipped} ok, {skipped} skipped, {verdict}", flush=True)
    sys.stdout.flush()
    return 2 if any(s == "FAIL" for s, _, _ in results) else 0


# ----------------------------------------------------------------------------- the memory plan at start-up


def plan_device(args) -> str:
    """--plan_gpu, with auto = this machine's GPU (h100-80gb / h200-141gb by its memory), or h100-80gb without one."""
    return args.plan_gpu if args.plan_gpu != "auto" else detect_gpu().replace("cpu", "h100-80gb")


def memory_plan(args, method: str, found: dict) -> str:
    """The --dry_run line of the plan (kept in `found` for its table); a ValueError naming the phase and the fixes if
    it does not fit."""
    try:
        p = found["plan"] = plan_for_args(args, method, gpu=plan_device(args))
    except TypeError as e:  # a config without the fields of a Qwen2 / Llama decoder (hidden_size, ...)
        raise ValueError(f"the plan cannot read the models' shapes ({e}): python -m common.plan models Qwen2 / Llama "
                         "decoders") from e
    if not p.fits:
        raise ValueError(p.refusal())
    budget = f"{p.micro_batch_tokens:,}{' (chosen)' if p.chosen else ''}" if p.micro_batch_tokens else "0 (one pass)"
    return (f"peak {p.peak / GiB:.1f} of {p.hardware.memory / GiB:.0f} GiB in '{p.peak_phase.name}' on "
               f"{p.num_processes} x {p.hardware.name}, --micro_batch_tokens {budget}, predicted step "
               f"{p.step_seconds:.1f} s (table below; python -m common.plan --gpu for other devices)")


def plan_at_start(accelerator, args) -> None:
    """Print the memory plan of this run's step before anything loads. On a GPU (or with --plan_gpu set): refuse a run
    whose predicted peak exceeds the device (exit 2), and let `--micro_batch_tokens 0` take the budget the plan
    chose. On CPU (auto) the plan is printed with the budget as given and never refuses (its device is the host)."""
    from accelerate.utils import DistributedType


    on_gpu = args.plan_gpu != "auto" or detect_gpu() != "cpu"
    strategy = {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "zero2"}.get(accelerator.distributed_type, "ddp")
    gpu = plan_device(args) if on_gpu else "cpu"
    try:
        p = plan_for_args(args, method_name(args), gpu=gpu, num_processes=accelerator.num_processes,
                          strategy=strategy, choose=on_gpu)
    except (ValueError, OSError, KeyError, TypeError) as e:  # a config the plan cannot read (no hidden_size...): go on
        accelerator.print(f"memory plan: not available ({' '.join(str(e).split())[:200]})")
        return
    accelerator.print(p.summary())
    if on_gpu and not p.fits:
        fail(p.refusal())
    if on_gpu and p.chosen and hasattr(args, "micro_batch_tokens"):
        args.micro_batch_tokens = p.micro_batch_tokens
