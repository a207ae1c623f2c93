"""A run folder belongs to one run (issue 17, parts 2 and 3): what resuming may change, the explicit overrides,
nothing written before validation passes, one metrics row per step after any resume, stop signals at any point
end in a checkpoint and exit 130, and the collapse alarm's start-of-run note. The refusals themselves (another
method, other settings, --resume_from none, no config.yaml) are cases of tests/test_bad_inputs.py."""

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from common.cli import parse
from common.metrics import collapse_alarm
from common.models import load_model
from common.toy import build_toy_world, load_toy_tokenizer, toy_config_path
from common.tracking import read_jsonl, rewind_logs
from tests.test_bad_inputs import module, run_main, snapshot


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    tok = load_toy_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        load_model(str(toy_config_path("student")), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = build_toy_world(root / "toy", n_train=64, n_val=8, n_test=8, max_steps=2)
    return {"root": root, "student": root / "student", "teacher": root / "teacher", **data}


def opd_flags(w, run_dir, **over):
    flags = {"run_dir": run_dir, "model_name_or_path": w["student"], "teacher_name_or_path": w["teacher"], "train_data": w["train"],
             "val_data": "", "per_device_prompts": 2, "num_generations": 2, "max_completion_length": 8, "max_steps": 2,
             "eval_every": 0, "save_every": 0, "learning_rate": 1e-3}
    return {**flags, **over}


def sft_flags(w, run_dir, **over):
    flags = {"run_dir": run_dir, "model_name_or_path": toy_config_path("student"), "train_data": w["train"], "val_data": "",
             "max_steps": 2, "per_device_batch_size": 4, "max_completion_length": 48, "eval_every": 0, "save_every": 0,
             "learning_rate": 1e-3, "warmup_steps": 0, "log_every": 1, "lr_scheduler_type": "constant"}
    return {**flags, **over}


def train_rows(run_dir):
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "train/loss" in r]


def test_config_records_the_method_and_loads_back(world, tmp_path):
    run_main("opd", opd_flags(world, tmp_path / "run", max_steps=1))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert next(iter(saved)) == "method" and saved["method"] == "opd"
    args = parse(module("opd").Args, ["--config", str(tmp_path / "run" / "config.yaml")])
    assert args.learning_rate == 1e-3 and args.max_steps == 1


