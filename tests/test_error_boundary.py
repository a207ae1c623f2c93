"""common/errors.py: one boundary for every entry point (issue 34 item 1). Expected failures are known by kind (our
BadInput classes, the environment's OSError / UnicodeError / hub and safetensors errors): one `error:` line, exit 2;
a bug keeps its traceback; STABLE_OPD_TRACEBACK=1 shows the traceback of an expected failure too."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import BadInput, error_boundary, explain

ROOT = Path(__file__).resolve().parents[1]


def run_boundary(exc, capsys, monkeypatch, rank="0", traceback=""):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("STABLE_OPD_TRACEBACK", traceback)
    with pytest.raises(BaseException) as e, error_boundary(prog="x.py"):
        raise exc
    return e.value, capsys.readouterr().err


@pytest.mark.parametrize("exc, text", [
    (BadInput("--foo 3: must be 2"), "x.py: error: --foo 3: must be 2"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/train.jsonl"),
     "x.py: error: /data/train.jsonl: Permission denied (check its permissions"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/run"),
     ("/ro/run: Read-only file system (the file system is read-only: choose a writable folder")),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/tmp/afile/run"), "/tmp/afile/run: Not a directory (a file"),
    (OSError(errno.ENOSPC, "No space left on device", "/run/ckpt"), "x.py: error: disk full ("),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8 text"),
])
def test_expected_failures_are_one_line_and_exit_2(exc, text, capsys, monkeypatch):
    value, err = run_boundary(exc, capsys, monkeypatch)
    assert isinstance(value, SystemExit) and value.code == 2, value
    assert len(err.strip().splitlines()) == 1 and text in err, err


def test_a_multi_line_message_is_printed_on_one_line(capsys, monkeypatch):
    _, err = run_boundary(BadInput("teacher and student differ:\n  - vocab\n  - template"), capsys, monkeypatch)
    assert err == "x.py: error: teacher and student differ: - vocab - template\n"


def test_a_bug_keeps_its_traceback(capsys, monkeypatch):
    """A plain ValueError / KeyError is not an expected failure: re-raised unchanged (the traceback, status 1)."""
    for bug in (ValueError("shapes differ"), KeyError("x"), RuntimeError("CUDA error")):
        value, err = run_boundary(bug, capsys, monkeypatch)
        assert value is bug and err == ""
    assert explain(ValueError("x")) is None and explain(json.JSONDecodeError("x", "{", 0)) is None


def test_other_ranks_stay_quiet_and_the_switch_shows_the_traceback(capsys, monkeypatch):
    value, err = run_boundary(BadInput("bad"), capsys, monkeypatch, rank="1")
    assert value.code == 2 and err == ""  # rank 0 prints the line; every rank exits 2
    exc = BadInput("bad")
    value, err = run_boundary(exc, capsys, monkeypatch, traceback="1")
    assert value is exc  # re-raised: Python prints the traceback


def test_system_exit_and_interrupts_pass_through(capsys, monkeypatch):
    for exc in (SystemExit(130), KeyboardInterrupt()):
        value, _ = run_boundary(exc, capsys, monkeypatch)
        assert value is exc


def test_hub_and_safetensors_errors_by_kind():
    hub = type("LocalEntryNotFoundError", (Exception,), {"__module__": "huggingface_hub.errors"})
    assert "network or hub error" in explain(hub("cannot find the requested files in the local cache"))
    torn = type("SafetensorError", (Exception,), {"__module__": "safetensors._safetensors_rust"})
    assert "corrupt or truncated" in explain(torn("incomplete metadata"))


def test_every_entry_point_has_the_boundary():
    """The methods, eval and the scripts a user runs on their own data call main() inside error_boundary."""
    files = ["methods/sft.py", "methods/grpo.py", "methods/opd.py", "methods/stable_opd.py", "eval/evaluate.py",
             "scripts/make_golden.py", "scripts/prepare_openr1.py", "scripts/compare.py", "scripts/summarize_runs.py"]
    for f in files:
        tail = (ROOT / f).read_text().split('if __name__ == "__main__":')[-1]
        assert "error_boundary()" in (ROOT / f).read_text() and ("with error_boundary():" in tail or "cli()" in tail), f


def test_traceback_switch_as_a_script(tmp_path):
    """As a script: exit 2 and one line; with STABLE_OPD_TRACEBACK=1 the traceback of the same failure."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "scripts/compare.py", str(tmp_path / "missing")]
    quiet = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                           check=False)
    loud = subprocess.run(cmd, cwd=ROOT, env={**env, "STABLE_OPD_TRACEBACK": "1"}, capture_output=True, text=True,
                          timeout=120, check=False)
    assert quiet.returncode == 2 and quiet.stderr.startswith(f"compare.py: error: no results.json at {tmp_path}"), quiet
    assert len(quiet.stderr.splitlines()) == 1, quiet.stderr
    assert loud.returncode == 1 and "Traceback (most recent call last)" in loud.stderr and "BadInput" in loud.stderr


def test_the_survey_sorts_outcomes_as_the_issue_counts_them():
    """scripts/bad_inputs_survey.py's verdict: data lost first, then silent (exit 0), clear (one line naming the thing,
    nothing written) or unclear (a traceback, two error lines, a line that does not name it, a file written)."""
    from scripts.bad_inputs_survey import verdict

    line = "opd.py: error: /d/train.jsonl:3: invalid JSON"
    assert verdict(2, "", line, ["/d/train.jsonl", ":3"], [], [])[0] == "clear"
    assert verdict(2, "", line, ["/d/train.jsonl", ":3"], ["run/metrics.jsonl"], [])[0] == "data lost"
    assert verdict(0, "done", "", ["/d/train.jsonl"], [], [])[0] == "silent"
    assert verdict(0, "", "warning: /d/train.jsonl has a key twice", ["/d/train.jsonl"], [], [])[0] == "clear"
    assert verdict(1, "", "Traceback (most recent call last):\n" + line, [], [], [])[1] == "a traceback"
    assert verdict(2, "", line + "\n" + line, [], [], [])[1] == "2 error lines"
    assert verdict(2, "", line, ["--train_data"], [], [])[0] == "unclear"
    assert verdict(2, "", line, [], [], ["run/config.yaml"])[0] == "unclear"


def test_an_open_progress_bar_is_closed_before_the_line(capsys, monkeypatch):
    """A failure inside a tqdm loop (e.g. eval's): the bar is closed first, so the error line is a line of its own."""
    from tqdm import tqdm

    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("STABLE_OPD_TRACEBACK", raising=False)
    with pytest.raises(SystemExit), error_boundary(prog="x.py"):
        bar = tqdm(total=4, file=sys.stderr)
        bar.update(1)
        raise BadInput("bad")
    assert capsys.readouterr().err.splitlines()[-1] == "x.py: error: bad"
