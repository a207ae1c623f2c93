"""common/data.py options: column mapping and answer formats on GSM8K / NuminaMath / OpenR1-Math shaped rows,
hub ids with a config, --system_prompt through real chat templates, and methods' Args without the new fields."""

import json
from types import SimpleNamespace

import pytest

from common.data import (COT_INSTRUCTION, DataError, encode_prompts, extract_reference_answer, filter_by_length, gsm8k_answer,
                         gsm8k_solution, load_golden, load_prompts, load_rows, render_prompt, row_options)
from common.flags import DataFlags
from common.grading import extract_answer
from common.toy import load_toy_tokenizer
from tests.realtok import QWEN25_INSTRUCT_SYSTEM, QWEN25_MATH_SYSTEM, require_qwen_files, write_tokenizer

GSM8K = [  # openai/gsm8k (config main): question, answer ending in "#### <number>", calculator annotations
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
               "in April and May.\n#### 72"},
    {"question": "A shop sells 1,000 pens a day for 1.08 days. How many pens?",
     "answer": "1000*1.08 = <<1000*1.08=1080>>1080\n#### 1,080"},
]
NUMINA = [  # AI-MO/NuminaMath-CoT: source, problem, solution (answer = its last \boxed{}), messages
    {"source": "synthetic_math", "problem": "Compute $\\frac{1}{2} + \\frac{1}{2}$.",
     "solution": "We add: $\\frac{1}{2} + \\frac{1}{2} = 1$. So the answer is $\\boxed{1}$.",
     "messages": [{"role": "user", "content": "..."}]},
    {"source": "olympiads", "problem": "Find $x$ with $2x = 1$.",
     "solution": "Divide by 2: $x = \\boxed{\\frac{1}{2}}$.", "messages": []},
]
OPENR1 = [  # open-r1/OpenR1-Math-220k: problem, solution (reference), answer, generations + verdicts
    {"problem": "What is $2+3$?", "solution": "2+3=5", "answer": "5", "uuid": "a",
     "generations": ["<think>2+3=6</think> \\boxed{6}", "<think>2+3=5</think> \\boxed{5}"],
     "correctness_math_verify": [False, True]},
    {"problem": "What is $3 \\cdot 3$?", "solution": "9", "answer": "9", "uuid": "b",
     "generations": ["<think>9</think> \\boxed{9}"], "correctness_math_verify": [True]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _args(**kw):
    """Every method's DataFlags (their defaults), plus the method's own fields the test needs."""
    return SimpleNamespace(**{**vars(DataFlags()), **kw})


def test_gsm8k_question_and_hash_answer(tmp_path):
    src = _jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    opts = row_options(_args(prompt_column="question", answer_format="gsm8k", solution_column="answer"))
    rows = load_rows(src, need_solution=True, **opts)
    assert [r["problem"] for r in rows] == [g["question"] for g in GSM8K]
    assert [r["answer"] for r in rows] == ["72", "1080"]  # text after the last ####, thousands commas dropped
    gold = rows[0]["solution"]
    assert "<<" not in gold and "####" not in gold and gold.endswith("The final answer is $\\boxed{72}$.")
    assert extract_answer(gold) == ("72", "boxed")  # a golden response the grader reads like a rollout
    # without --solution_column there is no golden response, and SFT says which field is missing
    with pytest.raises(DataError, match=r"gsm8k\.jsonl:1: missing required field\(s\) \['solution'\]"):
        load_rows(src, need_solution=True, **row_options(_args(prompt_column="question", answer_format="gsm8k")))


def test_gsm8k_answer_helpers():
    assert gsm8k_answer("x\n#### -3.5") == "-3.5" and gsm8k_answer("no marker") is None
    assert gsm8k_answer("#### 12,5") == "12,5"  # not a thousands group: left alone
    assert gsm8k_solution("no marker") == "no marker"
    assert extract_reference_answer(" 7 ", "plain") == " 7 "  # plain: as before, untouched


def test_numinamath_answer_from_boxed_solution(tmp_path):
    import datasets

    src = str(tmp_path / "numina.parquet")
    datasets.Dataset.from_list(NUMINA).to_parquet(src)
    rows = load_rows(src, need_solution=True, **row_options(_args(answer_column="solution", answer_format="boxed")))
    assert [r["answer"] for r in rows] == ["1", "\\frac{1}{2}"]  # nested braces kept
    assert rows[1]["solution"] == NUMINA[1]["solution"] and rows[0]["source"] == "synthetic_math"
    bad = _jsonl(tmp_path / "b.jsonl", [{"problem": "p", "solution": "no box here"}])
    with pytest.raises(DataError, match=r"b\.jsonl:1: no boxed answer in column 'solution'"):
        load_rows(bad, **row_options(_args(answer_column="solution", answer_format="boxed")))


def test_openr1_generations_as_golden(tmp_path):
    src = _jsonl(tmp_path / "openr1.jsonl", OPENR1)
    rows = load_rows(src, need_solution=True)  # default columns: the reference solution
    assert [r["solution"] for r in rows] == ["2+3=5", "9"] and [r["answer"] for r in rows] == ["5", "9"]
    rows = load_rows(src, need_solution=True, **row_options(_args(solution_column="generations")))
    assert rows[0]["solution"] == OPENR1[0]["generations"][1]  # the first one Math-Verify marked correct
    no_verdicts = [{k: v for k, v in r.items() if k != "correctness_math_verify"} for r in OPENR1]
    rows = load_rows(_jsonl(tmp_path / "nv.jsonl", no_verdicts), **row_options(_args(solution_column="generations")))
    assert rows[0]["solution"] == OPENR1[0]["generations"][0]


def test_missing_column_names_the_source_column(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", [{"problem": "p", "answer": "1"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing required field\(s\) \['problem'\] .*column\(s\) "
                                        r"\{'problem': 'question'\}"):
        load_rows(src, **row_options(_args(prompt_column="question")))
    with pytest.raises(DataError, match="unknown --answer_format"):
        row_options(_args(answer_format="latex"))
    with pytest.raises(DataError, match="unknown answer format"):
        load_rows(src, answer_format="latex")


def test_row_options_defaults_keep_todays_rows(tmp_path):
    assert row_options(_args()) == {"fields": None, "answer_format": "plain"}
    rows = [{"problem": "1+1?", "answer": 2, "solution": "\\boxed{2}"}]
    src = _jsonl(tmp_path / "d.jsonl", rows)
    assert load_rows(src, **row_options(_args())) == load_rows(src)


def test_hub_ids_with_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"question": "q?", "answer": "so\n#### 4"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    opts = row_options(_args(prompt_column="question", answer_format="gsm8k"))
    assert load_rows("openai/gsm8k:main:test", **opts)[0]["answer"] == "4"
    load_rows("openai/gsm8k:main:test", **opts)
    load_rows("org/data:validation", **opts)
    load_rows("org/data", **opts)
    assert calls == [("openai/gsm8k", "main", "test")] * 2 + [("org/data", None, "validation"), ("org/data", None, "train")]
    with pytest.raises(DataError, match="name:config:split"):
        load_rows("org/data:a:b:c")


@pytest.fixture(scope="module")
def qwen_toks(tmp_path_factory):
    require_qwen_files()
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("toks")
    math_dir = write_tokenizer("math", root / "math")
    inst_dir = write_tokenizer("instruct", root / "instruct", tokenizer_json=math_dir / "tokenizer.json")
    r1_dir = write_tokenizer("r1", root / "r1")
    return {k: AutoTokenizer.from_pretrained(str(p)) for k, p in (("math", math_dir), ("instruct", inst_dir), ("r1", r1_dir))}


def test_system_prompt_through_real_chat_templates(qwen_toks):
    sp = "You are a careful mathematician."
    inst = qwen_toks["instruct"]
    default = render_prompt(inst, "1+1?", "chat", "")
    assert default.startswith(f"<|im_start|>system\n{QWEN25_INSTRUCT_SYSTEM}<|im_end|>\n")  # the template's own
    got = render_prompt(inst, "1+1?", "chat", "", system_prompt=sp)
    assert got == f"<|im_start|>system\n{sp}<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    # Qwen2.5-Math: its default system prompt IS the CoT line; passing it explicitly renders the same text
    math = qwen_toks["math"]
    assert render_prompt(math, "1+1?", "chat", "", system_prompt=QWEN25_MATH_SYSTEM) == render_prompt(math, "1+1?", "chat", "")
    # DeepSeek-R1-Distill: the system text right after BOS, before <｜User｜>
    r1 = render_prompt(qwen_toks["r1"], "1+1?", "chat", COT_INSTRUCTION, system_prompt=sp)
    assert r1.startswith(f"<｜begin▁of▁sentence｜>{sp}<｜User｜>1+1?\n{COT_INSTRUCTION}")
    assert r1.endswith("<｜Assistant｜><think>\n")
    ids = encode_prompts(inst, [{"problem": "1+1?"}], "chat", "", system_prompt=sp)[0]
    assert inst.decode(ids) == got


def test_system_prompt_plain_and_errors():
    tok = load_toy_tokenizer()
    assert render_prompt(tok, "1+1?", "plain", "", system_prompt="Be brief.") == "Be brief.\n\nQuestion: 1+1?\nAnswer: "
    # encode_prompts keeps its positional signature
    assert encode_prompts(tok, [{"problem": "1+1?"}], "chat", "Think.") == encode_prompts(
        tok, [{"problem": "1+1?"}], "chat", "Think.", system_prompt="")

    class NoSystem:  # a template that refuses a system turn (as Gemma's does)
        chat_template = "x"

        def apply_chat_template(self, messages, **kw):
            if messages[0]["role"] == "system":
                raise ValueError("System role not supported")
            return "ok"

    assert render_prompt(NoSystem(), "p", "chat", "") == "ok"
    with pytest.raises(DataError, match="does not take a system message"):
        render_prompt(NoSystem(), "p", "chat", "", system_prompt="s")


def test_load_prompts_and_golden_with_default_and_other_columns(tmp_path):
    tok = load_toy_tokenizer()
    src = _jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    plain_src = _jsonl(tmp_path / "d.jsonl", [{"problem": "1+1?", "answer": "2", "solution": "1+1=2 \\boxed{2}"}])
    old = _args(train_data=plain_src, prompt_template="chat", instruction="Think.", max_prompt_length=10_000,
                on_overflow="skip", golden_data="", max_completion_length=10_000, golden_overflow="skip")
    rows, prompts, skipped = load_prompts(old, tok)  # the default columns
    assert skipped == 0 and prompts == encode_prompts(tok, rows, "chat", "Think.")
    golden, counts = load_golden(old, rows, tok)
    assert golden[0] and counts == {"missing": 0, "over_long": 0, "unparsable": 0}
    new = _args(**{**vars(old), "train_data": src, "prompt_column": "question", "answer_format": "gsm8k",
                   "solution_column": "answer", "system_prompt": "Be brief."})
    rows, prompts, _ = load_prompts(new, tok)
    assert [r["answer"] for r in rows] == ["72", "1080"]
    assert tok.decode(prompts[0]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    golden, counts = load_golden(new, rows, tok)
    assert all(golden) and counts["unparsable"] == 0


def test_filter_by_length_names_its_limit():
    rows = [{"problem": "a"}, {"problem": "b"}]
    with pytest.raises(DataError, match=r"1 solution\(s\) longer than max_completion_length=5, e.g. row 1"):
        filter_by_length(rows, [3, 9], 5, "error", limit_name="max_completion_length", what="solution")
    with pytest.raises(DataError, match=r"every solution is longer than max_completion_length=2 \(the longest has 9"):
        filter_by_length(rows, [3, 9], 2, "skip", limit_name="max_completion_length", what="solution")
    assert filter_by_length(rows, [3, 9], 5) == ([rows[0]], 1)  # defaults as before: prompts, max_prompt_length


def test_golden_file_for_another_dataset_fails(tmp_path):
    tok = load_toy_tokenizer()
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]
    train = _jsonl(tmp_path / "train.jsonl", rows)
    shifted = [{**r, "solution": f"So the sum is \\boxed{{{int(r['answer']) + 1}}}."} for r in rows]
    args = _args(train_data=train, golden_data=_jsonl(tmp_path / "golden.jsonl", shifted), max_completion_length=100,
                 golden_overflow="skip")
    with pytest.raises(DataError, match=r"golden responses \(.*golden\.jsonl\) contradict the dataset's answers for 6 of 6"):
        load_golden(args, load_rows(train), tok)
    good = [{**r, "solution": f"So the sum is \\boxed{{{r['answer']}}}."} for r in rows]
    args.golden_data = _jsonl(tmp_path / "good.jsonl", good)
    golden, counts = load_golden(args, load_rows(train), tok)
    assert all(golden) and counts["missing"] == 0
