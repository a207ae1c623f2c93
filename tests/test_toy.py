"""Tests for the toy math world: problem generator, splits, tokenizer, tiny model configs, CLI."""

import os

# Offline before transformers is imported: a hub lookup would otherwise stall for ~50 s.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

import json
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from common import toy

REPO = Path(__file__).resolve().parent.parent
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


@pytest.fixture(scope="module")
def tok():
    return toy.load_toy_tokenizer()


# ----------------------------------------------------------------------------- problems and splits


def check_row(row: dict, min_steps: int, max_steps: int, max_operand: int, max_value: int) -> None:
    """Recompute a golden solution from its own text and check it against the row and the knobs."""
    start = re.match(r"\w+ starts with (\d+)\. ", row["solution"])
    assert start, row["solution"]
    value = int(start.group(1))
    assert 0 <= value <= max_value
    steps = STEP.findall(row["solution"])
    assert len(steps) == row["n_steps"] and min_steps <= row["n_steps"] <= max_steps
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert a == value, f"step does not restate the previous result: {row['solution']}"
        assert OPS[op](a, b) == c, f"wrong arithmetic {a} {op} {b} = {c}"
        if op in "+-":
            assert 1 <= b <= max_operand
        else:
            assert b == 2 and (op == "*" or a % 2 == 0)  # halves are exact
        assert 0 <= c <= max_value
        value = c
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", row["solution"])
    assert boxed == [row["answer"]] == [str(value)]
    assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}.")
    assert row["problem"].endswith("have now?")


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"min_steps": 1, "max_steps": 10, "max_operand": 9, "max_value": 30},
        {"min_steps": 3, "max_steps": 3, "max_operand": 50, "max_value": 99, "ops": ("add", "sub", "double", "half")},
        {"min_steps": 2, "max_steps": 8, "max_operand": 1, "max_value": 1},  # values pinned to 0/1
    ],
)
def test_solutions_are_correct_and_bounded(knobs):
    full = {**toy.DEFAULT_KNOBS, **knobs}
    rows = toy.make_split(300, seed=5, **knobs)
    for row in rows:
        check_row(row, full["min_steps"], full["max_steps"], full["max_operand"], full["max_value"])
    assert {r["n_steps"] for r in rows} == set(range(full["min_steps"], full["max_steps"] + 1))


def test_make_problem_uses_rng_only():
    a = toy.make_problem(random.Random(11), 1, 6, 20, 99)
    b = toy.make_problem(random.Random(11), 1, 6, 20, 99)
    assert a == b and set(a) == {"problem", "answer", "solution", "n_steps"}


@pytest.mark.parametrize(
    "bad",
    [
        {"min_steps": 0},
        {"min_steps": 4, "max_steps": 3},
        {"max_operand": 0},
        {"max_value": 0},
        {"ops": ("add",)},
        {"ops": ("add", "sub", "mul")},
    ],
)
def test_bad_knobs_raise(bad):
    with pytest.raises(ValueError):
        toy.make_problem(random.Random(0), **{**toy.DEFAULT_KNOBS, **bad})


def test_split_is_deterministic_and_unique():
    a, b = toy.make_split(200, seed=3), toy.make_split(200, seed=3)
    assert a == b
    assert a != toy.make_split(200, seed=4)
    assert len({r["problem"] for r in a}) == 200
    assert [r["id"] for r in a[:2]] == ["toy-train-000000", "toy-train-000001"]


def test_build_world_disjoint_deterministic_idempotent(tmp_path):
    kw = {"seed": 1, "n_train": 400, "n_val": 40, "n_test": 60}
    paths = toy.build_toy_world(tmp_path / "a", **kw)
    splits = {s: [json.loads(line) for line in p.read_text().splitlines()] for s, p in paths.items()}
    assert {s: len(r) for s, r in splits.items()} == {"train": 400, "val": 40, "test": 60}
    texts = {s: {r["problem"] for r in rows} for s, rows in splits.items()}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"] and not texts["val"] & texts["test"]
    assert all(set(r) == {"id", "problem", "answer", "solution", "n_steps"} for r in splits["test"])
    assert splits["val"][0]["id"] == "toy-val-000000"

    # Same seed elsewhere: identical bytes. Second call: reused (files untouched).
    again = toy.build_toy_world(tmp_path / "b", **kw)
    assert all(paths[s].read_bytes() == again[s].read_bytes() for s in paths)
    mtimes = {s: p.stat().st_mtime_ns for s, p in paths.items()}
    toy.build_toy_world(tmp_path / "a", **kw)
    assert mtimes == {s: p.stat().st_mtime_ns for s, p in paths.items()}

    # Changed knobs rebuild; test does not depend on n_train.
    more = toy.build_toy_world(tmp_path / "a", **{**kw, "n_train": 500})
    assert len(more["train"].read_text().splitlines()) == 500
    assert more["test"].read_bytes() == again["test"].read_bytes()
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["n_train"] == 500


