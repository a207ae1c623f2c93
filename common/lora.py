"""LoRA students through peft (`--use_peft`): the adapter, the reference it gives for free, merged weights.

With `--use_peft` the trained model is a `peft.PeftModel` around the loaded student: the base weights are
frozen and only the low-rank adapters (rank `--lora_r`, scale `--lora_alpha / --lora_r`) train, on the
modules `--lora_target_modules` names ("all-linear": every linear layer but the lm_head). Where it shows:

- Reference policy (Stable-OPD's pi_ref, GRPO's KL reference): the student's start is the base with the
  adapters switched off, so `adapter_disabled_reference` returns a view that runs the same weights under
  `disable_adapter()`: no second copy of the model in memory.
- Rollout engine (vLLM): `merged_parameters` yields W + (alpha / r) B A for every adapted layer under the base
  model's own parameter names, so the engine loads an ordinary model; the sync is otherwise unchanged.
- Checkpoints (`common/checkpoint.py`) hold the trainable tensors only (the adapters) plus the optimizer, and
  resume exactly; `final/` holds the merged model (loads with plain `AutoModelForCausalLM`, vLLM, our eval)
  and `final_adapter/` the adapter alone (`PeftModel.from_pretrained(base, run_dir / "final_adapter")`).

LoRA dropout defaults to 0: with dropout the training forward is not the forward that sampled the rollouts,
and every importance ratio pi_theta / pi_old would start away from 1. Under FSDP or DeepSpeed `--use_peft` is
refused at start-up (not offered yet; DDP and one process are).
"""

from pathlib import Path

import torch

from common.errors import BadInput
from common.models import load_frozen

NOT_TARGETS = ("lm_head", "embed_tokens")  # the chunked losses apply the head weight themselves: it must stay plain


def is_peft(model) -> bool:
    """A peft model (after DDP unwrapping)."""
    return hasattr(getattr(model, "module", model), "peft_config")


class LoraOptionError(BadInput, ValueError):
    """A --lora_target_modules that cannot work on this model."""


def target_modules(spec: str) -> str | list[str]:
    """--lora_target_modules: "all-linear" or a comma list of module names (q_proj,v_proj)."""
    spec = spec.strip()
    if spec == "all-linear":
        return spec
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise LoraOptionError("--lora_target_modules: give all-linear or a comma list of module names, e.g. q_proj,v_proj")
    bad = [n for n in names if n.split(".")[-1] in NOT_TARGETS]
    if bad:
        raise LoraOptionError(f"--lora_target_modules: {', '.join(bad)} cannot carry an adapter here (the chunked losses "
                              "use the lm_head / embedding weight directly); target the linear layers, e.g. all-linear")
    return names


def apply_lora(model, args):
    """The student wrapped for LoRA training when `args.use_peft`, else the model itself. Raises LoraOptionError
    (a ValueError naming the flag) when the target modules match nothing in the model."""
    if not args.use_peft:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=target_modules(args.lora_target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise LoraOptionError(f"--lora_target_modules {args.lora_target_modules!r}: {' '.join(str(e).split())}") from e
    return peft_model  # gradient checkpointing stays non-reentrant (load_model): inputs need not require grad


class _AdapterOff:
    """The base model of a peft student with its adapters disabled, shaped like a frozen model for
    `common.logprobs` (no trainable parameters, `base_model(...)` = the transformer trunk, the same lm_head)."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def parameters(self):
        return iter(())

    def get_output_embeddings(self):
        return self.peft_model.get_output_embeddings()

    def base_model(self, **inputs):
        with self.peft_model.disable_adapter(), torch.no_grad():
            return self.peft_model.get_base_model().base_model(**inputs)


def adapter_disabled_reference(model):
    """pi_ref = the LoRA student's start: its base with the adapters off (no copy of the weights)."""
    return _AdapterOff(getattr(model, "module", model))


def load_reference(args, model, ref_path: str, device, print_fn=print):
    """The frozen reference policy: the adapter-disabled student when it trains a LoRA adapter and the reference
    is its start (the paper's setting); otherwise `ref_path` loaded frozen (a warning when that is not the start)."""
    if ref_path != args.model_name_or_path:
        print_fn(f"WARNING: reference {ref_path} is not the student's start {args.model_name_or_path}: not the paper's setting")
    elif is_peft(model):
        return adapter_disabled_reference(model)
    return load_frozen(ref_path, args.dtype, args.ref_quantization, device, attn_implementation=args.attn_implementation,
                       model_kwargs=args.model_init_kwargs)


@torch.no_grad()
def merged_parameters(model):
    """(name, tensor) of the merged model W + scale * B A under the base model's parameter names (as
    `named_parameters` of the plain model: tied weights once), one tensor at a time; no model is modified."""
    from peft.tuners.lora import LoraLayer

    peft_model = getattr(model, "module", model)
    base = peft_model.get_base_model()
    adapter = peft_model.active_adapter
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            deltas[f"{name}.base_layer.weight"] = module
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        plain = name.replace(".base_layer.", ".")
        if name in deltas:
            delta = deltas[name].get_delta_weight(adapter)
            yield plain, param.detach() + delta.to(param.dtype)
        else:
            yield plain, param.detach()


def save_merged(model, folder: Path, is_main_process: bool = True, save_function=torch.save) -> None:
    """final/: the merged model as an ordinary transformers checkpoint; final_adapter/ beside it: the adapter."""
    peft_model = getattr(model, "module", model)
    state = {name: t.contiguous() for name, t in merged_parameters(peft_model)}
    base = peft_model.get_base_model()
    base.save_pretrained(folder, state_dict=state, is_main_process=is_main_process, save_function=save_function)
    peft_model.save_pretrained(Path(folder).parent / "final_adapter", is_main_process=is_main_process)
