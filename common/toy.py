"""The toy math world: a CPU-sized stand-in for the real math benchmarks.

Problems are multi-step arithmetic word problems about one person and one kind of object:

    problem:  "Ann has 12 apples. She buys 7 more. She gives away 5. How many apples does Ann have now?"
    solution: "Ann starts with 12. 12 + 7 = 19. 19 - 5 = 14. The answer is \\boxed{14}."

The golden chain of thought is written by the program: one equation per operation, each restating the
previous intermediate result (so studies of repetition have something to copy), and the final answer
in `\\boxed{}` so the real grader applies unchanged. Rows use the benchmark schema (id/problem/answer)
plus `solution` and `n_steps`. The number of operations varies (default 1..6), so solution length
varies several-fold; all running values stay in 0..max_value so the tiny models only see small numbers.

The world also owns a committed byte-level BPE tokenizer (digits split one per token, vocab < 1k) and
three tiny Qwen2 configs (teacher ~3M, teacher_small ~1.2M, student ~0.5M parameters) under `assets/toy/`.
Everything here is deterministic for a seed and builds offline in seconds.
"""

import argparse
import json
import random
from pathlib import Path

from common.data import COT_INSTRUCTION as INSTRUCTION  # the tokenizer corpus holds the prompts' instruction

TOY_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy"
TOKENIZER_DIR = TOY_DIR / "tokenizer"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHAT_TEMPLATE = (  # Qwen2.5-style ChatML, without Qwen's default system prompt or tool calls
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
DEFAULT_KNOBS = {"min_steps": 1, "max_steps": 6, "max_operand": 20, "max_value": 99, "ops": ("add", "sub")}
TOKENIZER_VOCAB_SIZE = 640  # a cap (256 bytes + 4 specials + merges); the toy corpus saturates below it
TOKENIZER_MAX_TOKEN_CHARS = 16  # merges may span words (phrases), but not whole sentences
MODEL_SHAPES = {  # (hidden, layers, heads, kv heads, intermediate): ~3M, ~1.2M and ~0.5M parameters
    "teacher": (256, 4, 4, 2, 688),  # the long demo's teacher and the toy studies'
    "teacher_small": (128, 6, 4, 2, 344),  # the ten-minute demo's teacher: deep and narrow learns fastest per second
    "student": (128, 2, 4, 2, 344),
}

# A deliberately small vocabulary: variety in wording, not in tokens.
PEOPLE = [("Ann", "She"), ("Ben", "He"), ("Cara", "She"), ("Dan", "He"), ("Eve", "She"), ("Sam", "He")]
OBJECTS = ["apples", "books", "cards", "coins", "marbles", "pens"]
PHRASES = {  # op -> sentences; {p} is the pronoun, {k} the operand
    "add": ["{p} buys {k} more.", "{p} finds {k} more.", "{p} gets {k} more."],
    "sub": ["{p} gives away {k}.", "{p} loses {k}.", "{p} sells {k}."],
    "double": ["{p} doubles them."],
    "half": ["{p} gives away half of them."],
}
SYMBOLS = {"add": "+", "sub": "-", "double": "*", "half": "/"}


# ----------------------------------------------------------------------------- problems


def _feasible_ops(value: int, ops: tuple[str, ...], max_value: int) -> list[str]:
    """Operations that keep the running value inside 0..max_value with an exact integer result."""
    ok = {
        "add": value < max_value,
        "sub": value > 0,
        "double": 0 < value and 2 * value <= max_value,  # doubling 0 would be a no-op step
        "half": 0 < value and value % 2 == 0,
    }
    return [op for op in ops if ok[op]]


def _apply(op: str, value: int, rng: random.Random, max_operand: int, max_value: int) -> tuple[int, int]:
    """Draw an operand for `op` (1..max_operand, capped to stay in bounds); return (operand, new value)."""
    if op == "add":
        k = rng.randint(1, min(max_operand, max_value - value))
        return k, value + k
    if op == "sub":
        k = rng.randint(1, min(max_operand, value))
        return k, value - k
    if op == "double":
        return 2, value * 2
    return 2, value // 2  # "half": feasibility guarantees value is even


def make_problem(
    rng: random.Random,
    min_steps: int = 1,
    max_steps: int = 6,
    max_operand: int = 20,
    max_value: int = 99,
    ops: tuple[str, ...] = ("add", "sub"),
) -> dict:
    """One problem as {"problem", "answer", "solution", "n_steps"} (no id), drawn from `rng`.

    The step count is uniform in min_steps..max_steps; each step is a uniformly chosen feasible op.
    """
    if not 1 <= min_steps <= max_steps or max_operand < 1 or max_value < 1:
        raise ValueError(f"bad knobs: steps {min_steps}..{max_steps}, operand {max_operand}, value {max_value}")
    if not ops or set(ops) - set(PHRASES):
        raise ValueError(f"ops must be a non-empty subset of {sorted(PHRASES)}, got {ops}")
    if not {"add", "sub"} <= set(ops):
        raise ValueError("ops must include 'add' and 'sub' so every running value has a feasible step")
    name, pronoun = rng.choice(PEOPLE)
    obj = rng.choice(OBJECTS)
    n_steps = rng.randint(min_steps, max_steps)
    value = rng.randint(1, max_value)
    sentences = [f"{name} has {value} {obj}."]
    equations = [f"{name} starts with {value}."]
    for _ in range(n_steps):
        op = rng.choice(_feasible_ops(value, ops, max_value))
        k, new = _apply(op, value, rng, max_operand, max_value)
        sentences.append(rng.choice(PHRASES[op]).format(p=pronoun, k=k))
        equations.append(f"{value} {SYMBOLS[op]} {k} = {new}.")
        value = new
    sentences.append(f"How many {obj} does {name} have now?")
    equations.append(f"The answer is \\boxed{{{value}}}.")
    return {"problem": " ".join(sentences), "answer": str(value), "solution": " ".join(equations), "n_steps": n_steps}


def make_split(n: int, seed: int, split: str = "train", exclude: frozenset[str] = frozenset(), **knobs) -> list[dict]:
    """`n` problems with distinct texts not in `exclude`, ids "toy-{split}-000123", deterministic for (seed, split).

    The RNG is seeded with a string of split and seed so that splits of one world never share a stream.
    """
    knobs = {**DEFAULT_KNOBS, **knobs}
    knobs["ops"] = tuple(knobs["ops"])
    rng = random.Random(f"toy/{split}/{seed}")
    seen, rows, attempts = set(exclude), [], 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n + 1000:  # a tiny knob space cannot hold n distinct problems
            raise ValueError(f"could only make {len(rows)} of {n} distinct {split} problems with {knobs}")
        row = make_problem(rng, **knobs)
        if row["problem"] not in seen:
            seen.add(row["problem"])
            rows.append({"id": f"toy-{split}-{len(rows):06d}", **row})
    return rows


RECHECK = "Let me check again."


def with_rechecks(rows: list[dict], prob: float, seed: int = 0) -> list[dict]:
    """A "re-checking" style of the same problems, for the collapse study: after the last equation the
    solution restates its whole chain k times, k ~ Geometric(prob) (P(k) = (1 - prob) prob^k), each pass
    introduced by RECHECK, before the boxed answer. A teacher trained on it copies readily from its own
    context (the paper's teachers re-verify at length); the problems and answers are unchanged.
    """
    if not 0.0 <= prob < 1.0:
        raise ValueError(f"prob must be in [0, 1), got {prob}")
    rng = random.Random(f"toy/recheck/{seed}")
    out = []
    for row in rows:
        chain, answer = row["solution"].rsplit(" The answer is ", 1)
        k = 0
        while rng.random() < prob:
            k += 1
        out.append({**row, "solution": " ".join([chain] + [f"{RECHECK} {chain}"] * k + [f"The answer is {answer}"])})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_toy_world(
    out_dir, seed: int = 0, n_train: int = 20000, n_val: int = 200, n_test: int = 500, **knobs
) -> dict[str, Path]:
    """Write train/val/test.jsonl (+ meta.json) under `out_dir` and return {split: path}.

    Test is drawn first, then val excluding test, then train excluding both: splits are disjoint by
    problem text, and test/val do not change when n_train does. If meta.json already records the same
    seed, sizes and knobs and the files exist, they are reused (idempotent).
    """
    out = Path(out_dir)
    knobs = {**DEFAULT_KNOBS, **knobs}
    meta = {"seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test, **knobs, "ops": list(knobs["ops"])}
    paths = {s: out / f"{s}.jsonl" for s in ("train", "val", "test")}
    meta_path = out / "meta.json"
    if meta_path.exists() and all(p.exists() for p in paths.values()) and json.loads(meta_path.read_text()) == meta:
        return paths
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for split, n in (("test", n_test), ("val", n_val), ("train", n_train)):
        rows = make_split(n, seed, split=split, exclude=frozenset(taken), **knobs)
        taken.update(r["problem"] for r in rows)
        _write_jsonl(paths[split], rows)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks a complete world
    return paths


# ----------------------------------------------------------------------------- tokenizer and configs


def _tokenizer_corpus() -> list[str]:
    """Training text for the BPE: toy problems and solutions, chat scaffolding, and some LaTeX."""
    rows = make_split(4000, seed=1234, split="tokenizer")
    latex = [
        "\\frac{1}{2}", "\\sqrt{2}", "x^2 + y^2 = z^2", "\\left( a + b \\right)", "a \\cdot b", "\\pi r^2",
        "$x$", "$$\\sum_{i=1}^{n} i$$", "\\dfrac{a}{b}", "\\text{ and }", "\\le \\ge \\ne", "f(x) = 3x - 1",
    ]
    chat = ["system\nYou are a helpful assistant.", "user\n", "assistant\n", INSTRUCTION]
    return [r["problem"] + "\n" + INSTRUCTION for r in rows] + [r["solution"] for r in rows] + latex + chat


# Why the saved tokenizer_config.json carries an `auto_map`. In transformers 5.x, AutoTokenizer on a model
# folder whose config.json says model_type "qwen2" builds Qwen2Tokenizer whatever tokenizer_class says
# ("qwen2" is in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, models/auto/tokenization_auto.py), and
# Qwen2Tokenizer rebuilds the pre-tokenizer (Qwen's regex + NFC): our merges span words and digits are
# split first, so the ids change (a toy teacher then scores 8.0 instead of 0.5 nats/token). A
# tokenizer_class of PreTrainedTokenizerFast does not help; an `auto_map` entry does: it skips that
# override, the remote code it would name is dropped for "qwen2" unless trust_remote_code=True, and the
# saved tokenizer_class (TokenizersBackend) loads tokenizer.json as it is. It names no module, so
# AutoTokenizer.from_pretrained(..., trust_remote_code=True) fails on these folders (there is no remote
# code to trust); everything else (plain AutoTokenizer, with or without config.json) round-trips.
TOKENIZER_AUTO_MAP = {"AutoTokenizer": [None, "TokenizersBackend"]}


def build_toy_tokenizer(out_dir=TOKENIZER_DIR):
    """Train the byte-level BPE (single digits) and save it as a transformers tokenizer; returns it.

    Byte-level means any text (real benchmark LaTeX too) encodes without unknown tokens. Training is
    single-pass over a fixed corpus, so rebuilding writes a byte-identical tokenizer.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits first (one token per digit, so arithmetic is digit-wise), then bytes. No GPT-2 regex:
    # merges may span words, which keeps the fixed phrases of the toy world to a few tokens each
    # (shorter sequences, cheaper CPU training); a length cap stops whole-sentence tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        max_token_length=TOKENIZER_MAX_TOKEN_CHARS,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        padding_side="left",
        clean_up_tokenization_spaces=False,  # decode must return the exact text
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.init_kwargs["auto_map"] = TOKENIZER_AUTO_MAP  # travels into every folder it is saved to (final/)
    hf.save_pretrained(str(out_dir))
    return hf


def load_toy_tokenizer(path=TOKENIZER_DIR):
    """The committed toy tokenizer (left padding, pad != eos)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), padding_side="left")


