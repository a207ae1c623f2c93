"""Benchmark `common.grading.grade_batch`: responses graded per second, pool vs inline; and, with
`--robust N`, how the grader copes with hostile content.

The mix imitates a training batch: toy-world chains of thought ending in `\\boxed{n}` (right and
wrong), LaTeX fractions written as decimals or `\\dfrac`, symbolic answers that need math-verify,
and responses with no answer at all. Target: >= 200 responses/s on 2 cores.

The robustness run grades the inputs reported to crash the grader plus N random hostile ones
(nested LaTeX, huge and tiny numbers, junk bytes, NULs, unbalanced braces), one at a time inline
(`grade_one`) and in the pool (`grade_batch`), then all in one batch; it counts cases that raised
(goal: 0) and reports the worst time per item (goal: about the timeout, plus the kill grace).

    python scripts/bench_grading.py            # N=2000
    python scripts/bench_grading.py --n 500 --timeout 5
    python scripts/bench_grading.py --n 0 --robust 500 --timeout 2
"""

import argparse
import random
import statistics
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from common.grading import (_KILL_GRACE, _clean_gold, _prejudge, extract_answer, grade_batch,  # noqa: E402
                            grade_one, grade_stats)

SYMBOLIC = [  # k -> (gold, prediction): equivalences that only math-verify can decide
    lambda k: (f"{k}\\sqrt{{2}}", f"\\sqrt{{{2 * k * k}}}"),
    lambda k: (f"{k}", f"x = {k}"),
    lambda k: (f"(0,{k}]", f"(0, {k}]"),
    lambda k: (f"\\frac{{\\pi}}{{{k}}}", f"\\pi/{k}"),
    lambda k: (f"\\{{1,{k},{k + 1}\\}}", f"\\{{{k + 1},{k},1\\}}"),
    lambda k: (f"{k}\\%", f"{k / 100}"),
    lambda k: (f"{k}000", f"{k},000"),
    lambda k: (f"x^2+{2 * k}x+{k * k}", f"(x+{k})^2"),
]


def toy_chain(rng: random.Random) -> tuple[str, int]:
    """A multi-step arithmetic chain of thought and its result."""
    value, steps = rng.randint(1, 20), []
    for k in range(rng.randint(2, 6)):
        op, operand = rng.choice("+-*"), rng.randint(1, 9)
        new = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        steps.append(f"Step {k + 1}: {value} {op} {operand} = {new}.")
        value = new
    return " ".join(steps), value


def make_item(rng: random.Random) -> tuple[str, str]:
    """One (response, gold) pair drawn from the mix described in the module docstring."""
    kind = rng.random()
    if kind < 0.40:  # toy world, correct
        chain, value = toy_chain(rng)
        return f"{chain} The answer is \\boxed{{{value}}}.", str(value)
    if kind < 0.60:  # toy world, wrong
        chain, value = toy_chain(rng)
        return f"{chain} The answer is \\boxed{{{value + rng.choice([-2, -1, 1, 3])}}}.", str(value)
    if kind < 0.75:  # fractions: \dfrac (exact shortcut), decimal (math-verify), or wrong
        a, b = rng.randint(1, 9), rng.choice([2, 4, 5, 8])
        gold = f"\\frac{{{a}}}{{{b}}}"
        pred = rng.choice([f"\\dfrac{{{a}}}{{{b}}}", str(float(Fraction(a, b))), f"\\frac{{{a + 1}}}{{{b}}}"])
        return f"Simplifying, we get $\\boxed{{{pred}}}$.", gold
    if kind < 0.90:  # symbolic equivalences
        gold, pred = rng.choice(SYMBOLIC)(rng.randint(2, 99))
        return f"Therefore the final answer is $\\boxed{{{pred}}}$.", gold
    return "Let me think about this step by step, carefully and slowly", str(rng.randint(1, 99))


# ----------------------------------------------------------------------------- hostile content

