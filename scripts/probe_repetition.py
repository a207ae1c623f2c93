"""Token-level probe of the paper's mechanism: how readily does each model continue a repetition?

For toy test problems, the golden chain of equations is restated k = 0..K times (each pass introduced by
"Let me check again.", the style of `common.toy.with_rechecks`), and each model scores, teacher-forced:

  log P(another pass)   log-prob of the first token of one more restatement (" Let me check again. ...")
                        right after the k-th one
  log P(answer)         log-prob of the first token of " The answer is \\boxed{a}." at the same place
  copy logp / token     mean log-prob per token of the k-th restatement itself (k >= 1): how easy copying is
  log P(EOS)            of the end-of-sequence token after the boxed answer

The paper's loop needs a teacher whose log P(another pass) and copy log-prob exceed the student's (so the
OPD advantage A = log pi_T - log pi_S is positive on repeated content) and grow with k.

    python scripts/probe_repetition.py --model teacher=runs/demo/full/teacher/final --model student=runs/demo/full/student/final
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.data import COT_INSTRUCTION, render_prompt  # noqa: E402
from common.models import load_model, load_tokenizer  # noqa: E402
from common.toy import RECHECK  # noqa: E402


def completions(row: dict, k: int) -> tuple[str, str, tuple[int, int]]:
    """Two well-formed solutions that share the chain restated k times: one stops there (the boxed answer
    follows), one restates once more; and the character span of the k-th restatement."""
    chain, answer = row["solution"].rsplit(" The answer is ", 1)
    body = chain + "".join(f" {RECHECK} {chain}" for _ in range(k))
    stop = f"{body} The answer is {answer}"
    more = f"{body} {RECHECK} {chain} The answer is {answer}"
    return stop, more, (len(body) - len(chain), len(body))


@torch.no_grad()
def token_logps(model, prompt: list[int], completion: list[int], eos: int) -> torch.Tensor:
    """log P(completion token i | prompt, earlier tokens) for every completion token and a final EOS."""
    ids = torch.tensor([prompt + completion + [eos]])
    logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[len(prompt) - 1 :]


def score(model, tokenizer, row: dict, k: int) -> dict[str, float]:
    """The probe's numbers after k restatements (see the module docstring). Each text is tokenized whole (the
    models were trained on whole solutions, whose BPE merges may straddle sentences); the branch point is
    the first token where the two solutions differ."""
    prompt = tokenizer(render_prompt(tokenizer, row["problem"], "chat", COT_INSTRUCTION), add_special_tokens=False)["input_ids"]
    stop_text, more_text, span = completions(row, k)
    stop = tokenizer(stop_text, add_special_tokens=False, return_offsets_mapping=True)
    more = tokenizer(more_text, add_special_tokens=False)["input_ids"]
    d = next(i for i, (a, b) in enumerate(zip(stop["input_ids"], more)) if a != b)
    lp_stop = token_logps(model, prompt, stop["input_ids"], tokenizer.eos_token_id)
    lp_more = token_logps(model, prompt, more, tokenizer.eos_token_id)
    out = {"logp_another": float(lp_more[d]), "logp_answer": float(lp_stop[d]), "logp_eos": float(lp_stop[-1])}
    if k:
        inside = [i for i, (a, b) in enumerate(stop["offset_mapping"]) if a >= span[0] and b <= span[1]]
        out["copy_logp"] = float(lp_stop[inside].mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--data", default="data/toy/test.jsonl")
    parser.add_argument("--n", type=int, default=50, help="problems")
    parser.add_argument("--max_k", type=int, default=4, help="restatements 0..max_k")
    parser.add_argument("--out", default="", help="also write the table as JSON here")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[: args.n]]
    table = {}
    print("| model | k | log P(another pass) | log P(answer) | copy logp/token | log P(EOS) |\n|---|---|---|---|---|---|")
    for spec in args.model:
        name, path = spec.split("=", 1)
        model, tokenizer = load_model(path, trainable=False).eval(), load_tokenizer(path)
        for k in range(args.max_k + 1):
            scores = [score(model, tokenizer, r, k) for r in rows]
            mean = {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}
            table.setdefault(name, {})[k] = mean
            copy = f"{mean['copy_logp']:.3f}" if "copy_logp" in mean else "-"
            print(f"| {name} | {k} | {mean['logp_another']:.2f} | {mean['logp_answer']:.2f} | {copy} | {mean['logp_eos']:.2f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
