"""Markdown table of a sweep's runs `<out>/<config>_s<seed>` (scripts/ablate_toy.sh, scripts/collapse_toy.sh):
greedy test accuracy (eval/results.json) over seeds, and the worst truncation / length / repetition seen
in training with the first step the collapse alarm fired.

    python scripts/summarize_runs.py runs/collapse opd both mix ref adaptive
    python scripts/summarize_runs.py runs/collapse opd both --seeds 3,4,5 --dynamics
    python scripts/summarize_runs.py runs/collapse opd --peaks

--seeds keeps those seeds only (default: every `_s*` folder). --dynamics adds a second table of run means per config
(mean ± sd over seeds): training truncated fraction over all steps and over the steps after 30 (past the early
inflation every run at lr 3e-3 goes through: its mean, and its largest single step), mean rollout length over the
last 20 steps, the advantage gap (mean advantage on tokens in repeated spans minus on the others, over the steps
that have both), the reference KL and the effective coefficients (Stable-OPD), and the greedy val accuracy at each
eval step. --peaks adds one row per run for the improve-then-collapse question (issue 35): greedy val accuracy at
the first eval, its peak and the peak's step, at the last eval, and the step truncation takes off (`takeoff`: the
first step whose trailing 3-step mean truncated fraction reaches TAKEOFF = 0.25; "-": never).
"""

import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import error_boundary  # noqa: E402
from scripts.plot_runs import read_metrics  # noqa: E402  (a torn last line is skipped)

LABELS = {"opd": "OPD", "both": "Stable-OPD", "mix": "+ mixture only", "ref": "+ ref KL only", "adaptive": "Stable-OPD adaptive",
          "tuned": "Stable-OPD (1.0 / 0.1)"}


def summarize(run: Path) -> dict | None:
    """Test accuracy and training extremes of one run (None if it has no finished evaluation)."""
    res = run / "eval" / "results.json"
    if not res.exists():
        return None
    metrics = next(iter(json.loads(res.read_text())["benchmarks"].values()))["metrics"]
    rows = [r for r in read_metrics(run) if "rollout/truncated_frac" in r]
    alarms = [r["step"] for r in rows if r.get("alarm/truncation")]
    return {"acc": metrics["acc"], "test_trunc": metrics["truncated_frac"],
            "trunc": max(r["rollout/truncated_frac"] for r in rows), "len": max(r["rollout/len_mean"] for r in rows),
            "rep": max(r.get("rollout/repetition_frac", 0.0) for r in rows), "alarm": alarms[0] if alarms else None}


def _mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def dynamics(run: Path) -> dict:
    """Run means of one run's training log (see the module docstring)."""
    rows = read_metrics(run)
    train = [r for r in rows if "rollout/truncated_frac" in r]
    mean = lambda xs: statistics.mean(xs) if xs else float("nan")  # noqa: E731
    gaps = [r["opd/adv_repeat_tokens"] - r["opd/adv_other_tokens"] for r in train  # NaN: a step without repeated tokens
            if not math.isnan(r.get("opd/adv_repeat_tokens", math.nan)) and not math.isnan(r.get("opd/adv_other_tokens", math.nan))]
    late = [r["rollout/truncated_frac"] for r in train if r["step"] > 30]
    out = {"trunc": mean([r["rollout/truncated_frac"] for r in train]), "late_trunc": mean(late), "late_trunc_max": max(late, default=float("nan")),
           "len_last20": mean([r["rollout/len_mean"] for r in train[-20:]]),
           "gap": mean(gaps), "ref_kl": mean([r["ref/kl"] for r in train if "ref/kl" in r]),
           "coef_mix": mean([r["coef/mix"] for r in train if "coef/mix" in r]),
           "coef_ref_last": train[-1].get("coef/ref_kl", float("nan")) if train else float("nan")}
    for r in rows:
        if "eval/val/acc" in r:
            out[f"val@{r['step']}"] = r["eval/val/acc"]
    return out


TAKEOFF = 0.25  # --peaks: the trailing 3-step mean truncated fraction at which truncation has "taken off"


