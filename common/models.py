"""Loading the policy (student), the teacher and the reference model, and their tokenizer.

A model comes from a pretrained folder / hub id, or from a config (`config.json` path: random
weights, e.g. the toy world's `assets/toy/*_config.json`). Frozen models (teacher, reference) can be
quantised with bitsandbytes (4-bit nf4 or 8-bit, CUDA only in practice); trained models cannot. A path
that does not exist fails at once, offline, instead of after the hub's retries. `make_optimizer` builds
the trained model's AdamW, the torch one or bitsandbytes' 8-bit one (optimizer state ~1/4 the size).
Load options per model: its own dtype (a bf16 teacher beside an fp32 student), `attn_implementation`
(eager / sdpa / flash_attention_2) and extra from_pretrained keywords (`parse_model_kwargs`, validated).
Measured memory per option: scripts/bench_memory.py.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from common.data import left_pad, render_prompt
from common.errors import BadInput, first_line
from common.toy import TOKENIZER_AUTO_MAP

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(BadInput, OSError):
    """A model or tokenizer that cannot be found or loaded."""


class LoadOptionError(ModelLoadError, ValueError):
    """A load option that cannot work (attn_implementation, model init kwargs): a ValueError too, and printed as
    one `error:` line by the run's error hook, like every ModelLoadError."""


class IncompatibleModels(BadInput, ValueError):
    """A teacher / reference whose tokenizer or vocabulary does not match the student's (`check_compatible`)."""


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


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX). Without it, bf16 autocast on the CPU is emulated:
    measured on a 2-core AVX2 EPYC, a 512 x 512 bf16 matmul took 0.21 s against 0.008 s in fp32 (27x), and the toy
    teacher's SFT step 20 s against ~0.3 s. On GPUs this is never asked."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe: assume the slow case
        return False


def load_tokenizer(name: str):
    """Tokenizer with left padding (generation pads prompts on the left) and a pad token."""
    check_exists(name)
    path = Path(name)
    if path.is_file() and path.suffix == ".json":  # a model config: its tokenizer lives next to it
        path = path.parent / "tokenizer"
    try:
        tok = _load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 -- tokenizers raises bare Exceptions for a torn tokenizer.json
        raise ModelLoadError(f"cannot load the tokenizer of {name} ({first_line(e, 240)}): its tokenizer files are missing "
                             "or corrupt: re-download or re-save the model folder") from e
    if tok.pad_token is None:  # many base models ship without one; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def _load_tokenizer(path: Path):
    tok_class = _saved_tokenizer_class(path)
    if tok_class == "TokenizersBackend":
        # A plain `tokenizers` tokenizer (the toy world's). Without the `auto_map` the toy tokenizer now
        # saves (common/toy.py, TOKENIZER_AUTO_MAP), AutoTokenizer picks the class of the model type in
        # config.json (Qwen2Tokenizer), which ignores the saved pre-tokenizer and splits text differently
        # from training (a toy teacher then scores ~1% instead of ~96%). Folders saved before that still
        # load right here, and get the map, so whatever this tokenizer is saved into (final/) reloads
        # with plain AutoTokenizer.
        from transformers import TokenizersBackend


        tok = TokenizersBackend.from_pretrained(str(path), padding_side="left")
        tok.init_kwargs.setdefault("auto_map", TOKENIZER_AUTO_MAP)
    else:
        tok = AutoTokenizer.from_pretrained(str(path), padding_side="left")
    return tok


def _saved_tokenizer_class(path: Path) -> str | None:
    cfg = path / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("tokenizer_class")


