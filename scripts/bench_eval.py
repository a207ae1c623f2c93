"""Time the evaluation of a toy model on the toy test split (500 problems) with the HF backend.

The protocol of the toy world's evals: chat template + CoT instruction, greedy, 256 new tokens, graded
by common/grading.py. Target: <= 120 s end to end (model load + generation + grading) on 2 CPU cores.

    python scripts/bench_eval.py /tmp/demo1/full/teacher/final
    python scripts/bench_eval.py runs/toy/teacher/final --batch_size 128 --limit 100
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

import torch  # noqa: E402

from common.models import load_model, load_tokenizer  # noqa: E402
from common.toy import TOKENIZER_DIR as TOY_TOKENIZER  # noqa: E402
from eval.benchmarks import load_benchmark  # noqa: E402
from common.evaluation import evaluate_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a toy model folder (save_pretrained with its tokenizer)")
    parser.add_argument("--tokenizer", default=str(TOY_TOKENIZER),
                        help="tokenizer folder (default: the committed toy tokenizer, which every toy model uses)")
    parser.add_argument("--batch_size", type=int, default=64, help="sequences generated at once (default 64)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="generation cap (default 256, the toy protocol)")
    parser.add_argument("--limit", type=int, default=0, help="first N problems only (0 = all 500)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see below; 0 = torch's default)")
    args = parser.parse_args()
    # One thread: a decode step of a 3M-parameter model is a few small matmuls, which a second OpenMP
    # thread slows down (synchronisation), by ~50x when the other core is busy with another job.
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer)
    model = load_model(args.model, trainable=False)
    rows, _ = load_benchmark("toy")
    rows = rows[: args.limit or None]
    loaded = time.perf_counter()
    metrics, samples = evaluate_rows(model, tokenizer, rows, greedy=True, max_new_tokens=args.max_new_tokens,
                                     batch_size=args.batch_size, show_progress=True, desc="toy")
    done = time.perf_counter()
    tokens = sum(s["n_tokens"] for s in samples)
    print(json.dumps({"problems": len(rows), "batch_size": args.batch_size, "load_s": round(loaded - start, 2),
                      "eval_s": round(done - loaded, 2), "total_s": round(done - start, 2),
                      "tokens_per_s": round(tokens / (done - loaded), 1), "threads": torch.get_num_threads(), "acc": metrics["acc"],
                      "no_answer_frac": metrics["no_answer_frac"], "truncated_frac": metrics["truncated_frac"],
                      "len_mean": metrics["len_mean"], "target_s": 120}, indent=2))


if __name__ == "__main__":
    main()
