"""Golden responses for Stable-OPD's rollout-mixture term, for datasets without solutions.

For every training prompt, sample k responses from the teacher, grade them against the gold answer
(common/grading.py), and keep the shortest correct one that ended with EOS (complete, not truncated:
the mixture term exists to anchor the student to well-formed, terminating solutions). Reports
coverage, the share of prompts that got a golden response. Prompts without one are dropped from the
output by default (stable_opd.py needs a golden response for every prompt it trains on), or kept
without a solution with --keep_missing (then train on them with --mix_coef 0 only).

    python scripts/make_golden.py --teacher runs/demo/full/teacher/final --data data/toy/train.jsonl \\
        --out data/toy/train_golden.jsonl --k 4 --limit 2000
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.data import COT_INSTRUCTION, load_rows  # noqa: E402
from common.errors import error_boundary  # noqa: E402
from common.models import load_model, load_tokenizer  # noqa: E402
from common.evaluation import evaluate_rows  # noqa: E402


def shortest_correct(records: list[dict]) -> dict | None:
    """The shortest (in tokens) correct, EOS-terminated response among one prompt's samples."""
    ok = [r for r in records if r["correct"] and r["finish_reason"] == "stop"]
    return min(ok, key=lambda r: (r["n_tokens"], r["sample_index"])) if ok else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher model folder or hub id")
    p.add_argument("--data", required=True, help="prompts: JSONL / Parquet / hub id with problem, answer")
    p.add_argument("--out", required=True, help="output JSONL (input rows + `solution` + `golden_source`)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0 = off (the full softmax)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--prompt_template", default="chat")
    p.add_argument("--instruction", default=COT_INSTRUCTION)
    p.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep_missing", action="store_true", help="keep prompts without a golden response (no solution field)")
    a = p.parse_args()

    rows = load_rows(a.data, limit=a.limit or None)
    tokenizer, teacher = load_tokenizer(a.teacher), load_model(a.teacher, trainable=False)
    _, records = evaluate_rows(teacher, tokenizer, rows, n_samples=a.k, greedy=False, temperature=a.temperature,
                               top_p=a.top_p, top_k=a.top_k, max_new_tokens=a.max_new_tokens, prompt_template=a.prompt_template,
                               instruction=a.instruction, batch_size=a.batch_size, seed=a.seed, show_progress=True,
                               desc="teacher samples")
    by_row: dict[int, list[dict]] = {}
    for r in records:
        by_row.setdefault(r["row_index"], []).append(r)
    out, covered = [], 0
    for i, row in enumerate(rows):
        best = shortest_correct(by_row.get(i, []))
        if best is not None:
            covered += 1
            out.append({**row, "solution": best["response"], "golden_source": f"teacher shortest correct of {a.k}"})
        elif a.keep_missing:
            out.append({k: v for k, v in row.items() if k != "solution"})
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in out))
    tmp.replace(a.out)
    print(f"coverage: {covered}/{len(rows)} prompts ({covered / len(rows):.1%}) have a golden response; "
          f"{len(rows) - covered} without one were {'kept without a solution' if a.keep_missing else 'dropped'}; "
          f"wrote {len(out)} rows to {a.out}")


if __name__ == "__main__":
    with error_boundary():  # an expected failure: one `error:` line, exit 2 (common/errors.py)
        main()
