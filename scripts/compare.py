"""Merge several evaluation results into one markdown table (like the paper's Table 1).

Each input is a `results.json` written by `eval/evaluate.py`, or the folder holding it. Rows keep the
order given; cells are accuracy in percent (avg@n, i.e. pass@1 for n = 1), the last column the mean
over the table's benchmarks (shown only for rows that have all of them). The table goes to stdout and,
with --out, to a file. Rows evaluated with different generation settings are flagged below the table.

    python scripts/compare.py runs/eval/base runs/eval/sft runs/eval/grpo runs/eval/opd runs/eval/stable_opd \\
        --labels base,SFT,GRPO,OPD,Stable-OPD --out docs/results_table.md
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from common.errors import BadInput, error_boundary  # noqa: E402
from eval.table import markdown_table  # noqa: E402

# Settings that define the protocol; a row that differs from the first in any of them is flagged.
PROTOCOL_KEYS = ("preset", "n_samples", "temperature", "top_p", "top_k", "max_new_tokens", "prompt_template", "instruction", "limit")


def load_results(path: str) -> dict:
    """A results.json, given as the file or the folder that holds it."""
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise BadInput(f"no results.json at {p} (run eval/evaluate.py with --output_dir {p.parent} first)")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise BadInput(f"{p}: not valid JSON ({e}): rerun eval/evaluate.py with --output_dir {p.parent}") from e


def protocol_notes(results: list[dict], labels: list[str]) -> list[str]:
    """One line per row whose generation settings differ from the first row's."""
    first = results[0].get("settings", {})
    notes = []
    for label, result in zip(labels[1:], results[1:]):
        diff = [f"{k}={result.get('settings', {}).get(k)!r} (vs {first.get(k)!r})" for k in PROTOCOL_KEYS
                if result.get("settings", {}).get(k) != first.get(k)]
        if diff:
            notes.append(f"- {label}: different settings: " + ", ".join(diff))
    return notes


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="results.json files or the folders holding them")
    parser.add_argument("--labels", default="", help="comma list of row names (default: each result's label)")
    parser.add_argument("--out", default="", help="also write the table to this markdown file")
    parser.add_argument("--digits", type=int, default=1, help="decimals per cell (default 1)")
    args = parser.parse_args(argv)
    results = [load_results(p) for p in args.results]
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else [r.get("label") or r["model"] for r in results]
    if len(labels) != len(results):
        raise BadInput(f"--labels: {len(labels)} labels for {len(results)} results")
    text = markdown_table(results, labels, digits=args.digits)
    notes = protocol_notes(results, labels)
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    with error_boundary():  # an expected failure: one `error:` line, exit 2 (common/errors.py)
        main()
