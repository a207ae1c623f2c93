"""scripts/plot_runs.py: seed bands, smoothing, final accuracy lookup, and the three figures."""

import json

import numpy as np
import pytest

from scripts import plot_runs


def _run(folder, rows, acc=None):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 9")  # torn last line
    if acc is not None:
        (folder / "eval").mkdir()
        (folder / "eval" / "results.json").write_text(json.dumps({"benchmarks": {"toy": {"metrics": {"acc": acc}}}}))
    return folder


def test_seed_band_keeps_common_steps_and_smooths_trailing():
    a, b = {1: 1.0, 2: 3.0, 3: 5.0}, {2: 1.0, 3: 3.0, 4: 0.0}
    steps, vals = plot_runs.seed_band([a, b, {}])
    assert steps == [2, 3] and vals.tolist() == [[3.0, 5.0], [1.0, 3.0]]
    steps, vals = plot_runs.seed_band([a], smooth=2)
    assert steps == [1, 2, 3] and np.allclose(vals, [[1.0, 2.0, 4.0]])
    assert plot_runs.seed_band([{1: 0.0}, {2: 0.0}]) is None


def test_final_accuracy_prefers_the_test_eval(tmp_path):
    run = _run(tmp_path / "r", [{"step": 1}], acc=0.5)
    assert plot_runs.final_accuracy(run) == 0.5
    other = _run(tmp_path / "s", [{"step": 1}])
    (other / "final_eval.json").write_text(json.dumps({"val": {"acc": 0.25}}))
    assert plot_runs.final_accuracy(other) == 0.25
    assert plot_runs.final_accuracy(_run(tmp_path / "t", [{"step": 1}])) is None


def test_main_writes_three_figures_and_rejects_empty_globs(tmp_path):
    rows = [{"step": s, "rollout/len_mean": 40.0 + s, "rollout/truncated_frac": 0.0, "rollout/repetition_frac": 0.1,
             "rollout/repeat_token_frac": 0.05, "opd/adv_repeat_tokens": -0.5, "opd/adv_other_tokens": -0.2,
             "opd/teacher_eos_logp": -11.0, "opd/student_eos_logp": -12.0} for s in range(1, 8)]
    rows.append({"step": 7, "eval/val/acc": 0.6})
    for seed in (0, 1):
        _run(tmp_path / f"opd_s{seed}", rows, acc=0.6 + seed / 10)
    out = tmp_path / "fig" / "toy"
    plot_runs.main(["--run", f"OPD={tmp_path}/opd_s*", "--out", str(out), "--baseline", "SFT=0.4"])
    for suffix in ("dynamics", "evidence", "final"):
        assert (tmp_path / "fig" / f"toy_{suffix}.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="no run folder"):
        plot_runs.main(["--run", f"X={tmp_path}/nothing*", "--out", str(out)])
    with pytest.raises(SystemExit, match="LABEL=GLOB"):
        plot_runs.main(["--run", "nolabel", "--out", str(out)])


def test_summarize_runs_table_seed_filter_and_dynamics(tmp_path, capsys):
    """scripts/summarize_runs.py: mean ± sd of the test accuracy over the selected seeds, the training extremes, the
    first alarm step, and the run-mean dynamics (truncation, the repeat-vs-other advantage gap, val accuracy per eval)."""
    from scripts import summarize_runs

    for seed, trunc in ((0, 0.2), (1, 0.4), (3, 0.9)):
        rows = [{"step": s, "rollout/truncated_frac": trunc * s / 4, "rollout/len_mean": 50.0 * s, "rollout/repetition_frac": 0.1,
                 "opd/adv_repeat_tokens": -0.5, "opd/adv_other_tokens": -1.5, "alarm/truncation": s == 3} for s in range(1, 5)]
        rows.append({"step": 4, "eval/val/acc": 0.3 + seed / 10})
        res = _run(tmp_path / f"opd_s{seed}", rows, acc=0.5 + seed / 10)
        (res / "eval" / "results.json").write_text(json.dumps({"benchmarks": {"toy": {"metrics": {"acc": 0.5 + seed / 10, "truncated_frac": 0.1}}}}))
    summarize_runs.main([str(tmp_path), "opd", "--seeds", "0,1", "--dynamics"])
    out = capsys.readouterr().out.splitlines()
    row = next(line for line in out if line.startswith("| OPD | 2 |"))
    assert "0.550 ± 0.071" in row and "0.500, 0.600" in row and "| 0.400 |" in row and "| 3, 3 |" in row
    dyn = next(line for line in out if line.startswith("| OPD |") and "±" in line and "| 2 |" not in line)
    assert "0.188 ± 0.088" in dyn and "1.000 ± 0.000" in dyn and "0.350 ± 0.071" in dyn  # truncation, gap, val@4


def test_summarize_runs_dynamics_truncation_after_step_30(tmp_path):
    """dynamics(): the truncated fraction after step 30 (mean and worst step) leaves out the early steps."""
    from scripts import summarize_runs

    rows = [{"step": s, "rollout/truncated_frac": 1.0 if s <= 30 else (0.5 if s == 35 else 0.1), "rollout/len_mean": 50.0,
             "rollout/repetition_frac": 0.0} for s in range(1, 41)]
    d = summarize_runs.dynamics(_run(tmp_path / "opd_s0", rows))
    assert abs(d["late_trunc"] - 0.14) < 1e-12 and d["late_trunc_max"] == 0.5 and abs(d["trunc"] - 31.4 / 40) < 1e-12


def test_summarize_runs_peaks_takeoff(tmp_path, capsys):
    """peaks(): val accuracy first / peak (its step, the first of equal maxima) / last, and the first step whose trailing
    3-step mean truncated fraction reaches 0.25 (brute force over the steps); --peaks prints one row per run."""
    from scripts import summarize_runs

    trunc = [0.0, 0.1, 0.0, 0.2, 0.3, 0.4, 0.9, 1.0]
    rows = [{"step": s, "rollout/truncated_frac": t, "rollout/len_mean": 50.0} for s, t in enumerate(trunc, 1)]
    rows += [{"step": s, "eval/val/acc": a} for s, a in ((0, 0.3), (2, 0.5), (4, 0.5), (8, 0.1))]
    run = _run(tmp_path / "opd_s0", rows)
    k = summarize_runs.peaks(run)
    want = next(s for s in range(1, 9) if sum(trunc[max(0, s - 3) : s]) / len(trunc[max(0, s - 3) : s]) >= 0.25)
    assert want == 6 and k["takeoff"] == want
    assert (k["first"], k["peak"], k["peak_step"], k["last"], k["last_step"], k["max_trunc"]) == (0.3, 0.5, 2, 0.1, 8, 1.0)
    flat = summarize_runs.peaks(_run(tmp_path / "ref_s1", [{"step": 1, "rollout/truncated_frac": 0.2}]))
    assert flat["takeoff"] is None and flat["peak_step"] is None
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "results.json").write_text(json.dumps({"benchmarks": {"toy": {"metrics": {"acc": 0.2, "truncated_frac": 0.0}}}}))
    summarize_runs.main([str(tmp_path), "opd", "--peaks"])
    assert "| opd_s0 | 0.300 | 0.500 | 2 | 0.100 | 8 | 6 | 1.000 |" in capsys.readouterr().out
