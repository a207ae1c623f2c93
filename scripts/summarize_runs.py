"""Markdown table of a sweep's runs `<out>/<config>_s<seed>` (scripts/ablate_toy.sh, scripts/collapse_toy.sh):
greedy test accuracy (eval/results.json) over seeds, and the worst truncation / length / repetition seen
in training with the first step the collapse alarm fired.

    python scripts/summarize_runs.py runs/collapse opd both mix ref adaptive
"""

import json
import statistics
import sys
from pathlib import Path

LABELS = {"opd": "OPD", "both": "Stable-OPD", "mix": "+ mixture only", "ref": "+ ref KL only", "adaptive": "Stable-OPD adaptive",
          "tuned": "Stable-OPD (1.0 / 0.1)"}


def summarize(run: Path) -> dict | None:
    """Test accuracy and training extremes of one run (None if it has no finished evaluation)."""
    res = run / "eval" / "results.json"
    if not res.exists():
        return None
    metrics = next(iter(json.loads(res.read_text())["benchmarks"].values()))["metrics"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"rollout/truncated_frac"' in x]
    alarms = [r["step"] for r in rows if r.get("alarm/truncation")]
    return {"acc": metrics["acc"], "test_trunc": metrics["truncated_frac"],
            "trunc": max(r["rollout/truncated_frac"] for r in rows), "len": max(r["rollout/len_mean"] for r in rows),
            "rep": max(r.get("rollout/repetition_frac", 0.0) for r in rows), "alarm": alarms[0] if alarms else None}


def main(argv: list[str]) -> None:
    out, configs = Path(argv[0]), argv[1:] or list(LABELS)
    print("| config | seeds | test acc (mean ± sd) | per seed | test truncated (worst seed) | max truncated (train) | max mean length | "
          "max repetition | first alarm step |\n|---|---|---|---|---|---|---|---|---|")
    for cfg in configs:
        runs = [r for r in (summarize(d) for d in sorted(out.glob(f"{cfg}_s*")) if d.is_dir()) if r]
        if not runs:
            continue
        acc = [r["acc"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        alarms = [str(r["alarm"]) if r["alarm"] is not None else "-" for r in runs]
        print(f"| {LABELS.get(cfg, cfg)} | {len(runs)} | {statistics.mean(acc):.3f} ± {sd:.3f} | {', '.join(f'{a:.3f}' for a in acc)} | "
              f"{max(r['test_trunc'] for r in runs):.3f} | {max(r['trunc'] for r in runs):.3f} | {max(r['len'] for r in runs):.1f} | "
              f"{max(r['rep'] for r in runs):.3f} | {', '.join(alarms)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
