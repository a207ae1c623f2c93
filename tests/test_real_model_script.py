"""scripts/real_model.py: only its arguments (the real run is opt-in and takes ~40 minutes; see its docstring)."""

import subprocess
import sys
from pathlib import Path

import pytest

from scripts import real_model

REPO = Path(__file__).resolve().parent.parent


def test_help_runs_without_torch_or_the_model():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "real_model.py"), "--help"], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout
    for flag in ("--quick", "--force", "--dtype", "--methods", "--cap", "--sft_steps", "--steps", "--n_val", "--threads"):
        assert flag in out


def test_defaults_quick_defaults_env_and_flags(monkeypatch):
    for name in real_model.KNOBS:
        monkeypatch.delenv(f"REAL_{name.upper()}", raising=False)
    full, quick = real_model.parse_args([]), real_model.parse_args(["--quick"])
    assert full.steps == real_model.KNOBS["steps"][0] and quick.steps == real_model.KNOBS["steps"][1]
    assert full.methods == ["opd", "stable_opd"] and full.dtype == "float32"
    monkeypatch.setenv("REAL_STEPS", "7")
    assert real_model.parse_args([]).steps == 7 and real_model.parse_args(["--steps", "3"]).steps == 3  # flag > env
    assert real_model.parse_args(["--methods", "opd"]).methods == ["opd"]


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--methods", "grpo"], ["--cap", "-1"], ["--dtype", "float16"],
                                  ["--sft_batch", "1000"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        real_model.parse_args(argv)
    assert e.value.code == 2