def test_raising_max_steps_resumes_and_every_step_is_logged_once(world, tmp_path):
    """Uninterrupted 4 steps == 2 steps, then resumed to 4 from an OLDER checkpoint (the newest one lost): the steps
    re-run after resuming are logged once, with the uninterrupted run's values."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_main("opd", opd_flags(world, a, max_steps=4))
    run_main("opd", opd_flags(world, b, max_steps=3, save_every=1, keep_last=0))
    # a crash after step 3 was logged but before it was saved: lose checkpoint 3 and the end of the run
    import shutil

    shutil.rmtree(b / "checkpoints" / "step_00000003")
    shutil.rmtree(b / "final")
    assert [r["step"] for r in train_rows(b)] == [1, 2, 3]
    run_main("opd", opd_flags(world, b, max_steps=4, save_every=1, keep_last=0))  # max_steps may change on resume
    rows = train_rows(b)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in train_rows(a)]
    assert yaml.safe_load((b / "config.yaml").read_text())["max_steps"] == 4


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(world, tmp_path):
    """An explicit older --resume_from of the same run: the newer checkpoints are moved aside (kept, never resumed or
    pruned), the logs cut back to that checkpoint, and the run continues from it."""
    run_dir = tmp_path / "run"
    run_main("opd", opd_flags(world, run_dir, max_steps=3, save_every=1, keep_last=0))
    older = run_dir / "checkpoints" / "step_00000001"
    run_main("opd", opd_flags(world, run_dir, max_steps=3, save_every=1, keep_last=2, resume_from=older))
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert sorted(p.name for p in (ckpts / "abandoned_after_step_00000001").iterdir()) == ["step_00000002", "step_00000003"]
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3]
    # issue 34: nothing the finished run wrote was deleted: its final/, final_eval.json and full logs are kept aside
    kept = run_dir / "superseded_at_step_00000001"
    assert sorted(p.name for p in kept.iterdir()) == ["final", "final_eval.json", "metrics.jsonl"]
    assert [r["step"] for r in read_jsonl(kept / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3]
    assert json.loads((kept / "final_eval.json").read_text())["step"] == 3
    assert (kept / "final" / "model.safetensors").is_file()


def test_a_failed_start_changes_nothing(world, tmp_path):
    """Same settings, but the data went missing: the resume fails while loading, before anything is written."""
    data = tmp_path / "train.jsonl"
    data.write_text(Path(world["train"]).read_text())
    run_dir = tmp_path / "run"
    run_main("opd", opd_flags(world, run_dir, max_steps=1, train_data=data))
    data.unlink()
    before = snapshot(run_dir)
    with pytest.raises(Exception, match="dataset file not found"):
        run_main("opd", opd_flags(world, run_dir, max_steps=2, train_data=data))
    assert snapshot(run_dir) == before


def test_force_resume_keeps_the_old_config(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_main("opd", opd_flags(world, run_dir, max_steps=1))
    run_main("opd", opd_flags(world, run_dir, max_steps=2, learning_rate=5e-4, force_resume="true"))
    assert "--force_resume: continuing with changed settings (learning_rate)" in capsys.readouterr().out
    assert yaml.safe_load((run_dir / "config.before_step_1.yaml").read_text())["learning_rate"] == 1e-3
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["learning_rate"] == 5e-4
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2]


def test_force_resume_never_crosses_methods(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_main("opd", opd_flags(world, run_dir, max_steps=1))
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as e:
        run_main("sft", sft_flags(world, run_dir, force_resume="true"))
    assert e.value.code == 2 and "holds a finished opd run" in capsys.readouterr().err
    assert snapshot(run_dir) == before


def test_overwrite_run_dir_replaces_another_methods_run(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_main("opd", opd_flags(world, run_dir, max_steps=1))
    (run_dir / "notes.txt").write_text("mine")  # not a run file: left alone
    run_main("sft", sft_flags(world, run_dir, overwrite_run_dir="true"))
    assert "--overwrite_run_dir: removed config.yaml" in capsys.readouterr().out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["method"] == "sft"
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002"]
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_rewind_logs(tmp_path):
    """Cut back to recorded sizes (a torn last line never kept); older checkpoints: by step; fresh: emptied."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "x": s} for s in (1, 2, 3, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text)
    size_at_2 = len("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert rewind_logs(tmp_path, {"metrics.jsonl": size_at_2}) == {"metrics.jsonl": 3}
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    path.write_text(text + '{"step": 4, "x"')  # torn
    rewind_logs(tmp_path, step=2)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 2]
    rewind_logs(tmp_path)
    assert path.read_text() == ""


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_sigterm_during_the_final_eval_exits_130_after_a_checkpoint(world, tmp_path, monkeypatch, restore_signals, capsys):
    """SFT's final eval used to swallow SIGTERM (exit 0). Now: the checkpoint is kept, final/ is not written, exit 130;
    rerunning the command finishes the run."""
    sft = module("sft")
    real = sft.greedy_eval

    def eval_then_sigterm(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the final eval runs
        return real(*a, **kw)

    monkeypatch.setattr(sft, "greedy_eval", eval_then_sigterm)
    run_dir = tmp_path / "run"
    flags = sft_flags(world, run_dir, val_data=world["val"], eval_samples=2, max_completion_length=48)
    with pytest.raises(SystemExit) as e:
        run_main("sft", flags)
    assert e.value.code == 130 and "during the final evaluation" in capsys.readouterr().out
    assert (run_dir / "checkpoints" / "step_00000002" / "MANIFEST.json").exists() and not (run_dir / "final").exists()
    monkeypatch.setattr(sft, "greedy_eval", real)
    run_main("sft", flags)
    assert (run_dir / "final" / "model.safetensors").exists()
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2]
    assert sum("eval/val/acc" in r for r in read_jsonl(run_dir / "metrics.jsonl")) == 1  # the final eval, once


