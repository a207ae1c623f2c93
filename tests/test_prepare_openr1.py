"""scripts/prepare_openr1.py on a small synthetic file in the OpenR1-Math-220k schema (offline, toy tokenizer):
counts after every filter, the golden choice, --verify modes, split sizes, determinism, and that
stable_opd.py's data path reads the output."""

import importlib.util
import json
from pathlib import Path

import pytest

from common.data import DataError, load_rows
from common.toy import load_toy_tokenizer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("prepare_openr1", ROOT / "scripts" / "prepare_openr1.py")
prep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prep)

STEP = "We add 3 and 4 to get 7. "


def gen(answer, repeats: int) -> str:
    """A generation of controlled length ending in \\boxed{answer}."""
    return "<think>\n" + STEP * repeats + "</think>\n" + f"So the answer is \\boxed{{{answer}}}."


SHORT, MEDIUM, LONG = 2, 6, 60  # repeats; the length cap sits between MEDIUM and LONG


def synthetic_rows() -> list[dict]:
    """13 rows: see the comments for what each one tests."""
    def row(k, problem, answer, gens, flags, **extra):
        return {"problem": problem, "solution": "ref", "answer": answer, "problem_type": "Algebra", "question_type": "math-word-problem",
                "source": "olympiads" if k % 2 else "amc_aime", "uuid": f"u{k}", "is_reasoning_complete": [True] * len(gens),
                "generations": gens, "correctness_math_verify": flags, "correctness_llama": None,
                "finish_reasons": ["stop"] * len(gens), "correctness_count": sum(flags),
                "messages": [{"role": "user", "content": problem}], **extra}
    rows = [
        row(1, "P1: 3 + 4?", "7", [gen(7, SHORT), gen(7, LONG), gen(8, SHORT)], [True, True, False]),  # keeps gen 0 only
        row(2, "P2: 5 + 7?", "12", [gen(12, LONG), gen(12, MEDIUM), gen(12, SHORT)], [True, True, True]),  # keeps 1, 2
        row(3, "P3: 2 + 3?", "5", [gen(6, SHORT), gen(5, LONG)], [False, True]),  # nothing left: dropped
        row(4, "P4: 4 + 5?", "9", [gen(9, SHORT)], [False]),  # right answer, dataset flag says wrong
        row(5, "P5: 1 + 2?", "3", [gen(4, SHORT)], [True]),  # wrong answer, dataset flag says right
        row(6, "P1: 3 + 4?", "7", [gen(7, SHORT)], [True]),  # repeated problem text: dropped
        row(7, "P7: empty", "1", [], []),  # no generations: invalid
    ]
    rows += [row(10 + k, f"F{k}: {k} + 1?", str(k + 1), [gen(k + 1, SHORT)], [True]) for k in range(6)]  # fillers
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openr1")
    src = tmp / "openr1.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows()))
    tok_dir = tmp / "tokenizer"
    tok = load_toy_tokenizer()
    tok.save_pretrained(str(tok_dir))
    n = lambda r: len(tok(gen(7, r), add_special_tokens=False)["input_ids"])  # noqa: E731
    assert n(MEDIUM) < n(LONG)
    return {"tmp": tmp, "src": src, "tok": tok, "tok_dir": tok_dir, "max_tokens": (n(MEDIUM) + n(LONG)) // 2}


def run(world, name: str, **over) -> tuple[dict, Path]:
    out = world["tmp"] / name
    settings = {"source": str(world["src"]), "tokenizer": str(world["tok_dir"]), "max_tokens": world["max_tokens"], "opd_size": 3,
                "grade_workers": 0, "num_proc": 1, "out_dir": str(out), "cache_dir": str(world["tmp"] / "cache")}
    args = prep.Args(**{**settings, **over})
    return prep.main(args), out


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_counts_golden_and_split(world):
    report, out = run(world, "default")
    c = report["counts"]
    assert (c["rows_in"], c["rows_invalid"], c["rows_repeated"], c["problems"]) == (13, 1, 1, 11)
    assert c["generations"] == 16 and c["generations_over_length"] == 3 and c["generations_within_length"] == 13
    assert c["generations_incorrect"] == 3 and c["generations_kept"] == 10  # dataset flags: P1 gen 2, P3 gen 0, P4
    assert (c["problems_kept"], c["problems_dropped"], c["opd_problems"], c["sft_problems"]) == (9, 2, 3, 6)
    opd, sft = jsonl(out / "opd.jsonl"), jsonl(out / "sft.jsonl")
    assert len(opd) == 3 and len(sft) == 6
    kept = {r["problem"] for r in opd + sft}
    assert len(kept) == 9 and not {r["problem"] for r in opd} & {r["problem"] for r in sft}
    assert kept.isdisjoint({"P3: 2 + 3?", "P4: 4 + 5?", "P7: empty"})
    by_problem = {r["problem"]: r for r in opd + sft}
    assert by_problem["P1: 3 + 4?"]["golden_index"] == 0 and by_problem["P1: 3 + 4?"]["id"] == "u1"
    assert by_problem["P2: 5 + 7?"]["golden_index"] == 1 and by_problem["P2: 5 + 7?"]["n_kept"] == 2  # first kept
    assert by_problem["P2: 5 + 7?"]["solution"] == gen(12, MEDIUM)
    assert "P5: 1 + 2?" in by_problem  # the dataset's flag is trusted by default
    assert all(set(r) >= {"id", "problem", "answer", "solution"} for r in opd + sft)
    assert "| 2. correct, verify=dataset (-3) | 9 | 10 |" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["counts"] == c


def test_golden_rules_and_sft_all(world):
    report, out = run(world, "shortest", golden="shortest", sft_solutions="all", opd_size=0, sft_size=9)
    rows = jsonl(out / "sft.jsonl")
    p2 = [r for r in rows if r["problem"] == "P2: 5 + 7?"]
    assert len(rows) == 10 and report["counts"]["sft_rows"] == 10 and report["counts"]["sft_problems"] == 9
    assert sorted(r["golden_index"] for r in p2) == [1, 2]
    assert [r["golden_source"].startswith("OpenR1-Math-220k DeepSeek-R1 generation 2 (shortest") for r in p2 if r["golden_index"] == 2] == [True]
    with pytest.raises(ValueError):
        prep.choose_golden([0], [1], "longest", None)


@pytest.mark.parametrize("mode,present,absent", [("ours", "P4: 4 + 5?", "P5: 1 + 2?"), ("both", None, "P4: 4 + 5?")])
def test_verify_modes(world, mode, present, absent):
    report, out = run(world, f"verify_{mode}", verify=mode)
    problems = {r["problem"] for r in jsonl(out / "opd.jsonl") + jsonl(out / "sft.jsonl")}
    assert absent not in problems and "P5: 1 + 2?" not in problems and (present is None or present in problems)
    assert report["counts"]["problems_kept"] == (9 if mode == "ours" else 8)
    if mode == "both":
        assert report["verify_disagreements"] == {"dataset_only": 1, "ours_only": 1}


def test_split_is_seeded_and_deterministic(world):
    _, a = run(world, "seed0_a")
    _, b = run(world, "seed0_b")
    assert (a / "opd.jsonl").read_text() == (b / "opd.jsonl").read_text()
    assert (a / "sft.jsonl").read_text() == (b / "sft.jsonl").read_text()
    opds = set()
    for seed in range(1, 4):
        _, c = run(world, f"seed{seed}", seed=seed)
        opds.add(tuple(r["problem"] for r in jsonl(c / "opd.jsonl")))
    assert len(opds | {tuple(r["problem"] for r in jsonl(a / "opd.jsonl"))}) > 1
    report, _ = run(world, "frac", opd_frac=0.5)
    assert (report["counts"]["opd_problems"], report["counts"]["sft_problems"]) == (4, 5)  # round(4.5) = 4
    with pytest.raises(DataError):
        run(world, "too_big", opd_size=9)


def test_stable_opd_reads_the_output(world):
    from common.data import golden_ids_for

    _, out = run(world, "for_stable_opd", parquet=True)
    rows = load_rows(str(out / "opd.jsonl"), need_solution=True)
    golden = {r["problem"]: r.get("solution") for r in load_rows(str(out / "opd.parquet"), need_solution=True)}
    ids, counts = golden_ids_for(rows, golden, world["tok"], max_len=world["max_tokens"] + 1, overflow="skip")
    assert counts == {"missing": 0, "over_long": 0, "unparsable": 0}
    assert all(seq and seq[-1] == world["tok"].eos_token_id for seq in ids)
    assert len(load_rows(str(out / "sft.jsonl"), need_solution=True)) == 6


def test_bad_source_is_a_clear_error(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "x", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match="generations"):
        prep.main(prep.Args(source=str(bad), tokenizer=str(world["tok_dir"]), cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match="verify"):
        prep.main(prep.Args(source=str(world["src"]), verify="llama"))
