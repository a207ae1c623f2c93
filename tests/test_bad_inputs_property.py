"""Bad inputs found by construction (issue 34 item 5): mutate a valid config, dataset or model; run the method.

Every outcome must be either a successful run, or ONE `error:` line with exit status 2 and no file changed: the
config, the dataset and the models hash the same after the attempt, and the (fresh) run folder does not exist.
The mutations: drop / duplicate / retype a key of the config or a column of a row, an unknown key, a non-object
row, corrupt bytes (a non-UTF-8 byte, a NUL, a quote, a brace, a newline) and truncation at any byte; and the same
byte damage to one file of a copy of the student's model folder (weights, config, tokenizer files).

Each attempt is a real 1-step run of sft / grpo / opd / stable_opd on the toy world (or eval/evaluate.py on 2 toy
problems, its benchmark file in --data_dir mutated), in-process, through the entry point's own boundary
(`common.errors.error_boundary` around `main(parse(Args))`, as `python methods/x.py` runs): ~0.1-2 s each.
STABLE_OPD_FUZZ_EXAMPLES sets the number of examples (default 16; e.g. 400 for a long hunt);
STABLE_OPD_FUZZ_LOG=file appends one line per attempt (status, mutation, error line).
"""

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from common.cli import parse  # noqa: E402
from common.errors import error_boundary  # noqa: E402
from common.models import load_model  # noqa: E402
from common.toy import build_toy_world, load_toy_tokenizer, make_split, toy_config_path  # noqa: E402
from tests.test_bad_inputs import module  # noqa: E402

EXAMPLES = int(os.environ.get("STABLE_OPD_FUZZ_EXAMPLES", "16"))
METHODS = ("sft", "grpo", "opd", "stable_opd", "evaluate")
COLUMNS = ("id", "problem", "answer", "solution")
# values of other types than the valid ones: a key / column retyped to one of these
ODD_VALUES = ["abc", "", [1, 2], {"a": 1}, None, True, False, 1.5, -1, 0, 10**30, "nan", "1e-30", "\u00e9\x00"]
BAD_BYTES = [b"\xff", b"\x80", b"\x00", b'"', b"{", b"}", b"\n", b":", b"\t", b"-", b"#", b"\xc3"]


