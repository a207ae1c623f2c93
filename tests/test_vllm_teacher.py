"""--teacher_backend vllm (common/vllm_teacher.py) without vLLM: the flag refusals (at start-up, one `error:` line, exit
2, nothing written), the alignment of an engine's prompt log-probs with the completion positions (a stand-in `LLM`),
the temperature the engine was built for, the memory plan and the dry run. The real engine:
tests/vllm_real/test_vllm_teacher.py (bash scripts/test.sh --vllm)."""

import dataclasses
import sys
from types import SimpleNamespace

import pytest
import torch

from common.errors import BadInput
from common.teacher_server import connect_teacher, server_flags, server_forward
from common.toy import load_toy_tokenizer, toy_config_path
from common.vllm_teacher import VLLMTeacher, static_refusal
from tests.method_runs import run_method
from tests.test_teacher_server import batch, world  # noqa: F401 (the module fixture)


class FakeLLM:
    """`LLM.generate` with prompt log-probs as vLLM gives them: None at position 0, then {token: Logprob} with
    log-prob -x_t / 1000 at x_t; `short` drops the last one."""

    def __init__(self, short=False):
        self.calls, self.short = [], short

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append([p["prompt_token_ids"] for p in prompts])
        out = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            lp = [None] + [{t: SimpleNamespace(logprob=-t / 1000)} for t in ids[1:]]
            out.append(SimpleNamespace(prompt_logprobs=lp[:-1] if self.short else lp))
        return out


def engine(llm, temperature=1.0):
    return VLLMTeacher(llm, lambda **kw: kw, None, temperature)


def test_engine_log_probs_land_on_their_completion_positions():
    ids, attn, completion, mask = batch()
    llm = FakeLLM()
    out = server_forward(engine(llm, 0.7), ids, attn, 4, 0.7)
    assert torch.allclose(out["logps"], -completion.float() / 1000 * mask) and out["eos_logps"].isnan().all()
    assert llm.calls == [[[11, 12, 21, 22, 23], [13, 14, 15, 24]]]  # the attended ids, as ids; the empty row not sent
    with pytest.raises(ValueError, match="scores at temperature 0.7, asked for 1.0"):
        server_forward(engine(llm, 0.7), ids, attn, 4, 1.0)
    with pytest.raises(RuntimeError, match="prompt log-probs for a row"):
        server_forward(engine(FakeLLM(short=True)), ids, attn, 4)


@pytest.mark.parametrize("kw,message", [
    ({"full_distribution": True}, "needs the teacher's full distribution"),
    ({"quantization": "8bit"}, "--teacher_quantization 8bit is the hf backend's"),
    ({"model_kwargs": '{"revision": "main", "device_map": "auto"}'}, "device_map: not passed to a vLLM engine"),
    ({"teacher_url": "http://127.0.0.1:1"}, "--teacher_url is for --teacher_backend server"),
])
def test_what_the_engine_cannot_give_is_refused_before_vllm_is_imported(kw, message):
    assert message in static_refusal(**{"full_distribution": False, **kw})
    with pytest.raises(BadInput, match=message.replace("(", r"\(")):
        connect_teacher(str(toy_config_path("student")), load_toy_tokenizer(), 1.0, 64, teacher_backend="vllm", **kw)
    assert static_refusal(full_distribution=False, model_kwargs='{"revision": "main"}') == ""


def test_server_flags_carry_the_engine_settings_for_vllm_only():
    from methods.opd import Args

    args = Args(teacher_backend="vllm", teacher_dtype="bfloat16", seed=3, teacher_vllm_gpu_memory_utilization=0.2)
    kw = server_flags(args)
    assert kw["dtype"] == "bfloat16" and kw["seed"] == 3 and kw["teacher_vllm_gpu_memory_utilization"] == 0.2
    kw = server_flags(dataclasses.replace(args, teacher_backend="server"))
    assert not {"dtype", "seed", "quantization", "teacher_vllm_gpu_memory_utilization"} & set(kw)


def test_memory_plan_counts_the_engine_not_an_in_process_teacher():
    from common.plan import GiB, plan
    from methods.opd import Args

    args = Args(model_name_or_path="Qwen/Qwen2.5-Math-1.5B", teacher_name_or_path="Qwen/Qwen2.5-Math-7B",
                micro_batch_tokens=16384, teacher_backend="vllm", teacher_vllm_gpu_memory_utilization=0.25)
    p = plan(args, "opd", args.model_name_or_path, args.teacher_name_or_path)
    assert "teacher" not in {ph.name for ph in p.phases}  # no scoring pass in the trainer's torch
    assert all(ph.parts["teacher vllm engine"] == 0.25 * 80 * GiB for ph in p.phases)  # held the whole step
    assert not any(k == "teacher" or "teacher hidden" in k for ph in p.phases for k in ph.parts)


@pytest.mark.parametrize("method,flags,message", [
    ("opd", {}, "needs vllm"),  # the main venv has no vLLM
    ("opd", {"loss_type": "full_kl"}, "needs the teacher's full distribution"),
    ("stable_opd", {"mix_loss": "reverse_kl"}, "needs the teacher's full distribution"),
])
def test_refused_at_start_up_exit_2_nothing_written(world, tmp_path, method, flags, message):  # noqa: F811
    from tests.test_teacher_server import run_args

    args = run_args(world, tmp_path / "run", "", teacher_backend="vllm", **flags)
    proc = run_method([sys.executable, f"methods/{method}.py", *args], check=False)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_dry_run_checks_the_weights_and_the_engine(world, tmp_path):  # noqa: F811
    from tests.test_teacher_server import run_args

    proc = run_method([sys.executable, "methods/opd.py", *run_args(world, tmp_path / "run", "", teacher_backend="vllm",
                                                                   dry_run="true")], check=False)
    lines = proc.stdout.splitlines()
    engine_line = next((x for x in lines if "teacher engine" in x), "")
    assert proc.returncode == 2 and "FAIL" in engine_line and "needs vllm" in engine_line, proc.stdout[-3000:]
    assert any("teacher weights" in x and "ok" in x for x in lines) and not (tmp_path / "run").exists()