def load_model(
    name: str,
    dtype: str = "float32",
    quantization: str = "none",
    gradient_checkpointing: bool = False,
    trainable: bool = True,
    seed: int | None = None,
    attn_implementation: str | None = None,
    model_kwargs: dict | str | None = None,
):
    """A causal LM from a pretrained folder / hub id, or randomly initialised from a `config.json`.

    `quantization` ("none" | "4bit" | "8bit") is for frozen models only. A frozen model is put in
    eval mode with `requires_grad=False` on every parameter. `attn_implementation` (eager | sdpa |
    flash_attention_2; None or "" = transformers' default, sdpa where available) goes to
    from_pretrained / from_config. `model_kwargs` (a dict or a JSON object string, see
    `parse_model_kwargs`) are further from_pretrained keywords, e.g. {"revision": "main"}.
    """
    attn = check_attn_implementation(attn_implementation)  # option errors first, before any file is read
    extra = parse_model_kwargs(model_kwargs)
    check_exists(name)
    if quantization not in ("none", "4bit", "8bit"):
        raise ValueError(f"unknown quantization {quantization!r}; choose none, 4bit or 8bit")
    if quantization != "none" and trainable:
        raise ValueError("quantization is only supported for frozen models (teacher / reference)")
    torch_dtype = resolve_dtype(dtype)
    if name.endswith(".json") and quantization != "none":  # bitsandbytes quantizes while loading a checkpoint
        raise ValueError(f"{quantization} quantization needs a saved checkpoint folder, not a config ({name}): "
                         "save_pretrained the randomly initialised model first")
    try:
        model = _load_causal_lm(name, torch_dtype, quantization, seed, attn, extra)
    except Exception as e:  # noqa: BLE001 -- sorted here: what a model folder's files can cause, else re-raised
        if isinstance(e, ModelLoadError) or not (isinstance(e, (OSError, ValueError))
                                                 or "safetensors" in type(e).__module__):
            raise
        raise ModelLoadError(f"cannot load model {name} ({first_line(e, 240)}): check that it is a complete model "
                             "folder (config.json, weights) or hub id; re-download or re-save it") from e
    if gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the KV cache is useless (and warned about) while checkpointing
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


def _load_causal_lm(name: str, torch_dtype, quantization: str, seed: int | None, attn: str | None, extra: dict):
    """from_config (a config.json: random weights, seeded so runs are reproducible) or from_pretrained."""
    if name.endswith(".json"):
        config = AutoConfig.from_pretrained(name)
        if seed is not None:
            torch.manual_seed(seed)
        if extra:
            raise LoadOptionError(f"model init kwargs {sorted(extra)} apply to from_pretrained (a checkpoint folder or "
                                  f"hub id); {name} is a config: edit it instead")
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **({"attn_implementation": attn} if attn else {}))
    kwargs = {**extra, "dtype": torch_dtype, **({"attn_implementation": attn} if attn else {})}
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype)
            if quantization == "4bit"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
    return AutoModelForCausalLM.from_pretrained(name, **kwargs)


def load_frozen(name: str, dtype: str = "float32", quantization: str = "none", device=None,
                attn_implementation: str | None = None, model_kwargs: dict | str | None = None):
    """A frozen teacher / reference (eval mode, no gradients) on `device` (bitsandbytes places quantized weights
    itself, and so does a `device_map` in `model_kwargs`). Its dtype is its own: a bf16 teacher beside an fp32
    student is fine (the losses compute the teacher's logits in its dtype and its softmax in fp32)."""
    extra = parse_model_kwargs(model_kwargs)
    model = load_model(name, dtype=dtype, quantization=quantization, trainable=False,
                       attn_implementation=attn_implementation, model_kwargs=extra)
    placed = quantization != "none" or "device_map" in extra
    return model.to(device) if device is not None and not placed else model


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
# from_pretrained keywords that have their own option here: passing them in the kwargs dict is refused
_QUANT_FLAGS = "--teacher_quantization / --ref_quantization"
RESERVED_MODEL_KWARGS = {"dtype": "--dtype / --teacher_dtype", "torch_dtype": "--dtype / --teacher_dtype",
                         "quantization_config": _QUANT_FLAGS, "load_in_4bit": _QUANT_FLAGS, "load_in_8bit": _QUANT_FLAGS,
                         "attn_implementation": "--attn_implementation",
                         "pretrained_model_name_or_path": "--model_name_or_path / --teacher_name_or_path"}


