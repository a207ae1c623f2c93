"""The vLLM rollout backend: a vLLM engine colocated in the training process.

`vllm` is imported inside `make_rollout_engine` only, never at import time. The colocated engine
(vLLM 0.33 API, read from its source):
  * built from the policy's config and tokenizer with `load_format="dummy"`: its weights only ever
    come from the trainer, through `sync_weights`, which must run before the first rollout, after every
    optimizer update and after a resume; `generate` refuses to sample from weights never synced;
  * in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`; under several ranks `distributed_executor_backend=
    "external_launcher"`, one engine per rank on its own GPU, tensor parallel 1), so weights are loaded
    with `LLM.apply_model(lambda m: m.load_weights(...))` straight from GPU tensors, no copies through
    files or sockets; FSDP2 (DTensor) and ZeRO-3 parameters are gathered one at a time (collective:
    every rank calls `sync_weights`);
  * with `sleep_level` 1 or 2, `enable_sleep_mode=True`: the engine releases its GPU memory (KV cache,
    and weights) after each rollout so the update has it, wakes its weights for a sync and its KV cache
    for the next rollout;
  * `check_sync` (debug) compares a few engine tensors with the trainer's after a sync.
"""

import torch

from common.rollout import Rollout, left_pad

_MASK64 = (1 << 64) - 1


class RolloutBackendError(RuntimeError):
    """A backend that cannot run here (vLLM not installed, no GPU)."""


