"""The CPU main job on the toy world (what `bash scripts/demo.sh` runs).

1. Build the toy world (data/toy); SFT a teacher to high accuracy and a weak student with `methods/sft.py`.
2. From that same student, train OPD, Stable-OPD and GRPO with the same budget (steps x prompts x samples).
3. Evaluate all five models greedily on the toy test split (`eval/evaluate.py`), print a comparison table
   (accuracy with its binomial standard error, mean length, truncated and repetition fractions, wall time),
   write it to `<out>/results.md` and draw the figures (`scripts/plot_runs.py`) into `<out>/figures/`.

Stages run `--jobs` at a time (default: one per CPU core, one thread each), each as soon as the stages it needs
are done, longest first; each writes its output to `<run dir>/log.txt`, and a progress line per running stage
(step, rate, ETA) is printed every `--progress_every` seconds. Every stage is cached in the output folder: a
finished stage with the same flags is skipped, an interrupted one resumes from its checkpoint.

Profiles: the default (`<out>/main`) fits in about ten minutes on 2 cores; `--quick` (`<out>/quick`, ~3 min)
only shows that the pipeline runs (its models are barely trained); `--long` (`<out>/full`) is the earlier,
hour-long configuration (3.1M teacher, 100 steps of 16 x 4 per method) whose numbers docs/RESULTS.md and the
toy studies (`scripts/collapse_toy.sh`, `scripts/ablate_toy.sh`) quote.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.toy import build_toy_world, toy_config_path  # noqa: E402
from scripts import plot_runs  # noqa: E402

CAP = 96  # toy solutions are <= 64 tokens; the cap of rollouts and evals (also bounds untrained models' evals)
METHODS = {"opd": "OPD", "stable_opd": "Stable-OPD", "grpo": "GRPO"}
# Every stage trains in fp32 (`--bf16 false`): the same numbers on every CPU, and emulated bf16 on a CPU without
# native bf16 is ~27x slower. SFT flags tuned on the 2-core CPU machine (docs/LOG.md, 2026-11-25 and 2026-12-07).
SFT = {"per_device_batch_size": 32, "bf16": "false", "eval_samples": 100, "log_every": 25,
       "max_completion_length": CAP}
RL = {"per_device_prompts": 16, "num_generations": 4, "max_completion_length": CAP, "log_every": 1, "bf16": "false"}
PROFILES = {
    "main": {  # about ten minutes on 2 cores
        "teacher": {"model": "teacher_small", "max_steps": 800, "learning_rate": 1.5e-3, "warmup_steps": 50,
                    "eval_every": 200, "save_every": 200},
        # the student learns the task abruptly (somewhere between ~600 and ~1000 steps), so a fixed step count
        # lands anywhere from 5% to 60%: it stops at the first val eval at or above 40% (at most 1,000 steps)
        "student": {"model": "student", "max_steps": 1000, "learning_rate": 2e-3, "warmup_steps": 20,
                    "eval_every": 50, "target_val_acc": 0.4, "save_every": 250},
        "methods": {"max_steps": 60, "eval_every": 20, "eval_samples": 100, "save_every": 30},
        "eval_limit": 0,
    },
    "quick": {  # ~3 minutes: the pipeline runs end to end; the accuracies show nothing about the methods
        "teacher": {"model": "teacher_small", "max_steps": 120, "learning_rate": 1.5e-3, "warmup_steps": 20,
                    "eval_every": 0, "save_every": 0},
        "student": {"model": "student", "max_steps": 60, "learning_rate": 2e-3, "warmup_steps": 20,
                    "eval_every": 0, "save_every": 0},
        "methods": {"max_steps": 6, "per_device_prompts": 8, "eval_every": 0, "eval_samples": 50, "save_every": 0},
        "eval_limit": 100,
    },
    "full": {  # --long: the configuration behind docs/RESULTS.md section 1 and the toy studies (about an hour)
        "teacher": {"model": "teacher", "max_steps": 800, "learning_rate": 1e-3, "warmup_steps": 50,
                    "eval_every": 200, "save_every": 100},
        "student": {"model": "student", "max_steps": 1500, "learning_rate": 2e-3, "warmup_steps": 20,
                    "eval_every": 50, "target_val_acc": 0.4, "save_every": 100},
        "methods": {"max_steps": 100, "eval_every": 25, "eval_samples": 100, "save_every": 50},
        "eval_limit": 0,
    },
}


@dataclass
class Stage:
    """One subprocess of the job: a training run (`methods/<script>.py`) or an evaluation (`eval/evaluate.py`)."""

    name: str
    cmd: list[str]
    run_dir: Path  # where its log.txt (and, for training, metrics.jsonl) goes
    needs: list[str]
    total_steps: int  # 0 for an evaluation
    cost: float  # rough relative cost: longest first
    done: bool = False
    proc: subprocess.Popen | None = None
    started: float = 0.0
    wall_s: float | None = None
    log: object = field(default=None, repr=False)


def same_config(config_path: Path, flags: dict) -> bool:
    """Whether a finished run used these flags (so its model can be reused)."""
    import yaml

    saved = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    return all(str(saved.get(k)).lower() == str(v).lower() or saved.get(k) == v for k, v in flags.items())


def train_stage(name: str, script: str, out: Path, flags: dict, needs: list[str], cost: float) -> Stage:
    """`methods/<script>.py --run_dir out/name <flags>`; already done if a finished run used the same flags."""
    run_dir = out / name
    cmd = [sys.executable, str(ROOT / "methods" / f"{script}.py"), "--run_dir", str(run_dir), "--seed", "0"]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    done = (run_dir / "final_eval.json").exists() and same_config(run_dir / "config.yaml", flags)
    return Stage(name, cmd, run_dir, needs, int(flags["max_steps"]), cost, done=done)


def eval_stage(name: str, out: Path, limit: int, retrained: bool) -> Stage:
    """Greedy toy-test metrics of one model (eval/evaluate.py); redone whenever its model was retrained."""
    eval_dir = out / "eval" / name
    if retrained and eval_dir.exists():
        shutil.rmtree(eval_dir)
    cmd = [sys.executable, str(ROOT / "eval" / "evaluate.py"), "--model_name_or_path", str(out / name / "final"),
           "--label", name, "--benchmarks", "toy", "--max_new_tokens", str(CAP), "--output_dir", str(eval_dir),
           "--threads", "1", "--limit", str(limit)]
    done = (eval_dir / "results.json").exists()
    return Stage(f"eval {name}", cmd, eval_dir, [name], 0, 1.0, done=done)


def progress(s: Stage, now: float) -> str:
    """`name: step 120/400, 2.1 steps/s, ETA 2 min 13 s` from the stage's metrics.jsonl (elapsed only for evals)."""
    elapsed = now - s.started
    step = 0
    metrics = s.run_dir / "metrics.jsonl"
    if s.total_steps and metrics.exists():
        for line in reversed(metrics.read_text().splitlines()[-5:]):
            try:
                step = int(json.loads(line).get("step", 0))
                break
            except (ValueError, AttributeError):
                continue
    if not step:
        return f"{s.name}: {elapsed:.0f} s"
    rate = step / elapsed
    eta = (s.total_steps - step) / rate
    return f"{s.name}: step {step}/{s.total_steps}, {rate:.2f} steps/s, ETA {eta // 60:.0f} min {eta % 60:02.0f} s"