def check_attn_implementation(name: str | None) -> str | None:
    """The attention kernel to request (None = transformers' default). A LoadOptionError for an unknown name, and
    for flash_attention_2 without the flash_attn package or without CUDA, before any weights load."""
    if not name:
        return None
    if name not in ATTN_IMPLEMENTATIONS:
        raise LoadOptionError(f"unknown attn_implementation {name!r}; choose one of {ATTN_IMPLEMENTATIONS} ('' = default)")
    if name == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise LoadOptionError("attn_implementation flash_attention_2 needs the flash-attn package (CUDA only); "
                                  "use sdpa (the default) or eager")
        if not torch.cuda.is_available():
            raise LoadOptionError("attn_implementation flash_attention_2 needs a CUDA GPU; use sdpa (the default) or eager")
    return name


_KWARGS_FLAGS = "--model_init_kwargs / --teacher_model_init_kwargs"  # the flags parse_model_kwargs reads


def parse_model_kwargs(spec: dict | str | None) -> dict:
    """Extra from_pretrained keywords (TRL's `model_init_kwargs` / `teacher_model_init_kwargs` analogue) from a
    dict or a JSON object string ('' / None = none), e.g. '{"revision": "main", "trust_remote_code": false}', or config
    overrides such as '{"use_cache": false}'.
    Refused, with the option to use instead: dtype, quantization and attention keys (they have their own
    options). Values must be JSON values (so that config.yaml records them)."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return {}
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise LoadOptionError(f"{_KWARGS_FLAGS} {spec!r}: not valid JSON ({e}); expected an object like "
                                  '\'{"revision": "main"}\'') from e
    if not isinstance(spec, dict):
        raise LoadOptionError(f"{_KWARGS_FLAGS} must be a JSON object (a dict), got {type(spec).__name__}: {spec!r}")
    for key, value in spec.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise LoadOptionError(f"{_KWARGS_FLAGS}: key {key!r} is not a keyword name")
        if key in RESERVED_MODEL_KWARGS:
            raise LoadOptionError(f"{_KWARGS_FLAGS}: {key!r} has its own option, use {RESERVED_MODEL_KWARGS[key]}")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise LoadOptionError(f"{_KWARGS_FLAGS}: {key}={value!r} is not a JSON value") from e
    return dict(spec)


OPTIMIZERS = {"adamw": "adamw", "adamw_torch": "adamw", "adamw8bit": "adamw8bit", "adamw_8bit": "adamw8bit"}


def make_optimizer(params, name: str = "adamw", lr: float = 1e-5, weight_decay: float = 0.0):
    """AdamW for the trainable ones of `params`: "adamw" (alias "adamw_torch": torch.optim.AdamW) or "adamw8bit" (alias
    "adamw_8bit": bitsandbytes' AdamW8bit, block-wise 8-bit moments: 2 bytes per parameter instead of 8)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    params = [p for p in params if p.requires_grad]  # a LoRA student: the adapters only
    if OPTIMIZERS[name] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"--optim {name} needs bitsandbytes (pip install bitsandbytes==0.50.2, in requirements.txt)") from e
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


CONFIG_KWARGS = ("revision", "subfolder", "trust_remote_code")  # the model-init keywords that also pick the config