BIG = "9" * 5000
REPORTED = [  # (response, gold) reported to raise OverflowError / ValueError, and kin
    ("\\boxed{1e400}", "5"), ("The answer is 2\\times10^{309}.", "5"), ("\\boxed{1e99999999}", "5"),
    (f"\\boxed{{{BIG}}}", "5"), (f"The answer is {BIG}.", "7"), ("7" * 20_000, "7"), ("\\boxed{1e-400}", "0"),
    ("\\boxed{1e400}", "10^{400}"), (f"\\boxed{{{BIG}}}", "\\frac12"), ("\\boxed{9^{9^{9^{9}}}}", "1"),
    ("\\boxed{1e99999999999999999999999}", "5"), ("\\boxed{10^{10^{10}}}", "1"), ("{" * 50_000, "1"),
    ("\\boxed{" * 1000 + "1", "1"), ("\x00\\boxed{\x00}\x00", "1"), ("\\boxed{1}", None), (None, "1"),
]
EXTREME_NUMBERS = ["1e400", "-1e400", "1e-400", "1e99999999", "1e99999999999999999999999", "2\\times10^{309}",
                   "0e999999999999999999", BIG, "-" + "9" * 4301, "0" * 3000 + "7", "1" + "0" * 20000, "nan", "inf",
                   "-0", "1/0", "5e-324", "1.7976931348623157e+308", "1,000,000"]
TOKENS = ["x", "\\pi", "\\infty", "\\text{yes}", "%", "^\\circ", "", " ", "\\", "{", "}", "$", "^", "_", "&",
          "\\frac", "\\sqrt", "\\left(", "\\right)", "\\boxed{", "=", "\\{", "\\}", ",", "."]
TEMPLATES = ["\\frac{{{}}}{{{}}}", "\\sqrt{{{}}}{}", "{}^{{{}}}", "\\left({}, {}\\right)", "\\{{{}, {}\\}}",
             "\\boxed{{{}}}{}", "\\begin{{pmatrix}}{}\\\\{}\\end{{pmatrix}}", "{} + {}", "{}{}"]


def random_number(rng: random.Random) -> str:
    """An extreme or random number: huge and tiny exponents, long digit runs, float reprs."""
    kind = rng.random()
    if kind < 0.3:
        return rng.choice(EXTREME_NUMBERS)
    if kind < 0.5:
        return f"{rng.randint(-99, 10 ** 6)}e{rng.randint(-10 ** 30, 10 ** 30)}"
    if kind < 0.6:
        return f"{rng.randint(-99, 99)}\\times10^{{{rng.randint(-10 ** 9, 10 ** 9)}}}"
    if kind < 0.8:
        return repr(rng.uniform(-1e300, 1e300) * rng.choice([1, 1e-300, 1e-320]))
    return "".join(rng.choices("0123456789", k=rng.randint(1, 8000)))


def random_latex(rng: random.Random, depth: int = 0) -> str:
    """Nested LaTeX built from random templates, numbers and stray tokens."""
    if depth > 4 or rng.random() < 0.3:
        return random_number(rng) if rng.random() < 0.5 else rng.choice(TOKENS)
    return rng.choice(TEMPLATES).format(random_latex(rng, depth + 1), random_latex(rng, depth + 1))


def random_junk(rng: random.Random) -> str:
    """Junk bytes, NULs and control characters, lone surrogates, unbalanced braces, long repeats."""
    kind = rng.random()
    if kind < 0.25:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))).decode("latin-1")
    if kind < 0.5:
        return "".join(chr(rng.choice([0, 1, 0xD800, 0xFFFF, 0x10FFFF, rng.randint(0, 0x10FFFF)]))
                       for _ in range(rng.randint(0, 100)))
    if kind < 0.75:
        return "".join(rng.choices("{}\\$^_ boxed0123456789.", k=rng.randint(0, 400)))
    return rng.choice(["{", "\\boxed{", "$", "9", "answer is ", "1,", "\\frac{"]) * rng.randint(1, 20_000)


