"""The paper's training data (arXiv 2604.08527, section 4) from the public OpenR1-Math-220k.

The paper (following Yan et al. 2025) keeps OpenR1-Math-220k generations of <= 8,192 tokens that Math-Verify
judges correct (94K -> 46K problems), warm-starts the student by SFT on 33K of them and runs OPD / Stable-OPD
on the remaining 13K prompts, whose golden solutions are "their filtered generations".

Source schema, verified 2026-11-25 on the dataset card (huggingface.co/datasets/open-r1/OpenR1-Math-220k,
README.md at commit 075afe0 and its dataset viewer): config `default` -> split `train` (data/train-*-of-00010
.parquet, 93,733 problems; config `extended` adds 131K more, `all` holds both as splits), one row per problem:
  problem, solution (NuminaMath-1.5 reference solution), answer, problem_type, question_type, source, uuid: str
  generations: list[str]               2-4 DeepSeek-R1 traces, prompted with the problem + "Please reason step by
                                       step, and put your final answer within \\boxed{}."
  correctness_math_verify: list[bool]  Math-Verify verdict of each generation against `answer`
  correctness_llama: list[bool]        Llama-3.3-70B-Instruct judge (only some rows; may be null)
  is_reasoning_complete: list[bool], finish_reasons: list[str], correctness_count: int, messages: list[{role, content}]

Pipeline (counts after every step go to report.json and report.md):
  0. drop rows with an empty problem / answer or no generations, and repeated problem texts (first kept):
     stable_opd.py looks golden solutions up by problem text, and a problem must not sit in both splits.
  1. length: per generation, student-tokenizer tokens of the text (no special tokens, no EOS) <= --max_tokens.
  2. correctness, --verify: `dataset` (default) trusts correctness_math_verify: it IS Math-Verify's verdict
     against the same `answer`, which is the paper's filter, and costs nothing; `ours` re-grades with
     common/grading.py (last \\boxed{} + math-verify in a process pool with hard timeouts: the grader of our
     rewards and benchmarks; ~200K gradings); `both` keeps what both accept and counts the disagreements.
  3. problems with >= 1 generation left keep ONE golden (--golden): `first` (default: lowest index; neutral
     about length, which matters in a study of length inflation), `shortest` (as scripts/make_golden.py), `random`.
  4. seeded split: --opd_size problems (13,000) for OPD / Stable-OPD / GRPO, the rest (or --sft_size) for SFT.
Outputs in --out_dir: sft.jsonl, opd.jsonl (id, problem, answer, solution = the golden generation, plus source,
uuid, golden_index, golden_tokens, n_kept, golden_source), .parquet twins with --parquet, report.json, report.md.
stable_opd.py reads opd.jsonl's `solution` as --golden_data (or as train_data's own solution).

    python scripts/prepare_openr1.py --out_dir data/openr1 --num_proc 16          # hub download (~4 GB)
    python scripts/prepare_openr1.py --source local/train.parquet --verify both --parquet true
"""

import json
import os
import random
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.cli import parse  # noqa: E402
from common.data import DataError  # noqa: E402
from common.errors import error_boundary  # noqa: E402


@dataclass
class Args:
    source: str = field(default="open-r1/OpenR1-Math-220k", metadata={"help": "Hub id, a local dataset folder, or a .jsonl / .json / .parquet file in the OpenR1 schema."})
    subset: str = field(default="default", metadata={"help": "Hub config name (the paper's 94K problems are `default`)."})
    split: str = "train"
    revision: str = field(default="", metadata={"help": "Hub revision (commit) to pin; '' = the newest."})
    cache_dir: str = field(default="", metadata={"help": "datasets cache folder ('' = the default)."})
    tokenizer: str = field(default="Qwen/Qwen2.5-Math-1.5B", metadata={"help": "Student tokenizer that measures generation length."})
    max_tokens: int = field(default=8192, metadata={"help": "Keep generations of at most this many tokens (text only, no EOS)."})
    verify: str = field(default="dataset", metadata={"help": "dataset (correctness_math_verify), ours (common/grading.py) or both."})
    grade_workers: int = field(default=8, metadata={"help": "math-verify worker processes for --verify ours/both (0 = inline)."})
    grade_timeout: float = field(default=5.0, metadata={"help": "Seconds per math-verify comparison before it counts as wrong."})
    golden: str = field(default="first", metadata={"help": "Golden generation per problem: first, shortest or random (seeded)."})
    sft_solutions: str = field(default="golden", metadata={"help": "SFT rows: golden (one per problem) or all (every kept generation)."})
    opd_size: int = field(default=13000, metadata={"help": "Problems in the OPD set (the paper: 13K)."})
    opd_frac: float = field(default=0.0, metadata={"help": "If > 0, the OPD set is this fraction of the kept problems (overrides opd_size)."})
    sft_size: int = field(default=0, metadata={"help": "Problems in the SFT set (0 = all the rest; the paper: 33K)."})
    seed: int = 0
    out_dir: str = "data/openr1"
    parquet: bool = field(default=False, metadata={"help": "Also write sft.parquet and opd.parquet."})
    num_proc: int = field(default=8, metadata={"help": "Processes for tokenisation (datasets.map)."})
    limit: int = field(default=0, metadata={"help": "Only the first N rows (0 = all); for smoke runs."})