def meta_model(name: str, model_kwargs: str = ""):
    """The causal LM of a folder / hub id / config.json built on the meta device: every shape, no weights, no memory.
    A folder's or hub id's generation_config.json is read as from_pretrained would (stop ids)."""
    check_exists(name)
    extra = parse_model_kwargs(model_kwargs)
    config = AutoConfig.from_pretrained(name, **{k: extra[k] for k in CONFIG_KWARGS if k in extra})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if not name.endswith(".json"):
        try:
            model.generation_config = GenerationConfig.from_pretrained(name, **{k: extra[k] for k in CONFIG_KWARGS[:2]
                                                                                 if k in extra})
        except OSError:
            pass  # none shipped: from_pretrained keeps the one derived from config.json too
    return model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_replicas_in_sync(accelerator, model) -> None:
    """Raise if data-parallel replicas hold different parameters (a broken gradient all-reduce)."""
    if accelerator.num_processes == 1:
        return
    total = torch.stack([p.detach().double().sum() for p in accelerator.unwrap_model(model).parameters()]).sum()
    sums = accelerator.gather(total.reshape(1).to(accelerator.device))
    if not torch.all(sums == sums[0]):
        raise RuntimeError(f"parameters differ across ranks: per-rank checksums {sums.tolist()}")
    accelerator.print(f"replicas in sync across {accelerator.num_processes} ranks (checksum {sums[0].item():.6f})")


@dataclasses.dataclass(frozen=True)
class TeacherCompat:
    """What `check_compatible` found: the shared vocabulary and what the methods need to score with a teacher whose
    chat template or special-token names differ from the student's.

    vocab_limit     logits of both models are compared over ids [0, vocab_limit).
    same_template   the teacher's own prompt ids equal the student's (same chat template, same rendering of
                    the special tokens, same split of the text): the teacher can score the student's rollout
                    ids unchanged. False: build its input with `teacher_inputs` from prompts encoded with the
                    teacher's tokenizer (`encode_prompts(teacher_tok, ...)`).
    stop_id_map     student stop ids that are no stop for the teacher -> the teacher's EOS id, substituted
                    in the completion by `teacher_inputs` (empty in the usual case).
    teacher_eos_id  the teacher's EOS id (for "how much does the teacher want to stop" probes).
    renamed         {id: (student string, teacher string)} for special tokens with other names in the teacher
                    (e.g. 151646 <|object_ref_start|> / <｜begin▁of▁sentence｜>): tolerated, the student does not
                    emit them in practice; listed for the start-up log.
    """

    vocab_limit: int
    same_template: bool
    stop_id_map: dict[int, int] = dataclasses.field(default_factory=dict)
    teacher_eos_id: int | None = None
    renamed: dict[int, tuple[str, str]] = dataclasses.field(default_factory=dict)

    @property
    def needs_teacher_inputs(self) -> bool:
        """True when the teacher must get its own input ids (`teacher_inputs`) instead of the student's."""
        return not self.same_template or bool(self.stop_id_map)

    def describe(self) -> str:
        """One line for the start-up log."""
        parts = [f"shared vocab {self.vocab_limit}",
                 "same prompt ids" if self.same_template else "teacher scores with its own chat template"]
        if self.stop_id_map:
            parts.append("stop ids mapped " + ", ".join(f"{s}->{t}" for s, t in self.stop_id_map.items()))
        if self.renamed:
            parts.append(f"{len(self.renamed)} special tokens renamed in the teacher (e.g. "
                         + ", ".join(f"{i}: {a!r}/{b!r}" for i, (a, b) in list(self.renamed.items())[:2]) + ")")
        return "teacher compatible: " + "; ".join(parts)


def _decoded_vocab(tok, n: int) -> list[str]:
    """The string each id in [0, n) decodes to on its own (special tokens kept; ~0.4 s for 152k ids)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return [backend.decode([i], skip_special_tokens=False) for i in range(n)]
    return [tok.decode([i], skip_special_tokens=False) for i in range(n)]


def _added_ids(tok) -> set[int]:
    """Ids of the added tokens (specials and other added tokens such as Qwen's <tool_call>)."""
    return set(getattr(tok, "added_tokens_decoder", {}) or {}) | set(tok.all_special_ids)


def _as_id_set(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple, set)) else {int(value)}


