"""A memory and time model of one training step, per phase and per device, from model configs alone (issue 29).

    plan(args, method, student_cfg, teacher_cfg=None, ref_cfg=None, gpu="h100-80gb", num_processes=1) -> Plan
    plan_for_args(args, method)        # the configs read with AutoConfig from the Args' model paths (no weights)
    python -m common.plan --config recipes/paper/stable_opd_1.5b.yaml [--gpu h200-141gb --num_processes 4]

A Plan holds, for every phase of a step (rollout, teacher scoring, reference, update, optimizer step), the bytes per
device of each part live at that phase's peak, its FLOPs and a predicted time from HARDWARE; `Plan.summary()` is one
screen, `Plan.fits` whether the peak fits the device, `Plan.refusal()` the one-line reason naming the phase and the
flags that would fix it. `choose_micro_batch_tokens` picks the largest --micro_batch_tokens whose plan fits.
Model shapes come from transformers configs, dicts or KNOWN_CONFIGS (Qwen2.5-Math-1.5B / 7B and the paper's 7B
teachers, written from their published config.json values): nothing is downloaded, no weights are loaded.

Assumptions (the model is approximate; scripts/bench_plan.py checks it against the OS's peak RSS on CPU):
  1. Worst-case shapes: every prompt has max_prompt_length tokens and every completion max_completion_length (a
     truncation collapse does exactly that), so a forward of n rows holds n x (prompt + completion) tokens.
  2. Activations per token of a Qwen2 / Llama decoder layer, with a = bytes of the matmul outputs (2 under bf16
     autocast or bf16 weights, else 4) and r = bytes of the residual stream (the weights' dtype): kept for the
     backward r * 6H + a * (3H + 2 KV + 4I) (+ a * 2H of casts under autocast over fp32 weights: `_layer_act`
     counts them tensor by tensor); with gradient checkpointing only the layer inputs (r * H per layer)
     plus one layer's activations during its recomputation; a frozen (no-grad) forward holds r * 3H + a * max(3I,
     4H + 2 KV). Attention is flash / memory-efficient (no [S, S] scores); the [rows, 1, S, S] bool mask is counted
     (plus its fp32 copy inside the CPU kernel).
  3. The lm_head is chunked (common/logprobs.py, common/losses.py): [chunk, V] fp32 buffers of the `auto_chunk`
     budget, a full [V, H] weight-gradient buffer in the update (SFT's `nll` too, since 2026-12-08: before, it
     built the [rows, S, V] logits, their fp32 copy and log-softmax at the completion positions).
  4. AdamW keeps 2 moments in the parameters' dtype (adamw8bit: 2 bytes per parameter); on a GPU the foreach step
     adds one temporary of that size. DDP adds gradient buckets (one more copy of the gradients); FSDP2 shards the
     student's weights, gradients and optimizer state (and gathers one layer); ZeRO-2 shards gradients and state.
  5. A vLLM engine takes vllm_gpu_memory_utilization x the device while awake (weights in bf16 + KV cache), and
     ASLEEP_ENGINE_BYTES asleep; it is built after the trainer's models, which stay resident during the rollout.
     A colocated teacher engine (--teacher_backend vllm) holds teacher_vllm_gpu_memory_utilization x the device all
     run (cpu: its weights + VLLM_CPU_KVCACHE_SPACE GiB); its scoring is not timed. Teacher and reference are
     replicated (never sharded); 4-/8-bit quantization covers their linear layers, not the embeddings or the lm_head.
  6. Time: matmul FLOPs / (peak x mfu); decode steps read the engine's weights and KV cache at bandwidth x
     decode_eff (HF generate adds a per-layer overhead per token); gradient all-reduce at `interconnect`. The GPU
     efficiencies are stated guesses (not measured here); the "cpu" entry is calibrated on the 2-core CI machine.
  7. Not modelled: the CUDA caching allocator's fragmentation (`Hardware.reserved` covers context, NCCL and cuBLAS
     workspaces only), eval steps, checkpoint saves, the first step (no optimizer state yet: it is smaller), golden
     responses longer than the rollouts' width, Stable-OPD's --mix_loss *_kl teacher pass on golden rows.
Checked (scripts/bench_plan.py, 11 CPU configurations): peak memory -11%..+10% of the OS's peak RSS; step time with
the "cpu" entry fitted to those runs -84%..+17% (the cores were shared, load 5-10). Nothing is checked on a GPU.
The lead's entry point: `plan_for_args(args, method)`; with --micro_batch_tokens 0 its `.micro_batch_tokens` is the
budget `choose_micro_batch_tokens` picked, `.summary()` the start-up screen, `.refusal()` None or the error line.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

GiB = 2**30
CHUNK_BUDGET_BYTES = 256 * 2**20  # common/logprobs.py: the [chunk, V] fp32 buffers of one head block
ASLEEP_ENGINE_BYTES = 1 * GiB  # a sleeping vLLM engine: CUDA graphs and its allocator's pools (assumed)
METHODS = ("sft", "grpo", "opd", "stable_opd")


# ----------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer (Qwen2 / Llama layout: q/k/v/o, gated MLP, RMSNorm)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int = 0  # 0 = hidden // heads
    qkv_bias: bool = True
    name: str = ""

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    @property
    def layer_params(self) -> int:
        H, q, kv = self.hidden, self.heads * self.hd, self.kv_dim
        bias = (q + 2 * kv) if self.qkv_bias else 0
        return 2 * H * q + 2 * H * kv + bias + 3 * H * self.intermediate + 2 * H

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder layers' linear weights (what bitsandbytes quantizes)."""
        H, q, kv = self.hidden, self.heads * self.hd, self.kv_dim
        return self.layers * (2 * H * q + 2 * H * kv + 3 * H * self.intermediate)

    @property
    def body_params(self) -> int:
        return self.layers * self.layer_params + self.hidden

    @property
    def params(self) -> int:
        return self.body_params + self.vocab * self.hidden * (1 if self.tied else 2)

    def lora_params(self, r: int) -> int:
        """Adapter parameters of all-linear LoRA (q, k, v, o, gate, up, down in every layer)."""
        H, q, kv, inter = self.hidden, self.heads * self.hd, self.kv_dim, self.intermediate
        return self.layers * r * ((H + q) * 2 + (H + kv) * 2 + (H + inter) * 3)