def hostile_item(rng: random.Random) -> tuple[str | None, str | None]:
    """One (response, gold) pair of hostile content."""
    answer = random_latex(rng) if rng.random() < 0.7 else random_junk(rng)
    response = rng.choice([f"We get $\\boxed{{{answer}}}$.", f"The answer is {answer}.", answer,
                           f"{random_junk(rng)} \\boxed{{{answer}}}", None])
    gold = rng.choice([random_latex(rng), random_number(rng), random_junk(rng), str(rng.randint(0, 99)), None])
    return response, gold


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result or the exception raised)."""
    start = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # what we count: the grader must never get here
        result = exc
    return time.perf_counter() - start, result


def robustness(n: int, timeout: float, seed: int) -> None:
    """Grade REPORTED plus `n` hostile items inline, in the pool and as one batch; print the counts."""
    rng = random.Random(seed)
    items = REPORTED + [hostile_item(rng) for _ in range(n)]
    print(f"robustness: {len(items)} cases ({len(REPORTED)} reported + {n} random, seed {seed}), timeout {timeout} s")
    grade_batch(["\\boxed{0.5}"], ["\\frac12"])  # start the pool: its start-up is not an item's time
    for label, grade in (("inline (grade_one)", lambda r, g: grade_one(r, g, timeout=timeout)),
                         ("pool (grade_batch)", lambda r, g: grade_batch([r], [g], timeout=timeout)[0])):
        runs = [(timed(grade, r, g), (r, g)) for r, g in items]
        raised = [(item, res) for (_, res), item in runs if isinstance(res, Exception)]
        seconds = [sec for (sec, _), _ in runs]
        statuses = Counter(res.status for (_, res), _ in runs if not isinstance(res, Exception))
        slowest_sec, slowest = max((sec, item) for (sec, _), item in runs)
        print(f"  {label}: tried {len(items)}, raised {len(raised)}; worst {max(seconds):.2f} s/item, "
              f"median {statistics.median(seconds) * 1000:.1f} ms; statuses {dict(statuses)}")
        print(f"    slowest ({slowest_sec:.2f} s): {repr(slowest)[:100]}")
        for item, exc in raised[:5]:
            print(f"    RAISED {type(exc).__name__}: {exc!s:.80} on {repr(item)[:80]}")
    sec, res = timed(grade_batch, [r for r, _ in items], [g for _, g in items], timeout=timeout)
    raised = isinstance(res, Exception)
    outcome = f"raised {type(res).__name__}" if raised else f"ok, {dict(Counter(g.status for g in res))}"
    print(f"  one batch of {len(items)}: {outcome} in {sec:.1f} s")
    print(f"  bound per item: timeout {timeout} s (+ {_KILL_GRACE} s before a deaf worker is killed)")


# ----------------------------------------------------------------------------- throughput

def bench(responses, golds, **kwargs) -> tuple[float, list]:
    start = time.perf_counter()
    grades = grade_batch(responses, golds, **kwargs)
    return len(responses) / (time.perf_counter() - start), grades


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--robust", type=int, default=0, metavar="N",
                        help="also grade the reported crashers plus N random hostile inputs")
    args = parser.parse_args()
    if args.n:
        throughput(args)
    if args.robust:
        robustness(args.robust, args.timeout, args.seed)


def throughput(args) -> None:
    """Responses per second on the training-like mix of the module docstring."""
    rng = random.Random(args.seed)
    responses, golds = zip(*(make_item(rng) for _ in range(args.n)))
    responses, golds = list(responses), list(golds)
    needs_mv = sum(_prejudge(*extract_answer(r), _clean_gold(g), False) is None for r, g in zip(responses, golds))
    print(f"{args.n} responses, {needs_mv} ({needs_mv / args.n:.0%}) need math-verify")

    cold, _ = bench(responses[:50], golds[:50], timeout=args.timeout)  # includes pool start-up
    print(f"pool cold start (first 50):  {cold:8.0f} responses/s")
    pool_rate, pool_grades = bench(responses, golds, timeout=args.timeout)
    print(f"grade_batch, pool (warm):    {pool_rate:8.0f} responses/s")
    inline_rate, inline_grades = bench(responses, golds, timeout=args.timeout, max_workers=0)
    print(f"grade_batch, inline:         {inline_rate:8.0f} responses/s")
    mv_only = [(r, g) for r, g in zip(responses, golds) if _prejudge(*extract_answer(r), _clean_gold(g), False) is None]
    mv_rate, _ = bench([r for r, _ in mv_only], [g for _, g in mv_only], timeout=args.timeout)
    print(f"math-verify-only items, pool:{mv_rate:8.0f} responses/s (worst case: nothing decided early)")
    assert [g.correct for g in pool_grades] == [g.correct for g in inline_grades], "pool and inline disagree"
    stats = grade_stats(pool_grades)
    print("stats:", {k: round(v, 3) for k, v in stats.items() if v})


if __name__ == "__main__":
    main()
