"""SFT throughput on the toy teacher: tokens/s (completion tokens) in fp32 and with bf16 autocast.

    python scripts/bench_sft.py [--steps 40] [--batch 32] [--model assets/toy/teacher_config.json]

Runs methods/sft.py for `--steps` optimizer steps per setting (no eval, no checkpoints) and reports the
median over steps after the first 5 (warm-up) of `perf/tokens_per_s` and `perf/step_s`.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.toy import build_toy_world, toy_config_path  # noqa: E402


def run(bf16: bool, args, data) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "methods" / "sft.py"), "--run_dir", tmp, "--model_name_or_path", args.model,
               "--train_data", str(data["train"]), "--val_data", "", "--max_steps", str(args.steps), "--log_every", "1",
               "--per_device_batch_size", str(args.batch), "--save_every", "0", "--bf16", str(bf16).lower(), "--resume_from", "none"]
        subprocess.run(cmd, check=True, capture_output=True)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/tokens_per_s" in r and r["step"] > 5]
    return {"tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in rows),
            "step_s": statistics.median(r["perf/step_s"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--model", default=str(toy_config_path("teacher")))
    args = parser.parse_args()
    data = build_toy_world(ROOT / "data" / "toy")
    print("| precision | batch | completion tokens/s | s/step |\n|---|---|---|---|")
    for bf16 in (False, True):
        r = run(bf16, args, data)
        print(f"| {'bf16 autocast' if bf16 else 'fp32'} | {args.batch} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
