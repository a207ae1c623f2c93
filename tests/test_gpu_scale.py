"""Issue 9 ("GPU scale") pieces that CPU can check: make_optimizer, frozen-model quantization guard, the
accelerate configs (ZeRO-2 training itself: tests/test_zero.py), requirements hygiene (no vllm on CPU), and the FSDP2 weight gather of the vLLM sync
on 2 real gloo ranks. GPU-only behaviour is scripts/gpu_smoke.sh's job."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from common.models import make_optimizer, load_model
from common.toy import toy_config_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
STUDENT = str(toy_config_path("student"))


def _one_step(opt, model):
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("name", ["adamw", "adamw_torch", "adamw8bit", "adamw_8bit"])
def test_make_optimizer_steps(name):
    if "8bit" in name:
        pytest.importorskip("bitsandbytes")
    model = load_model(STUDENT, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(model.parameters(), name, lr=1e-3, weight_decay=0.01)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.01
    _one_step(opt, model)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    big = max(model.parameters(), key=lambda p: p.numel())
    state = opt.state[big]
    if "8bit" in name:  # 8-bit moments: 1 byte per value (plus block-wise scales)
        assert state["state1"].dtype == torch.uint8
    else:
        assert state["exp_avg"].dtype == torch.float32
    assert type(opt).__name__ == ("AdamW8bit" if "8bit" in name else "AdamW")


def test_make_optimizer_errors(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer(params, "sgd")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="needs bitsandbytes"):
        make_optimizer(params, "adamw8bit")


def test_quantizing_a_config_model_is_refused_not_ignored():
    with pytest.raises(ValueError, match="needs a saved checkpoint folder"):
        load_model(STUDENT, quantization="4bit", trainable=False)
    with pytest.raises(ValueError, match="unknown quantization"):
        load_model(STUDENT, quantization="2bit", trainable=False)


EXPECTED = {"single_gpu": ("NO", None), "ddp": ("MULTI_GPU", None), "fsdp2": ("FSDP", 2), "zero2": ("DEEPSPEED", 2)}


def test_accelerate_configs_parse_and_launch_validates_them():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType

    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)
    for name, (dist_type, level) in EXPECTED.items():
        path = CONFIGS / f"{name}.yaml"
        text = path.read_text()
        # commented: launch line, and where the frozen teacher / reference and the rollouts go
        comments = " ".join(line for line in text.splitlines() if line.startswith("#")).lower()
        assert f"--config_file configs/accelerate/{name}.yaml" in comments, name
        assert "teacher" in comments and "reference" in comments and "rollout" in comments, name
        raw = yaml.safe_load(text)
        assert raw["distributed_type"] == dist_type and DistributedType(dist_type)
        ClusterConfig.from_yaml_file(yaml_file=str(path))  # accelerate's own loader: unknown keys raise
        args = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))[0]
        assert args.mixed_precision == "bf16"
        if dist_type == "FSDP":
            assert args.use_fsdp and str(args.fsdp_version) == "2"
        if dist_type == "DEEPSPEED":  # clipping and micro-batch come from the methods' flags (common/run.py)
            assert args.use_deepspeed and int(args.zero_stage) == level and args.gradient_clipping is None
            assert "train_micro_batch_size_per_gpu" in comments and "--max_grad_norm" in comments
        if dist_type == "FSDP":
            from accelerate.utils.launch import prepare_multi_gpu_env

            env = prepare_multi_gpu_env(args)
            assert env["FSDP_VERSION"] == "2" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"


def test_zero2_multinode_launchers():
    """docs/GPU.md section 3: across machines accelerate starts DeepSpeed through pdsh unless told
    --deepspeed_multinode_launcher standard (then torchrun on each machine, as for DDP / FSDP2)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    base = ["--config_file", str(CONFIGS / "zero2.yaml"), "--num_machines", "2", "--machine_rank", "1",
            "--num_processes", "16", "--main_process_ip", "10.0.0.1", "--main_process_port", "29500"]
    cmds = {}
    for extra in ([], ["--deepspeed_multinode_launcher", "standard"]):
        args = _validate_launch_command(launch_command_parser().parse_args([*base, *extra, "x.py"]))[0]
        args.deepspeed_fields_from_accelerate_config = ""  # set by launch_command before this call
        cmds[bool(extra)], env = prepare_deepspeed_cmd_env(args)
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
        assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"
    assert cmds[False][:1] == ["deepspeed"] and cmds[False][cmds[False].index("--launcher") + 1] == "pdsh"
    assert cmds[True] is None  # standard: no deepspeed runner; accelerate calls torch.distributed.run itself


def test_requirements_keep_vllm_off_cpu_and_rollout_does_not_import_it():
    cpu = (ROOT / "requirements.txt").read_text().lower()
    gpu = (ROOT / "requirements-gpu.txt").read_text().lower()
    assert "vllm" not in [line.split("==")[0].strip() for line in cpu.splitlines() if not line.startswith("#")]
    assert "vllm==0.33.0" in gpu and "deepspeed==" in gpu and "torch==2.14.0" in gpu
    code = "import sys, common.rollout, common.vllm_engine, eval.evaluate; assert 'vllm' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


