"""The CPU main job on the toy world (what `bash scripts/demo.sh` runs).

1. Build the toy world (data/toy) and SFT a teacher to high accuracy and a weak student with
   `methods/sft.py`.
2. From that same student, train OPD, Stable-OPD and GRPO with the same budget (steps x prompts x samples).
3. Evaluate all five models greedily on the toy test split (`eval/evaluate.py`), print a comparison table
   (accuracy, mean length, truncated and repetition fractions, wall time), write it to `<out>/results.md`
   and draw the figures (`scripts/plot_runs.py`) into `<out>/figures/`.

Every stage is cached in the output folder: a finished stage with the same flags is skipped, an
interrupted one resumes from its checkpoint. `--quick` is a few-minute version with far fewer steps (its
accuracies mean little). `--only` runs a subset of the methods.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.models import cpu_has_fast_bf16  # noqa: E402
from common.toy import build_toy_world, toy_config_path  # noqa: E402
from scripts import plot_runs  # noqa: E402

# bf16 autocast for the SFT stages only where the CPU computes bf16 natively: emulated bf16 is ~27x slower than fp32
# (an AVX2-only CPU: 20 s per teacher step instead of ~0.3 s; common/models.py cpu_has_fast_bf16).
BF16 = "true" if cpu_has_fast_bf16() else "false"
CAP = 96  # toy solutions are <= 64 tokens; the cap of rollouts and evals (also bounds untrained models' evals)
# SFT stages: sft.py flags. Tuned on the 2-core CPU machine (docs/LOG.md, 2026-11-25).
TEACHER = {"max_steps": 800, "per_device_batch_size": 32, "learning_rate": 1e-3, "warmup_steps": 50, "bf16": BF16,
           "eval_every": 200}
# The student stops as soon as its greedy val accuracy reaches 40% (it learns the task abruptly, somewhere
# between ~600 and ~1000 steps, so a fixed step count lands anywhere from 5% to 60%).
STUDENT = {"max_steps": 1500, "per_device_batch_size": 32, "learning_rate": 2e-3, "warmup_steps": 20, "bf16": BF16,
           "eval_every": 50, "target_val_acc": 0.4}
# Post-training stages: the same budget for each (steps x 16 prompts x 4 samples); the methods' own toy
# defaults otherwise (learning rates etc., see each file's Args).
BUDGET = {"max_steps": 100, "per_device_prompts": 16, "num_generations": 4, "eval_every": 25, "eval_samples": 100,
          "save_every": 50, "max_completion_length": CAP, "log_every": 1}
METHODS = {"opd": "OPD", "stable_opd": "Stable-OPD", "grpo": "GRPO"}
QUICK = {"teacher": {"max_steps": 150, "eval_every": 0}, "student": {"max_steps": 60, "eval_every": 0},
         "methods": {"max_steps": 6, "per_device_prompts": 8, "eval_every": 0, "eval_samples": 50, "save_every": 0}}
QUICK_EVAL_LIMIT = 100  # test problems evaluated in --quick mode (the full split has 500)


def _same_config(config_path: Path, flags: dict) -> bool:
    """Whether a finished run used these flags (so its model can be reused)."""
    import yaml

    saved = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    return all(str(saved.get(k)).lower() == str(v).lower() or saved.get(k) == v for k, v in flags.items())


def stage(name: str, script: str, out: Path, flags: dict) -> dict:
    """Run (or reuse) one training stage `methods/<script>.py --run_dir out/name <flags>`; returns its final_eval.json."""
    run_dir = out / name
    done = run_dir / "final_eval.json"
    if done.exists() and _same_config(run_dir / "config.yaml", flags):
        print(f"[demo] {name}: cached in {run_dir}", flush=True)
        return json.loads(done.read_text())
    cmd = [sys.executable, str(ROOT / "methods" / f"{script}.py"), "--run_dir", str(run_dir), "--seed", "0"]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    print(f"\n[demo] {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    result = json.loads(done.read_text())
    result["wall_s"] = round(time.time() - t0, 1)
    done.write_text(json.dumps(result, indent=2))
    return result


def evaluate(name: str, model_dir: Path, out: Path, limit: int) -> dict:
    """Greedy toy-test metrics of one model (eval/evaluate.py; a finished evaluation is reused)."""
    eval_dir = out / "eval" / name
    cmd = [sys.executable, str(ROOT / "eval" / "evaluate.py"), "--model_name_or_path", str(model_dir), "--label", name,
           "--benchmarks", "toy", "--max_new_tokens", str(CAP), "--output_dir", str(eval_dir), "--threads", "1",
           "--limit", str(limit)]
    print(f"[demo] evaluating {name} on the toy test split", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((eval_dir / "results.json").read_text())["benchmarks"]["toy"]["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (models are cached here)")
    parser.add_argument("--quick", action="store_true", help="a few-minute version with fewer steps (lower accuracy)")
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    parser.add_argument("--only", default=",".join(METHODS), help=f"comma list of post-training methods ({', '.join(METHODS)})")
    args = parser.parse_args()
    methods = [m.strip() for m in args.only.split(",") if m.strip()]
    if set(methods) - set(METHODS):
        parser.error(f"--only: unknown method(s) {sorted(set(methods) - set(METHODS))}; choose from {list(METHODS)}")
    out = Path(args.out) / ("quick" if args.quick else "full")
    if args.force and out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.time()
    data = build_toy_world(ROOT / "data" / "toy")
    print(f"[demo] toy world: {', '.join(f'{k} {v}' for k, v in data.items())}")

    # 1. SFT: teacher and weak student
    common = {"train_data": data["train"], "val_data": data["val"], "test_data": data["test"], "eval_samples": 100,
              "save_every": 100, "log_every": 25, "max_completion_length": CAP}
    runs = {}
    for name, flags in [("teacher", TEACHER), ("student", STUDENT)]:
        flags = {"model_name_or_path": toy_config_path(name), **common, **flags, **(QUICK[name] if args.quick else {})}
        runs[name] = stage(name, "sft", out, flags)

    # 2. OPD, Stable-OPD, GRPO from the same student, same budget
    for name in methods:
        flags = {"model_name_or_path": out / "student" / "final", "train_data": data["train"], "val_data": data["val"],
                 **BUDGET, **(QUICK["methods"] if args.quick else {})}
        if name != "grpo":
            flags["teacher_name_or_path"] = out / "teacher" / "final"
        runs[name] = stage(name, name, out, flags)

    # 3. the same greedy test evaluation for every model; table and figures
    limit = QUICK_EVAL_LIMIT if args.quick else 0
    rows = []
    for name in ["teacher", "student", *methods]:
        m = evaluate(name, out / name / "final", out, limit)
        label = {"teacher": "SFT teacher (3.1M)", "student": "SFT student (0.45M)", **METHODS}[name]
        wall = runs[name].get("wall_s")
        rows.append((label, m, f"{wall:.0f}" if wall is not None else "cached"))
    n_test = int(rows[0][1]["n_problems"])
    table = [f"Greedy accuracy on {n_test} toy test problems (cap {CAP} tokens); post-training budget "
             f"{BUDGET['max_steps'] if not args.quick else QUICK['methods']['max_steps']} steps each, from the SFT student.", "",
             "| model | test acc | mean length | truncated | repetition | train wall s |", "|---|---|---|---|---|---|"]
    table += [f"| {label} | {m['acc']:.3f} | {m['len_mean']:.1f} | {m['truncated_frac']:.3f} | {m['repetition_frac']:.3f} | {wall} |"
              for label, m, wall in rows]
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    if methods:
        plot_runs.main(["--out", str(out / "figures" / "toy"), *[x for n in methods for x in ("--run", f"{METHODS[n]}={out / n}")],
                        "--baseline", f"SFT student={rows[1][1]['acc']}", "--baseline", f"SFT teacher={rows[0][1]['acc']}"])
    print(f"\n[demo] done in {time.time() - t0:.0f} s; models in {out}/*/final, table in {out}/results.md, figures in {out}/figures")


if __name__ == "__main__":
    main()
