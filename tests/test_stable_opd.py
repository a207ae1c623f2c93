"""methods/stable_opd.py: drift against opd.py, ablation equivalence, each component, the controllers."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.models import load_model
from common.toy import build_toy_world, load_toy_tokenizer, toy_config_path
from tests.method_runs import ENV, ROOT, run_method


def _main_lines(path: Path, drop_blocks: bool) -> list[str]:
    """The source lines of the file's main() (without the marked stable-opd blocks)."""
    main = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    text = "\n".join(path.read_text().splitlines()[main.lineno - 1 : main.end_lineno]) + "\n"
    if drop_blocks:
        text = re.sub(r"\n[ ]*# >>> stable-opd\n.*?# <<< stable-opd\n", "\n", text, flags=re.S)
    return text.splitlines()


def _functions(path: Path) -> set[str]:
    return {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


# the objective's interface: each file defines its own; everything else Stable-OPD takes from opd.py by import
OBJECTIVE = {"main", "initial_coefs", "objective", "token_terms", "vocab_terms", "fused_head"}


def test_stable_opd_is_opd_plus_marked_blocks():
    """The drift test: stable_opd.py's main() is opd.py's line for line outside its marked blocks; both files define
    the objective's interface (OBJECTIVE), and Stable-OPD imports every other function and every flag of opd.py."""
    import methods.opd as opd
    import methods.stable_opd as so

    assert _main_lines(ROOT / "methods" / "stable_opd.py", drop_blocks=True) == _main_lines(ROOT / "methods" / "opd.py", False)
    text = (ROOT / "methods" / "stable_opd.py").read_text()
    assert text.count("# >>> stable-opd") == text.count("# <<< stable-opd") >= 4
    shared = _functions(ROOT / "methods" / "opd.py") & _functions(ROOT / "methods" / "stable_opd.py")
    assert shared == OBJECTIVE, shared ^ OBJECTIVE
    assert issubclass(so.Args, opd.Args) and so.opd_advantages is opd.opd_advantages


def test_golden_ids_for_counts_missing_overlong_unparsable():
    import common.data as so

    tok = load_toy_tokenizer()
    rows = [{"problem": p} for p in ("a", "b", "c", "d")]
    golden = {"a": "x = 1. The answer is \\boxed{1}.", "b": "no answer here", "c": "1 + 1 = 2. " * 20 + "\\boxed{2}"}
    ids, counts = so.golden_ids_for(rows, golden, tok, max_len=30, overflow="skip")
    assert counts == {"missing": 1, "over_long": 1, "unparsable": 1}
    assert ids[0][-1] == tok.eos_token_id and ids[1] and ids[2] == [] and ids[3] == []
    ids_t, counts_t = so.golden_ids_for(rows, golden, tok, max_len=30, overflow="truncate")
    assert len(ids_t[2]) == 30 and counts_t["over_long"] == 1
    g_ids, g_attn, g_mask, T = so.golden_batch([[5, 6], [7]], [[8, 9, 2], []], pad_id=3)
    assert T == 3 and g_ids.tolist() == [[5, 6, 8, 9, 2], [3, 7, 3, 3, 3]]
    assert g_attn.tolist() == [[1, 1, 1, 1, 1], [0, 1, 0, 0, 0]] and g_mask.tolist() == [[1, 1, 1], [0, 0, 0]]


def test_join_and_split_rows_keep_every_row_and_position():
    """Rollouts and golden responses in one forward: the layout puts each row's tokens at the same
    relative positions (prompts right-aligned, completions left-aligned) and split_rows undoes it."""
    from common.logprobs import join_rows, split_rows, stack_rows

    a_ids, a_attn = torch.tensor([[0, 5, 6, 7, 8]]), torch.tensor([[0, 1, 1, 1, 1]])  # prompt [5, 6], completion [7, 8]
    b_ids, b_attn = torch.tensor([[9, 1, 2, 3]]), torch.tensor([[1, 1, 1, 0]])  # prompt [9], completion [1, 2, 3] (3 = pad)
    ids, attn, T = join_rows(a_ids, a_attn, 2, b_ids, b_attn, 3, pad_id=0)
    assert T == 3 and ids.tolist() == [[0, 5, 6, 7, 8, 0], [0, 0, 9, 1, 2, 3]]
    assert attn.tolist() == [[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0]]
    out = {"logps": ids[:, -T:].float(), "head": torch.ones(1)}
    a, b = split_rows(out, 1, 2, 3)
    assert a["logps"].tolist() == [[7, 8]] and b["logps"].tolist() == [[1, 2, 3]] and a["head"] is out["head"]
    assert stack_rows(torch.ones(1, 2), torch.full((1, 3), 2.0), 3).tolist() == [[1, 1, 0], [2, 2, 2]]


def test_controllers():
    import methods.stable_opd as so

    assert so.adapt_ref_kl(0.01, kl=0.05, target=0.05) == pytest.approx(0.01)  # on target: unchanged
    assert so.adapt_ref_kl(0.01, kl=1.0, target=0.05) == pytest.approx(0.01 * 1.02)  # far above: +2% at most
    assert so.adapt_ref_kl(0.01, kl=0.0, target=0.05) == pytest.approx(0.01 * 0.98)
    coef, trace = 0.1, []
    for unhealthy in [0.5] * 4 + [0.0] * 12:
        coef = so.adapt_mix(coef, unhealthy, target=0.1, base=0.1, max_coef=1.0)
        trace.append(coef)
    assert trace[:4] == pytest.approx([0.2, 0.4, 0.8, 1.0])  # doubles, capped at mix_max
    assert trace[4] == pytest.approx(0.8) and trace[-1] == pytest.approx(0.1)  # decays back to the base, not below
    assert so.adapt_mix(0.0, 1.0, 0.1, 0.0, 1.0) == pytest.approx(0.01)  # starts from 0.01 when the base is 0


def test_initial_coefs_from_flags_and_from_checkpoints_old_and_new():
    """lambda_gold is "gold" in the objective and in checkpoints; one saved before 2026-12-08 named it "mix"."""
    import methods.stable_opd as so
    from common.cli import parse

    args = parse(so.Args, ["--mix_coef", "0.2", "--ref_kl_coef", "0.03"])
    assert so.initial_coefs(args) == {"gold": 0.2, "ref": 0.03}
    assert so.initial_coefs(args, {"gold": 0.4, "ref": 0.05}) == {"gold": 0.4, "ref": 0.05}  # as adapted, not the flags
    assert so.initial_coefs(args, {"mix": 0.8, "ref": 0.06}) == {"gold": 0.8, "ref": 0.06}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sopd")
    tok = load_toy_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        load_model(str(toy_config_path("student")), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = build_toy_world(root / "toy", n_train=64, n_val=8, n_test=8, max_steps=2)
    return {"student": root / "student", "teacher": root / "teacher", **data}


def args_for(world, run_dir, **overrides):
    args = {"run_dir": run_dir, "model_name_or_path": world["student"], "teacher_name_or_path": world["teacher"],
            "train_data": world["train"], "val_data": world["val"], "per_device_prompts": 2, "num_generations": 2,
            "max_completion_length": 40, "max_steps": 2, "eval_every": 0, "eval_samples": 4, "save_every": 0,
            "learning_rate": 1e-3, "resume_from": "none"}  # 40 tokens: the toy world's 1-2-step golden solutions fit
    args.update(overrides)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def run(script, args):
    return run_method([sys.executable, f"methods/{script}", *args])


def metrics(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in x]


def params(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


CONTROLLERS = {"adaptive_ref_kl": "true", "adaptive_mix": "true", "mix_target": 0.0}


@pytest.fixture(scope="module")
def controllers_run(world, tmp_path_factory):
    """One 4-step run with both controllers on, shared: a component run below and the straight side of the exact
    resume. Tests only read it."""
    run_dir = tmp_path_factory.mktemp("sopd_controllers") / "run"
    run("stable_opd.py", args_for(world, run_dir, max_steps=4, **CONTROLLERS))
    return run_dir


@pytest.mark.parametrize("overrides", [
    {},  # the defaults: NLL mixture + exact reference KL
    {"mix_loss": "forward_kl", "ref_kl_type": "k3"},
    {"mix_loss": "reverse_kl", "ref_kl_on_golden": "true", "loss_type": "full_kl"},
    {**CONTROLLERS, "max_steps": 4},  # the run of the `controllers_run` fixture
    {"ref_kl_on_golden": "true", "ppo_epochs": 2, "num_minibatches": 2},  # clipped ratios; the KL on golden rows
])
def test_components_run_and_log(world, tmp_path, overrides, request):
    run_dir = tmp_path / "run"
    if overrides == {**CONTROLLERS, "max_steps": 4}:
        run_dir = request.getfixturevalue("controllers_run")
    else:
        run("stable_opd.py", args_for(world, run_dir, **overrides))
    rows = metrics(run_dir)
    for m in rows:
        mix_key = "mix/nll" if overrides.get("mix_loss", "nll") == "nll" else "mix/kl"
        for key in ("train/loss", mix_key, "ref/kl", "coef/mix", "coef/ref_kl", "rollout/truncated_frac", "opd/adv_mean"):
            assert key in m and torch.isfinite(torch.tensor(m[key])), key
        assert m[mix_key] > 0 and m["ref/kl"] >= -1e-6
    if overrides.get("adaptive_mix"):
        # mix_target 0: any truncation or repetition keeps lambda_gold doubling (random models rarely stop)
        assert [m["coef/mix"] for m in rows] == pytest.approx([0.1, 0.2, 0.4, 0.8])
        assert rows[-1]["coef/ref_kl"] != 0.01  # the KL controller moved


def test_first_step_reference_kl_is_zero(world, tmp_path):
    """Before the first update pi_theta == pi_ref, so the exact KL of the first minibatch is 0."""
    run("stable_opd.py", args_for(world, tmp_path / "run", max_steps=1, mix_coef=0))
    assert abs(metrics(tmp_path / "run")[0]["ref/kl"]) < 1e-6


def test_exact_resume_with_controller_state(world, tmp_path, controllers_run):
    a, flags = controllers_run, CONTROLLERS  # a: args_for(world, a, max_steps=4, **flags), 4 steps in one go
    run("stable_opd.py", args_for(world, tmp_path / "b", max_steps=2, resume_from="auto", **flags))
    proc = run("stable_opd.py", args_for(world, tmp_path / "b", max_steps=4, resume_from="auto", **flags))
    assert "resumed from" in proc.stdout
    ma, mb = metrics(a), metrics(tmp_path / "b")
    for key in ("train/loss", "coef/mix", "coef/ref_kl"):
        assert [m[key] for m in ma] == [m[key] for m in mb], key
    pa, pb = params(a), params(tmp_path / "b")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_golden_file_and_reference_warning(world, tmp_path):
    golden = tmp_path / "golden.jsonl"
    golden.write_text(Path(world["train"]).read_text())  # a golden file: the same rows, with their solutions
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n"
                            for r in map(json.loads, Path(world["train"]).read_text().splitlines())))
    proc = run("stable_opd.py", args_for(world, tmp_path / "run", train_data=bare, golden_data=golden, max_steps=1,
                                         ref_model_name_or_path=world["teacher"]))
    assert "golden responses: " in proc.stdout and "not the paper's setting" in proc.stdout
    assert metrics(tmp_path / "run")[0]["mix/nll"] > 0


def test_missing_golden_solutions_is_a_clear_error(world, tmp_path):
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n"
                            for r in map(json.loads, Path(world["train"]).read_text().splitlines())))
    proc = subprocess.run([sys.executable, "methods/stable_opd.py", *args_for(world, tmp_path / "run", train_data=bare)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "scripts/make_golden.py" in proc.stderr and "`solution` field" in proc.stderr


def test_make_golden_keeps_shortest_correct_and_reports_coverage(world, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_golden import shortest_correct

    recs = [{"correct": True, "finish_reason": "stop", "n_tokens": 9, "sample_index": 0, "response": "long"},
            {"correct": True, "finish_reason": "length", "n_tokens": 3, "sample_index": 1, "response": "truncated"},
            {"correct": False, "finish_reason": "stop", "n_tokens": 2, "sample_index": 2, "response": "wrong"},
            {"correct": True, "finish_reason": "stop", "n_tokens": 5, "sample_index": 3, "response": "short"}]
    assert shortest_correct(recs)["response"] == "short"
    assert shortest_correct(recs[1:3]) is None
    out = tmp_path / "golden.jsonl"
    proc = subprocess.run([sys.executable, "scripts/make_golden.py", "--teacher", str(world["teacher"]), "--data", str(world["train"]),
                           "--out", str(out), "--k", "2", "--limit", "4", "--max_new_tokens", "8", "--keep_missing"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "coverage: 0/4" in proc.stdout  # a random teacher writes nothing correct in 8 tokens
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and not any("solution" in r for r in rows)


def test_two_processes_gloo(world, tmp_path):
    """Several forwards (rollouts, golden responses, reference KL) before one backward, under DDP."""
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", "methods/stable_opd.py",
                           *args_for(world, tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "replicas in sync across 2 ranks" in proc.stdout
