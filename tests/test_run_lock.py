"""A run folder belongs to one live process (issue 34, item 2): the main process holds an exclusive flock on
run_dir/.run.lock from resume_run to the end of the run; a second start on the folder (at once, or mid-run) exits
with status 2 and one `error:` line naming the holder's PID, having written nothing; the OS releases the lock on
any exit, so a lock file left by kill -9 never blocks. Real subprocess runs of opd on a tiny model."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.run import LOCK_FILE
from tests.method_runs import ENV, ROOT, run_method
from tests.test_bad_inputs import argv_of, run_main
from tests.test_run_dir import opd_flags, train_rows, world  # noqa: F401 -- `world` is the shared fixture

HOLD = ("import sys, time; from pathlib import Path; from common.runlock import _acquire; "
        "fd = _acquire(Path(sys.argv[1])); assert isinstance(fd, int), fd; print('held', flush=True); time.sleep(600)")


def opd_cmd(w, run_dir, **over):
    return [sys.executable, "methods/opd.py", *argv_of(opd_flags(w, run_dir, **over))]


def start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if "error" in x.lower() or "Traceback" in x]


def wait_for(predicate, what, timeout=120):
    t0 = time.time()
    while not predicate():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def holder(request):
    """A helper process that takes a folder's lock the way a run does and keeps it."""
    procs = []

    def hold(run_dir):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_two_runs_started_at_once(world, tmp_path):
    """The same command twice at once on a fresh folder: one runs (every step logged once, the same numbers as a run
    alone), the other exits 2 with one line naming the first one's PID. On a loaded machine (CI runs two test files
    at once on 2 cores) the second may only reach the folder after the first has finished: then it must say the run
    is finished and change nothing, and the race is tried again on a fresh folder (at most 3 tries)."""
    solo = tmp_path / "solo"
    flags = {"max_steps": 30, "save_every": 1, "keep_last": 0}
    run_method(opd_cmd(world, solo, **flags))
    for attempt in range(3):
        run_dir = tmp_path / f"run{attempt}"
        procs = [start(opd_cmd(world, run_dir, **flags)) for _ in range(2)]
        outs = [(p.wait(timeout=240), *p.communicate()) for p in procs]
        codes = sorted(code for code, _, _ in outs)
        assert codes in ([0, 2], [0, 0]), [(c, e[-2000:]) for c, _, e in outs]
        assert [r["step"] for r in train_rows(run_dir)] == list(range(1, 31))
        assert [r["train/loss"] for r in train_rows(run_dir)] == [r["train/loss"] for r in train_rows(solo)]
        assert not (run_dir / LOCK_FILE).exists()  # given back at the end of the run
        if codes == [0, 2]:
            break
        late = [out for _, out, _ in outs if "holds a run that finished at step 30" in out]
        assert len(late) == 1, [o[-2000:] for _, o, _ in outs]  # no race: the second came after the first ended
    else:
        pytest.fail("in 3 tries the second start never reached the folder while the first run held it")
    winner, loser = (0, 1) if outs[0][0] == 0 else (1, 0)
    lines = error_lines(outs[loser][2])
    assert len(lines) == 1, outs[loser][2][-2000:]
    assert f"is in use by PID {procs[winner].pid} (opd.py, running since" in lines[0], lines


def test_a_second_run_started_mid_run(world, tmp_path):
    """While a run trains, the same command again is refused at start-up, before it loads anything; the first run
    goes on undisturbed (every step once, the numbers of a run alone) and gives the folder back when it ends."""
    solo, run_dir = tmp_path / "solo", tmp_path / "run"
    flags = {"max_steps": 120, "save_every": 1, "keep_last": 2}
    first = start(opd_cmd(world, run_dir, **flags))
    log = run_dir / "metrics.jsonl"
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 2, "the first run's second step")
    lock = json.loads((run_dir / LOCK_FILE).read_text())
    assert lock["pid"] == first.pid and lock["command"].startswith("opd.py --run_dir")
    t0 = time.time()
    second = run_method(opd_cmd(world, run_dir, **flags), check=False)
    assert first.poll() is None, "the first run ended before the second start was refused: make it longer"
    assert second.returncode == 2, second.stderr[-2000:]
    assert error_lines(second.stderr) == [
        f"opd.py: error: --run_dir {run_dir} is in use by PID {first.pid} (opd.py, running since {lock['since']}); "
        "one run folder belongs to one live process: wait for that run to end, stop it, or choose another --run_dir "
        f"(the lock is {run_dir / LOCK_FILE}; the OS releases it when that process exits, even after kill -9)"
    ], second.stderr[-2000:]
    assert "teacher compatible" not in second.stdout and time.time() - t0 < 60  # refused before the models loaded
    assert first.wait(timeout=240) == 0, first.communicate()[1][-2000:]
    run_method(opd_cmd(world, solo, **flags))
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, 121))
    assert [r["train/loss"] for r in train_rows(run_dir)] == [r["train/loss"] for r in train_rows(solo)]
    assert not (run_dir / LOCK_FILE).exists()


