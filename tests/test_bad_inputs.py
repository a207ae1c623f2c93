"""Bad inputs, one table: every case a user tried (issue 17) and more, each with the exit status and the message.

Kinds of case (fastest first; in-process wherever the check allows):
  flag   parse(Args, argv) only: the declared choices / ranges / types (status 2, ONE line on stderr);
  start  the method's main() in-process: a start-up check of common.run.start_run refuses before anything is
         loaded or written (status 2, one line; the run folder is byte-for-byte unchanged);
  run    main() in-process: an error found once models / data / checkpoints are read (exception type + message;
         run as a script, the entry point's error_boundary prints it as one `error:` line and exits 2, see
         test_runtime_error_is_one_line);
  call   a library function (golden answers, disk full while checkpointing).
A case marked `needs` waits on a change outside this issue's files (see the reason); it is xfail until then.
"""

import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from common.cli import numeric_fields, parse
from common.models import load_model
from common.toy import build_toy_world, load_toy_tokenizer, toy_config_path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"sft": "methods.sft", "grpo": "methods.grpo", "opd": "methods.opd", "stable_opd": "methods.stable_opd",
           "evaluate": "eval.evaluate"}


def module(method):
    return importlib.import_module(MODULES[method])


@dataclass
class Case:
    id: str
    kind: str  # flag | start | run | call
    method: str
    flags: dict = field(default_factory=dict)
    code: int | type = 2  # exit status (flag, start) or the exception type (run, call)
    message: str = ""
    setup: str = ""  # name of a setup below (monkeypatches / prepared folders)
    needs: str = ""  # a change outside this files; xfail until it is made