def test_sigterm_while_loading_exits_130_with_a_checkpoint(world, tmp_path, monkeypatch, restore_signals):
    opd = module("opd")
    real = opd.load_model

    def load_then_sigterm(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(opd, "load_model", load_then_sigterm)
    with pytest.raises(SystemExit) as e:
        run_main("opd", opd_flags(world, tmp_path / "run"))
    assert e.value.code == 130
    assert (tmp_path / "run" / "checkpoints" / "step_00000000" / "MANIFEST.json").exists()


def test_alarm_at_a_truncated_start_is_a_note_not_a_rise():
    history = [{"step": 1, "rollout/truncated_frac": 1.0, "rollout/repetition_frac": 0.0}]
    (msg,) = collapse_alarm(history)
    assert msg.startswith("NOTE rollout/truncated_frac starts at 1.00 (step 1)") and "starts truncated" in msg and "rose" not in msg
    for step in range(2, 8):  # stays high: quiet
        history.append({"step": step, "rollout/truncated_frac": 1.0, "rollout/repetition_frac": 0.0})
        assert collapse_alarm(history) == []
    history = [{"step": s, "rollout/truncated_frac": 0.1, "rollout/repetition_frac": 0.0} for s in range(1, 6)]
    history += [{"step": s, "rollout/truncated_frac": 1.0, "rollout/repetition_frac": 0.0} for s in range(6, 8)]
    (msg,) = collapse_alarm(history)
    assert msg.startswith("ALARM rollout/truncated_frac rose from 0.10")


# ----------------------------------------------------------------------------- issue 34: checkpoints never distrusted


def file_hashes(folder: Path) -> dict:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_finished_run_with_a_torn_only_checkpoint_is_refused_unchanged(world, tmp_path):
    """The issue's example, as a user meets it: rerunning a finished run whose only checkpoint has a truncated
    optimizer.bin used to warn, empty metrics.jsonl, retrain and replace the checkpoint and final/. Now: exit 2, one
    line naming the file and --overwrite_run_dir, every file byte-for-byte the same."""
    import sys

    from tests.method_runs import run_method
    from tests.test_bad_inputs import argv_of

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "methods/opd.py", *argv_of(opd_flags(world, run_dir))]
    run_method(cmd)
    opt = run_dir / "checkpoints" / "step_00000002" / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[:100])
    before = file_hashes(run_dir)
    proc = run_method(cmd, check=False)
    lines = [x for x in proc.stderr.splitlines() if "error" in x.lower() or "Warning" in x or "Traceback" in x]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"opd.py: error: --run_dir {run_dir} holds a finished opd run (config.yaml, "
                               "final/, metrics.jsonl) but no intact checkpoint to resume it from "
                               "(run/checkpoints/step_00000002: optimizer.bin has 100 bytes, manifest says "), lines[0]
    assert "--overwrite_run_dir true to delete this run and start afresh" in lines[0]
    assert file_hashes(run_dir) == before
    proc = run_method([*cmd, "--overwrite_run_dir", "true"])  # the way out it names
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2]


def test_a_corrupt_newest_checkpoint_falls_back_and_is_kept_aside(world, tmp_path):
    """A torn newest checkpoint: the run resumes from the previous intact one with a note naming the torn file, and the
    torn one is moved aside (kept for inspection), never deleted or silently replaced."""
    run_dir = tmp_path / "run"
    run_main("opd", opd_flags(world, run_dir, max_steps=2, save_every=1, keep_last=0))
    weights = run_dir / "checkpoints" / "step_00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    torn = file_hashes(weights.parent)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_00000002: model.safetensors has 100 bytes"):
        run_main("opd", opd_flags(world, run_dir, max_steps=3, save_every=1, keep_last=0))
    aside = run_dir / "checkpoints" / "abandoned_after_step_00000001" / "step_00000002"
    assert file_hashes(aside) == torn
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3]