# config.json values of the paper's models, from their published configs (Hugging Face model cards)
KNOWN_CONFIGS = {
    "Qwen/Qwen2.5-Math-1.5B": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                               "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                               "tie_word_embeddings": True, "max_position_embeddings": 4096},
    "Qwen/Qwen2.5-Math-7B": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                             "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                             "tie_word_embeddings": False, "max_position_embeddings": 4096},
    "open-thoughts/OpenThinker3-7B": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                      "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                                      "tie_word_embeddings": False, "max_position_embeddings": 32768},
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": {"hidden_size": 3584, "intermediate_size": 18944,
                                                "num_hidden_layers": 28, "num_attention_heads": 28,
                                                "num_key_value_heads": 4, "vocab_size": 152064,
                                                "tie_word_embeddings": False, "max_position_embeddings": 131072},
}
# the recipes' own outputs have their base model's shape
KNOWN_CONFIGS["runs/paper/sft_1.5b/final"] = KNOWN_CONFIGS["Qwen/Qwen2.5-Math-1.5B"]
KNOWN_CONFIGS["runs/paper/sft_7b/final"] = KNOWN_CONFIGS["Qwen/Qwen2.5-Math-7B"]


def shape_of(cfg, name: str = "") -> Shape:
    """A Shape from a Shape, a config dict, a transformers config, a KNOWN_CONFIGS name, or a config.json / model
    folder (read with AutoConfig: no weights)."""
    if isinstance(cfg, Shape):
        return cfg
    if isinstance(cfg, (str, Path)):
        name = name or str(cfg)
        path = Path(cfg)
        real = path.is_file() or (path / "config.json").is_file()  # a folder or file here wins over a known name
        cfg = _read_config(str(cfg)) if real or str(cfg) not in KNOWN_CONFIGS else KNOWN_CONFIGS[str(cfg)]
    get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    sub = get("text_config")
    if sub is not None:
        return shape_of(sub, name)
    heads = int(get("num_attention_heads"))
    return Shape(hidden=int(get("hidden_size")), intermediate=int(get("intermediate_size")),
                 layers=int(get("num_hidden_layers")), heads=heads, kv_heads=int(get("num_key_value_heads") or heads),
                 vocab=int(get("vocab_size")), tied=bool(get("tie_word_embeddings", False)),
                 head_dim=int(get("head_dim") or 0), name=name)


def _read_config(path: str) -> dict:
    p = Path(path)
    if p.is_file():
        return json.loads(p.read_text())
    if (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text())
    from transformers import AutoConfig  # a hub id in the local cache (HF_HUB_OFFLINE: nothing is downloaded)

    return AutoConfig.from_pretrained(path).to_dict()


# --------------------------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Hardware:
    name: str
    memory: int  # bytes per device
    peak_flops: float  # dense bf16 FLOP/s (GPUs); measured fp32 GEMM FLOP/s (cpu)
    bandwidth: float  # memory bytes/s
    mfu: float  # fraction of peak_flops reached by the step's matmuls (long sequences)
    decode_eff: float  # fraction of bandwidth reached by a decode step
    hf_token_overhead_s: float  # HF generate: fixed seconds per generated token per layer (kernel launches, Python)
    reserved: int  # bytes not available to tensors (CUDA context, NCCL, cuBLAS workspace; on cpu the process base)
    interconnect: float = 300e9  # all-reduce bus bytes/s (NVLink)
    gpu: bool = True
    hf_token_base_s: float = 5e-3  # HF generate + our sampler: fixed seconds per generated token
    hf_token_row_s: float = 0.0  # ... and per row per generated token
    hf_token_vocab_s: float = 0.0  # ... and per vocabulary entry per generated token (the sampler's [B, V] passes)
    call_s: float = 2e-3  # fixed seconds per forward (+ backward) call of a model (Python, autograd, dispatch)
    tokenizer_bytes: float = 0.0  # host bytes per vocabulary entry of a loaded tokenizer (counted on cpu only)


HARDWARE = {
    # NVIDIA datasheets: H100 SXM 80 GB (989 TFLOP/s dense bf16, 3.35 TB/s), H200 141 GB (989 TFLOP/s, 4.8 TB/s).
    # mfu / decode_eff / overheads: guesses, not measured (no GPU run of this model yet).
    "h100-80gb": Hardware("h100-80gb", 80 * GiB, 989e12, 3.35e12, 0.40, 0.6, 2.5e-4, int(1.5 * GiB)),
    "h200-141gb": Hardware("h200-141gb", 140 * GiB, 989e12, 4.8e12, 0.40, 0.6, 2.5e-4, int(1.5 * GiB)),
    # the 2-core CI machine (AVX2 EPYC, 24 GiB): fp32 GEMM 100-150 GFLOP/s and a 64 MB copy at 45 GB/s when idle;
    # `reserved` = the peak RSS of the smallest run of scripts/bench_plan.py (c0: tensors ~1 MB), tokenizer_bytes
    # from two Qwen tokenizers loaded (+270 MB). The time constants (mfu, decode_eff, call_s, hf_token_*) are a
    # least-squares fit (relative errors) to the bench's 9 runs of 2026-12-08, taken at load average 5-10 on the 2
    # cores (other jobs): 16 GFLOP/s effective, 0.36 GB/s effective decode reads (OpenMP threads descheduled).
    "cpu": Hardware("cpu", 24 * GiB, 120e9, 20e9, 0.136, 0.018, 0.0, int(0.47 * GiB), gpu=False,
                    hf_token_base_s=0.0375, hf_token_row_s=3.5e-4, hf_token_vocab_s=6.3e-7, call_s=0.02,
                    tokenizer_bytes=890.0),
}