CASES = [
    # --- the user's silent wrong runs and unclear errors, as flags (status 2, one line)
    Case("sft max_steps 0", "flag", "sft", {"max_steps": 0}, 2, "--max_steps 0: must be >= 1"),
    Case("sft max_steps -5", "flag", "sft", {"max_steps": -5}, 2, "--max_steps -5: must be >= 1"),
    Case("sft gradient_accumulation_steps 0", "flag", "sft", {"gradient_accumulation_steps": 0}, 2, "--gradient_accumulation_steps 0: must be >= 1"),
    Case("sft save_every -1", "flag", "sft", {"save_every": -1}, 2, "--save_every -1: must be >= 0 (0 = only at the end"),
    Case("sft max_train_samples -5", "flag", "sft", {"max_train_samples": -5}, 2, "--max_train_samples -5: must be >= 0 (0 = all)"),
    Case("sft eval_samples -1", "flag", "sft", {"eval_samples": -1}, 2, "--eval_samples -1: must be >= 0"),
    Case("opd epsilon -0.2", "flag", "opd", {"epsilon": -0.2}, 2, "--epsilon -0.2: must be in (0, 1]"),
    Case("stable_opd mix_coef -0.5", "flag", "stable_opd", {"mix_coef": -0.5}, 2, "--mix_coef -0.5: must be >= 0 (0 = off)"),
    Case("stable_opd ref_kl_coef -0.1", "flag", "stable_opd", {"ref_kl_coef": -0.1}, 2, "--ref_kl_coef -0.1: must be >= 0"),
    Case("evaluate limit -3", "flag", "evaluate", {"limit": -3}, 2, "--limit -3: must be >= 0 (0 = all)"),
    Case("sft max_grad_norm 0", "flag", "sft", {"max_grad_norm": 0}, 2, "--max_grad_norm 0.0: must be > 0"),
    Case("grpo max_grad_norm 0", "flag", "grpo", {"max_grad_norm": 0}, 2, "--max_grad_norm 0.0: must be > 0"),
    Case("opd max_grad_norm 0", "flag", "opd", {"max_grad_norm": 0}, 2, "--max_grad_norm 0.0: must be > 0"),
    Case("stable_opd max_grad_norm 0", "flag", "stable_opd", {"max_grad_norm": 0}, 2, "--max_grad_norm 0.0: must be > 0"),
    Case("sft batch size 0", "flag", "sft", {"per_device_batch_size": 0}, 2, "--per_device_batch_size 0: must be >= 1"),
    Case("sft eval batch size 0", "flag", "sft", {"eval_batch_size": 0}, 2, "--eval_batch_size 0: must be >= 1"),
    Case("grpo num_generations 0", "flag", "grpo", {"num_generations": 0}, 2, "--num_generations 0: must be >= 2"),
    Case("grpo num_generations 1", "flag", "grpo", {"num_generations": 1}, 2, "--num_generations 1: must be >= 2"),
    Case("opd num_generations 0", "flag", "opd", {"num_generations": 0}, 2, "--num_generations 0: must be >= 1"),
    Case("opd per_device_prompts 0", "flag", "opd", {"per_device_prompts": 0}, 2, "--per_device_prompts 0: must be >= 1"),
    Case("grpo per_device_prompts 0", "flag", "grpo", {"per_device_prompts": 0}, 2, "--per_device_prompts 0: must be >= 1"),
    Case("evaluate n_samples 0", "flag", "evaluate", {"n_samples": 0}, 2, "--n_samples 0: must be >= 1"),
    Case("sft learning_rate -1e-3", "flag", "sft", {"learning_rate": "-1e-3"}, 2, "--learning_rate -0.001: must be > 0"),
    Case("opd learning_rate=-1e-3", "flag", "opd", {"learning_rate=": "-1e-3"}, 2, "--learning_rate -0.001: must be > 0"),
    Case("opd learning_rate 0", "flag", "opd", {"learning_rate": 0}, 2, "--learning_rate 0.0: must be > 0"),
    # --- more of our own: every kind of numeric bound, choices, types, config files
    Case("opd temperature 0", "flag", "opd", {"temperature": 0}, 2, "--temperature 0.0: must be > 0"),
    Case("opd temperature nan", "flag", "opd", {"temperature": "nan"}, 2, "--temperature nan: must be a finite number"),
    Case("opd top_p 1.5", "flag", "opd", {"top_p": 1.5}, 2, "--top_p 1.5: must be in (0, 1]"),
    Case("opd top_k -1", "flag", "opd", {"top_k": -1}, 2, "--top_k -1: must be >= 0 (0 = off"),
    Case("opd num_minibatches > prompts", "flag", "opd", {"per_device_prompts": 4, "num_minibatches": 8}, 2,
         "--num_minibatches 8: must be in [1, per_device_prompts=4]"),
    Case("opd num_minibatches not dividing prompts", "flag", "opd", {"per_device_prompts": 6, "num_minibatches": 4}, 2,
         "--num_minibatches 4: must divide --per_device_prompts 6"),
    Case("grpo num_minibatches not dividing prompts", "flag", "grpo", {"per_device_prompts": 6, "num_minibatches": 4}, 2,
         "--num_minibatches 4: must divide --per_device_prompts 6"),
    Case("opd ppo_epochs 0", "flag", "opd", {"ppo_epochs": 0}, 2, "--ppo_epochs 0: must be >= 1"),
    Case("opd max_completion_length 0", "flag", "opd", {"max_completion_length": 0}, 2, "--max_completion_length 0: must be >= 1"),
    Case("opd seed -1", "flag", "opd", {"seed": -1}, 2, "--seed -1: must be in [0, 4294967295]"),
    Case("opd log_every 0", "flag", "opd", {"log_every": 0}, 2, "--log_every 0: must be >= 1"),
    Case("opd alarm_window 0", "flag", "opd", {"alarm_window": 0}, 2, "--alarm_window 0: must be >= 1"),
    Case("opd vllm memory 0", "flag", "opd", {"vllm_gpu_memory_utilization": 0}, 2, "--vllm_gpu_memory_utilization 0.0: must be in (0, 1]"),
    Case("opd vllm_sleep 3", "flag", "opd", {"vllm_sleep": 3}, 2, "--vllm_sleep 3: must be in [0, 2]"),
    Case("opd loss_type bogus", "flag", "opd", {"loss_type": "bogus"}, 2, "invalid choice: 'bogus'"),
    Case("opd max_steps abc", "flag", "opd", {"max_steps": "abc"}, 2, "invalid int value: 'abc'"),
    Case("opd unknown flag", "flag", "opd", {"no_such_flag": 1}, 2, "unknown flag(s) --no_such_flag 1"),
    Case("grpo epsilon_low 1.5", "flag", "grpo", {"epsilon_low": 1.5}, 2, "--epsilon_low 1.5: must be in [0, 1)"),
    Case("grpo beta -0.1", "flag", "grpo", {"beta": -0.1}, 2, "--beta -0.1: must be >= 0"),
    Case("grpo grade_timeout 0", "flag", "grpo", {"grade_timeout": 0}, 2, "--grade_timeout 0.0: must be > 0"),
    Case("sft target_val_acc 2", "flag", "sft", {"target_val_acc": 2}, 2, "--target_val_acc 2.0: must be in [0, 1]"),
    Case("sft warmup_steps -1", "flag", "sft", {"warmup_steps": -1}, 2, "--warmup_steps -1: must be >= 0"),
    Case("stable_opd mix_target 1.5", "flag", "stable_opd", {"mix_target": 1.5}, 2, "--mix_target 1.5: must be in [0, 1]"),
    Case("stable_opd ref_kl_target 0", "flag", "stable_opd", {"ref_kl_target": 0}, 2, "--ref_kl_target 0.0: must be > 0"),
    Case("evaluate temperature -1", "flag", "evaluate", {"temperature": -1}, 2, "--temperature -1.0: must be >= 0"),
    Case("evaluate backend sglang", "flag", "evaluate", {"backend": "sglang"}, 2, "invalid choice: 'sglang'"),
    Case("evaluate preset bogus", "flag", "evaluate", {"preset": "bogus"}, 2, "invalid choice: 'bogus'"),
    Case("evaluate batch_size 0", "flag", "evaluate", {"batch_size": 0}, 2, "--batch_size 0: must be >= 1"),
    Case("config max_steps -5", "flag", "opd", {"config": "max_steps: -5\n"}, 2, "--max_steps -5 (from --config"),
    Case("config loss_type bogus", "flag", "opd", {"config": "loss_type: bogus\n"}, 2, "--loss_type 'bogus' (from --config"),
    Case("config max_steps 1.5", "flag", "opd", {"config": "max_steps: 1.5\n"}, 2, "--max_steps 1.5 (from --config"),
    Case("config mix_coef -1", "flag", "stable_opd", {"config": "mix_coef: -1\n"}, 2, "--mix_coef -1 (from --config"),
    Case("config unknown key", "flag", "opd", {"config": "bogus: 1\n"}, 2, "unknown field(s) ['bogus']"),
    Case("config not a mapping", "flag", "opd", {"config": "- 1\n"}, 2, "expected a mapping"),
    # issue 34: configs parsed strictly
    Case("config key given twice", "flag", "opd", {"config": "max_steps: 3\nlearning_rate: 0.001\nmax_steps: 5\n"}, 2,
         "key 'max_steps' is given twice (lines 1 and 3): keep one of them"),
    Case("config nested key given twice", "flag", "opd", {"config": "model_init_kwargs: {a: 1, a: 2}\n"}, 2,
         "key 'a' is given twice"),
    Case("config given twice", "flag", "opd", {"config": "max_steps: 3\n", "config2": "max_steps: 5\n"}, 2,
         "--config is given 2 times"),
    # issue 34: interacting flags checked where declared (range_if), tiny temperatures
    Case("stable_opd adaptive_mix, mix_max below mix_coef", "flag", "stable_opd",
         {"adaptive_mix": "true", "mix_coef": 0.5, "mix_max": 0.25}, 2,
         "--mix_max 0.25: must be >= mix_coef=0.5 with --adaptive_mix true"),
    Case("stable_opd adaptive_mix, mix_max below the default mix_coef", "flag", "stable_opd",
         {"adaptive_mix": "true", "mix_max": 0.05}, 2, "--mix_max 0.05: must be >= mix_coef=0.1 with --adaptive_mix"),
    Case("opd temperature 1e-30", "flag", "opd", {"temperature": "1e-30"}, 2,
         "--temperature 1e-30: must be >= 0.001: colder than that, sampling is greedy decoding in all but name"),
    Case("grpo temperature 1e-4", "flag", "grpo", {"temperature": "1e-4"}, 2, "--temperature 0.0001: must be >= 0.001:"),
    Case("stable_opd temperature 5e-324", "flag", "stable_opd", {"temperature": "5e-324"}, 2,
         "--temperature 5e-324: must be >= 0.001"),
    Case("evaluate temperature 1e-5", "flag", "evaluate", {"temperature": "1e-5"}, 2,
         "--temperature 1e-05: must be >= 0.001 (or 0 for greedy decoding)"),
    Case("config temperature 1e-30", "flag", "opd", {"config": "temperature: 1.0e-30\n"}, 2,
         "--temperature 1e-30 (from --config"),
    # --- start-up checks (main() in-process; nothing loaded, nothing written)
    Case("opd report_to wandbx", "start", "opd", {"report_to": "wandbx"}, 2, "unknown tracker(s) ['wandbx']"),
    Case("opd completion past positions", "start", "opd", {"max_completion_length": 2000}, 2,
         "= 2256 tokens exceeds the max_position_embeddings 1024 of --model_name_or_path"),
    Case("sft completion past positions", "start", "sft", {"max_prompt_length": 900, "max_completion_length": 200}, 2,
         "exceeds the max_position_embeddings 1024"),
    Case("opd teacher 4bit, bitsandbytes broken here", "start", "opd", {"teacher_quantization": "4bit"}, 2,
         "--teacher_quantization 4bit: bitsandbytes", setup="bnb_broken"),
    Case("grpo ref 8bit, no bitsandbytes", "start", "grpo", {"ref_quantization": "8bit", "beta": 0.1}, 2,
         "--ref_quantization 8bit needs bitsandbytes", setup="bnb_missing"),
    Case("sft adamw8bit, bitsandbytes broken here", "start", "sft", {"optim": "adamw8bit"}, 2, "--optim adamw8bit: bitsandbytes",
         setup="bnb_broken"),
    Case("sft into a finished OPD run", "start", "sft", {}, 2, "holds a finished opd run", setup="opd_run"),
    Case("opd into an SFT run", "start", "opd", {}, 2, "holds a finished sft run", setup="sft_run"),
    Case("stable_opd into an OPD run", "start", "stable_opd", {}, 2, "holds a finished opd run", setup="opd_run"),
    Case("opd run, other learning rate", "start", "opd", {"learning_rate": 0.01}, 2, "other settings: learning_rate 0.001 -> 0.01",
         setup="opd_run"),
    Case("opd run, other model", "start", "opd", {"model_name_or_path": "@teacher"}, 2, "other settings: model_name_or_path",
         setup="opd_run"),
    Case("opd run, other data (a failed start)", "start", "opd", {"train_data": "missing.jsonl"}, 2, "train_data", setup="opd_run"),
    Case("opd run, resume_from none", "start", "opd", {"resume_from": "none"}, 2, "would restart it from step 0", setup="opd_run"),
    Case("files without config.yaml", "start", "opd", {}, 2, "but no config.yaml", setup="no_config"),
    Case("resume_from an SFT checkpoint", "start", "opd", {"resume_from": "@sft_ckpt"}, 2, "is a checkpoint of a sft run",
         setup="sft_run_elsewhere"),
    Case("overwrite and resume_from inside", "start", "opd", {"overwrite_run_dir": "true", "resume_from": "@opd_ckpt"}, 2,
         "would delete --resume_from", setup="opd_run"),
    # issue 34: checkpoints are never silently distrusted or replaced; a checkpoint says whose it is
    Case("finished run, its only checkpoint torn", "start", "opd", {}, 2,
         "holds a finished opd run (config.yaml, final/, metrics.jsonl) but no intact checkpoint to resume it from "
         "(run/checkpoints/step_00000001: optimizer.bin has 100 bytes", setup="opd_run_torn"),
    Case("run without any complete checkpoint", "start", "opd", {}, 2, "(no checkpoint was ever completed)",
         setup="opd_run_no_ckpt"),
    Case("resume_from a torn checkpoint", "start", "opd", {"resume_from": "@opd_ckpt_torn"}, 2,
         "not a complete checkpoint: optimizer.bin has 100 bytes"),
    Case("resume_from an SFT checkpoint copied out of its run", "start", "opd", {"resume_from": "@sft_ckpt_copied"}, 2,
         "is a checkpoint of a sft run; opd cannot resume it"),
    Case("resume_from a checkpoint that records no run", "start", "opd", {"resume_from": "@opd_ckpt_unrecorded"}, 2,
         "records no run"),
    Case("resume_from another run's checkpoint", "start", "opd", {"resume_from": "@opd_ckpt"}, 2,
         "is a checkpoint of another run (run_id", setup="opd_run_other_id"),
    Case("another method's checkpoint copied into checkpoints/", "start", "opd", {}, 2,
         "is a checkpoint of a sft run; opd cannot resume it", setup="opd_run_foreign_ckpt"),
    # --- errors found once things are loaded (exception; one `error:` line when run as a script)
    Case("checkpoint of another model size", "run", "sft", {"model_name_or_path": "@big_config", "force_resume": "true"},
         "CheckpointError", "does not fit model", setup="sft_run"),
    Case("missing train data, fresh folder", "run", "opd", {"train_data": "missing.jsonl"}, "DataError", "dataset file not found"),
    Case("answers given as JSON objects", "run", "opd", {"train_data": "@answers_object"}, "DataError",
         "answers_object.jsonl:4: column 'answer' holds a JSON object ({\"value\": "),
    Case("answers given as JSON lists", "run", "grpo", {"train_data": "@answers_list"}, "DataError",
         "answers_list.jsonl:4: column 'answer' holds a JSON array (["),
    Case("sft answers given as JSON booleans", "run", "sft", {"train_data": "@answers_bool"}, "DataError",
         "answers_bool.jsonl:4: column 'answer' holds a JSON boolean (true)"),
    Case("sft max_completion_length 5 names its limit", "run", "sft", {"max_completion_length": 5}, "DataError",
         "max_completion_length=5"),
    Case("golden answers contradict the dataset", "call", "stable_opd", {}, "DataError",
         "contradict the dataset's answers for", setup="golden_shifted"),
    Case("golden file for another dataset, end to end", "run", "stable_opd", {"golden_data": "@golden_shifted", "max_completion_length": 40},
         "DataError",
         "contradict the dataset's answers"),
    Case("disk full while checkpointing", "call", "checkpoint", {}, "CheckpointError",
         "disk full while writing checkpoint", setup="disk_full"),
]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    tok = load_toy_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        load_model(str(toy_config_path("student")), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = build_toy_world(root / "toy", n_train=64, n_val=8, n_test=8, max_steps=2)
    w = {"root": root, "student": root / "student", "teacher": root / "teacher", **data}
    # one finished run of each of two methods (1 step), reused read-only by the cases that must refuse them
    run_main("opd", base_flags("opd", w, root / "opd_run"))
    run_main("sft", base_flags("sft", w, root / "sft_run"))
    return w


def base_flags(method, w, run_dir):
    """Small, valid flags for `method` on the toy world (1 step, no evals)."""
    if method == "evaluate":
        return {"model_name_or_path": "m"}
    common = {"run_dir": run_dir, "train_data": w["train"], "val_data": "", "max_steps": 1, "eval_every": 0, "save_every": 0,
              "learning_rate": 1e-3}
    if method == "sft":
        return {**common, "model_name_or_path": toy_config_path("student"), "per_device_batch_size": 4,
                "max_completion_length": 48, "warmup_steps": 0, "log_every": 1}
    rl = {**common, "model_name_or_path": w["student"], "per_device_prompts": 2, "num_generations": 2, "max_completion_length": 8}
    if method == "grpo":
        return rl
    return {**rl, "teacher_name_or_path": w["teacher"]}


def argv_of(flags: dict) -> list[str]:
    out = []
    for k, v in flags.items():
        out += [f"--{k}{v}"] if k.endswith("=") else [f"--{k}", str(v)]
    return out


def run_main(method, flags):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    mod = module(method)
    return mod.main(parse(mod.Args, argv_of(flags)))


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def golden_shifted(w, tmp: Path) -> Path:
    """A golden file for the same problems whose solutions are shifted by one row (another row's answer)."""
    rows = [json.loads(x) for x in Path(w["train"]).read_text().splitlines()][:8]
    shifted = [{"problem": r["problem"], "answer": rows[(i + 1) % len(rows)]["answer"], "solution": rows[(i + 1) % len(rows)]["solution"]}
               for i, r in enumerate(rows)]
    path = tmp / "golden_shifted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in shifted))
    return path


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.needs, strict=False)] if c.needs else [])
                                  for c in CASES])