def _model_stop_ids(tok, model) -> set[int]:
    """Ids that end a turn for a model: its tokenizer's EOS plus the EOS ids of its config and generation
    config (Qwen2.5-Instruct stops at 151645 <|im_end|> and 151643 <|endoftext|>)."""
    ids = _as_id_set(tok.eos_token_id)
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        ids |= _as_id_set(getattr(cfg, "eos_token_id", None))
    return ids


def _probe_prompt_ids(tok) -> list[int]:
    problem = "Ann has 12 apples. She buys 7 more. How many apples does Ann have now? $\\frac{3}{4}$"
    text = render_prompt(tok, problem, "chat" if getattr(tok, "chat_template", None) else "plain",
                         "Please reason step by step, and put your final answer within \\boxed{}.")
    return tok(text, add_special_tokens=False)["input_ids"]


def check_compatible(student_tok, teacher_tok, student_model, teacher_model, stop_ids=None,
                     allow_teacher_template: bool = False) -> TeacherCompat:
    """Stop before step 1 if the teacher cannot score the student's tokens; return a `TeacherCompat`.

    The teacher scores the student's completion ids as they are, so what must hold is:
      * every id the student can emit (its tokenizer's ids) decodes to the same string for the teacher
        (a byte-identical piece where the single-id decode is lossy), else the error names the first
        mismatching id and both strings;
      * special tokens may carry other names in the teacher (DeepSeek-R1-Distill renames Qwen's
        151643-151649): tolerated where the id is an added token on both sides, except that each student
        stop id (`stop_ids`, default the student's EOS) must end the turn for the teacher too; if it does
        not, it is mapped to the teacher's EOS (`stop_id_map`, applied by `teacher_inputs`);
      * the logits both models produce cover every such id: embedding rows may be padded differently
        (Qwen2.5-1.5B: 151,936 rows, 7B: 152,064), and logits are compared over the first min(rows).
    The chat templates may differ: `same_template` says whether the teacher's own prompt ids equal the
    student's; when they do not (or a stop id is mapped) the teacher's input must be built with
    `teacher_inputs`. A caller that does so passes `allow_teacher_template=True`; without it such a
    teacher is refused, so that no method scores it on prompts in the student's format by accident.
    The result is an int (the shared vocabulary limit) carrying those fields.
    """
    problems = []
    n = len(student_tok)
    rows_s = student_model.get_output_embeddings().weight.shape[0]
    rows_t = teacher_model.get_output_embeddings().weight.shape[0]
    shared = min(rows_s, rows_t)
    if shared < n:
        problems.append(f"output embeddings ({rows_s} student / {rows_t} teacher rows) do not cover the "
                        f"student tokenizer's {n} tokens")
    student_stops = _as_id_set(stop_ids if stop_ids is not None else student_tok.eos_token_id)
    teacher_stops = _model_stop_ids(teacher_tok, teacher_model)
    teacher_eos = teacher_tok.eos_token_id
    s_text = _decoded_vocab(student_tok, n)
    t_text = _decoded_vocab(teacher_tok, min(n, len(teacher_tok)))
    added_s, added_t = _added_ids(student_tok), _added_ids(teacher_tok)
    mismatched, renamed, stop_map = [], {}, {}
    for i in range(n):
        s, t = s_text[i], (t_text[i] if i < len(t_text) else None)
        same = s == t and ("\ufffd" not in s  # a lossy decode (part of a UTF-8 character): compare the pieces
                           or student_tok.convert_ids_to_tokens(i) == teacher_tok.convert_ids_to_tokens(i))
        if i in student_stops:  # judged by what it means (end of turn), below
            if not same:
                renamed[i] = (s, t)
        elif same:
            continue
        elif i in added_s and i in added_t:  # a special token under another name
            renamed[i] = (s, t)
        else:
            mismatched.append(i)
    for i in sorted(student_stops):
        if i in teacher_stops or i >= n:
            continue
        if i in renamed and i not in added_t:  # a plain token for the teacher: not an end of turn
            mismatched.append(i)
            del renamed[i]
        elif teacher_eos is not None:  # the teacher ends its turns with another token: score that one
            stop_map[i] = teacher_eos
    mismatched.sort()
    if mismatched:
        i = mismatched[0]
        t = t_text[i] if i < len(t_text) else f"(nothing: the teacher's tokenizer has {len(teacher_tok)} tokens)"
        problems.append(f"token id {i} decodes to {s_text[i]!r} for the student but {t!r} for the teacher "
                        f"({len(mismatched)} of the student's {n} ids differ): the token-to-id mappings differ")
    if any(v >= shared for v in stop_map.values()):
        problems.append(f"the teacher's EOS id {teacher_eos} lies outside the shared vocabulary ({shared})")
    if len(teacher_tok) > rows_t:  # its own prompts could hold ids its model has no embedding for
        problems.append(f"the teacher's tokenizer has {len(teacher_tok)} tokens, more than its {rows_t} embedding rows")
    same = _probe_prompt_ids(student_tok) == _probe_prompt_ids(teacher_tok)
    if not allow_teacher_template and (not same or stop_map):
        what = "chat templates differ (the teacher's own prompt ids are not the student's)" if not same else \
            f"the student's stop ids {sorted(stop_map)} are no stop for the teacher"
        problems.append(f"{what}: this caller would score the teacher on the student's ids; build its input with "
                        "teacher_inputs(...) and pass allow_teacher_template=True")
    if problems:
        raise IncompatibleModels("teacher and student are incompatible (--teacher_name_or_path / "
                                 "--ref_model_name_or_path against --model_name_or_path): " + "; ".join(problems))
    return TeacherCompat(int(shared), same, dict(stop_map or {}), teacher_eos, dict(renamed or {}))


