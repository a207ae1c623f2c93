"""Figures of training runs, read from their `metrics.jsonl` (and `eval/results.json` for final accuracy).

One `--run LABEL=GLOB` per curve; the glob's matches are seeds of one configuration (mean line, min-max
shading; training curves smoothed by a trailing mean, `--smooth`). Three PNGs are written next to
`--out PREFIX`:

  PREFIX_dynamics.png   rollout length, truncated fraction, repetition fraction, greedy val accuracy over
                        steps (the paper's training-dynamics figure)
  PREFIX_evidence.png   token-level evidence: mean advantage on tokens inside repeated spans vs the rest,
                        the share of repeated tokens, and the teacher's vs the student's EOS log-prob
                        (the paper's Figure 4 analogue; OPD-family runs only)
  PREFIX_final.png      final greedy test accuracy per configuration (bars: mean, dots: seeds)

    python scripts/plot_runs.py --out docs/figures/toy --run "OPD=runs/demo/full/opd" \
        --run "Stable-OPD=runs/demo/full/stable_opd" --run "GRPO=runs/demo/full/grpo"
"""

import argparse
import glob
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DYNAMICS = [("rollout/len_mean", "rollout length (tokens)"), ("rollout/truncated_frac", "truncated fraction"),
            ("rollout/repetition_frac", "repetition fraction"), ("eval/val/acc", "greedy val accuracy")]
EVIDENCE = [(("opd/adv_repeat_tokens", "opd/adv_other_tokens"), "mean advantage: repeated (solid) vs other (dashed)"),
            (("rollout/repeat_token_frac",), "share of tokens in repeated spans"),
            (("opd/teacher_eos_logp", "opd/student_eos_logp"), "EOS log-prob: teacher (solid) vs student (dashed)")]


def read_metrics(run: Path) -> list[dict]:
    """Rows of a run's metrics.jsonl (a half-written last line is skipped)."""
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def series(rows: list[dict], key: str) -> dict[int, float]:
    """step -> value of `key` (the last row wins when a resumed run logged a step twice)."""
    return {r["step"]: r[key] for r in rows if key in r and r[key] is not None and np.isfinite(r[key])}


def seed_band(curves: list[dict[int, float]], smooth: int = 1) -> tuple[list[int], np.ndarray] | None:
    """Steps common to every seed and the [seeds, steps] values there, each seed smoothed by a trailing
    mean over `smooth` points (None if nothing in common)."""
    curves = [c for c in curves if c]
    if not curves:
        return None
    steps = sorted(set.intersection(*[set(c) for c in curves]))
    if not steps:
        return None
    vals = np.array([[c[s] for s in steps] for c in curves])
    if smooth > 1:
        csum = np.cumsum(np.pad(vals, ((0, 0), (1, 0))), axis=1)
        lo = np.maximum(np.arange(1, len(steps) + 1) - smooth, 0)
        vals = (csum[:, 1:] - csum[:, lo]) / (np.arange(1, len(steps) + 1) - lo)
    return steps, vals


def final_accuracy(run: Path) -> float | None:
    """Greedy test accuracy from eval/results.json (eval/evaluate.py), else the run's final val accuracy."""
    res = run / "eval" / "results.json"
    if res.exists():
        return next(iter(json.loads(res.read_text())["benchmarks"].values()))["metrics"]["acc"]
    final = run / "final_eval.json"
    if final.exists():
        data = json.loads(final.read_text())
        return (data.get("test") or data.get("val") or {}).get("acc")
    return None


def parse_runs(specs: list[str]) -> dict[str, list[Path]]:
    """LABEL=GLOB -> run folders that have a metrics.jsonl; an empty match is an error."""
    runs = {}
    for spec in specs:
        if "=" not in spec:
            raise SystemExit(f"--run expects LABEL=GLOB, got {spec!r}")
        label, pattern = spec.split("=", 1)
        found = [Path(p) for p in sorted(glob.glob(pattern)) if (Path(p) / "metrics.jsonl").exists()]
        if not found:
            raise SystemExit(f"--run {spec!r}: no run folder with a metrics.jsonl matches {pattern!r}")
        runs[label] = found
    return runs