def test_a_checkpoint_records_its_method_and_run(world, tmp_path):
    """Every checkpoint carries a copy of its run's config.yaml (method, run_id, settings): the run_id is made once,
    kept across resumes and --force_resume, and new after --overwrite_run_dir; config.yaml still loads with --config."""
    run_dir = tmp_path / "run"
    run_main("opd", opd_flags(world, run_dir, max_steps=1))
    first = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert list(first)[:2] == ["method", "run_id"] and first["method"] == "opd" and len(first["run_id"]) == 12
    ckpt = run_dir / "checkpoints" / "step_00000001"
    assert yaml.safe_load((ckpt / "run_config.yaml").read_text()) == first
    assert "run_config.yaml" in json.loads((ckpt / "MANIFEST.json").read_text())["files"]
    run_main("opd", opd_flags(world, run_dir, max_steps=2))
    run_main("opd", opd_flags(world, run_dir, max_steps=3, learning_rate=5e-4, force_resume="true"))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run_id"] == first["run_id"]
    saved = yaml.safe_load((run_dir / "checkpoints" / "step_00000003" / "run_config.yaml").read_text())
    assert saved["learning_rate"] == 5e-4 and saved["run_id"] == first["run_id"]
    args = parse(module("opd").Args, ["--config", str(run_dir / "config.yaml")])
    assert args.max_steps == 3
    run_main("opd", opd_flags(world, run_dir, max_steps=1, overwrite_run_dir="true"))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run_id"] != first["run_id"]


def test_a_checkpoint_copied_into_a_new_folder_continues_there(world, tmp_path):
    """A checkpoint of this method and these settings may start a new run folder (a branch): it gets its own run_id."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    run_main("opd", opd_flags(world, src, max_steps=2, save_every=1, keep_last=0))
    run_main("opd", opd_flags(world, dst, max_steps=2, resume_from=src / "checkpoints" / "step_00000001"))
    assert [r["step"] for r in train_rows(dst)] == [2]
    assert [r["train/loss"] for r in train_rows(dst)] == [r["train/loss"] for r in train_rows(src)][1:]
    ids = {yaml.safe_load((d / "config.yaml").read_text())["run_id"] for d in (src, dst)}
    assert len(ids) == 2


def test_rerunning_a_finished_run_changes_nothing(world, tmp_path, capsys):
    """The same command again on a finished run: nothing to do, exit 0, every file byte-for-byte the same (it used to
    re-save its last checkpoint, re-evaluate and rewrite final/)."""
    run_dir = tmp_path / "run"
    flags = opd_flags(world, run_dir, val_data=world["val"], eval_samples=2)
    run_main("opd", flags)
    before = file_hashes(run_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main("opd", flags)
    assert e.value.code == 0 and "holds a run that finished at step 2" in capsys.readouterr().out
    assert file_hashes(run_dir) == before


def test_continuing_a_finished_run_keeps_its_earlier_end(world, tmp_path):
    """--max_steps raised on a finished run: it continues, and the final/ and final_eval.json of step 2, with the logs
    as they were (the final eval's rows are cut back), are kept in superseded_at_step_00000002/."""
    run_dir = tmp_path / "run"
    run_main("opd", opd_flags(world, run_dir, val_data=world["val"], eval_samples=2))
    end2 = {k: v for k, v in file_hashes(run_dir).items() if k.startswith("final") or k == "metrics.jsonl"}
    run_main("opd", opd_flags(world, run_dir, max_steps=3, val_data=world["val"], eval_samples=2))
    kept = run_dir / "superseded_at_step_00000002"
    assert file_hashes(kept) == end2
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3]
    assert json.loads((run_dir / "final_eval.json").read_text())["step"] == 3
    run_main("opd", opd_flags(world, run_dir, max_steps=1, overwrite_run_dir="true"))  # only this deletes them
    assert not kept.exists()