def _bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _frozen_bytes(s: Shape, dtype: str, quant: str) -> int:
    """Weights of a frozen model: quantized linear layers (bitsandbytes nf4 ~0.53 bytes / int8 ~1.02 bytes per
    weight with their scales), everything else in `dtype`."""
    if quant == "none":
        return s.params * _bytes(dtype)
    per = {"4bit": 0.53, "8bit": 1.02}[quant]
    return int(s.linear_params * per + (s.params - s.linear_params) * _bytes(dtype))


# ------------------------------------------------------------------------------------------------- plan
@dataclass
class Phase:
    name: str
    parts: dict  # what is live at this phase's peak: name -> bytes per device
    flops: float = 0.0
    seconds: float = 0.0
    note: str = ""
    fix: str = ""  # the flags that shrink this phase

    @property
    def peak(self) -> int:
        return int(sum(self.parts.values()))


@dataclass
class Plan:
    method: str
    hardware: Hardware
    num_processes: int
    strategy: str
    phases: list
    micro_batch_tokens: int  # the budget planned (0: one pass)
    chosen: bool = False  # the budget was chosen by choose_micro_batch_tokens (--micro_batch_tokens 0)
    notes: list = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases)

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.peak)

    @property
    def fits(self) -> bool:
        return self.peak <= self.hardware.memory

    @property
    def step_seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    def refusal(self) -> str | None:
        """None when the plan fits; else one line: the phase, its peak against the device, its largest parts, the
        flags that would fix it."""
        if self.fits:
            return None
        ph = self.peak_phase
        top = ", ".join(f"{k} {v / GiB:.1f}" for k, v in sorted(ph.parts.items(), key=lambda kv: -kv[1])[:3])
        return (f"predicted peak {ph.peak / GiB:.1f} GiB per device in phase '{ph.name}' exceeds "
                f"{self.hardware.name}'s "
                f"{self.hardware.memory / GiB:.0f} GiB (largest parts, GiB: {top}); try {ph.fix}")

    def summary(self) -> str:
        hw = self.hardware
        budget = f"{self.micro_batch_tokens:,}" if self.micro_batch_tokens else "0 (one pass)"
        lines = [f"memory / time plan: {self.method} on {self.num_processes} x {hw.name} ({self.strategy}), "
                 f"--micro_batch_tokens {budget}{' (chosen)' if self.chosen else ''}",
                 f"{'phase':<12} {'peak GiB':>9} {'TFLOP':>9} {'time s':>9}  largest parts (GiB)"]
        for p in self.phases:
            top = ", ".join(f"{k} {v / GiB:.2f}" for k, v in sorted(p.parts.items(), key=lambda kv: -kv[1])[:4])
            lines.append(f"{p.name:<12} {p.peak / GiB:>9.2f} {p.flops / 1e12:>9.2f} {p.seconds:>9.2f}  {top}")
            if p.note:
                lines.append(f"{'':<12} {p.note}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"peak {self.peak / GiB:.2f} GiB of {hw.memory / GiB:.0f} GiB in '{self.peak_phase.name}': "
                     f"{verdict}; predicted step {self.step_seconds:.1f} s")
        lines += self.notes
        return "\n".join(lines)


def _get(args, key, default):
    return getattr(args, key, default) if not isinstance(args, dict) else args.get(key, default)


@dataclass
class _Ctx:
    """What every phase reads: the args' numbers resolved once."""
    args: object
    method: str
    hw: Hardware
    n: int
    strategy: str
    s: Shape
    t: Shape | None
    r: Shape | None
    budget: int
    te: Shape | None = None  # the teacher in a colocated vLLM engine (--teacher_backend vllm)

    def __post_init__(self):
        g = lambda k, d: _get(self.args, k, d)  # noqa: E731
        self.dtype = g("dtype", "float32")
        self.w = _bytes(self.dtype)
        self.a = 2 if (g("bf16", False) or self.dtype == "bfloat16") else 4
        self.ckpt = bool(g("gradient_checkpointing", False))
        self.lora = bool(g("use_peft", False))
        self.Lp = int(g("max_prompt_length", 256))
        self.T = int(g("max_completion_length", 128))
        self.S = self.Lp + self.T
        self.P, self.G = int(g("per_device_prompts", 16)), int(g("num_generations", 4))
        self.B = self.P * self.G
        self.sampled = g("loss_type", "sampled") == "sampled"
        self.optim = g("optim", "adamw")


def _layer_act(c: _Ctx, s: Shape) -> float:
    """Bytes per token a decoder layer keeps for its backward (assumption 2): in the residual's dtype its input, the
    mid-layer residual and both RMSNorms' normalised values and outputs (6H); in the matmuls' dtype q, the attention
    output and its reshaped copy (3H), k and v (2 KV), gate, silu(gate), up and their product (4I); under autocast
    with fp32 weights also the bf16 casts of the two norms' outputs (2H)."""
    cast = 2 * s.hidden * c.a if (c.a == 2 and c.w == 4) else 0
    return c.w * 6 * s.hidden + c.a * (3 * s.hidden + 2 * s.kv_dim + 4 * s.intermediate) + cast


