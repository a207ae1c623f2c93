"""Loading the policy (student), the teacher and the reference model, and their tokenizer.

A model comes from a pretrained folder / hub id, or from a config (`config.json` path: random
weights, e.g. the toy world's `assets/toy/*_config.json`). Frozen models (teacher, reference) can be
quantised with bitsandbytes (4-bit nf4 or 8-bit, CUDA only in practice); trained models cannot. A path
that does not exist fails at once, offline, instead of after the hub's retries. `make_optimizer` builds
the trained model's AdamW, the torch one or bitsandbytes' 8-bit one (optimizer state ~1/4 the size).
"""

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(OSError):
    """A model or tokenizer that cannot be found or loaded."""


def _looks_local(name: str) -> bool:
    # A hub id is `org/name` (one slash, no leading dot or slash); anything else must be on disk.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".json")


def check_exists(name: str) -> None:
    """Fail fast for a local path that does not exist, and for a hub id when offline and not cached."""
    if os.path.exists(name):
        return
    if _looks_local(name):
        raise ModelLoadError(f"model path does not exist: {name}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if try_to_load_from_cache(name, "config.json") is None:
            raise ModelLoadError(
                f"{name}: not a local folder, and not in the hub cache while HF_HUB_OFFLINE=1 "
                "(download it first, or pass a local path)"
            )


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(name: str):
    """Tokenizer with left padding (generation pads prompts on the left) and a pad token."""
    check_exists(name)
    path = Path(name)
    if path.is_file() and path.suffix == ".json":  # a model config: its tokenizer lives next to it
        path = path.parent / "tokenizer"
    tok_class = _saved_tokenizer_class(path)
    if tok_class == "TokenizersBackend":
        # A plain `tokenizers` tokenizer (the toy world's). AutoTokenizer would pick the class of the
        # model type in config.json (Qwen2Tokenizer), which ignores the saved pre-tokenizer and splits
        # text differently from training (a toy teacher then scores ~1% instead of ~96%).
        from transformers import TokenizersBackend

        tok = TokenizersBackend.from_pretrained(str(path), padding_side="left")
    else:
        tok = AutoTokenizer.from_pretrained(str(path), padding_side="left")
    if tok.pad_token is None:  # many base models ship without one; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def _saved_tokenizer_class(path: Path) -> str | None:
    cfg = path / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    import json

    return json.loads(cfg.read_text()).get("tokenizer_class")


def load_model(
    name: str,
    dtype: str = "float32",
    quantization: str = "none",
    gradient_checkpointing: bool = False,
    trainable: bool = True,
    seed: int | None = None,
):
    """A causal LM from a pretrained folder / hub id, or randomly initialised from a `config.json`.

    `quantization` ("none" | "4bit" | "8bit") is for frozen models only. A frozen model is put in
    eval mode with `requires_grad=False` on every parameter.
    """
    check_exists(name)
    if quantization not in ("none", "4bit", "8bit"):
        raise ValueError(f"unknown quantization {quantization!r}; choose none, 4bit or 8bit")
    if quantization != "none" and trainable:
        raise ValueError("quantization is only supported for frozen models (teacher / reference)")
    torch_dtype = resolve_dtype(dtype)
    if name.endswith(".json") and quantization != "none":  # bitsandbytes quantizes while loading a checkpoint
        raise ValueError(f"{quantization} quantization needs a saved checkpoint folder, not a config ({name}): "
                         "save_pretrained the randomly initialised model first")
    if name.endswith(".json"):  # a config: random weights, seeded so runs are reproducible
        config = AutoConfig.from_pretrained(name)
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        kwargs = {"dtype": torch_dtype}
        if quantization != "none":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = (
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype)
                if quantization == "4bit"
                else BitsAndBytesConfig(load_in_8bit=True)
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except OSError as e:
            raise ModelLoadError(f"cannot load model {name}: {e}") from e
    if gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the KV cache is useless (and warned about) while checkpointing
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


OPTIMIZERS = {"adamw": "adamw", "adamw_torch": "adamw", "adamw8bit": "adamw8bit", "adamw_8bit": "adamw8bit"}


def make_optimizer(params, name: str = "adamw", lr: float = 1e-5, weight_decay: float = 0.0):
    """AdamW for `params`: "adamw" (alias "adamw_torch": torch.optim.AdamW) or "adamw8bit" (alias
    "adamw_8bit": bitsandbytes' AdamW8bit, block-wise 8-bit moments: 2 bytes per parameter instead of 8)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    if OPTIMIZERS[name] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"--optim {name} needs bitsandbytes (pip install bitsandbytes==0.50.2, in requirements.txt)") from e
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_replicas_in_sync(accelerator, model) -> None:
    """Raise if data-parallel replicas hold different parameters (a broken gradient all-reduce)."""
    if accelerator.num_processes == 1:
        return
    import torch

    total = torch.stack([p.detach().double().sum() for p in accelerator.unwrap_model(model).parameters()]).sum()
    sums = accelerator.gather(total.reshape(1).to(accelerator.device))
    if not torch.all(sums == sums[0]):
        raise RuntimeError(f"parameters differ across ranks: per-rank checksums {sums.tolist()}")
    accelerator.print(f"replicas in sync across {accelerator.num_processes} ranks (checksum {sums[0].item():.6f})")


def check_compatible(student_tok, teacher_tok, student_model, teacher_model) -> int:
    """Stop before step 1 if the teacher cannot score the student's tokens; return the shared vocab size.

    Checks the token-to-id mapping itself (not just its size), EOS / PAD ids and the chat template.
    Embedding matrices may be padded differently (Qwen2.5-1.5B: 151,936 rows, 7B: 152,064): logits are
    then compared over the first min(rows) entries, which must cover the tokenizer.
    """
    problems = []
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        diff = sorted(set(sv.items()) ^ set(tv.items()), key=lambda kv: kv[1])
        problems.append(f"token-to-id mappings differ in {len(diff)} entries (sizes {len(sv)} vs {len(tv)}), "
                        f"e.g. {diff[:3]}")
    probe = "Ann has 12 apples. 12 + 7 = 19. The answer is \\boxed{\\frac{3}{4}}."
    if student_tok(probe)["input_ids"] != teacher_tok(probe)["input_ids"]:  # same vocab, other pre-tokenizer
        problems.append(f"the tokenizers split the same text differently (probe {probe!r})")
    for attr in ("eos_token_id", "pad_token_id"):
        if getattr(student_tok, attr) != getattr(teacher_tok, attr):
            problems.append(f"{attr}: student {getattr(student_tok, attr)} vs teacher {getattr(teacher_tok, attr)}")
    if (student_tok.chat_template or "") != (teacher_tok.chat_template or ""):
        problems.append("chat templates differ (the teacher would score prompts rendered for another format)")
    rows_s = student_model.get_output_embeddings().weight.shape[0]
    rows_t = teacher_model.get_output_embeddings().weight.shape[0]
    shared = min(rows_s, rows_t)
    if shared < len(student_tok):
        problems.append(f"output embeddings ({rows_s} student / {rows_t} teacher rows) do not cover the "
                        f"tokenizer's {len(student_tok)} tokens")
    if problems:
        raise ValueError("teacher and student are incompatible:\n  - " + "\n  - ".join(problems))
    return shared