def test_cli_build_writes_three_files(tmp_path):
    out = tmp_path / "toy"
    cmd = [sys.executable, "-m", "common.toy", "build", "--out", str(out)]
    cmd += ["--n_train", "30", "--n_val", "5", "--n_test", "5", "--max_steps", "3"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    for split, n in (("train", 30), ("val", 5), ("test", 5)):
        rows = [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == n and max(r["n_steps"] for r in rows) <= 3
    assert json.loads((out / "meta.json").read_text())["max_steps"] == 3


# ----------------------------------------------------------------------------- tokenizer


def test_solution_length_varies_several_fold(tok):
    rows = toy.make_split(600, seed=0)
    lengths = {k: [len(tok.encode(r["solution"])) for r in rows if r["n_steps"] == k] for k in (1, 6)}
    assert statistics.mean(lengths[6]) >= 3 * statistics.mean(lengths[1])


def test_tokenizer_basics(tok):
    assert len(tok) <= 1000
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.padding_side == "left"
    for special in toy.SPECIAL_TOKENS:
        assert len(tok.encode(special)) == 1
    ids = tok.encode("Ann has 1234 apples.")
    digit_ids = [i for i in ids if tok.decode([i]).isdigit()]
    assert [tok.decode([i]) for i in digit_ids] == ["1", "2", "3", "4"]
    assert all(len(tok.encode(d)) == 1 for d in "0123456789")


@pytest.mark.parametrize(
    "text",
    [
        "Ann has 12 apples. She buys 7 more. She gives away 5. How many apples does Ann have now?",
        "Ann starts with 12. 12 + 7 = 19. 19 - 5 = 14. The answer is \\boxed{14}.",
        "Let $f(x)=\\frac{3x^2-1}{\\sqrt{7}}$ and $\\sum_{k=1}^{\\infty} \\binom{n}{k}$; café, 日本, 😀\n\t  end ",
    ],
)
def test_tokenizer_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in ids


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "Hi 12?"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nHi 12?<|im_end|>\n<|im_start|>assistant\n"
    with_system = [{"role": "system", "content": "Be brief."}, *msgs, {"role": "assistant", "content": "\\boxed{1}"}]
    assert tok.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi 12?<|im_end|>\n"
        "<|im_start|>assistant\n\\boxed{1}<|im_end|>\n"
    )
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == tok.encode(rendered) and ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_tokenizer_rebuild_is_byte_identical(tmp_path):
    toy.build_toy_tokenizer(tmp_path / "tokenizer")
    committed = sorted(p.name for p in toy.TOKENIZER_DIR.iterdir())
    assert committed == sorted(p.name for p in (tmp_path / "tokenizer").iterdir())
    for name in committed:
        assert (tmp_path / "tokenizer" / name).read_bytes() == (toy.TOKENIZER_DIR / name).read_bytes(), name


# ----------------------------------------------------------------------------- model configs


@pytest.mark.parametrize("name,low,high", [("teacher", 2e6, 4e6), ("teacher_small", 0.4e6, 1.5e6), ("student", 0.3e6, 0.8e6)])
def test_configs_build_models_of_intended_size(tok, name, low, high):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    path = toy.toy_config_path(name)
    cfg = AutoConfig.from_pretrained(str(path))
    assert cfg.model_type == "qwen2" and cfg.to_dict()["vocab_size"] == Qwen2Config.from_json_file(str(path)).vocab_size
    assert json.loads(path.read_text()) == toy.toy_config_dict(name, tok)  # committed == what the CLI writes
    assert (cfg.vocab_size, cfg.eos_token_id, cfg.pad_token_id) == (len(tok), tok.eos_token_id, tok.pad_token_id)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 1024
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert low <= n_params <= high, n_params
    logits = model(torch.tensor([tok.encode("Ann has 3 pens.")])).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()


def test_toy_config_path_rejects_unknown():
    with pytest.raises(ValueError):
        toy.toy_config_path("giant")


def test_with_rechecks_restates_the_chain_a_geometric_number_of_times():
    from common.toy import RECHECK, make_split, with_rechecks

    rows = make_split(2000, seed=0)
    out = with_rechecks(rows, prob=0.5, seed=1)
    assert [r["answer"] for r in out] == [r["answer"] for r in rows] and out == with_rechecks(rows, prob=0.5, seed=1)
    ks = [r["solution"].count(RECHECK) for r in out]
    assert abs(sum(ks) / len(ks) - 1.0) < 0.1  # mean of Geometric(0.5) is 1
    for row, new, k in zip(rows, out, ks):
        chain = row["solution"].rsplit(" The answer is ", 1)[0]
        assert new["solution"].count(chain) == k + 1 and new["solution"].endswith(f"\\boxed{{{row['answer']}}}.")
    assert with_rechecks(rows[:5], prob=0.0) == rows[:5]
    with pytest.raises(ValueError):
        with_rechecks(rows, prob=1.0)