def plot_dynamics(runs: dict[str, list[Path]], dest: Path, smooth: int) -> None:
    fig, axes = plt.subplots(1, len(DYNAMICS), figsize=(4.2 * len(DYNAMICS), 3.4))
    for i, (label, paths) in enumerate(runs.items()):
        rows = [read_metrics(p) for p in paths]
        for ax, (key, _) in zip(axes, DYNAMICS):
            band = seed_band([series(r, key) for r in rows], 1 if key.startswith("eval/") else smooth)
            if band:
                steps, vals = band
                ax.plot(steps, vals.mean(0), color=f"C{i}", marker="o" if key.startswith("eval/") else None,
                        ms=3, label=f"{label} (n={len(vals)})")
                ax.fill_between(steps, vals.min(0), vals.max(0), color=f"C{i}", alpha=0.15)
    for ax, (_, title) in zip(axes, DYNAMICS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    _save(fig, dest)


def plot_evidence(runs: dict[str, list[Path]], dest: Path, smooth: int) -> bool:
    fig, axes = plt.subplots(1, len(EVIDENCE), figsize=(4.6 * len(EVIDENCE), 3.4))
    drawn = False
    for i, (label, paths) in enumerate(runs.items()):
        rows = [read_metrics(p) for p in paths]
        for ax, (keys, _) in zip(axes, EVIDENCE):
            for key, style in zip(keys, ("-", "--")):
                band = seed_band([series(r, key) for r in rows], smooth)
                if band:
                    steps, vals = band
                    ax.plot(steps, vals.mean(0), style, color=f"C{i}", label=label if style == "-" else None)
                    drawn = True
    for ax, (_, title) in zip(axes, EVIDENCE):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[0].legend(fontsize=7)
    if drawn:
        _save(fig, dest)
    plt.close(fig)
    return drawn


def plot_final(runs: dict[str, list[Path]], dest: Path, baselines: dict[str, float]) -> bool:
    labels, accs = [], []
    for label, paths in runs.items():
        a = [x for x in (final_accuracy(p) for p in paths) if x is not None]
        if a:
            labels.append(label)
            accs.append(a)
    if not accs:
        return False
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 3.4))
    x = np.arange(len(labels))
    ax.bar(x, [np.mean(a) for a in accs], color=[f"C{i}" for i in range(len(labels))], alpha=0.7)
    for xi, a in zip(x, accs):
        ax.scatter([xi] * len(a), a, color="black", s=10, zorder=3)
        ax.text(xi, np.mean(a) + 0.01, f"{np.mean(a):.3f}", ha="center", fontsize=8)
    for j, (name, value) in enumerate(baselines.items()):
        ax.axhline(value, color=f"C{len(labels) + j}", ls="--", lw=1, label=f"{name} {value:.3f}")
    if baselines:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("greedy test accuracy")
    ax.set_title("final accuracy (dots: seeds)", fontsize=10)
    _save(fig, dest)
    return True


def _save(fig, dest: Path) -> None:
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    print(f"wrote {dest}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=GLOB", help="a configuration (glob = its seeds)")
    parser.add_argument("--out", required=True, help="prefix of the PNGs, e.g. docs/figures/toy")
    parser.add_argument("--baseline", action="append", default=[], metavar="NAME=ACC",
                        help="a horizontal line on the final-accuracy chart (e.g. the SFT student)")
    parser.add_argument("--smooth", type=int, default=5, help="trailing mean over N logged steps for training curves (1 = raw)")
    args = parser.parse_args(argv)
    runs = parse_runs(args.run)
    baselines = {b.split("=", 1)[0]: float(b.split("=", 1)[1]) for b in args.baseline}
    plot_dynamics(runs, Path(f"{args.out}_dynamics.png"), args.smooth)
    plot_evidence(runs, Path(f"{args.out}_evidence.png"), args.smooth)
    plot_final(runs, Path(f"{args.out}_final.png"), baselines)


if __name__ == "__main__":
    main()