def _nograd_act(c: _Ctx, s: Shape, w: int) -> float:
    """Bytes per token at the peak of one layer of a frozen forward (residual in w bytes; matmul outputs in 2 under
    autocast or with 2-byte weights)."""
    a = 2 if 2 in (c.a, w) else 4
    return w * 3 * s.hidden + a * max(3 * s.intermediate, 4 * s.hidden + 2 * s.kv_dim)


def _mask(c: _Ctx, rows: int, S: int) -> int:
    return rows * S * S * (1 + (0 if c.hw.gpu else 4))


def _head_bufs(positions: int, vocab: int, copies: int, nbuf: int) -> int:
    chunk = max(16, CHUNK_BUDGET_BYTES // (4 * vocab * copies))
    return min(chunk, max(positions, 1)) * vocab * 4 * nbuf


def _fwd_flops(s: Shape, tokens: float, S: int, head_positions: float) -> float:
    """Forward FLOPs of `tokens` tokens in sequences of S (causal attention) and the head on `head_positions`."""
    return 2 * s.body_params * tokens + 2 * s.layers * s.hidden * S * tokens + 2 * s.hidden * s.vocab * head_positions


def _secs(c: _Ctx, flops: float) -> float:
    return flops / (c.hw.peak_flops * c.hw.mfu)


def _student_state(c: _Ctx) -> dict:
    """Resident bytes of the trained model: weights, optimizer state, and the gradients (update phase only)."""
    s, n, st = c.s, c.n, c.strategy
    trainable = s.lora_params(int(_get(c.args, "lora_r", 16))) if c.lora else s.params
    shard_w = n if st == "fsdp" else 1
    shard_g = n if st in ("fsdp", "zero2") else 1
    weights = s.params * c.w / shard_w + (trainable * c.w if c.lora else 0)
    if st == "fsdp" and n > 1:
        weights += s.layer_params * c.w  # one layer gathered at a time
    per_state = 2 if c.optim in ("adamw8bit", "adamw_8bit") else 2 * c.w
    return {"weights": weights, "grads": trainable * c.w / shard_g, "optimizer": trainable * per_state / shard_g,
            "trainable": trainable, "ddp_buckets": trainable * c.w if (st == "ddp" and n > 1) else 0}


def _frozen(c: _Ctx) -> dict:
    """Resident frozen models: the teacher and the reference (none for a LoRA student's own base)."""
    g = lambda k, d: _get(c.args, k, d)  # noqa: E731
    out = {}
    if c.t is not None:
        out["teacher"] = _frozen_bytes(c.t, g("teacher_dtype", "") or c.dtype, g("teacher_quantization", "none"))
    if c.r is not None:
        out["reference"] = _frozen_bytes(c.r, c.dtype, g("ref_quantization", "none"))
    if c.te is not None:  # GPU: the engine's share (weights + KV cache); cpu: its weights + VLLM_CPU_KVCACHE_SPACE
        out["teacher vllm engine"] = (float(g("teacher_vllm_gpu_memory_utilization", 0.3)) * c.hw.memory if c.hw.gpu
                                      else _frozen_bytes(c.te, g("teacher_dtype", "") or c.dtype, "none")
                                      + float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) * GiB)
    return out


def _rollout(c: _Ctx, resident: dict) -> Phase:
    g = lambda k, d: _get(c.args, k, d)  # noqa: E731
    s, hw = c.s, c.hw
    ctx_mean = c.Lp + c.T / 2
    decode_flops = c.B * c.T * (2 * s.body_params + 2 * s.hidden * s.vocab + 4 * s.layers * s.hidden * ctx_mean)
    prefill = _fwd_flops(s, c.B * c.Lp, c.Lp, c.B)
    kv_tok = 2 * s.layers * s.kv_dim
    parts = dict(resident)
    if g("rollout_backend", "hf") == "vllm":
        util = float(g("vllm_gpu_memory_utilization", 0.3))
        eng_w = 2 if (g("bf16", False) or c.dtype == "bfloat16") else c.w
        engine = util * hw.memory
        parts["vllm engine"] = engine
        kv_cap = max(0.0, engine - s.params * eng_w - 1 * GiB)  # its weights and ~1 GiB of activations / graphs
        seqs = kv_cap / (kv_tok * eng_w * c.S)
        waves = max(1, math.ceil(c.B / max(seqs, 1e-9))) if seqs >= 1 else float("inf")
        read = s.params * eng_w + min(c.B, max(seqs, 1)) * kv_tok * eng_w * ctx_mean  # weights + KV per step
        per_step = read / (hw.bandwidth * hw.decode_eff)
        secs = c.T * per_step * (waves if math.isfinite(waves) else 1) + _secs(c, prefill + decode_flops) * 0.25
        note = (f"vLLM: KV cache for {seqs:.0f} of {c.B} full sequences ({c.S:,} tokens)" +
                ("" if seqs >= c.B else f": {waves if math.isfinite(waves) else 'no'} waves (slower, not an OOM)"))
        fix = "--vllm_gpu_memory_utilization lower, --teacher_quantization 8bit|4bit, --teacher_dtype bfloat16, "
        fix += "--optim adamw8bit, FSDP2 (configs/accelerate/fsdp2.yaml)"
        return Phase("rollout", parts, prefill + decode_flops, secs, note, fix)
    # HF generate on the trained model: a KV cache in its dtype for all B rows, a few [B, V] fp32 blocks per token,
    # the prefill's no-grad activations
    parts["kv cache"] = c.B * c.S * kv_tok * c.w
    parts["prefill activations"] = c.B * c.Lp * _nograd_act(c, s, c.w) + _mask(c, c.B, c.Lp)
    parts["logits blocks"] = 4 * c.B * s.vocab * 4
    read = s.params * c.w + c.B * kv_tok * c.w * ctx_mean  # weights + KV cache per generated token
    per_token = (hw.hf_token_base_s + s.layers * hw.hf_token_overhead_s + c.B * hw.hf_token_row_s
                 + s.vocab * hw.hf_token_vocab_s + read / (hw.bandwidth * hw.decode_eff))
    secs = c.T * per_token + _secs(c, prefill + decode_flops)
    return Phase("rollout", parts, prefill + decode_flops, secs, "HF generate (all rows at once)",
                 "--rollout_backend vllm, --per_device_prompts lower, --max_completion_length lower")