def teacher_inputs(teacher_prompt_ids, completion_ids, completion_mask, pad_id: int, num_samples: int = 1,
                   stop_id_map: dict[int, int] | None = None):
    """Input ids and attention mask for a teacher-forced pass of a teacher with its own chat template.

    teacher_prompt_ids: one id list per prompt, rendered with the TEACHER's tokenizer and chat template
        (`common.data.encode_prompts(teacher_tok, rows, template, instruction)`); each is repeated
        `num_samples` times in a row, as `generate` repeats the student's prompts.
    completion_ids / completion_mask: the student's rollout, [B, T], right-padded.
    Returns (input_ids, attention_mask), [B, P_t + T]: the teacher's prompts left-padded with `pad_id`
    (the teacher's pad id), then the completion, so the last T positions are the completion and
    `completion_logps(teacher, ids, mask, T, ...)` scores exactly the student's tokens. Padded completion
    positions get `pad_id`; student stop ids in `stop_id_map` (see `check_compatible`) become the
    teacher's EOS.

    Deviation from scoring the student's own sequence: the teacher sees the prompt in its own format
    (its system prompt, role markers and generation prompt, e.g. DeepSeek-R1-Distill's
    "<｜User｜>...<｜Assistant｜><think>\\n"), while the completion ids are shared unchanged: a student
    completion that does not follow the teacher's format (no "</think>") is scored as it is.
    """
    rows = [list(p) for p in teacher_prompt_ids for _ in range(num_samples)]
    if len(rows) != completion_ids.shape[0]:
        raise ValueError(f"{len(teacher_prompt_ids)} prompts x {num_samples} samples != {completion_ids.shape[0]} completions")
    prompt_ids, prompt_mask = left_pad(rows, pad_id)
    completion = completion_ids.masked_fill(completion_mask == 0, pad_id)
    for student_id, teacher_id in (stop_id_map or {}).items():
        completion = completion.masked_fill((completion == student_id) & (completion_mask != 0), teacher_id)
    device = completion_ids.device
    ids = torch.cat([prompt_ids.to(device), completion], 1)
    mask = torch.cat([prompt_mask.to(device), completion_mask.to(device=device, dtype=prompt_mask.dtype)], 1)
    return ids, mask