def test_a_lock_left_by_kill_9_does_not_block(world, tmp_path):
    """kill -9 mid-run leaves the lock file (with the dead PID) but not the lock: the same command resumes."""
    run_dir = tmp_path / "run"
    flags = {"max_steps": 120, "save_every": 1, "keep_last": 2}
    first = start(opd_cmd(world, run_dir, **flags))
    wait_for(lambda: len(list((run_dir / "checkpoints").glob("step_*"))) >= 2, "two checkpoints")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == first.pid  # stale: its holder is gone
    proc = run_method(opd_cmd(world, run_dir, **flags))
    assert "resumed from" in proc.stdout
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, 121))
    assert not (run_dir / LOCK_FILE).exists()


def test_two_ranks_refused_together(world, tmp_path, holder):
    """Under accelerate launch (2 DDP ranks), a held folder stops both ranks with status 2 and one line from rank 0."""
    run_dir = tmp_path / "run"
    run_method(opd_cmd(world, run_dir, max_steps=1))
    before = hashes(run_dir)
    h = holder(run_dir)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
              "methods/opd.py"]
    proc = subprocess.run([*launch, *argv_of(opd_flags(world, run_dir, max_steps=2))], cwd=ROOT, capture_output=True,
                          text=True, env={**ENV, "ACCELERATE_USE_CPU": "true"}, timeout=240)
    assert proc.returncode != 0
    refusals = [x for x in proc.stderr.splitlines() if x.startswith("opd.py: error:")]
    assert len(refusals) == 1 and f"is in use by PID {h.pid}" in refusals[0], proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]  # torchrun's summary: the first rank to end exited 2
    assert {k: v for k, v in hashes(run_dir).items() if k != LOCK_FILE} == before


def test_refused_in_process_changes_nothing(world, tmp_path, holder, capsys):
    """A held finished run: the start is refused with the holder's PID, every file byte-for-byte the same."""
    run_dir = tmp_path / "run"
    run_main("opd", opd_flags(world, run_dir, max_steps=1))
    before = hashes(run_dir)
    h = holder(run_dir)
    before[LOCK_FILE] = hashlib.sha256((run_dir / LOCK_FILE).read_bytes()).hexdigest()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main("opd", opd_flags(world, run_dir, max_steps=2))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and f"is in use by PID {h.pid}" in err, err
    assert hashes(run_dir) == before


def test_taken_while_loading_is_refused_before_any_write(world, tmp_path, holder, monkeypatch, capsys):
    """Two starts on a fresh folder both pass start-up; the one that reaches resume_run second (the folder taken while
    its models loaded) is refused there, before it writes anything."""
    import common.run

    run_dir = tmp_path / "run"
    real = common.run.check_run_lock
    monkeypatch.setattr(common.run, "check_run_lock", lambda d: None)  # both got past start-up ...
    opd = __import__("methods.opd", fromlist=["main"])
    real_load = opd.load_model
    held = []

    def load_while_another_takes_the_folder(*a, **kw):
        if not held:
            held.append(holder(run_dir))  # ... and the other one took the folder meanwhile
        return real_load(*a, **kw)

    monkeypatch.setattr(opd, "load_model", load_while_another_takes_the_folder)
    with pytest.raises(SystemExit) as e:
        run_main("opd", opd_flags(world, run_dir, max_steps=1))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"is in use by PID {held[0].pid}" in err, err
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # the holder's lock file, nothing else
    monkeypatch.setattr(common.run, "check_run_lock", real)


def test_stale_or_garbled_lock_file_is_taken_over(world, tmp_path):
    """A lock file nobody holds (a crash, even one mid-write of the file) is taken over and removed at the end."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text('{"pid": 99999')
    run_main("opd", opd_flags(world, run_dir, max_steps=1))
    assert [r["step"] for r in train_rows(run_dir)] == [1] and not (run_dir / LOCK_FILE).exists()
