"""Bad inputs tried from outside, as a new user would (issue 34 item 6): each case a real subprocess run of a method,
eval/evaluate.py or a script on the toy world's tiny models, every file hashed before and after; counted as

  clear      one `error:` line that names the file / flag / row (the case's `names`), no traceback, nothing written
             (the run folder / output folder not created, no existing file changed);
  unclear    refused, but with a traceback, more than one error line, a message that does not name the thing, or
             having written something first;
  silent     exit 0 and no warning naming the problem: the bad input was used as if it were good;
  data lost  a file that existed before the command (a finished run's logs, final/, checkpoints) changed or vanished.

The exit status is reported beside the verdict (the issue asks for 2). Cases are our own (none is an example listed
in issue 34, none is a case of tests/test_bad_inputs.py). Permission and read-only cases are not tried: this machine
runs as root, which reads and writes through mode bits.

    python scripts/bad_inputs_survey.py                       # this checkout, the table on stdout
    python scripts/bad_inputs_survey.py --repo /tmp/before    # another checkout (e.g. `git archive` of an older main)
    python scripts/bad_inputs_survey.py --only opd_teacher_torn_safetensors --show
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ENV.pop("STABLE_OPD_TRACEBACK", None)


@dataclass
class Case:
    id: str
    script: str  # path under the repo: methods/opd.py, eval/evaluate.py, scripts/...
    flags: dict  # values may hold {tmp} / {student} / {teacher} / {train} / {opd_run} / {sft_run} placeholders
    names: list[str]  # what a clear message must name (after placeholders): the file, flag or row
    setup: str = ""  # a function below that prepares files in tmp
    keep: list[str] = field(default_factory=list)  # paths (placeholders) whose files must not change


def base(method: str) -> dict:
    common = {"train_data": "{train}", "val_data": "", "max_steps": 1, "eval_every": 0, "save_every": 0,
              "learning_rate": 1e-3, "run_dir": "{tmp}/run"}
    if method == "sft":
        return {**common, "model_name_or_path": "{student}", "per_device_batch_size": 4, "max_completion_length": 48,
                "warmup_steps": 0}
    rl = {**common, "model_name_or_path": "{student}", "per_device_prompts": 2, "num_generations": 2,
          "max_completion_length": 8}
    if method == "grpo":
        return rl
    if method == "stable_opd":
        return {**rl, "teacher_name_or_path": "{teacher}", "max_completion_length": 40}
    return {**rl, "teacher_name_or_path": "{teacher}"}


def case(id, method, names, setup="", keep=(), drop=(), **flags):
    """A case; `drop`: flags of the base command left out (so that a --config's value is the one used)."""
    script = {"evaluate": "eval/evaluate.py"}.get(method, f"methods/{method}.py")
    start = {"model_name_or_path": "{student}", "benchmarks": "toy", "limit": 4, "max_new_tokens": 8,
             "output_dir": "{tmp}/eval"} if method == "evaluate" else base(method)
    start = {k: v for k, v in start.items() if k not in drop}
    return Case(id, script, {**start, **flags}, list(names), setup, list(keep))


def fill(text, subs: dict) -> str:
    """{tmp}, {student}, ... replaced (str.format would choke on a value such as '{bad json')."""
    for k, v in subs.items():
        text = text.replace("{" + k + "}", v)
    return text


CASES = [
    # --- data files
    case("opd_train_utf16", "opd", ["{tmp}/utf16.jsonl", ":1"], "utf16", train_data="{tmp}/utf16.jsonl"),
    case("grpo_row_key_twice", "grpo", ["{tmp}/dup.jsonl", ":3", "answer"], "dup_key", train_data="{tmp}/dup.jsonl"),
    case("sft_solution_number", "sft", ["{tmp}/solnum.jsonl", ":2", "solution"], "solution_number",
         train_data="{tmp}/solnum.jsonl"),
    case("sft_solution_object", "sft", ["{tmp}/solobj.jsonl", ":5", "solution"], "solution_object",
         train_data="{tmp}/solobj.jsonl"),
    case("opd_train_is_a_folder", "opd", ["{tmp}/folder.jsonl"], "folder_jsonl", train_data="{tmp}/folder.jsonl"),
    case("opd_parquet_truncated", "opd", ["{tmp}/torn.parquet"], "torn_parquet", train_data="{tmp}/torn.parquet"),
    case("opd_parquet_is_text", "opd", ["{tmp}/text.parquet"], "text_parquet", train_data="{tmp}/text.parquet"),
    case("grpo_hub_dataset_offline", "grpo", ["nobody-xyz/no-such-dataset"], train_data="nobody-xyz/no-such-dataset"),
    case("grpo_val_row_missing_answer", "grpo", ["{tmp}/val.jsonl", ":3", "answer"], "val_missing_answer",
         val_data="{tmp}/val.jsonl", eval_every=1),
    case("stable_opd_golden_bad_json", "stable_opd", ["{tmp}/golden.jsonl", ":2"], "golden_bad_json",
         golden_data="{tmp}/golden.jsonl"),
    case("sft_train_only_blank_lines", "sft", ["{tmp}/blank.jsonl"], "blank_lines", train_data="{tmp}/blank.jsonl"),
    case("opd_train_latin1_on_line_7", "opd", ["{tmp}/latin1.jsonl", ":7"], "latin1_line7",
         train_data="{tmp}/latin1.jsonl"),
    # --- model folders
    case("opd_teacher_torn_safetensors", "opd", ["{tmp}/teacher_torn"], "teacher_torn",
         teacher_name_or_path="{tmp}/teacher_torn"),
    case("opd_student_no_config", "opd", ["{tmp}/noconfig"], "student_no_config", model_name_or_path="{tmp}/noconfig"),
    case("opd_student_config_bad_json", "opd", ["{tmp}/badcfg"], "student_bad_config",
         model_name_or_path="{tmp}/badcfg"),
    case("opd_student_tokenizer_corrupt", "opd", ["{tmp}/badtok"], "student_bad_tokenizer",
         model_name_or_path="{tmp}/badtok"),
    case("grpo_model_is_a_text_file", "grpo", ["{tmp}/model.txt"], "model_txt", model_name_or_path="{tmp}/model.txt"),
    case("sft_config_json_unknown_type", "sft", ["{tmp}/weird_config.json"], "weird_config",
         model_name_or_path="{tmp}/weird_config.json"),
    case("grpo_ref_other_vocabulary", "grpo", ["--ref_model_name_or_path"], "other_vocab", beta=0.1,
         ref_model_name_or_path="{tmp}/othervocab"),
    case("eval_model_torn_safetensors", "evaluate", ["{tmp}/student_torn"], "student_torn",
         model_name_or_path="{tmp}/student_torn"),
    case("opd_teacher_hub_id_offline", "opd", ["nobody-xyz/no-such-model"],
         teacher_name_or_path="nobody-xyz/no-such-model"),
    # --- run folders, checkpoints, output folders
    case("sft_run_dir_parent_is_a_file", "sft", ["{tmp}/afile"], "afile", run_dir="{tmp}/afile/run"),
    case("grpo_run_config_binary", "grpo", ["{tmp}/run", "config.yaml"], "run_config_binary", keep=["{tmp}/run"]),
    case("opd_finished_run_manifest_corrupt", "opd", ["MANIFEST.json", "--overwrite_run_dir"], "manifest_corrupt",
         keep=["{tmp}/run"]),
    case("opd_finished_run_trainer_state_corrupt", "opd", ["trainer_state.json"], "trainer_state_corrupt",
         keep=["{tmp}/run"]),
    case("opd_resume_from_missing_path", "opd", ["{tmp}/nowhere"], resume_from="{tmp}/nowhere"),
    case("opd_resume_from_a_file", "opd", ["{tmp}/afile"], "afile", resume_from="{tmp}/afile"),
    case("eval_output_dir_is_a_file", "evaluate", ["{tmp}/afile"], "afile", output_dir="{tmp}/afile"),
    case("eval_settings_json_corrupt", "evaluate", ["settings.json"], "eval_settings_corrupt", keep=["{tmp}/eval"]),
    # --- configs and flags
    case("opd_config_is_a_folder", "opd", ["{tmp}/cfgdir"], "cfgdir", config="{tmp}/cfgdir"),
    case("opd_config_tab_indent", "opd", ["{tmp}/tab.yaml"], "tab_yaml", config="{tmp}/tab.yaml"),
    case("grpo_config_json_trailing_comma", "grpo", ["{tmp}/c.json"], "json_trailing_comma", config="{tmp}/c.json",
         drop=("max_steps", "learning_rate")),
    case("opd_config_lr_mapping", "opd", ["--learning_rate"], "lr_mapping", config="{tmp}/lr.yaml",
         drop=("learning_rate",)),
    case("grpo_reward_weight_not_a_number", "grpo", ["correctness:abc"], rewards="correctness:abc"),
    case("stable_opd_ref_kl_on_golden_k3", "stable_opd", ["--ref_kl_on_golden", "--ref_kl_type"],
         ref_kl_on_golden="true", ref_kl_type="k3", ref_kl_coef=0.01),
    case("opd_model_init_kwargs_bad_json", "opd", ["model_init_kwargs"], model_init_kwargs="{bad json"),
    case("opd_lora_unknown_module", "opd", ["--lora_target_modules", "nonexistent_proj"], use_peft="true",
         lora_target_modules="nonexistent_proj"),
    case("grpo_run_dir_empty_string", "grpo", ["--run_dir"], run_dir=""),
]


# ----------------------------------------------------------------------------- setups (files in tmp)

def _rows(w):
    return [json.loads(x) for x in Path(w["train"]).read_text().splitlines()]


def _write_rows(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _copy_model(w, name, dest: Path) -> Path:
    shutil.copytree(w[name], dest)
    return dest


def setup(name: str, tmp: Path, w: dict) -> None:
    rows = _rows(w)
    if name == "utf16":
        (tmp / "utf16.jsonl").write_text(Path(w["train"]).read_text(), encoding="utf-16")
    elif name == "dup_key":
        lines = [json.dumps(r) for r in rows]
        lines[2] = lines[2][:-1] + ', "answer": "999"}'
        (tmp / "dup.jsonl").write_text("\n".join(lines) + "\n")
    elif name in ("solution_number", "solution_object"):
        i, value = (1, 30) if name == "solution_number" else (4, {"text": rows[4]["solution"]})
        rows[i]["solution"] = value
        _write_rows(tmp / ("solnum.jsonl" if name == "solution_number" else "solobj.jsonl"), rows)
    elif name == "folder_jsonl":
        (tmp / "folder.jsonl").mkdir()
    elif name in ("torn_parquet", "text_parquet"):
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(tmp / "full.parquet"))
        data = (tmp / "full.parquet").read_bytes()
        (tmp / "torn.parquet").write_bytes(data[: len(data) // 2])
        shutil.copyfile(w["train"], tmp / "text.parquet")
    elif name == "val_missing_answer":
        val = rows[:4]
        del val[2]["answer"]
        _write_rows(tmp / "val.jsonl", val)
    elif name == "golden_bad_json":
        (tmp / "golden.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:-5] + "\n")
    elif name == "blank_lines":
        (tmp / "blank.jsonl").write_text("\n  \n\t\n\n")
    elif name == "latin1_line7":
        lines = [json.dumps(r) for r in rows]
        lines[6] = lines[6].replace("has", "h\u00e9s", 1)
        (tmp / "latin1.jsonl").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    elif name in ("teacher_torn", "student_torn"):
        d = _copy_model(w, "teacher" if name == "teacher_torn" else "student", tmp / name)
        st = d / "model.safetensors"
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 3])
    elif name == "student_no_config":
        (_copy_model(w, "student", tmp / "noconfig") / "config.json").unlink()
    elif name == "student_bad_config":
        (_copy_model(w, "student", tmp / "badcfg") / "config.json").write_text('{"model_type": "qwen2", ')
    elif name == "student_bad_tokenizer":
        tok = _copy_model(w, "student", tmp / "badtok") / "tokenizer.json"
        tok.write_text(tok.read_text()[:200])
    elif name == "model_txt":
        (tmp / "model.txt").write_text("not a model\n")
    elif name == "weird_config":
        (tmp / "weird_config.json").write_text('{"model_type": "no_such_architecture", "vocab_size": 10}')
    elif name == "other_vocab":
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(w["student"])
        cfg.vocab_size = cfg.vocab_size + 64
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / "othervocab")
        for f in Path(w["student"]).glob("tokenizer*"):
            shutil.copy(f, tmp / "othervocab" / f.name)
        src = Path(w["student"]) / "special_tokens_map.json"
        if src.exists():
            shutil.copy(src, tmp / "othervocab" / src.name)
        tok = json.loads((tmp / "othervocab" / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        first = sorted(vocab, key=vocab.get)[:40]
        for k in first:  # another vocabulary: the same size, other ids for the first tokens
            vocab[k] = vocab[k] + 1 if vocab[k] + 1 not in vocab.values() else vocab[k]
        vocab[first[0]], vocab[first[1]] = vocab[first[1]], vocab[first[0]]
        (tmp / "othervocab" / "tokenizer.json").write_text(json.dumps(tok))
    elif name == "afile":
        (tmp / "afile").write_text("a file, not a folder\n")
    elif name == "run_config_binary":
        (tmp / "run").mkdir()
        (tmp / "run" / "config.yaml").write_bytes(bytes(range(256)))
        (tmp / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    elif name in ("manifest_corrupt", "trainer_state_corrupt"):
        shutil.copytree(w["opd_run"], tmp / "run")
        ckpt = next((tmp / "run" / "checkpoints").glob("step_*"))
        target = ckpt / ("MANIFEST.json" if name == "manifest_corrupt" else "trainer_state.json")
        target.write_text(target.read_text()[:-7])
    elif name == "eval_settings_corrupt":  # a finished benchmark, then its folder's settings.json torn
        (tmp / "eval" / "toy").mkdir(parents=True)
        (tmp / "eval" / "toy" / "result.json").write_text('{"benchmark": "toy", "metrics": {"acc": 0.5}}\n')
        (tmp / "eval" / "toy" / "samples.jsonl").write_text('{"benchmark": "toy"}\n')
        (tmp / "eval" / "settings.json").write_text('{"model": ')
    elif name == "cfgdir":
        (tmp / "cfgdir").mkdir()
    elif name == "tab_yaml":
        (tmp / "tab.yaml").write_text("max_steps: 1\nlearning_rate:\n\t0.001\n")
    elif name == "json_trailing_comma":
        (tmp / "c.json").write_text('{"max_steps": 1, "learning_rate": 0.001,}\n')
    elif name == "lr_mapping":
        (tmp / "lr.yaml").write_text("learning_rate: {value: 0.001}\n")
    elif name:
        raise KeyError(name)


# ----------------------------------------------------------------------------- the world, one attempt, the verdict

def build_world(root: Path) -> dict:
    """Tiny student / teacher folders, the toy data, and one finished OPD run (made with this checkout)."""
    from common.models import load_model
    from common.toy import build_toy_world, load_toy_tokenizer, toy_config_path

    tok = load_toy_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        load_model(str(toy_config_path("student")), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = build_toy_world(root / "toy", n_train=32, n_val=8, n_test=8, max_steps=2)
    w = {"root": root, "student": root / "student", "teacher": root / "teacher", "train": data["train"]}
    flags = {k: fill(str(v), {"tmp": str(root), **{n: str(p) for n, p in w.items()}}) for k, v in base("opd").items()}
    flags["run_dir"] = str(root / "opd_run")
    subprocess.run([sys.executable, "methods/opd.py", *argv_of(flags)], cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=600)
    return {**w, "opd_run": root / "opd_run"}


def argv_of(flags: dict) -> list[str]:
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def verdict(code: int, out: str, err: str, names: list[str], lost: list[str], wrote: list[str]) -> tuple[str, str]:
    """(clear | unclear | silent | data lost, why)."""
    if lost:
        return "data lost", f"changed or removed: {lost[:3]}"
    text = out + "\n" + err
    errors = [x for x in text.splitlines() if re.search(r"\berror\b", x, re.IGNORECASE)
              and not re.match(r"\s*(warnings\.warn|UserWarning)", x)]
    if code == 0:
        warned = [x for x in text.splitlines() if re.match(r"\S*\s*(warning|note)\b", x, re.IGNORECASE)
                  and all(n in x for n in names)]
        return ("clear", "ran, with a warning naming it") if names and warned else ("silent", "exit 0")
    if "Traceback (most recent call last)" in text:
        return "unclear", "a traceback"
    if len(errors) != 1:
        return "unclear", f"{len(errors)} error lines"
    missing = [n for n in names if n not in errors[0]]
    if missing:
        return "unclear", f"does not name {missing}"
    if wrote:
        return "unclear", f"wrote {wrote[:3]} before failing"
    return "clear", ""


def attempt(repo: Path, c: Case, w: dict, show: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(dir=w["root"], prefix=f"{c.id}-"))
    subs = {"tmp": str(tmp), **{k: str(v) for k, v in w.items()}}
    try:
        setup(c.setup, tmp, w)
        flags = {k: fill(str(v), subs) for k, v in c.flags.items()}
        names = [fill(n, subs) for n in c.names]
        before_tmp = hashes(tmp)
        before_inputs = {k: hashes(Path(w[k])) for k in ("student", "teacher", "opd_run")}
        t0 = time.time()
        # run from tmp: a relative path (--run_dir '', a default) lands there, where it is seen
        proc = subprocess.run([sys.executable, str(repo / c.script), *argv_of(flags)], cwd=tmp, env=ENV,
                              capture_output=True, text=True, timeout=600, check=False)
        after_tmp = hashes(tmp)
        lost = [k for k, v in before_tmp.items() if after_tmp.get(k) != v]
        lost += [f"{k}/{f}" for k, h in before_inputs.items() for f, v in h.items() if hashes(Path(w[k])).get(f) != v]
        wrote = sorted(set(after_tmp) - set(before_tmp))
        kind, why = verdict(proc.returncode, proc.stdout, proc.stderr, names, lost, wrote)
        line = next((x for x in (proc.stderr + proc.stdout).splitlines()[::-1] if "error" in x.lower()), "")
        if show:
            print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
        return {"id": c.id, "verdict": kind, "why": why, "exit": proc.returncode, "seconds": round(time.time() - t0, 1),
                "line": line.replace(str(tmp), "{tmp}").replace(str(w["root"]), "{root}")[:300]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(ROOT), help="the checkout whose entry points are run (default: this one)")
    p.add_argument("--only", default="", help="comma list of case ids")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--show", action="store_true", help="print each run's output tails")
    a = p.parse_args()
    cases = [c for c in CASES if not a.only or c.id in a.only.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bad-survey-"))
    try:
        w = build_world(root)
        results = []
        for c in cases:
            r = attempt(Path(a.repo), c, w, a.show)
            results.append(r)
            print(f"{r['verdict']:9s} exit {r['exit']:3d} {r['seconds']:5.1f}s {c.id}: {r['why']} | {r['line']}",
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    counts = {k: sum(r["verdict"] == k for r in results) for k in ("clear", "unclear", "silent", "data lost")}
    exit2 = sum(r["exit"] == 2 for r in results)
    print(f"\n{len(results)} bad inputs: " + ", ".join(f"{v} {k}" for k, v in counts.items())
          + f" | exit status 2: {exit2}")
    if a.json:
        Path(a.json).write_text(json.dumps({"repo": a.repo, "counts": counts, "results": results}, indent=1))


if __name__ == "__main__":
    main()