def run_stages(stages: list[Stage], jobs: int, every: float) -> None:
    """Run the stages not yet done, `jobs` at a time, each once its `needs` are done; stop everything on a failure."""
    by_name = {s.name: s for s in stages}
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs)), "PYTHONUNBUFFERED": "1"}
    running: list[Stage] = []
    last_print = time.time()
    while any(not s.done for s in stages):
        ready = [s for s in stages if not s.done and s.proc is None and all(by_name[n].done for n in s.needs)]
        for s in sorted(ready, key=lambda s: -s.cost)[: jobs - len(running)]:
            s.run_dir.mkdir(parents=True, exist_ok=True)
            s.log = open(s.run_dir / "log.txt", "a")
            print(f"[demo] start {s.name} (log: {s.run_dir / 'log.txt'})", flush=True)
            s.started = time.time()
            s.proc = subprocess.Popen(s.cmd, stdout=s.log, stderr=subprocess.STDOUT, env=env)
            running.append(s)
        time.sleep(0.5)
        for s in [s for s in running if s.proc.poll() is not None]:
            running.remove(s)
            s.log.close()
            if s.proc.returncode != 0:
                for other in running:
                    other.proc.terminate()  # SIGTERM: the training stages checkpoint and exit
                for other in running:
                    other.proc.wait()
                tail = "".join((s.run_dir / "log.txt").read_text().splitlines(keepends=True)[-25:])
                sys.exit(f"{tail}\nerror: stage {s.name!r} failed (exit {s.proc.returncode}); its log: "
                         f"{s.run_dir / 'log.txt'}; rerun the same command to resume")
            s.done, s.wall_s = True, time.time() - s.started
            print(f"[demo] done {s.name} in {s.wall_s:.0f} s", flush=True)
        if running and time.time() - last_print >= every:
            last_print = time.time()
            print("[demo] " + " | ".join(progress(s, last_print) for s in running), flush=True)