def _scoring(c: _Ctx, resident: dict, model: Shape, w: int, name: str, hidden_kept: bool, rows: int, fix: str) -> Phase:
    """A frozen model's teacher-forced pass over `rows` rows in micro-batches of the budget (scored_forward)."""
    mb = rows if c.budget <= 0 else max(1, min(rows, c.budget // c.S))
    parts = dict(resident)
    parts[f"{name} activations"] = mb * c.S * _nograd_act(c, model, w) + _mask(c, mb, c.S)
    parts[f"{name} head buffers"] = _head_bufs(mb * c.T, model.vocab, 3, 2)
    parts[f"{name} outputs"] = rows * c.T * 4 * 3  # log-probs, eos log-probs, masks [B, T] fp32
    if hidden_kept:  # full-vocabulary losses keep the final hidden states of every row; torch.cat doubles them once
        parts[f"{name} hidden states"] = 2 * rows * c.T * model.hidden * w
    flops = _fwd_flops(model, rows * c.S, c.S, rows * c.T)
    note = f"{mb} of {rows} rows per forward" if mb < rows else ""
    return Phase(name, parts, flops, _secs(c, flops) + math.ceil(rows / mb) * c.hw.call_s, note, fix)


def _update(c: _Ctx, resident: dict, st: dict, rows_per_group: int, extra: dict, head_copies: int, head_nbuf: int,
            head_factor: float, extra_flops: float) -> list:
    """The student's forward ("update fwd": its end, the head's gradient computed in it) and backward ("update bwd")
    of one micro-batch of whole prompt groups, and the FLOPs / time of all ppo_epochs x num_minibatches optimizer
    steps of the rollout batch (on the backward phase)."""
    s = c.s
    groups = c.P if c.budget <= 0 else max(1, min(c.P, c.budget // (rows_per_group * c.S)))
    mb_rows = groups * rows_per_group
    tok = mb_rows * c.S
    both = {**resident, "grads": st["grads"]}  # earlier micro-batches' gradients (conservative for the first)
    if st["ddp_buckets"]:
        both["ddp buckets"] = st["ddp_buckets"]
    both["attention mask"] = _mask(c, mb_rows, c.S)
    both.update(extra)
    kept = tok * s.layers * (c.w * s.hidden if c.ckpt else _layer_act(c, s))  # layer inputs, or everything
    fwd = {**both, "activations": kept}
    if c.a == 2 and c.w == 4 and c.hw.gpu and c.strategy != "fsdp":  # FSDP2 gathers bf16 copies itself (mp policy)
        fwd["autocast weight copies"] = st["trainable"] * 2  # autocast caches casts of trainable leaves until exit
    head_pos = mb_rows * c.T
    fwd["head buffers"] = _head_bufs(head_pos, s.vocab, head_copies, head_nbuf)
    fwd["head hidden + grad"] = 2 * head_pos * s.hidden * c.w
    if not c.lora:
        fwd["head weight-grad buffer"] = s.vocab * s.hidden * c.w
    bwd = {**both, "activations": kept + tok * _layer_act(c, s) * (1 if c.ckpt else 0.5)}  # a layer recomputed / grads
    if not c.lora:
        bwd["head weight-grad buffer"] = s.vocab * s.hidden * c.w
    rows_all = c.P * rows_per_group
    body = _fwd_flops(s, rows_all * c.S, c.S, 0) * (4 if c.ckpt else 3)
    head = 2 * s.hidden * s.vocab * rows_all * c.T * head_factor
    epochs = int(_get(c.args, "ppo_epochs", 1))
    flops = (body + head + extra_flops) * epochs
    n_steps = epochs * int(_get(c.args, "num_minibatches", 1))
    calls = epochs * math.ceil(c.P / groups) * 2
    secs = _secs(c, flops) + n_steps * _opt_secs(c, st) + calls * c.hw.call_s
    note = f"{groups} of {c.P} prompt groups ({mb_rows} rows) per micro-batch" if groups < c.P else ""
    fix = ("--micro_batch_tokens lower (the update holds at least one prompt group), --gradient_checkpointing true, "
           "--optim adamw8bit, --use_peft true, --max_completion_length lower, FSDP2")
    return [Phase("update fwd", fwd, 0.0, 0.0, note, fix), Phase("update bwd", bwd, flops, secs, "", fix)]


def _opt_secs(c: _Ctx, st: dict) -> float:
    """One optimizer step: AdamW reads and writes weights, gradients and moments; the gradient all-reduce."""
    moved = st["trainable"] * (c.w * 3 + 2 * (st["optimizer"] / max(st["trainable"], 1))) * 2
    secs = moved / c.hw.bandwidth
    if c.n > 1:
        secs += 2 * (c.n - 1) / c.n * st["trainable"] * c.w / c.hw.interconnect
    return secs


def _optimizer(c: _Ctx, resident: dict, st: dict) -> Phase:
    parts = dict(resident)
    parts["grads"] = st["grads"]
    if c.hw.gpu:
        parts["foreach temporaries"] = st["optimizer"] / 2
    return Phase("optimizer", parts, 0.0, 0.0, "", "--optim adamw8bit, FSDP2 / ZeRO-2 (shards gradients and state)")


def plan(args, method: str, student_cfg, teacher_cfg=None, ref_cfg=None, gpu: str = "h100-80gb",
         num_processes: int = 1, strategy: str = "ddp", choose: bool = True) -> Plan:
    """The memory / time plan of one step of `method` (sft, grpo, opd, stable_opd) with these Args, per device.
    teacher_cfg: opd / stable_opd; ref_cfg: grpo with beta > 0, stable_opd with ref_kl_coef > 0 (None: the student's
    shape, as the paper's reference is the student's start; a LoRA student's reference is its own base, no copy).
    strategy: ddp, fsdp (FSDP2) or zero2. With --micro_batch_tokens 0 and `choose`, the budget is chosen."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    hw = HARDWARE[gpu] if isinstance(gpu, str) else gpu
    s = shape_of(student_cfg)
    backend = _get(args, "teacher_backend", "hf") if method in ("opd", "stable_opd") else "hf"
    served = backend != "hf"  # server: on its own GPUs, nothing of it here; vllm: in its engine's memory (`_frozen`)
    t = shape_of(teacher_cfg) if teacher_cfg is not None and method in ("opd", "stable_opd") and not served else None
    te = shape_of(teacher_cfg) if teacher_cfg is not None and backend == "vllm" else None
    use_ref = (method == "grpo" and float(_get(args, "beta", 0.0)) > 0) or (
        method == "stable_opd" and float(_get(args, "ref_kl_coef", 0.01)) > 0)
    lora = bool(_get(args, "use_peft", False))
    r = None if not use_ref or lora else shape_of(ref_cfg) if ref_cfg is not None else s
    budget = int(_get(args, "micro_batch_tokens", 0) or 0)
    chosen = False
    if budget == 0 and choose and method != "sft":
        budget, chosen = choose_micro_batch_tokens(args, method, s, t, r, hw, num_processes, strategy), True
    c = _Ctx(args, method, hw, num_processes, strategy, s, t, r, budget, te)
    phases = _sft_phases(c) if method == "sft" else _rl_phases(c, use_ref)
    p = Plan(method, hw, num_processes, strategy, phases, budget, chosen)
    if not hw.gpu:
        p.notes.append(f"cpu: 'process' = a method's RSS before its models ({hw.reserved / GiB:.2f} GiB)")
    return p


def _base(c: _Ctx) -> dict:
    """Bytes no tensor of the step holds: on a GPU its reserved share; on the cpu the process itself and its tokenizers
    (the student's, the teacher's, GRPO's reference's: Qwen's BPE is ~135 MB of host memory)."""
    if c.hw.gpu:
        return {"reserved": c.hw.reserved}
    vocabs = [c.s.vocab] + [m.vocab for m in (c.t, c.r if c.method == "grpo" else None) if m is not None]
    return {"process": c.hw.reserved, "tokenizers": c.hw.tokenizer_bytes * sum(vocabs)}


def _rl_phases(c: _Ctx, use_ref: bool) -> list:
    g = lambda k, d: _get(c.args, k, d)  # noqa: E731
    st = _student_state(c)
    frozen = _frozen(c)
    engine = g("rollout_backend", "hf") == "vllm"
    asleep = {"vllm engine (asleep)": ASLEEP_ENGINE_BYTES} if engine and int(g("vllm_sleep", 1)) > 0 else {}
    if engine and int(g("vllm_sleep", 1)) == 0:
        asleep = {"vllm engine (awake)": float(g("vllm_gpu_memory_utilization", 0.3)) * c.hw.memory}
    resident = {**_base(c), "student weights": st["weights"], "optimizer state": st["optimizer"], **frozen}
    phases = [_rollout(c, resident)]
    resident = {**resident, **asleep}
    mix = c.method == "stable_opd" and (float(g("mix_coef", 0.1)) > 0 or bool(g("adaptive_mix", False)))
    t_w = _bytes(g("teacher_dtype", "") or c.dtype)  # also a quantized teacher's compute dtype
    if c.method == "grpo":
        if use_ref:
            phases.append(_scoring(c, resident, c.r or c.s, c.w, "reference", False, c.B,
                                   "--micro_batch_tokens lower, --ref_quantization 8bit|4bit"))
        if int(g("ppo_epochs", 1)) * int(g("num_minibatches", 1)) > 1:  # pi_old: a no-grad pass of the policy
            phases.append(_scoring(c, resident, c.s, c.w, "old log-probs", False, c.B, "--micro_batch_tokens lower"))
        kept = {}
        extra_flops = 0.0
    elif c.t is None:  # --teacher_backend server (common/teacher_server.py): scored elsewhere
        kept, extra_flops = {}, 0.0
    else:
        fix = "--micro_batch_tokens lower, --teacher_quantization 8bit|4bit, --teacher_dtype bfloat16"
        score = _scoring(c, resident, c.t, t_w, "teacher", not c.sampled, c.B, fix)
        phases.append(score)
        kept = {"teacher hidden states": score.parts["teacher hidden states"] / 2} if not c.sampled else {}
        extra_flops = 2 * c.t.hidden * c.t.vocab * c.B * c.T if not c.sampled else 0.0
    rows_per_group = c.G + (1 if mix else 0)
    extra = dict(kept)
    copies, nbuf, factor = 3, 2, 3.0
    if not c.sampled:  # full_kl: the chunked divergence's four buffers, and the head's second pass
        copies, nbuf, factor = 5, 4, 4.0
    if use_ref and c.method == "stable_opd":  # the reference pass of each micro-batch, before the student's forward
        ref = c.r or c.s
        full = g("ref_kl_type", "full") == "full"
        groups = c.P if c.budget <= 0 else max(1, min(c.P, c.budget // (rows_per_group * c.S)))
        rows = groups * c.G  # the rollout rows of the micro-batch (not the golden ones)
        hidden = groups * rows_per_group * c.T * ref.hidden * c.w if full else 0
        ph = Phase("reference", {**resident, "grads": st["grads"], **extra,
                                 "reference activations": rows * c.S * _nograd_act(c, ref, c.w),
                                 "reference head buffers": 0 if full else _head_bufs(rows * c.T, ref.vocab, 3, 2),
                                 "reference hidden states": hidden}, 0.0, 0.0, "",
                   "--micro_batch_tokens lower, --ref_quantization 8bit|4bit")
        phases.append(ph)
        if full:
            extra["reference hidden states"] = hidden
            copies, nbuf = max(copies, 4), nbuf + 1
            extra_flops += 2 * ref.hidden * ref.vocab * c.B * c.T
        extra_flops += _fwd_flops(ref, c.B * c.S, c.S, 0 if full else c.B * c.T)
    phases += _update(c, resident, st, rows_per_group, extra, copies, nbuf, factor, extra_flops)
    if use_ref and c.method == "stable_opd":
        for ph in phases[-2:]:
            ph.fix += ", --ref_quantization 8bit|4bit"
    phases.append(_optimizer(c, resident, st))
    return phases


def _sft_phases(c: _Ctx) -> list:
    g = lambda k, d: _get(c.args, k, d)  # noqa: E731
    st = _student_state(c)
    rows, accum = int(g("per_device_batch_size", 32)), int(g("gradient_accumulation_steps", 1))
    s, tok = c.s, rows * c.S
    resident = {**_base(c), "student weights": st["weights"], "optimizer state": st["optimizer"]}
    parts = dict(resident)
    parts["grads"] = st["grads"]
    if st["ddp_buckets"]:
        parts["ddp buckets"] = st["ddp_buckets"]
    per_tok = (s.layers * c.w * s.hidden + _layer_act(c, s)) if c.ckpt else s.layers * _layer_act(c, s)
    parts["activations"] = tok * per_tok
    parts["attention mask"] = _mask(c, rows, c.S)
    if c.a == 2 and c.w == 4 and c.hw.gpu:
        parts["autocast weight copies"] = s.params * 2
    # nll: the chunked head with its gradient in the forward (common/logprobs.py), as the RL methods' sampled update
    parts["head buffers"] = _head_bufs(rows * c.T, s.vocab, 3, 2)
    parts["head hidden + grad"] = 2 * rows * c.T * s.hidden * c.w
    if not c.lora:
        parts["head weight-grad buffer"] = s.vocab * s.hidden * c.w
    body = _fwd_flops(s, tok, c.S, 0) * (4 if c.ckpt else 3) + 2 * s.hidden * s.vocab * rows * c.T * 3
    flops = body * accum
    secs = _secs(c, flops) + _opt_secs(c, st) + 2 * accum * c.hw.call_s
    fix = ("--per_device_batch_size lower (with more --gradient_accumulation_steps), --gradient_checkpointing true, "
           "--optim adamw8bit, --use_peft true, FSDP2")
    note = f"{rows} row{'s' * (rows != 1)} per micro-batch, the lm_head chunked"
    return [Phase("update", parts, flops, secs, note, fix), _optimizer(c, resident, st)]


def choose_micro_batch_tokens(args, method: str, student_cfg, teacher_cfg=None, ref_cfg=None, gpu="h100-80gb",
                              num_processes: int = 1, strategy: str = "ddp", headroom: float = 0.9) -> int:
    """The --micro_batch_tokens for `--micro_batch_tokens 0`: the largest budget, in whole rows of prompt + completion
    tokens, whose plan peaks below `headroom` x the device's memory (the fewest forwards), or, when even one row's
    budget does not, no higher than that budget's peak (the update's floor of one prompt group; the plan may then
    refuse). A budget that holds every row is returned as such (one pass)."""
    hw = HARDWARE[gpu] if isinstance(gpu, str) else gpu
    S = int(_get(args, "max_prompt_length", 256)) + int(_get(args, "max_completion_length", 128))
    rows_max = int(_get(args, "per_device_prompts", 16)) * (int(_get(args, "num_generations", 4)) + 1)
    trial = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    peak = lambda rows: plan({**trial, "micro_batch_tokens": rows * S}, method, student_cfg, teacher_cfg,  # noqa: E731
                             ref_cfg, hw, num_processes, strategy, choose=False).peak
    # one prompt group per update micro-batch is the floor: when even that is above the headroom, the scoring passes
    # may still grow up to the floor's peak
    limit = max(headroom * hw.memory, peak(1))
    best = S
    lo, hi = 1, rows_max  # the largest fitting row count (peaks grow with rows): binary search
    while lo <= hi:
        mid = (lo + hi) // 2
        if peak(mid) <= limit:
            best, lo = mid * S, mid + 1
        else:
            hi = mid - 1
    return best


# ------------------------------------------------------------------------------------------------ entry points
def _strategy_from_env() -> str:
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "zero2"
    return "ddp"


def plan_for_args(args, method: str, gpu: str | None = None, num_processes: int | None = None,
                  strategy: str | None = None, choose: bool = True) -> Plan:
    """The plan of a method's parsed Args: the model shapes read with AutoConfig (or KNOWN_CONFIGS) from
    model_name_or_path / teacher_name_or_path / ref_model_name_or_path; the device from torch (an H100 / H200 by
    its memory, else "cpu"), the process count and strategy from accelerate's environment, unless given."""
    s = shape_of(_get(args, "model_name_or_path", ""))
    teacher = _get(args, "teacher_name_or_path", "")
    t = shape_of(teacher) if teacher and method in ("opd", "stable_opd") else None
    ref = _get(args, "ref_model_name_or_path", "")
    r = shape_of(ref) if ref else None
    return plan(args, method, s, t, r, gpu or detect_gpu(), num_processes or int(os.environ.get("WORLD_SIZE", "1")),
                strategy or _strategy_from_env(), choose)


def detect_gpu() -> str:
    """h100-80gb / h200-141gb from the CUDA device's memory, "cpu" without one."""
    try:
        import torch

        if torch.cuda.is_available():
            return "h200-141gb" if torch.cuda.get_device_properties(0).total_memory > 100 * GiB else "h100-80gb"
    except ImportError:
        pass
    return "cpu"


def recipe_values(path: str) -> tuple[str, dict, int, str]:
    """(method, layered values, processes, strategy) of a recipes/paper file, from its bases and launch line."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "paper"))
    import recipe  # scripts/paper/recipe.py: the launcher's own layering

    p = Path(path)
    values = recipe.resolve(p)
    launch = recipe.header(p, "launch") or ""
    words = launch.split()
    method = next((Path(w).stem for w in words if w.endswith(".py")), "")
    n = int(words[words.index("--num_processes") + 1]) if "--num_processes" in words else 1
    strategy = "fsdp" if "fsdp" in launch else "zero2" if "zero2" in launch else "ddp"
    return method, values, n, strategy


def method_args(method: str, values: dict):
    """The method's Args dataclass with `values` applied (unknown keys are an error), without parsing a command."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import importlib

    cls = importlib.import_module(f"methods.{method}").Args
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {method} fields: {', '.join(unknown)}")
    return cls(**values)


def recipes_table(folder: str, gpus=("h100-80gb", "h200-141gb"), n: int = 4) -> str:
    """One row per (method recipe, device): the chosen budget, the peak per device and its phase, the step time."""
    rows = ["| recipe | GPU x 4 | budget | peak GiB | peak phase | free GiB | step s (rollout / score / update) "
            "| run h |", "|---|---|---|---|---|---|---|---|"]
    for path in sorted(Path(folder).glob("*.yaml")):
        method, values, _, strategy = recipe_values(str(path))
        if method not in METHODS:
            continue
        args = method_args(method, values)
        for gpu in gpus:
            t = _get(args, "teacher_name_or_path", "") if method in ("opd", "stable_opd") else ""
            r = _get(args, "ref_model_name_or_path", "")
            p = plan(args, method, args.model_name_or_path, t or None, r or None, gpu, n, strategy)
            sec = {x.name: x.seconds for x in p.phases}
            score = sum(v for k, v in sec.items() if k in ("teacher", "old log-probs") or (k, method) == ("reference",
                                                                                                          "grpo"))
            update = sum(v for k, v in sec.items() if k.startswith(("update", "optimizer")))
            free = (HARDWARE[gpu].memory - p.peak) / GiB
            budget = f"{p.micro_batch_tokens:,}" if p.micro_batch_tokens else "-"
            verdict = f"{free:.1f}" + ("" if p.fits else " **no**")
            rows.append(f"| {path.stem} | {gpu.split('-')[0].upper()} {strategy} | {budget} | {p.peak / GiB:.1f} | "
                        f"{p.peak_phase.name} | {verdict} | {p.step_seconds:.0f} ({sec.get('rollout', 0):.0f} / "
                        f"{score:.0f} / {update:.0f}) | {p.step_seconds * args.max_steps / 3600:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="", help="a recipes/paper file (its bases and launch line are read)")
    ap.add_argument("--table", default="", metavar="FOLDER", help="a markdown table of every method recipe in FOLDER "
                    "on 4 x h100-80gb and 4 x h200-141gb (docs/GPU.md section 8)")
    ap.add_argument("--method", default="", help="sft, grpo, opd or stable_opd (default: the recipe's launch line)")
    ap.add_argument("--gpu", default="h100-80gb", choices=sorted(HARDWARE))
    ap.add_argument("--num_processes", type=int, default=0, help="default: the recipe's launch line, else 1")
    ap.add_argument("--strategy", default="", choices=("", "ddp", "fsdp", "zero2"), help="default: the launch line")
    for who in ("student", "teacher", "ref"):
        ap.add_argument(f"--{who}_config", default="", help=f"config.json of the {who} (default: from the recipe)")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override recipe values (YAML values)")
    a = ap.parse_args(argv)
    if a.table:
        print(recipes_table(a.table))
        return 0
    if not a.config:
        ap.error("--config or --table is required")
    try:
        import yaml

        method, values, n, strategy = recipe_values(a.config)
        method = a.method or method
        if method not in METHODS:
            raise ValueError(f"{a.config} launches {method or 'no program'}, not a training method "
                             f"({', '.join(METHODS)})")
        values.update({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set)})
        args = method_args(method, values)
        s = shape_of(a.student_config or args.model_name_or_path)
        tname = a.teacher_config or _get(args, "teacher_name_or_path", "")
        t = shape_of(tname) if tname and method in ("opd", "stable_opd") else None
        rname = a.ref_config or _get(args, "ref_model_name_or_path", "")
        p = plan(args, method, s, t, shape_of(rname) if rname else None, a.gpu, a.num_processes or n,
                 a.strategy or strategy)
    except (KeyError, ValueError, OSError) as e:
        print(f"python -m common.plan: error: {e}", file=sys.stderr)
        return 2
    print(p.summary())
    if not p.fits:
        print(f"python -m common.plan: error: {p.refusal()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