def peaks(run: Path) -> dict:
    """Val accuracy at the first / peak / last eval (with the peak's step; the first of equal maxima) and the truncation
    take-off step (see the module docstring; None: never) of one run."""
    rows = read_metrics(run)
    val = [(r["step"], r["eval/val/acc"]) for r in rows if "eval/val/acc" in r]
    trunc = [(r["step"], r["rollout/truncated_frac"]) for r in rows if "rollout/truncated_frac" in r]
    takeoff = next((s for i, (s, _) in enumerate(trunc) if statistics.mean(t for _, t in trunc[max(0, i - 2) : i + 1]) >= TAKEOFF), None)
    best = max(val, key=lambda sv: (sv[1], -sv[0])) if val else (None, float("nan"))
    return {"first": val[0][1] if val else float("nan"), "peak": best[1], "peak_step": best[0], "last": val[-1][1] if val else float("nan"),
            "last_step": val[-1][0] if val else None, "takeoff": takeoff, "max_trunc": max((t for _, t in trunc), default=float("nan"))}


def main(argv: list[str]) -> None:
    show_dynamics, show_peaks = "--dynamics" in argv, "--peaks" in argv
    argv = [a for a in argv if a not in ("--dynamics", "--peaks")]
    seeds = None
    if "--seeds" in argv:
        i = argv.index("--seeds")
        seeds, argv = set(argv[i + 1].split(",")), argv[:i] + argv[i + 2 :]
    out, configs = Path(argv[0]), argv[1:] or list(LABELS)
    folders = lambda cfg: [d for d in sorted(out.glob(f"{cfg}_s*")) if d.is_dir() and (seeds is None or d.name.rsplit("_s", 1)[1] in seeds)]  # noqa: E731
    print("| config | seeds | test acc (mean ± sd) | per seed | test truncated (worst seed) | max truncated (train) | max mean length | "
          "max repetition | first alarm step |\n|---|---|---|---|---|---|---|---|---|")
    for cfg in configs:
        runs = [r for r in (summarize(d) for d in folders(cfg)) if r]
        if not runs:
            continue
        acc = [r["acc"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        alarms = [str(r["alarm"]) if r["alarm"] is not None else "-" for r in runs]
        print(f"| {LABELS.get(cfg, cfg)} | {len(runs)} | {statistics.mean(acc):.3f} ± {sd:.3f} | {', '.join(f'{a:.3f}' for a in acc)} | "
              f"{max(r['test_trunc'] for r in runs):.3f} | {max(r['trunc'] for r in runs):.3f} | {max(r['len'] for r in runs):.1f} | "
              f"{max(r['rep'] for r in runs):.3f} | {', '.join(alarms)} |")
    if show_peaks:
        print(f"\n| run | val acc (first eval) | val peak | peak step | val acc (last eval) | last eval step | truncation take-off step (>= {TAKEOFF}) | "
              "max truncated (train) |\n|---|---|---|---|---|---|---|---|")
        for cfg in configs:
            for d in folders(cfg):
                k = peaks(d)
                print(f"| {d.name} | {k['first']:.3f} | {k['peak']:.3f} | {k['peak_step']} | {k['last']:.3f} | {k['last_step']} | "
                      f"{k['takeoff'] if k['takeoff'] is not None else '-'} | {k['max_trunc']:.3f} |")
    if not show_dynamics:
        return
    runs = {cfg: [dynamics(d) for d in folders(cfg) if (d / "eval" / "results.json").exists()] for cfg in configs}
    evals = sorted({k for rs in runs.values() for r in rs for k in r if k.startswith("val@")}, key=lambda k: int(k[4:]))
    print("\n| config | truncated (train, run mean) | truncated, steps 31+ (mean) | truncated, steps 31+ (worst step) | length (last 20 steps) | advantage gap repeat - other | ref KL | lambda_gold (mean) | "
          "beta_KL (end) | " + " | ".join(evals) + " |\n|---|---|---|---|---|---|---|---|---|" + "---|" * len(evals))
    for cfg, rs in runs.items():
        if rs:
            cols = [_mean_sd([r.get(k, float("nan")) for r in rs]) for k in ("trunc", "late_trunc", "late_trunc_max", "len_last20", "gap", "ref_kl", "coef_mix", "coef_ref_last", *evals)]
            print(f"| {LABELS.get(cfg, cfg)} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    with error_boundary():  # an expected failure: one `error:` line, exit 2 (common/errors.py)
        main(sys.argv[1:])