def binomial_se(p: float, n: int) -> float:
    """One standard error of an accuracy p measured on n independent problems: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def results_table(rows: list[tuple], cfg: dict, profile: str) -> list[str]:
    """The comparison table (markdown lines); rows are (label, metrics, wall seconds or None)."""
    n = int(rows[0][1]["n_problems"])
    lines = [f"Greedy accuracy on {n} toy test problems (cap {CAP} tokens; +- one binomial standard error, "
             f"sqrt(p(1-p)/n)); post-training budget {cfg['methods']['max_steps']} steps x "
             f"{cfg['methods'].get('per_device_prompts', RL['per_device_prompts'])} prompts x "
             f"{RL['num_generations']} samples each, from the SFT student; seed 0; profile {profile}.", "",
             "| model | test acc | mean length | truncated | repetition | train wall s |", "|---|---|---|---|---|---|"]
    for label, m, wall in rows:
        acc = f"{m['acc']:.3f} +- {binomial_se(m['acc'], n):.3f}"
        wall_s = f"{wall:.0f}" if wall is not None else "cached"
        lines.append(f"| {label} | {acc} | {m['len_mean']:.1f} | {m['truncated_frac']:.3f} | "
                     f"{m['repetition_frac']:.3f} | {wall_s} |")
    if profile == "quick":
        lines += ["", "--quick: the models are barely trained; this table shows only that every stage runs end to "
                  "end, not how the methods compare (run `bash scripts/demo.sh` for that)."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (models are cached here)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="~3 min: shows the pipeline runs, not how methods compare")
    size.add_argument("--long", action="store_true", help="the earlier hour-long configuration the studies build on")
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    parser.add_argument("--only", default=",".join(METHODS), help=f"comma list of methods ({', '.join(METHODS)})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="stages at once (default: CPU cores)")
    parser.add_argument("--progress_every", type=float, default=15.0, help="seconds between progress lines")
    args = parser.parse_args()
    methods = [m.strip() for m in args.only.split(",") if m.strip()]
    if set(methods) - set(METHODS):
        parser.error(f"--only: unknown method(s) {sorted(set(methods) - set(METHODS))}; choose from {list(METHODS)}")
    if args.jobs < 1 or args.progress_every <= 0:
        parser.error("--jobs must be >= 1 and --progress_every > 0")
    profile = "quick" if args.quick else "full" if args.long else "main"
    cfg, out = PROFILES[profile], Path(args.out) / profile
    if args.force and out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    data = build_toy_world(ROOT / "data" / "toy")
    print(f"[demo] toy world: {', '.join(f'{k} {v}' for k, v in data.items())}; profile {profile}, output {out}")

    # 1. SFT: teacher and weak student; 2. OPD, Stable-OPD, GRPO from the same student, same budget
    split = {"train_data": data["train"], "val_data": data["val"]}
    stages = []
    for name in ("teacher", "student"):
        flags = {k: v for k, v in cfg[name].items() if k != "model"}
        flags = {"model_name_or_path": toy_config_path(cfg[name]["model"]), **split, **SFT, **flags}
        stages.append(train_stage(name, "sft", out, flags, [], cost=3.0 if name == "teacher" else 2.0))
    for name in methods:
        flags = {"model_name_or_path": out / "student" / "final", **split, **RL, **cfg["methods"]}
        needs = ["student"] if name == "grpo" else ["student", "teacher"]
        if name != "grpo":
            flags["teacher_name_or_path"] = out / "teacher" / "final"
        cost = {"stable_opd": 2.5, "opd": 2.2, "grpo": 1.5}[name]
        stages.append(train_stage(name, name, out, flags, needs, cost))
    # 3. the same greedy test evaluation for every model; table and figures
    names = ["teacher", "student", *methods]
    stages += [eval_stage(n, out, cfg["eval_limit"], retrained=not s.done) for n, s in zip(names, stages)]
    run_stages(stages, args.jobs, args.progress_every)

    rows = []
    for name, s in zip(names, stages):
        final_path = out / name / "final_eval.json"
        final = json.loads(final_path.read_text())
        wall = final.get("wall_s") if s.wall_s is None else s.wall_s
        if s.wall_s is not None:  # remember the training wall time for a later, cached rerun
            final_path.write_text(json.dumps({**final, "wall_s": round(s.wall_s, 1)}, indent=2))
        metrics = json.loads((out / "eval" / name / "results.json").read_text())["benchmarks"]["toy"]["metrics"]
        shape = cfg[name]["model"] if name in ("teacher", "student") else ""
        label = {"teacher": f"SFT teacher ({shape})", "student": f"SFT student ({shape})", **METHODS}[name]
        rows.append((label, metrics, wall))
    table = results_table(rows, cfg, profile)
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    if methods:
        runs = [x for n in methods for x in ("--run", f"{METHODS[n]}={out / n}")]
        plot_runs.main(["--out", str(out / "figures" / "toy"), *runs, "--baseline", f"SFT student={rows[1][1]['acc']}",
                        "--baseline", f"SFT teacher={rows[0][1]['acc']}"])
    wall = time.time() - t0
    (out / "job_time.json").write_text(json.dumps({"profile": profile, "wall_s": round(wall, 1)}) + "\n")
    print(f"\n[demo] done in {wall // 60:.0f} min {wall % 60:02.0f} s; models in {out}/*/final, table in "
          f"{out}/results.md, figures in {out}/figures")


if __name__ == "__main__":
    main()