def toy_config_path(name: str) -> Path:
    """Path of the committed tiny Qwen2 config for `name` in {"teacher", "student"}."""
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown toy model {name!r}; expected one of {sorted(MODEL_SHAPES)}")
    return TOY_DIR / f"{name}_config.json"


def toy_config_dict(name: str, tokenizer) -> dict:
    """The Qwen2 config for a toy model, with vocab and special-token ids taken from `tokenizer`."""
    hidden, layers, heads, kv_heads, intermediate = MODEL_SHAPES[name]
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),  # as in Qwen2.5: no BOS is prepended
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def write_toy_configs(tokenizer, out_dir=TOY_DIR) -> dict[str, Path]:
    """Write teacher_config.json and student_config.json under `out_dir`; returns {name: path}."""
    paths = {}
    for name in MODEL_SHAPES:
        paths[name] = Path(out_dir) / f"{name}_config.json"
        paths[name].write_text(json.dumps(toy_config_dict(name, tokenizer), indent=2) + "\n")
    return paths


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """`python -m common.toy build ...` writes a data set; `python -m common.toy tokenizer` rebuilds assets."""
    parser = argparse.ArgumentParser(prog="python -m common.toy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write train/val/test.jsonl of toy problems (reused if already built)")
    b.add_argument("--out", default="data/toy", help="output folder (default: data/toy)")
    b.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    b.add_argument("--n_train", type=int, default=20000, help="training problems (default: 20000)")
    b.add_argument("--n_val", type=int, default=200, help="validation problems (default: 200)")
    b.add_argument("--n_test", type=int, default=500, help="test problems (default: 500)")
    for knob in ("min_steps", "max_steps", "max_operand", "max_value"):
        b.add_argument(f"--{knob}", type=int, default=DEFAULT_KNOBS[knob], help=f"default: {DEFAULT_KNOBS[knob]}")
    b.add_argument(
        "--ops", nargs="+", choices=sorted(PHRASES), default=list(DEFAULT_KNOBS["ops"]), help="default: add sub"
    )
    t = sub.add_parser("tokenizer", help="rebuild the committed tokenizer and tiny model configs")
    t.add_argument("--out", default=str(TOY_DIR), help=f"assets folder (default: {TOY_DIR})")
    args = parser.parse_args(argv)
    if args.command == "build":
        knobs = {k: getattr(args, k) for k in DEFAULT_KNOBS}
        paths = build_toy_world(args.out, args.seed, args.n_train, args.n_val, args.n_test, **knobs)
        print(json.dumps({s: str(p) for s, p in paths.items()}))
    else:
        tokenizer = build_toy_tokenizer(Path(args.out) / "tokenizer")
        write_toy_configs(tokenizer, args.out)
        print(f"wrote {args.out}: vocab {len(tokenizer)}")


if __name__ == "__main__":
    main()