FSDP2_WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, os.getcwd())

    def run(rank, world, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor
        from common.models import load_model
        from common.vllm_engine import full_parameters
        from common.toy import toy_config_path
        model = load_model(str(toy_config_path("student")), seed=0)
        ref = {k: v.detach().clone() for k, v in model.named_parameters()}
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        p = next(model.parameters())
        assert isinstance(p, DTensor) and p.to_local().shape[0] < p.shape[0], "not sharded"
        got = dict(full_parameters(model))  # collective: both ranks gather every parameter in the same order
        assert sorted(got) == sorted(ref)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
        one = dict(full_parameters(model, {"model.norm.weight"}))
        assert list(one) == ["model.norm.weight"] and torch.equal(one["model.norm.weight"], ref["model.norm.weight"])
        dist.barrier()
        if rank == 0:
            print("FSDP2 gather ok", flush=True)
        dist.destroy_process_group()

    if __name__ == "__main__":
        import socket
        import torch.multiprocessing as mp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(run, args=(2, port), nprocs=2)
""")


def test_fsdp2_weight_gather_on_two_ranks(tmp_path):
    """full_parameters (the vLLM sync's source) all-gathers real FSDP2 shards into the unsharded weights."""
    script = tmp_path / "fsdp2_gather.py"
    script.write_text(FSDP2_WORKER)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert "FSDP2 gather ok" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def _tiny_qwen(monkeypatch, gs):
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    monkeypatch.setattr(gs, "QWEN25_1_5B", {**gs.QWEN25_1_5B, **tiny})
    monkeypatch.setattr(gs, "QWEN25_7B", {**gs.QWEN25_7B, **tiny, "hidden_size": 48, "intermediate_size": 96})


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_gpu_smoke_step_code_runs_on_cpu_with_tiny_models(backend, monkeypatch, tmp_path):
    """A dry run of scripts/gpu_smoke.py's step on CPU (tiny widths, the real vocabularies); the vLLM row
    with the fake engine of test_vllm_backend, so the sleep / sync / check sequence of the script runs."""
    from scripts import gpu_smoke as gs
    from tests.test_vllm_backend import FakeLLM, FakeSamplingParams

    from common.vllm_engine import VLLMEngine

    _tiny_qwen(monkeypatch, gs)
    built = []

    def fake_engine(backend_, model, tok, **kw):
        fp32 = next(model.parameters()).dtype == torch.float32  # the probe's tolerance follows the dtype, as make_rollout_engine's
        engine = VLLMEngine(FakeLLM(model, vocab=gs.n_ids()), FakeSamplingParams, sleep_level=kw["sleep_level"],
                            check_sync=kw["check_sync"], probe_atol=1e-3 if fp32 else 0.25)
        engine.sync_weights(model)
        built.append(engine)
        return engine

    monkeypatch.setattr(gs, "make_rollout_engine", fake_engine)
    a = gs.parse_args(["--device", "cpu", "--prompts", "2", "--samples", "2", "--length", "6", "--prompt_len", "4",
                       "--micro_batch", "2", "--work", str(tmp_path)])
    row = gs.bench_step(a, backend)
    assert row["shape"] == "2x2x6" and row["step_s"] > 0 and 1 <= row["mean_len"] <= 6
    if backend == "vllm":
        tensors = {k: v for k, v in built[0].last_check.items() if k != "probe_logprobs"}  # the probe: bf16 noise
        assert row["sync_check"].startswith("max|diff|") and tensors and max(tensors.values()) == 0.0
        assert built[0].last_check["probe_logprobs"] <= 0.25 and built[0].asleep == set()  # the probe's prefill woke the KV cache
        names = built[0].llm.call_names()
        # 2 rollouts + one probe prefill per checked sync (the engine's first sync and one per step)
        assert names.count("generate") == 2 + 3 and names.count("sleep1") == 2
    else:
        assert row["sync_check"] == "-"
    assert "| part |" in gs.print_table([row])


def test_gpu_smoke_assets_tokenizer_fits_both_models(tmp_path):
    from common.data import encode_prompts, load_rows
    from common.models import load_tokenizer
    from scripts import gpu_smoke as gs

    paths = gs.write_assets(tmp_path, n_rows=3, prompt_len=5, solution_len=7)
    tok = load_tokenizer(paths["student"])
    assert tok.get_vocab() == load_tokenizer(paths["teacher"]).get_vocab()
    assert tok.eos_token_id == tok.pad_token_id == gs.N_WORDS and tok("w5 w6")["input_ids"] == [5, 6]
    assert len(tok) <= min(gs.QWEN25_1_5B["vocab_size"], gs.QWEN25_7B["vocab_size"])
    rows = load_rows(paths["data"])
    assert len(rows) == 3 and all(len(p) >= 5 for p in encode_prompts(tok, rows, "plain", ""))
