"""scripts/paper/*.sh: valid bash, "$@" last on every launch, and every flag a real field of the target's Args.

Each script runs for real with `accelerate` and `python` stubbed on PATH: the stubs record the argv of every
launch (shell variables expanded, arrays flattened) instead of running it; `python -` (inline summaries) still
runs. The recorded flags are then parsed by common.cli.parse against the target's own Args dataclass, so a
misspelt flag or a bad value fails here, not hours into a GPU job. The RL recipes must also sample with vLLM
and use the paper's repetition metric.
"""

import dataclasses
import importlib
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import parse

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "scripts" / "paper"
SCRIPTS = sorted(PAPER.glob("*.sh"))
EXTRA = ["--seed", "4242"]  # passed to every script: must arrive last, overriding the recipe's own --seed
RL_TARGETS = {"methods/grpo.py", "methods/opd.py", "methods/stable_opd.py"}
LAUNCH_LINE = re.compile(r"^\s*(accelerate launch|python (?!-)\S+\.py)")


def _stub(path: Path, body: str) -> None:
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_recipe(script: Path, tmp_path: Path, *args: str, env: dict | None = None) -> list[list[str]]:
    """Run `script` with stubbed launchers; return the argv of every launch it made, in order."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir(exist_ok=True)
    record = f'"{sys.executable}" -c \'import json, os, sys; open(os.environ["STUB_LOG"], "a").write(json.dumps(sys.argv[1:]) + "\\n")\''
    _stub(bin_dir / "accelerate", f'#!/usr/bin/env bash\n{record} accelerate "$@"\n')
    _stub(bin_dir / "python", f'#!/usr/bin/env bash\nif [[ "${{1:-}}" == *.py ]]; then {record} python "$@"; '
                              f'else exec "{sys.executable}" "$@"; fi\n')
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
                "RUN_ROOT": str(tmp_path / "runs"), "DATA": str(tmp_path / "data"), **(env or {})}
    proc = subprocess.run(["bash", str(script), *args], env=full_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def split_call(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """(target .py path, launcher args before it, flags after it) of one recorded call."""
    i = next(k for k, a in enumerate(argv) if a.endswith(".py"))
    return argv[i], argv[:i], argv[i + 1:]


def args_class(target: str):
    """The Args dataclass of a repo script (methods/x.py, eval/evaluate.py, scripts/prepare_openr1.py)."""
    if not (ROOT / target).is_file():
        pytest.fail(f"recipe launches {target}, which does not exist")
    return importlib.import_module(target.removesuffix(".py").replace("/", ".")).Args


def check_call(argv: list[str], want_extra_last: bool):
    target, launcher, flags = split_call(argv)
    if launcher[:2] == ["accelerate", "launch"]:
        config = launcher[launcher.index("--config_file") + 1]
        assert (ROOT / config).is_file(), f"no accelerate config {config}"
    cls = args_class(target)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted({f[2:].split("=", 1)[0] for f in flags if f.startswith("--")} - names)
    assert not unknown, f"{target}: unknown flag(s) {unknown}"
    if want_extra_last:
        assert flags[-len(EXTRA):] == EXTRA, f'{target}: "$@" is not last: {flags[-4:]}'
    try:
        parsed = parse(cls, flags)
    except SystemExit as e:
        pytest.fail(f"{target}: its flags do not parse ({e}): {flags}")
    return target, parsed


def test_the_recipe_set_is_complete():
    names = {s.name for s in SCRIPTS}
    for need in ("prepare_data.sh", "sft_1.5b.sh", "grpo_1.5b.sh", "opd_1.5b.sh", "stable_opd_1.5b.sh",
                 "stable_opd_ablation.sh", "eval_six.sh", "sweep_stable_opd.sh"):
        assert need in names
    readme = (PAPER / "README.md").read_text()
    assert all(s.name in readme for s in SCRIPTS), "scripts/paper/README.md must list every script"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_static_shape(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    header = text.split("set -euo pipefail")[0]
    for word in ("Hardware:", "Accelerate config:", "Expected time:", "(estimate, not measured)"):
        assert word in header, f"{script.name}: header lacks {word!r}"
    launches = [line for line in text.splitlines() if LAUNCH_LINE.match(line)]
    for line in launches:
        assert line.rstrip().endswith('"$@"'), f'{script.name}: launch does not end with "$@": {line.strip()}'


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name not in ("sweep_stable_opd.sh", "stable_opd_ablation.sh")],
                         ids=lambda s: s.name)
def test_flags_exist_and_parse(script, tmp_path):
    calls = run_recipe(script, tmp_path, *EXTRA)
    assert len(calls) == 1, calls
    target, parsed = check_call(calls[0], want_extra_last=True)
    assert parsed.seed == 4242
    if target in RL_TARGETS:  # paper scale: vLLM rollouts (hf generate at 8K tokens is far too slow), the paper's metric
        assert parsed.rollout_backend == "vllm" and 0 < parsed.vllm_gpu_memory_utilization < 1
        assert (parsed.rep_window_chars, parsed.rep_threshold) == (10000, 10.0)


@pytest.mark.parametrize("variant,mix,kl", [("opd", 0.0, 0.0), ("kl", 0.0, 0.01), ("mix", 0.1, 0.0), ("kl_mix", 0.1, 0.01)])
def test_ablation_variants(variant, mix, kl, tmp_path):
    (call,) = run_recipe(PAPER / "stable_opd_ablation.sh", tmp_path, variant, *EXTRA)
    target, a = check_call(call, want_extra_last=True)
    assert target == "methods/stable_opd.py" and (a.mix_coef, a.ref_kl_coef) == (mix, kl)
    assert a.teacher_name_or_path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" and a.run_dir.endswith(f"/{variant}")


def test_sweep_launches_the_grid_then_evaluates(tmp_path):
    calls = run_recipe(PAPER / "sweep_stable_opd.sh", tmp_path, *EXTRA, env={"BETAS": "0 0.01", "LAMBDAS": "0.1 0.3"})
    trains = [check_call(c, want_extra_last=True)[1] for c in calls if split_call(c)[0] == "methods/stable_opd.py"]
    evals = [check_call(c, want_extra_last=False)[1] for c in calls if split_call(c)[0] == "eval/evaluate.py"]
    assert sorted((a.ref_kl_coef, a.mix_coef) for a in trains) == [(0.0, 0.1), (0.0, 0.3), (0.01, 0.1), (0.01, 0.3)]
    assert len({a.run_dir for a in trains}) == 4 and len(evals) == 4
    assert {e.model_name_or_path for e in evals} == {f"{a.run_dir}/final" for a in trains}
    assert all(e.preset == "paper" for e in evals)