@pytest.fixture(scope="module")
def world():
    root = Path(tempfile.mkdtemp(prefix="bad-prop-"))
    tok = load_toy_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        load_model(str(toy_config_path("student")), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = build_toy_world(root / "toy", n_train=16, n_val=4, n_test=4, max_steps=2)
    bench = root / "toy_benchmark.jsonl"  # eval's toy benchmark as a --data_dir file (500 rows, as registered)
    bench.write_text("".join(json.dumps(r) + "\n" for r in make_split(500, seed=0, split="test")))
    yield {"root": root, "student": root / "student", "teacher": root / "teacher", "benchmark": bench, **data}
    shutil.rmtree(root, ignore_errors=True)


def valid_config(method: str, w: dict) -> dict:
    """A valid config of `method` (1 step, no evals; eval: 2 toy problems) whose keys the mutations work on."""
    if method == "evaluate":
        return {"model_name_or_path": str(w["student"]), "benchmarks": "toy", "limit": 2, "max_new_tokens": 4,
                "batch_size": 2, "seed": 0}
    base = {"train_data": str(w["train"]), "val_data": "", "max_steps": 1, "eval_every": 0, "save_every": 0,
            "learning_rate": 1e-3, "seed": 0, "log_every": 1}
    if method == "sft":
        return {**base, "model_name_or_path": str(toy_config_path("student")), "per_device_batch_size": 4,
                "max_completion_length": 48, "warmup_steps": 0}
    rl = {**base, "model_name_or_path": str(w["student"]), "per_device_prompts": 2, "num_generations": 2,
          "max_completion_length": 8, "temperature": 1.0}
    if method == "grpo":
        return rl
    teacher = {**rl, "teacher_name_or_path": str(w["teacher"])}
    return {**teacher, "max_completion_length": 40, "mix_coef": 0.1} if method == "stable_opd" else teacher


# ----------------------------------------------------------------------------- mutations (on bytes: what a user has)


def _corrupt(data: bytes, pos: int, byte: bytes) -> bytes:
    pos = pos % max(1, len(data))
    return data[:pos] + byte + data[pos + 1 :]


def _truncate(data: bytes, pos: int) -> bytes:
    return data[: pos % max(1, len(data))]


def mutate_config(text: str, op: tuple) -> bytes:
    kind, key_i, value, pos, byte = op
    cfg = yaml.safe_load(text)
    key = sorted(cfg)[key_i % len(cfg)]
    if kind == "drop":
        cfg.pop(key)
    elif kind == "retype":
        cfg[key] = value
    elif kind == "unknown":
        cfg[f"{key}_x"] = 1
    elif kind == "duplicate":  # the same key again, as a user's edit of the file would leave it
        return (text + f"{key}: {json.dumps(value)}\n").encode()
    elif kind == "corrupt":
        return _corrupt(text.encode(), pos, byte)
    elif kind == "truncate":
        return _truncate(text.encode(), pos)
    return yaml.safe_dump(cfg, sort_keys=False).encode()


def mutate_data(text: str, op: tuple) -> bytes:
    kind, row_i, col_i, value, pos, byte = op
    rows = [json.loads(x) for x in text.splitlines()]
    i, col = row_i % len(rows), COLUMNS[col_i % len(COLUMNS)]
    lines = [json.dumps(r) for r in rows]
    if kind == "drop":
        rows[i].pop(col, None)
        lines[i] = json.dumps(rows[i])
    elif kind == "retype":
        rows[i][col] = value
        lines[i] = json.dumps(rows[i])
    elif kind == "duplicate":  # a column given twice in one row: JSON parsers keep the last silently
        lines[i] = lines[i][:-1] + f", {json.dumps(col)}: {json.dumps(value)}}}"
    elif kind == "non_object":
        lines[i] = json.dumps(value if not isinstance(value, dict) else [value])
    elif kind == "corrupt":
        return _corrupt(text.encode(), pos, byte)
    elif kind == "truncate":
        return _truncate(text.encode(), pos)
    return ("\n".join(lines) + "\n").encode()


values = st.sampled_from(ODD_VALUES)
config_ops = st.tuples(st.sampled_from(["drop", "retype", "unknown", "duplicate", "corrupt", "truncate"]),
                       st.integers(0, 50), values, st.integers(0, 10**4), st.sampled_from(BAD_BYTES))
data_ops = st.tuples(st.sampled_from(["drop", "retype", "duplicate", "non_object", "corrupt", "truncate"]),
                     st.integers(0, 50), st.integers(0, 10), values, st.integers(0, 10**5), st.sampled_from(BAD_BYTES))
# a model folder (the student's, a copy): one of its files torn or with a corrupt byte
model_ops = st.tuples(st.sampled_from(["corrupt", "truncate"]), st.integers(0, 20), st.integers(0, 10**7),
                      st.sampled_from(BAD_BYTES))
plans = st.tuples(st.sampled_from(METHODS), st.one_of(st.tuples(st.just("config"), config_ops),
                                                      st.tuples(st.just("data"), data_ops),
                                                      st.tuples(st.just("model"), model_ops)))


def mutate_model(folder: Path, op: tuple) -> None:
    kind, file_i, pos, byte = op
    files = sorted(f for f in folder.iterdir() if f.is_file())
    f = files[file_i % len(files)]
    data = f.read_bytes()
    f.write_bytes(_corrupt(data, pos, byte) if kind == "corrupt" else _truncate(data, pos))


# ----------------------------------------------------------------------------- one attempt


def digest(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under `paths` (a missing path: None)."""
    out = {}
    for p in paths:
        if not p.exists():
            out[str(p)] = None
        for f in sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def attempt(method: str, argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of `python methods/<method>.py argv`, in-process: parse + main inside the boundary."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    mod = module(method)
    err, out = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = [f"{method}.py", *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                with error_boundary():
                    mod.main(parse(mod.Args, argv))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old_argv
    return code, err.getvalue()


def check_outcome(method: str, code: int, stderr: str, before: dict, after: dict, run_dir: Path, what: str):
    errors = [x for x in stderr.splitlines() if re.search(r"\berror\b", x, re.IGNORECASE)]
    if os.environ.get("STABLE_OPD_FUZZ_LOG"):  # one line per attempt, to read what the mutations reached
        with open(os.environ["STABLE_OPD_FUZZ_LOG"], "a") as f:
            f.write(f"{code} | {what[:100]} | {(errors or ['-'])[-1][:240]}\n")
    if code == 0:
        assert "Traceback" not in stderr and not errors, f"{what}: a successful run printed an error\n{stderr[-2000:]}"
        assert after == before, f"{what}: the run changed its inputs"
        return
    assert code == 2, f"{what}: exit status {code}, not 2\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, f"{what}: a traceback\n{stderr[-3000:]}"
    assert len(errors) == 1 and errors[0].startswith(f"{method}.py: error: "), f"{what}: not ONE error line\n{stderr}"
    assert after == before, f"{what}: a failed start changed a file: {sorted(set(after.items()) ^ set(before.items()))}"
    assert not run_dir.exists(), f"{what}: a failed start wrote {sorted(p.name for p in run_dir.rglob('*'))}"


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=plans)
def test_mutated_config_or_data_runs_or_fails_cleanly(world, plan):
    """A mutated config, dataset or model folder: a successful 1-step run, or one `error:` line, exit 2, and nothing
    written."""
    method, (target, op) = plan
    tmp = Path(tempfile.mkdtemp(dir=world["root"], prefix="case-"))
    try:
        cfg = valid_config(method, world)
        if method == "evaluate":  # the data is the toy benchmark's file in --data_dir
            data = tmp / "toy.jsonl"
            data.write_bytes(world["benchmark"].read_bytes())
            cfg["data_dir"] = str(tmp)
        else:
            data = tmp / "train.jsonl"
            data.write_bytes(world["train"].read_bytes())
            cfg["train_data"] = str(data)
        model = tmp / "model"
        if target == "model":  # a copy of the student folder (for sft too, instead of its config.json)
            shutil.copytree(world["student"], model)
            mutate_model(model, op)
            cfg["model_name_or_path"] = str(model)
        text = yaml.safe_dump(cfg, sort_keys=False)
        config = tmp / "config.yaml"
        if target == "config":
            config.write_bytes(mutate_config(text, op))
        else:
            config.write_text(text)
        if target == "data":
            data.write_bytes(mutate_data(data.read_text(), op))
        run_dir = tmp / "run"
        inputs = [config, data, model, world["student"], world["teacher"]]
        before = digest(inputs)
        out_flag = "--output_dir" if method == "evaluate" else "--run_dir"
        code, stderr = attempt(method, ["--config", str(config), out_flag, str(run_dir)])
        check_outcome(method, code, stderr, before, digest(inputs), run_dir, f"{method} {target} {op}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_check_itself_sees_a_traceback_and_a_written_file(world, tmp_path):
    """The outcome check is not vacuous: a bug's traceback, a wrong exit status and a file written all fail it."""
    run_dir = tmp_path / "run"
    with pytest.raises(AssertionError, match="a traceback"):
        check_outcome("opd", 2, "Traceback (most recent call last):\nopd.py: error: x", {}, {}, run_dir, "t")
    with pytest.raises(AssertionError, match="exit status 1"):
        check_outcome("opd", 1, "opd.py: error: x", {}, {}, run_dir, "t")
    run_dir.mkdir()
    with pytest.raises(AssertionError, match="wrote"):
        check_outcome("opd", 2, "opd.py: error: x", {}, {}, run_dir, "t")
    # and a valid config runs (the mutations start from something that works)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(valid_config("opd", world)))
    code, stderr = attempt("opd", ["--config", str(cfg), "--run_dir", str(tmp_path / "ok")])
    assert code == 0 and (tmp_path / "ok" / "final").is_dir(), stderr[-2000:]
