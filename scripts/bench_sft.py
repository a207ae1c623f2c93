"""SFT throughput and peak memory: tokens/s (completion tokens), s/step and peak RSS of methods/sft.py.

    python scripts/bench_sft.py [--steps 40] [--batch 32] [--model assets/toy/teacher_config.json]   # fp32 vs bf16
    python scripts/bench_sft.py --vocab 151936 --steps 6 --precisions fp32                            # real vocabulary
    python scripts/bench_sft.py --vocab 151936 --repo /path/to/older/checkout                         # A/B, same fixtures

Runs `--steps` optimizer steps per setting (no eval, no checkpoints) and reports the median over the steps after the
warm-up (the first 5, or the first with --steps <= 6) of `perf/tokens_per_s` and `perf/step_s`, and the run's peak
RSS from the OS (/usr/bin/time, as scripts/bench_opd_step.py). `--vocab 151936`: the real Qwen tokenizer and a tiny
random Qwen2 student (scripts/bench_opd_step.py's fixture, hidden 128, 2 layers) on the toy problems.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.toy import build_toy_world, toy_config_path  # noqa: E402
from scripts.bench_opd_step import build_fixtures, run_measured  # noqa: E402


def run(bf16: bool, args, model: str, train: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(Path(args.repo) / "methods" / "sft.py"), "--run_dir", tmp, "--model_name_or_path", model,
               "--train_data", str(train), "--val_data", "", "--max_steps", str(args.steps), "--log_every", "1",
               "--per_device_batch_size", str(args.batch), "--save_every", "0", "--bf16", str(bf16).lower(),
               "--resume_from", "none"]
        with (Path(tmp) / "stderr.txt").open("w") as err:
            status, peak_kib = run_measured(cmd, err, Path(args.repo), Path(tmp) / "maxrss.txt")
        if status != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{(Path(tmp) / 'stderr.txt').read_text()[-3000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    warm = 5 if args.steps > 6 else 1
    rows = [r for r in rows if "perf/tokens_per_s" in r and r["step"] > warm]
    return {"tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in rows),
            "step_s": statistics.median(r["perf/step_s"] for r in rows), "peak_rss_gb": peak_kib / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--model", default=str(toy_config_path("teacher")))
    parser.add_argument("--vocab", type=int, default=0, choices=(0, 1000, 151936),
                        help="0: --model on the toy world; else bench_opd_step.py's student fixture of that vocabulary")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (autocast)")
    parser.add_argument("--repo", default=str(ROOT), help="checkout whose methods/sft.py runs (an older commit, for A/B)")
    parser.add_argument("--cache", default=str(ROOT / "runs" / "bench_fixtures"))
    args = parser.parse_args()
    if args.vocab:
        fx = build_fixtures(Path(args.cache), args.vocab)
        model, train = str(fx["student"]), fx["train"]
    else:
        model, train = args.model, build_toy_world(ROOT / "data" / "toy")["train"]
    print(f"methods/sft.py of {args.repo}, model {model}")
    print("| precision | batch | completion tokens/s | s/step | peak RSS GB |\n|---|---|---|---|---|")
    for name in args.precisions.split(","):
        r = run(name == "bf16", args, model, train)
        print(f"| {'bf16 autocast' if name == 'bf16' else 'fp32'} | {args.batch} | {r['tokens_per_s']:.0f} | "
              f"{r['step_s']:.3f} | {r['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
