"""--teacher_backend server (common/teacher_server.py) against a stdlib fake server, for what the real engine cannot be
made to do on demand: the alignment of the log-probs with the completion positions, round robin, retries, timeouts,
short / re-tokenised / positive answers, the start-up refusals (server down, another model, another tokenizer, a short
max_model_len, a temperature ignored), and the run-level paths (exit 2 with nothing written; a failure mid-run ->
checkpoint + exit 130, then the same command resumes). The happy path against a real `vllm serve`:
tests/vllm_real/test_teacher_server.py."""

import json
import socket
import sys
import time

import pytest
import torch

from common.models import load_model
from common.teacher_server import TeacherServer, TeacherServerError, connect_teacher, probe, server_forward
from common.toy import build_toy_world, load_toy_tokenizer, toy_config_path
from tests.fake_teacher_server import FakeTeacherServer
from tests.method_runs import run_method


@pytest.fixture
def fake():
    servers = []

    def start(**state):
        servers.append(FakeTeacherServer(**state))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def client(*fakes, **kw) -> TeacherServer:
    options = {"timeout": 5.0, "retries": 0, "backoff": 0.0, **kw}
    return TeacherServer([f.url for f in fakes], "teacher", None, **options)


def batch():
    """3 rows as `generate` + teacher scoring lay them out: left-padded prompts, right-padded completions (pad 0);
    row 2 has an empty completion (never sent)."""
    prompt = torch.tensor([[0, 11, 12], [13, 14, 15], [0, 0, 16]])
    completion = torch.tensor([[21, 22, 23, 0], [24, 0, 0, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    return torch.cat([prompt, completion], 1), torch.cat([(prompt != 0).long(), mask], 1), completion, mask


def test_server_forward_puts_each_log_prob_on_its_completion_position(fake):
    f = fake()
    ids, attn, completion, mask = batch()
    out = server_forward(client(f, concurrency=2), ids, attn, 4, 0.7, eos_id=2, vocab_limit=100)
    assert out["logps"].shape == (3, 4) and out["eos_logps"].isnan().all()  # EOS log-probs: not measured
    assert torch.allclose(out["logps"], -completion.float() / 1000 * mask)  # the fake's -x_t / 1000 at x_t; 0 on pads
    sent = sorted(row for r in f.requests for row in r["prompt"])  # the requests run concurrently: any order
    assert sent == [[11, 12, 21, 22, 23], [13, 14, 15, 24]]  # the attended ids, as ids; the empty row not at all
    assert len(f.requests) == 2
    assert all(r["echo"] and r["max_tokens"] == 0 and r["temperature"] == 0.7 for r in f.requests)


def test_requests_go_round_robin_over_the_urls(fake):
    a, b = fake(), fake()
    ids, attn, _, _ = batch()
    for _ in range(2):
        server_forward(client(a, b, concurrency=2), ids, attn, 4)
    assert len(a.requests) == len(b.requests) == 2


def test_a_5xx_is_retried_with_backoff_then_given_up(fake):
    ids, attn, completion, mask = batch()
    f = fake(fail_first=2)
    out = server_forward(client(f, retries=2, backoff=0.01, concurrency=1), ids, attn, 4)
    assert len(f.requests) == 3 and torch.allclose(out["logps"], -completion.float() / 1000 * mask)
    g = fake(fail_first=10)
    with pytest.raises(TeacherServerError, match="failed 3 time.*HTTP 503"):
        server_forward(client(g, retries=2, backoff=0.01, concurrency=1), ids, attn, 4)
    assert len(g.requests) == 3


@pytest.mark.parametrize("fault,message", [("sleep", "timed out"), ("short", "log-probs for a row of"),
                                           ("retokenised", "differ from the ids sent")])
def test_a_faulty_answer_is_an_error_never_a_silent_zero(fake, fault, message):
    ids, attn, _, _ = batch()
    f = fake(fail_first=10, fault=fault, sleep_s=1.0)
    t0 = time.time()
    with pytest.raises(TeacherServerError, match=message):
        server_forward(client(f, retries=1, timeout=0.2, concurrency=1), ids, attn, 4)
    assert len(f.requests) == 2 and time.time() - t0 < 5


def _tokenize(tok):
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("state,temperature,refusal", [
    ({}, 1.0, None),
    ({"ignore_temperature": False}, 0.7, None),
    ({"ignore_temperature": True}, 0.7, "ignore the temperature"),
    ({"model": "/models/other-teacher"}, 1.0, "serves /models/other-teacher, not --teacher_name_or_path"),
    ({"tokenize": "other"}, 1.0, "tokenizes differently"),
    ({"tokenize": "none"}, 1.0, "/tokenize failed"),
    ({"max_model_len": 32}, 1.0, "max_model_len 32 <"),
    ({"fault": "positive", "fail_first": 10}, 1.0, "values > 0"),  # logits (--logprobs-mode raw_logits), not log-probs
])
def test_start_up_probe_refuses_what_the_server_cannot_do(fake, state, temperature, refusal):
    tok = load_toy_tokenizer()
    same = _tokenize(tok)
    tokenize = {"same": same, "other": lambda text: same(text)[:-1] + [7], "none": None}[state.pop("tokenize", "same")]
    f = fake(**state, tokenize=tokenize)
    if refusal is None:
        assert "teacher server: teacher" in probe(client(f), "teacher", tok, temperature, 64)
    else:
        with pytest.raises(ValueError, match=refusal):
            probe(client(f), "teacher", tok, temperature, 64)


def test_served_model_may_live_in_another_folder_of_the_same_name(fake):
    tok = load_toy_tokenizer()
    f = fake(model="/models/Qwen2.5-Math-7B", tokenize=_tokenize(tok))
    assert "/models/Qwen2.5-Math-7B" in probe(client(f), "Qwen/Qwen2.5-Math-7B", tok, 1.0, 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connect_fails_in_one_line_with_status_2(capsys):
    tok, config = load_toy_tokenizer(), str(toy_config_path("student"))
    down = f"http://127.0.0.1:{free_port()}"
    for kw, message in (({"teacher_url": down}, "teacher server not reachable"),
                        ({"teacher_url": ""}, "needs --teacher_url"),
                        ({"teacher_url": down, "full_distribution": True}, "needs the teacher's full distribution")):
        with pytest.raises(SystemExit) as e:
            connect_teacher(config, tok, 1.0, 64, **kw)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "error: " in err[0] and message in err[0], err


# ----------------------------------------------------------------------------- whole runs (subprocesses)

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_server")
    tok = load_toy_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        load_model(str(toy_config_path("student")), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = build_toy_world(root / "toy", n_train=32, n_val=4, n_test=4, max_steps=2)
    return {"root": root, "student": root / "student", "teacher": root / "teacher", "tok": tok, **data}


def run_args(world, run_dir, url, **overrides):
    args = {"run_dir": run_dir, "model_name_or_path": world["student"], "teacher_name_or_path": world["teacher"],
            "train_data": world["train"], "val_data": "", "per_device_prompts": 2, "num_generations": 2,
            "max_completion_length": 8, "max_steps": 2, "eval_every": 0, "save_every": 0, "learning_rate": 1e-3,
            "rep_window_chars": 50, "rep_threshold": 3.0, "teacher_backend": "server", "teacher_url": url,
            "teacher_retries": 1, "teacher_backoff": 0.01, "teacher_timeout": 5}
    args.update(overrides)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


@pytest.mark.parametrize("method,flags,message", [
    ("opd", {}, "teacher server not reachable"),
    ("opd", {"loss_type": "full_kl"}, "needs the teacher's full distribution"),
    ("stable_opd", {"mix_loss": "forward_kl"}, "needs the teacher's full distribution"),
])
def test_refused_at_start_up_exit_2_nothing_written(world, tmp_path, method, flags, message):
    down = f"http://127.0.0.1:{free_port()}"
    proc = run_method([sys.executable, f"methods/{method}.py", *run_args(world, tmp_path / "run", down, **flags)],
                      check=False)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_failure_mid_run_checkpoints_exits_130_and_the_same_command_resumes(world, tmp_path, fake):
    """Step 1 scores, step 2's requests get 503s past their retries: a checkpoint of step 1, exit 130 (as SIGTERM), no
    step 2 logged; with the server back, the same command resumes from step 1 and finishes."""
    f = fake(model=str(world["teacher"]), tokenize=_tokenize(world["tok"]), ok_calls=1 + 1)  # the probe + step 1
    cmd = [sys.executable, "methods/opd.py", *run_args(world, tmp_path / "run", f.url, teacher_concurrency=1)]
    proc = run_method(cmd, check=False)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "stopped by the teacher server: teacher request failed 2 time(s), last:" in proc.stdout, proc.stdout[-2000:]
    saved = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert saved == ["step_00000001"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == [1] and len(f.requests) == 1 + 1 + 2  # step 2's request: tried twice, then the run stopped
    f.state["ok_calls"] = None  # the server is back
    proc = run_method(cmd)
    assert "resumed from" in proc.stdout and (tmp_path / "run" / "final" / "config.json").is_file()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == [1, 2]


def test_teacher_failures_stop_every_rank_together(fake):
    """A TeacherServerError becomes a flag, not an exception; under several ranks one collective tells the others."""
    from common.teacher_server import teacher_failures

    class Ranks:  # 2 ranks; `other_failed`: what the other rank's flag was
        num_processes, device, other_failed, reduced = 2, "cpu", 0.0, 0

        def reduce(self, x, op):
            self.reduced += 1
            return torch.maximum(x, torch.tensor(self.other_failed))

    server, acc = client(fake()), Ranks()
    with teacher_failures(acc, server) as failed:
        raise TeacherServerError("teacher request failed 4 time(s)")
    assert failed["error"] == "teacher request failed 4 time(s)" and acc.reduced == 1
    acc.other_failed = 1.0
    with teacher_failures(acc, server) as failed:
        pass
    assert failed["error"] == "another rank's teacher requests failed"
    with teacher_failures(acc, object()) as failed:  # the in-process teacher: no collective, nothing caught
        pass
    assert failed["error"] == "" and acc.reduced == 2
    with pytest.raises(RuntimeError, match="other"), teacher_failures(acc, server):
        raise RuntimeError("other errors pass through")


def test_memory_plan_counts_no_teacher_when_it_is_served():
    """common/plan.py: with --teacher_backend server the teacher's weights and scoring are on its own GPUs."""
    import dataclasses

    from common.plan import plan
    from methods.opd import Args

    args = Args(model_name_or_path="Qwen/Qwen2.5-Math-1.5B", teacher_name_or_path="Qwen/Qwen2.5-Math-7B",
                micro_batch_tokens=16384)
    here, served = (plan(a, "opd", a.model_name_or_path, a.teacher_name_or_path) for a in
                    (args, dataclasses.replace(args, teacher_backend="server")))
    parts = lambda p: {k for ph in p.phases for k in ph.parts}  # noqa: E731
    assert "teacher" in {ph.name for ph in here.phases} and "teacher" not in {ph.name for ph in served.phases}
    assert any("teacher" in k for k in parts(here)) and not any("teacher" in k for k in parts(served))
    assert served.peak < here.peak - 10 * 2**30  # a 7B teacher: ~30 GB in fp32 (the default --dtype)


def test_dry_run_probes_the_server_instead_of_the_weights(world, tmp_path, fake):
    f = fake(model=str(world["teacher"]), tokenize=_tokenize(world["tok"]))
    down = f"http://127.0.0.1:{free_port()}"
    for url, status in ((f.url, 0), (down, 2)):
        proc = run_method([sys.executable, "methods/opd.py", *run_args(world, tmp_path / "run", url, dry_run="true")],
                          check=False)
        line = next((x for x in proc.stdout.splitlines() if "teacher server" in x), "")
        assert proc.returncode == status and ("not reachable" in line) == (status == 2), proc.stdout[-3000:]
        assert "teacher weights" not in proc.stdout and not (tmp_path / "run").exists()