def test_bad_input(case: Case, request, tmp_path, capsys, monkeypatch):
    flags = dict(case.flags)
    if case.kind == "flag":
        if "config" in flags:
            cfg = tmp_path / "c.yaml"
            cfg.write_text(flags.pop("config"))
            flags["config"] = cfg
        if "config2" in flags:  # a second --config
            cfg = tmp_path / "c2.yaml"
            cfg.write_text(flags.pop("config2"))
            flags["config="] = cfg
        base = {"model_name_or_path": "m"} if case.method == "evaluate" else {}
        with pytest.raises(SystemExit) as e:
            parse(module(case.method).Args, argv_of({**base, **flags}))
        err = capsys.readouterr().err
        assert e.value.code == case.code and case.message in err, err
        assert len(err.strip().splitlines()) == 1, err  # one line, no usage block, no traceback
        return

    w = request.getfixturevalue("world")
    capsys.readouterr()  # the fixture's own output (its two runs), when it was built for this case
    run_dir = tmp_path / "run"
    prepared = {"opd_run": w["root"] / "opd_run", "sft_run": w["root"] / "sft_run"}
    if case.setup in prepared:
        run_dir = prepared[case.setup]
    elif case.setup == "no_config":
        (run_dir / "checkpoints" / "step_00000003").mkdir(parents=True)
    elif case.setup.startswith("opd_run_"):  # a copy of the finished OPD run, then changed
        shutil.copytree(w["root"] / "opd_run", run_dir)
        ckpt = next((run_dir / "checkpoints").glob("step_*"))
        if case.setup == "opd_run_torn":
            opt = ckpt / "optimizer.bin"
            opt.write_bytes(opt.read_bytes()[:100])
        elif case.setup == "opd_run_no_ckpt":
            shutil.rmtree(run_dir / "checkpoints")
        elif case.setup == "opd_run_other_id":
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
            (run_dir / "config.yaml").write_text(yaml.safe_dump({**cfg, "run_id": "0123456789ab"}, sort_keys=False))
        elif case.setup == "opd_run_foreign_ckpt":
            shutil.rmtree(ckpt)
            shutil.copytree(next((w["root"] / "sft_run" / "checkpoints").glob("step_*")), ckpt)
    elif case.setup == "bnb_broken":
        def broken(kind, device):
            raise AssertionError("Torch not compiled with CUDA enabled")
        monkeypatch.setattr("common.models._probe_bnb", broken)
    elif case.setup == "bnb_missing":
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    subs = {"@teacher": str(w["teacher"]), "@big_config": str(toy_config_path("teacher")),
            "@sft_ckpt": str(next((w["root"] / "sft_run" / "checkpoints").glob("step_*"))),
            "@opd_ckpt": str(next((w["root"] / "opd_run" / "checkpoints").glob("step_*")))}
    for name, wrap in (("@answers_object", lambda a: {"value": a}), ("@answers_list", lambda a: [a]),
                       ("@answers_bool", lambda a: True)):
        if name in flags.values():  # the toy training set with row 4's answer given as a JSON value of another type
            rows = [json.loads(x) for x in Path(w["train"]).read_text().splitlines()]
            rows[3]["answer"] = wrap(rows[3]["answer"])
            subs[name] = str(tmp_path / f"{name[1:]}.jsonl")
            Path(subs[name]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if "@golden_shifted" in flags.values() or case.setup == "golden_shifted":
        subs["@golden_shifted"] = str(golden_shifted(w, tmp_path))
    for name in ("@sft_ckpt_copied", "@opd_ckpt_torn", "@opd_ckpt_unrecorded"):
        if name in flags.values():  # a checkpoint copied out of its run folder, then changed
            source = subs["@sft_ckpt" if name.startswith("@sft") else "@opd_ckpt"]
            subs[name] = str(shutil.copytree(source, tmp_path / "copied" / Path(source).name))
            copied = Path(subs[name])
            if name == "@opd_ckpt_torn":
                (copied / "optimizer.bin").write_bytes((copied / "optimizer.bin").read_bytes()[:100])
            elif name == "@opd_ckpt_unrecorded":  # as saved before checkpoints recorded their run
                (copied / "run_config.yaml").unlink()
                manifest = json.loads((copied / "MANIFEST.json").read_text())
                del manifest["files"]["run_config.yaml"]
                (copied / "MANIFEST.json").write_text(json.dumps(manifest))
    flags = {k: subs.get(v, v) if isinstance(v, str) else v for k, v in flags.items()}

    if case.kind == "call":
        with pytest.raises(Exception) as e:
            CALLS[case.setup](w, tmp_path, monkeypatch)
        assert type(e.value).__name__ == case.code and case.message in str(e.value), str(e.value)
        return

    flags = {**base_flags(case.method, w, run_dir), **flags}
    before = snapshot(run_dir) if run_dir.exists() else None
    if case.kind == "start":
        with pytest.raises(SystemExit) as e:
            run_main(case.method, flags)
        err = capsys.readouterr().err
        assert e.value.code == case.code and case.message in err, err
        assert len(err.strip().splitlines()) == 1, err
    else:
        with pytest.raises(Exception) as e:
            run_main(case.method, flags)
        assert type(e.value).__name__ == case.code and case.message in str(e.value), repr(e.value)
    # nothing in the folder changed (a refused start writes nothing; a failed load writes nothing either)
    assert (snapshot(run_dir) if run_dir.exists() else None) == before


def _golden_call(w, tmp, monkeypatch):
    from common.data import check_golden_answers

    rows = [json.loads(x) for x in Path(w["train"]).read_text().splitlines()][:8]
    path = golden_shifted(w, tmp)
    golden = {r["problem"]: r["solution"] for r in map(json.loads, path.read_text().splitlines())}
    assert check_golden_answers(rows, {r["problem"]: r["solution"] for r in rows}, "train") == 0  # its own solutions agree
    check_golden_answers(rows, golden, str(path))


def _disk_full_call(w, tmp, monkeypatch):
    """A save that runs out of space mid-write: the partial checkpoint is removed, the earlier one is intact."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from common.checkpoint import latest_checkpoint, save_checkpoint, verify_checkpoint

    AcceleratorState._reset_state(True)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    first = save_checkpoint(acc, tmp, 1, {"step": 1})
    real = acc.save_state

    def full_disk(output_dir, **kw):
        real(output_dir, **kw)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 505344 vs 505236")

    monkeypatch.setattr(acc, "save_state", full_disk)
    try:
        save_checkpoint(acc, tmp, 2, {"step": 2}, keep_last=1)
    finally:
        assert latest_checkpoint(tmp) == first and verify_checkpoint(first, check_hash=True) == []
        assert not list((tmp / "checkpoints").glob(".tmp-*"))  # the partial one is gone


CALLS = {"golden_shifted": _golden_call, "disk_full": _disk_full_call}


# ----------------------------------------------------------------------------- around the table


def test_every_numeric_field_declares_a_range():
    """The bounds are declared with the flag: every int / float field of every method and of eval/evaluate.py."""
    for method in MODULES:
        cls = module(method).Args
        missing = [n for n in numeric_fields(cls) if "range" not in {f.name: f for f in dataclasses.fields(cls)}[n].metadata]
        assert not missing, (method, missing)
        parse(cls, ["--model_name_or_path", "m"] if method == "evaluate" else [])  # the defaults are in range


def test_interacting_flags_are_checked_only_where_they_interact(capsys):
    """range_if holds while its flag is on: --mix_max below --mix_coef is unused (so accepted) without --adaptive_mix;
    the smallest temperature accepted is 0.001, and eval's 0 (greedy) stays valid."""
    stable, opd, evaluate = (module(m).Args for m in ("stable_opd", "opd", "evaluate"))
    assert parse(stable, ["--mix_coef", "0.5", "--mix_max", "0.25"]).mix_max == 0.25
    assert parse(stable, ["--adaptive_mix", "true", "--mix_coef", "0.5", "--mix_max", "0.5"]).mix_max == 0.5
    assert parse(opd, ["--temperature", "1e-3"]).temperature == 1e-3
    assert parse(evaluate, ["--model_name_or_path", "m", "--temperature", "0"]).temperature == 0
    with pytest.raises(SystemExit):
        parse(stable, ["--help"])
    assert "--adaptive_mix: the largest lambda_gold. Accepted: >= 0. With --adaptive_mix: >= mix_coef." in " ".join(
        capsys.readouterr().out.split())


def test_help_shows_the_range(capsys):
    with pytest.raises(SystemExit):
        parse(module("opd").Args, ["--help"])
    assert "Training steps: optimizer steps (SFT) or rollout batches (RL). Accepted: >= 1." in " ".join(capsys.readouterr().out.split())


def test_runtime_error_is_one_line(world, tmp_path):
    """As a script, a bad-input error found after start-up (a missing dataset) prints one `error:` line, no traceback,
    and exits with status 2 (common/errors.py error_boundary)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    flags = {**base_flags("opd", world, tmp_path / "run"), "train_data": tmp_path / "missing.jsonl"}
    proc = subprocess.run([sys.executable, "methods/opd.py", *argv_of(flags)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    lines = [x for x in proc.stderr.splitlines() if "error" in x.lower() or "Traceback" in x]
    assert proc.returncode == 2 and lines == [f"opd.py: error: dataset file not found: {tmp_path / 'missing.jsonl'}"], proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # nothing written


def test_scoreboard():
    """The issue's numbers for this table: every bad input tried is a clear error; none is silent, none loses data."""
    tried = len(CASES)
    clear = sum(1 for c in CASES if not c.needs)
    pending = [c.id for c in CASES if c.needs]
    print(f"\nbad inputs tried {tried} | clear errors {clear} | data lost 0 | waiting on a change outside these files "
          f"{len(pending)}: {pending} (until then the golden one runs silently, the sft one names the wrong limit)")
    assert clear >= tried - 2