# Wrapper names that DDP, torch.compile, FSDP and activation checkpointing put into parameter names.
_WRAPPER_PARTS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def request_seed(seed: int, index: int) -> int:
    """31-bit seed of prompt `index` in a call seeded `seed` (a splitmix64 mix). vLLM seeds the n samples
    of one request s, s + 1, ..., s + n - 1, so s = seed + index would share streams between neighbours."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0x7FFFFFFF


def rollout_from_outputs(outputs, prompts: list[list[int]], num_samples: int, tokenizer, with_logps: bool) -> Rollout:
    """A `Rollout` from vLLM `RequestOutput`s (one per prompt, in prompt order, `num_samples` each).

    vLLM's `token_ids` end with the stop token when one was sampled (finish_reason "stop"), so the mask
    covers every returned token, as the HF backend's does up to and including EOS. Log-probs: position t
    holds {token_id: Logprob} for the sampled token (SamplingParams(logprobs=0)).
    """
    if len(outputs) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(outputs)} requests for {len(prompts)} prompts")
    rows, completions, reasons, logps = [], [], [], []
    for prompt, request in zip(prompts, outputs):
        samples = sorted(request.outputs, key=lambda c: c.index)
        if len(samples) != num_samples:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for a prompt, expected {num_samples}")
        for c in samples:
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"a vLLM request finished with {c.finish_reason!r} (expected stop or length)")
            ids = list(c.token_ids)
            rows.append(prompt)
            completions.append(ids)
            reasons.append(c.finish_reason)
            if with_logps:
                if c.logprobs is None or len(c.logprobs) != len(ids):
                    raise RuntimeError("vLLM returned no sampled-token log-probs (SamplingParams.logprobs=0 missing?)")
                logps.append([c.logprobs[t][tok].logprob for t, tok in enumerate(ids)])
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad(rows, pad)
    width = max(1, max(len(c) for c in completions))
    completion_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    sampler_logps = torch.zeros((len(rows), width), dtype=torch.float32) if with_logps else None
    for i, ids in enumerate(completions):
        completion_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        completion_mask[i, : len(ids)] = 1
        if with_logps:
            sampler_logps[i, : len(ids)] = torch.tensor(logps[i], dtype=torch.float32)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, reasons, texts, sampler_logps)


def clean_param_name(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def full_parameters(model, names: set[str] | None = None):
    """Yield (name, full tensor) for the trainer's parameters, one at a time: FSDP2 (DTensor) shards are
    all-gathered and DeepSpeed ZeRO-3 partitions gathered, so this is collective under those: every rank
    must iterate it, with the same `names`. A yielded tensor is only valid until the next one is asked for."""
    from torch.distributed.tensor import DTensor

    for raw, param in model.named_parameters():
        name = clean_param_name(raw)
        if names is not None and name not in names:
            continue
        if hasattr(param, "ds_id"):  # DeepSpeed ZeRO-3: a partitioned parameter
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.data
        elif isinstance(param, DTensor):  # FSDP2
            yield name, param.full_tensor()
        else:
            yield name, param.detach()


def _rows_padded(engine_shape: tuple, trainer_shape: tuple) -> bool:
    """An engine tensor with extra rows (vLLM pads the vocabulary of embeddings / lm_head)."""
    return (len(engine_shape) == len(trainer_shape) > 1 and engine_shape[0] > trainer_shape[0]
            and engine_shape[1:] == trainer_shape[1:])


def _max_abs_diff(engine_param: torch.Tensor, trainer: torch.Tensor) -> float:
    """Max |engine - trainer| after casting the trainer tensor as a weight load does (padded rows ignored)."""
    t = trainer.to(engine_param.device, engine_param.dtype)
    e = engine_param[: t.shape[0]] if _rows_padded(tuple(engine_param.shape), tuple(t.shape)) else engine_param
    return float((e.float() - t.float()).abs().max())


class VLLMEngine:
    """A vLLM `LLM` colocated in this process (see the module docstring): the one stateful object of
    common/. It tracks which memory is asleep and whether its weights are the trainer's."""

    def __init__(self, llm, sampling_params_cls, *, sleep_level: int = 0, logps_source: str = "sampler",
                 check_sync: bool = False, synced: bool = False):
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0 (never sleep), 1 or 2, got {sleep_level}")
        if logps_source not in ("sampler", "trainer"):
            raise ValueError(f"logps_source must be sampler or trainer, got {logps_source!r}")
        self.llm, self.sampling_params_cls = llm, sampling_params_cls
        self.sleep_level, self.logps_source, self.check_after_sync = sleep_level, logps_source, check_sync
        self.asleep: set[str] = set()  # subset of {"weights", "kv_cache"}
        self.synced = synced  # engine weights == trainer weights (False: vLLM's dummy weights)
        self.last_check: dict[str, float] = {}

    def sleep(self) -> None:
        """Release the engine's GPU memory for the update (no-op with sleep_level 0 or when asleep)."""
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = {"weights", "kv_cache"}
            self.synced = self.synced and self.sleep_level == 1  # level 2 discards the weights

    def wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Re-allocate the sleeping memory among `tags` (vLLM resumes scheduling once all is awake)."""
        todo = [t for t in tags if t in self.asleep]
        if todo:
            if torch.cuda.is_available():  # return the update's cached blocks first, or the wake may not fit
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=todo)
            self.asleep -= set(todo)

    @torch.no_grad()
    def sync_weights(self, model) -> int:
        """Load the trainer's parameters (`accelerator.unwrap_model(model)`) into the engine; returns
        how many tensors were loaded. Collective under FSDP2 / ZeRO-3: call it on every rank."""
        self.wake(("weights",))  # the KV cache stays released until the next rollout
        n = 0
        for name, tensor in full_parameters(model):
            self.llm.apply_model(lambda m, item=(name, tensor): m.load_weights([item]))
            n += 1
        if "kv_cache" not in self.asleep:  # cached prefixes were computed with the old weights
            self.llm.reset_prefix_cache()
        self.synced = True
        if self.check_after_sync:
            self.last_check = self.check_sync(model)
        return n

    @torch.no_grad()
    def check_sync(self, model, n_tensors: int = 4, atol: float = 0.0) -> dict[str, float]:
        """Debug check: max |engine - trainer| on `n_tensors` parameters present in both under the same
        name (fused engine tensors such as qkv_proj are skipped); raises above `atol`."""
        self.wake(("weights",))
        shapes = self.llm.apply_model(lambda m: {k: tuple(v.shape) for k, v in m.named_parameters()})[0]
        trainer = [(clean_param_name(k), tuple(getattr(p, "ds_shape", p.shape))) for k, p in model.named_parameters()]
        common = [k for k, s in trainer if k in shapes and (shapes[k] == s or _rows_padded(shapes[k], s))]
        if not common:
            raise RuntimeError("no parameter name is shared by the engine and the trainer: cannot check the sync")
        k = min(n_tensors, len(common))  # spread over the model: first, last and evenly between
        picks = {common[round(i * (len(common) - 1) / max(1, k - 1))] for i in range(k)}
        diffs = {}
        for name, tensor in full_parameters(model, picks):
            diffs[name] = self.llm.apply_model(lambda m, name=name, t=tensor: _max_abs_diff(dict(m.named_parameters())[name], t))[0]
        bad = {k: v for k, v in diffs.items() if not v <= atol}
        if bad:
            raise RuntimeError(f"vLLM engine weights differ from the trainer's after a sync: {bad}")
        return diffs

    def generate(self, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, num_samples: int, temperature: float,
                 top_p: float, greedy: bool, seed: int | None, return_logps: bool, stop_token_ids: list[int],
                 top_k: int = 0) -> Rollout:
        """Sample with the engine (wakes it; the caller puts it to sleep before the update)."""
        if not self.synced:
            raise RuntimeError("the vLLM engine does not hold the trainer's weights: call sync_weights(model) after "
                               "building it, after every update, after a resume (and after a level-2 sleep)")
        self.wake()
        params = [self.sampling_params_cls(
            n=num_samples, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p, top_k=0 if greedy else top_k,
            max_tokens=max_new_tokens, stop_token_ids=list(stop_token_ids), logprobs=0 if return_logps else None,
            seed=None if seed is None else request_seed(seed, i), detokenize=False) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return rollout_from_outputs(outputs, prompts, num_samples, tokenizer, with_logps=return_logps)


def make_rollout_engine(backend: str, model, tokenizer=None, *, max_model_len: int | None = None,
                        gpu_memory_utilization: float = 0.3, sleep_level: int = 1, dtype: str = "bfloat16",
                        seed: int = 0, logps_source: str = "sampler", check_sync: bool = False,
                        enforce_eager: bool = False, process_index: int = 0, num_processes: int = 1,
                        workdir: str | None = None, **llm_kwargs) -> VLLMEngine | None:
    """None for backend "hf" (generate uses the model itself); for "vllm" an engine on this process's GPU.

    `model`: the trainer's (unwrapped) policy: the engine is built from its config with dummy weights and
    synced from it at once (collective under FSDP2 / ZeRO-3); or a checkpoint folder, which vLLM loads
    itself (evaluation). `gpu_memory_utilization` is the share of the whole GPU the engine may take
    (weights + KV cache): it must fit next to the trainer's models, which are loaded first.
    """
    if backend == "hf":
        return None
    if backend != "vllm":
        raise ValueError(f"unknown rollout backend {backend!r}; choose hf or vllm")
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise RolloutBackendError("the vLLM backend needs vllm (GPU machines only: pip install -r requirements-gpu.txt "
                                  "in a separate environment)") from e
    if not torch.cuda.is_available():
        raise RolloutBackendError("the vLLM backend needs a CUDA GPU; use the hf backend on CPU")
    import os
    import tempfile

    # In-process engine: apply_model then runs our loader on the worker's model directly (no pickling).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from_trainer = not isinstance(model, str)
    folder = model
    if from_trainer:  # vLLM needs a folder with config.json; the weights come from the trainer
        folder = workdir or tempfile.mkdtemp(prefix="vllm-engine-")
        model.config.save_pretrained(folder)
    kwargs = dict(model=folder, skip_tokenizer_init=True, load_format="dummy" if from_trainer else "auto", dtype=dtype,
                  gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed + process_index,
                  enable_sleep_mode=sleep_level > 0, enforce_eager=enforce_eager, logprobs_mode="processed_logprobs",
                  tensor_parallel_size=1,
                  # one engine per rank inside the ranks accelerate launched (torch.distributed already set up)
                  distributed_executor_backend="external_launcher" if num_processes > 1 else "uni")
    kwargs.update(llm_kwargs)
    llm = LLM(**kwargs)
    engine = VLLMEngine(llm, SamplingParams, sleep_level=sleep_level, logps_source=logps_source,
                        check_sync=check_sync, synced=not from_trainer)
    if from_trainer:
        engine.sync_weights(model)
    return engine