# ----------------------------------------------------------------------------- start-up checks of the models
# (common.run.start_run and the preflight run them before anything loads; each raises one line)

MODEL_FIELDS = ("model_name_or_path", "teacher_name_or_path", "ref_model_name_or_path")
LONG_CONTEXT_ENV = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"  # the switch scripts/paper already export for vLLM


def _model_positions(name: str) -> int | None:
    """max_position_embeddings from a model folder's / hub id's / config file's config (None if unknown)."""
    if not name:
        return None
    try:
        cfg = AutoConfig.from_pretrained(name)
    except Exception:  # noqa: BLE001 -- unreadable here: the model loader reports it with its own message
        return None
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_positions(args) -> None:
    """Prompt + completion (max_prompt_length + max_completion_length) must fit every model's
    max_position_embeddings (student, teacher, reference). Raises ValueError naming the flags and the model;
    `VLLM_ALLOW_LONG_MAX_MODEL_LEN=1` (as scripts/paper export: their known gap) turns the error into a warning."""
    total = args.max_prompt_length + args.max_completion_length
    for key, name in ((f.name, getattr(args, f.name)) for f in dataclasses.fields(args) if f.name in MODEL_FIELDS):
        if not name:  # no reference model: the student's start
            continue
        limit = _model_positions(name)
        if limit is None or total <= limit:
            continue
        msg = (f"--max_prompt_length {args.max_prompt_length} + --max_completion_length {args.max_completion_length} "
               f"= {total} tokens exceeds the max_position_embeddings {limit} of --{key} {name}")
        if os.environ.get(LONG_CONTEXT_ENV, "") in ("1", "true", "True"):
            print(f"warning: {msg}; running past its trained positions ({LONG_CONTEXT_ENV}=1)", file=sys.stderr)
            continue
        raise ValueError(f"{msg}: lower them, or export {LONG_CONTEXT_ENV}=1 to run past the positions it was trained on")


def check_quantization(args) -> None:
    """--*_quantization 4bit/8bit and --optim adamw8bit need bitsandbytes, working on this machine's device:
    a tiny probe at start-up, instead of an error deep inside the first forward. Raises ValueError (one line)."""
    wanted = [(f"--{f.name}", getattr(args, f.name)) for f in dataclasses.fields(args)
              if f.name.endswith("quantization") and getattr(args, f.name) not in ("none", "", None)]
    if args.optim in ("adamw8bit", "adamw_8bit"):
        wanted.append(("--optim", args.optim))
    if not wanted:
        return
    flags = ", ".join(f"{k} {v}" for k, v in wanted)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{flags} needs bitsandbytes (pip install bitsandbytes==0.50.2): {e}") from e
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for flag, value in wanted:
        try:
            _probe_bnb(value, device)
        except Exception as e:  # noqa: BLE001 -- whatever bitsandbytes raises here, it would raise mid-run
            first = " ".join(str(e).split())[:160] or type(e).__name__
            raise ValueError(f"{flag} {value}: bitsandbytes {getattr(bitsandbytes, '__version__', '?')} does not work on this "
                             f"machine ({device}{', no CUDA device' if device == 'cpu' else ''}: {type(e).__name__}: {first}); "
                             f"use {flag} {'adamw' if flag == '--optim' else 'none'} or a GPU") from e


def _probe_bnb(kind: str, device: str) -> None:
    import bitsandbytes as bnb

    if kind in ("adamw8bit", "adamw_8bit"):
        p = torch.nn.Parameter(torch.zeros(4096, device=device))  # 8-bit state only from 4096 values up
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        return
    layer = (bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32) if kind == "4bit"
             else bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False))
    layer = layer.to(device)
    with torch.no_grad():
        layer(torch.ones(2, 64, device=device))