def load_source(args: Args):
    """The raw dataset: a local file (json / jsonl / parquet) or a hub id / local dataset folder."""
    import datasets

    cache = args.cache_dir or None
    if args.source.endswith((".jsonl", ".json", ".parquet")):
        if not Path(args.source).is_file():
            raise DataError(f"--source {args.source}: file not found")
        kind = "parquet" if args.source.endswith(".parquet") else "json"
        ds = datasets.load_dataset(kind, data_files=args.source, split="train", cache_dir=cache)
    else:
        ds = datasets.load_dataset(args.source, args.subset, split=args.split, revision=args.revision or None, cache_dir=cache)
    missing = sorted({"problem", "answer", "generations"} - set(ds.column_names))
    if missing:
        raise DataError(f"--source {args.source}: missing column(s) {missing} (has {ds.column_names})")
    if args.verify in ("dataset", "both") and "correctness_math_verify" not in ds.column_names:
        raise DataError(f"--verify {args.verify} needs the column correctness_math_verify; use --verify ours")
    return ds.select(range(min(args.limit, len(ds)))) if args.limit else ds


def count_tokens(generations_batch: list[list[str] | None], tokenizer) -> dict[str, list[list[int]]]:
    """datasets.map function: student-tokenizer length of every generation (text only, no special tokens)."""
    flat = [g or "" for gens in generations_batch for g in (gens or [])]
    lengths = iter(len(ids) for ids in tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
    return {"gen_tokens": [[next(lengths) for _ in (gens or [])] for gens in generations_batch]}


def valid_unique_rows(problems: list, answers: list, generations_n: list[int]) -> tuple[list[int], int, int]:
    """Indices of rows with a problem, an answer and >= 1 generation, first occurrence of each problem text;
    and the numbers of invalid and repeated rows dropped."""
    keep, seen, invalid, repeated = [], set(), 0, 0
    for i, (p, a, n) in enumerate(zip(problems, answers, generations_n)):
        if not (p or "").strip() or not str(a or "").strip() or n == 0:
            invalid += 1
        elif p in seen:
            repeated += 1
        else:
            seen.add(p)
            keep.append(i)
    return keep, invalid, repeated


def choose_golden(kept: list[int], lengths: list[int], rule: str, rng: random.Random) -> int:
    """Index (into the row's generations) of the golden one among the kept indices `kept`."""
    if rule == "first":
        return kept[0]
    if rule == "shortest":
        return min(kept, key=lambda j: (lengths[j], j))
    if rule == "random":
        return rng.choice(kept)
    raise ValueError(f"unknown --golden {rule!r}; choose first, shortest or random")


def split_problems(n: int, opd_size: int, opd_frac: float, sft_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded disjoint (opd, sft) positions in range(n), each in ascending order."""
    n_opd = round(opd_frac * n) if opd_frac > 0 else opd_size
    n_sft = sft_size or n - n_opd
    if n_opd < 0 or n_sft <= 0 or n_opd + n_sft > n:
        raise DataError(f"cannot split {n} kept problems into OPD {n_opd} + SFT {n_sft}; "
                        "lower --opd_size / --opd_frac / --sft_size")
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    return sorted(perm[:n_opd]), sorted(perm[n_opd:n_opd + n_sft])


def grade_ours(ds, candidates: dict[int, list[int]], args: Args) -> tuple[dict[int, list[bool]], dict[str, int]]:
    """common/grading.py verdicts for the generations `candidates[row]` (within the length cap), and status counts."""
    from tqdm import tqdm

    from common.grading import grade_batch

    verdicts, statuses, rows = {}, {}, sorted(candidates)
    chunk = 512
    for start in tqdm(range(0, len(rows), chunk), desc="grading (common/grading.py)", unit="chunk"):
        block = rows[start:start + chunk]
        sub = ds.select(block)
        texts, golds, where = [], [], []
        for row, gens, answer in zip(block, sub["generations"], sub["answer"]):
            for j in candidates[row]:
                texts.append(gens[j])
                golds.append(str(answer))
                where.append((row, j))
        grades = grade_batch(texts, golds, timeout=args.grade_timeout, max_workers=args.grade_workers)
        for (row, j), g in zip(where, grades):
            verdicts.setdefault(row, {})[j] = g.correct
            statuses[g.status] = statuses.get(g.status, 0) + 1
    return {row: [verdicts.get(row, {}).get(j, False) for j in range(max(candidates[row], default=-1) + 1)]
            for row in rows}, statuses


def write_rows(path: Path, rows: list[dict], parquet: bool) -> None:
    """JSONL (atomically) and optionally a Parquet twin."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    if parquet:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path.with_suffix(".parquet")))


def report_markdown(report: dict) -> str:
    """The counts after each filter as a markdown table, then the settings."""
    c = report["counts"]
    lines = ["# OpenR1-Math-220k -> SFT / OPD sets (scripts/prepare_openr1.py)", "",
             "| step | problems | generations |", "|---|---|---|",
             f"| loaded | {c['rows_in']} | {c['generations_in']} |",
             f"| 0. valid, unique problem text (-{c['rows_invalid']} invalid, -{c['rows_repeated']} repeated) "
             f"| {c['problems']} | {c['generations']} |",
             f"| 1. <= {report['settings']['max_tokens']} tokens (-{c['generations_over_length']}) "
             f"| {c['problems_after_length']} | {c['generations_within_length']} |",
             f"| 2. correct, verify={report['settings']['verify']} (-{c['generations_incorrect']}) "
             f"| {c['problems_kept']} | {c['generations_kept']} |",
             f"| 4. OPD set | {c['opd_problems']} | {c['opd_problems']} (golden) |",
             f"| 4. SFT set | {c['sft_problems']} | {c['sft_rows']} |", ""]
    if report.get("golden_tokens"):
        g = report["golden_tokens"]
        lines += [f"Golden solutions ({report['settings']['golden']}): tokens mean {g['mean']:.0f}, median {g['median']:.0f}, "
                  f"max {g['max']}.", ""]
    for key in ("verify_disagreements", "grade_statuses", "golden_not_stopped"):
        if report.get(key):
            lines += [f"{key}: {json.dumps(report[key])}", ""]
    lines += ["Settings:", "", "```json", json.dumps(report["settings"], indent=2), "```", ""]
    return "\n".join(lines)


def main(args: Args) -> dict:
    from transformers import AutoTokenizer
    from tqdm import tqdm

    for name, value, allowed in (("verify", args.verify, ("dataset", "ours", "both")),
                                 ("golden", args.golden, ("first", "shortest", "random")),
                                 ("sft_solutions", args.sft_solutions, ("golden", "all"))):
        if value not in allowed:
            raise DataError(f"--{name} {value!r}: choose one of {', '.join(allowed)}")
    ds = load_source(args)
    rows_in = len(ds)
    # 0. valid rows, unique problem text
    import pyarrow.compute as pc  # list lengths without pulling ~5 GB of generation text into Python

    n_gens = pc.list_value_length(ds.with_format("arrow")["generations"]).fill_null(0).to_pylist()
    keep, invalid, repeated = valid_unique_rows(ds["problem"], ds["answer"], n_gens)
    ds = ds.select(keep)
    # 1. length in student tokens (parallel tokenisation; datasets shows the progress)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    lengths = ds.map(count_tokens, input_columns="generations", batched=True, batch_size=64, fn_kwargs={"tokenizer": tokenizer},
                     remove_columns=ds.column_names, desc="token lengths",  # writes only the lengths to the cache
                     num_proc=args.num_proc if args.num_proc > 1 and len(ds) > args.num_proc else None)["gen_tokens"]
    within = {i: [j for j, n in enumerate(ls) if n <= args.max_tokens] for i, ls in enumerate(lengths)}
    # 2. correctness of the generations within the cap
    flags_dataset = ds["correctness_math_verify"] if args.verify in ("dataset", "both") else None
    flags_ours, statuses = (grade_ours(ds, within, args) if args.verify in ("ours", "both") else (None, {}))
    disagreements = {"dataset_only": 0, "ours_only": 0}
    kept: dict[int, list[int]] = {}
    for i, cand in within.items():
        ok, theirs = [], (flags_dataset[i] or []) if flags_dataset is not None else []
        for j in cand:
            d = j < len(theirs) and bool(theirs[j])  # a missing / null flag counts as wrong
            o = flags_ours is not None and bool(flags_ours[i][j])
            if args.verify == "both":
                disagreements["dataset_only"] += d and not o
                disagreements["ours_only"] += o and not d
            if (d if args.verify == "dataset" else o if args.verify == "ours" else d and o):
                ok.append(j)
        if ok:
            kept[i] = ok
    # 3. one golden per problem
    rng = random.Random(args.seed)
    problems = sorted(kept)
    golden = {i: choose_golden(kept[i], lengths[i], args.golden, rng) for i in problems}
    # 4. seeded split, then the output rows (only the chosen generations are read back)
    opd_pos, sft_pos = split_problems(len(problems), args.opd_size, args.opd_frac, args.sft_size, args.seed)
    opd_set = {problems[p] for p in opd_pos}
    wanted = sorted(problems[p] for p in opd_pos + sft_pos)
    columns = [c for c in ("problem", "answer", "generations", "uuid", "source", "finish_reasons") if c in ds.column_names]
    opd_rows, sft_rows, not_stopped = [], [], 0
    sub = ds.select_columns(columns).select(wanted)
    for i, row in tqdm(zip(wanted, sub), total=len(wanted), desc="writing rows"):
        base = {"id": row.get("uuid") or f"openr1-{keep[i]}", "problem": row["problem"], "answer": str(row["answer"]),
                "source": row.get("source"), "uuid": row.get("uuid")}
        g = golden[i]
        not_stopped += bool(row.get("finish_reasons")) and row["finish_reasons"][g] not in (None, "stop")
        picks = kept[i] if i not in opd_set and args.sft_solutions == "all" else [g]
        made = [{**base, "solution": row["generations"][j], "golden_index": j, "golden_tokens": lengths[i][j],
                 "n_kept": len(kept[i]), "golden_source": f"OpenR1-Math-220k DeepSeek-R1 generation {j} "
                 f"({args.golden if j == g else 'another'} kept; <= {args.max_tokens} tokens, math-verify: {args.verify})"}
                for j in picks]
        (opd_rows if i in opd_set else sft_rows).extend(made)
    out = Path(args.out_dir)
    write_rows(out / "sft.jsonl", sft_rows, args.parquet)
    write_rows(out / "opd.jsonl", opd_rows, args.parquet)
    gold_lengths = [lengths[i][golden[i]] for i in problems]
    report = {
        "settings": {**asdict(args), "tokenizer_class": type(tokenizer).__name__},
        "counts": {"rows_in": rows_in, "generations_in": sum(n_gens), "rows_invalid": invalid, "rows_repeated": repeated,
                   "problems": len(keep), "generations": sum(len(x) for x in lengths),
                   "generations_over_length": sum(len(x) for x in lengths) - sum(len(c) for c in within.values()),
                   "generations_within_length": sum(len(c) for c in within.values()),
                   "problems_after_length": sum(1 for c in within.values() if c),
                   "generations_incorrect": sum(len(c) for c in within.values()) - sum(len(k) for k in kept.values()),
                   "generations_kept": sum(len(k) for k in kept.values()), "problems_kept": len(problems),
                   "problems_dropped": len(keep) - len(problems),
                   "opd_problems": len(opd_rows), "sft_problems": len(sft_pos), "sft_rows": len(sft_rows),
                   "unused_problems": len(problems) - len(wanted)},
        "golden_tokens": ({"mean": statistics.fmean(gold_lengths), "median": statistics.median(gold_lengths),
                           "max": max(gold_lengths)} if gold_lengths else None),
        "golden_not_stopped": not_stopped,
        "verify_disagreements": disagreements if args.verify == "both" else None,
        "grade_statuses": statuses or None,
        "files": {"sft": str(out / "sft.jsonl"), "opd": str(out / "opd.jsonl")},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    c = report["counts"]
    print(f"{c['rows_in']} rows -> {c['problems']} valid unique problems -> {c['problems_after_length']} with a generation "
          f"<= {args.max_tokens} tokens -> {c['problems_kept']} with a correct one; OPD {c['opd_problems']}, "
          f"SFT {c['sft_problems']} problems ({c['sft_rows']} rows) in {out}/ (report.md)")
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with error_boundary():  # an expected failure: one `error:` line, exit 2 (common/errors.py)
        main(parse(Args))
