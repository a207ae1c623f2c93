"""Property tests of common/grading.py: whatever a response or gold holds (nested LaTeX, huge and
tiny numbers, junk bytes, NULs, unbalanced braces), grading raises nothing and takes bounded time.

Two properties: the in-process stage (extraction and pre-judgement, where the reported crashes
were) never raises even without `grade_batch`'s per-item guard, on many cheap examples; and the
whole pipeline, math-verify workers included, returns a well-formed Grade per item within the
per-item timeout, on a few batches. Needs hypothesis (test-only).
"""

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import math  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import common.grading as grading  # noqa: E402
from common.grading import (METHODS, STATUSES, Grade, _clean_gold, _prejudge, extract_answer,  # noqa: E402
                            grade_batch)

# ----------------------------------------------------------------------------- strategies

EXTREME_NUMBERS = ["1e400", "-1e400", "1e-400", "1e99999999", "1e99999999999999999999999", "2\\times10^{309}",
                   "0e999999999999999999", "1.5\\times10^{-99999}", "9" * 5000, "-" + "9" * 4301, "0" * 3000 + "7",
                   "1" + "0" * 5000, "1" + "0" * 20000, "nan", "inf", "-0", "00", "1/0", "0/0", "1,000,000"]
numbers = st.one_of(
    st.sampled_from(EXTREME_NUMBERS),
    st.integers().map(str),
    st.floats().map(repr),  # includes nan, inf, 5e-324, 1.7976931348623157e+308
    st.builds("{}e{}".format, st.integers(-10, 10 ** 6), st.integers(-10 ** 30, 10 ** 30)),
    st.builds("{}\\times10^{{{}}}".format, st.integers(-99, 99), st.integers(-10 ** 30, 10 ** 30)),
    st.text("0123456789", min_size=1, max_size=6000),
)
TOKENS = ["x", "y", "\\pi", "\\infty", "\\text{yes}", "\\mathrm{cm}", "%", "\\%", "^\\circ", "i", "e",
          "", " ", "\\", "{", "}", "$", "^", "_", "&", "\\\\", "\\frac", "\\sqrt", "\\left(", "\\right)",
          "\\boxed", "\\boxed{", "\\fbox{", "!", "=", "<", "\\leq", "\\cup", "\\{", "\\}", ",", ".", "/",
          "\x00", "\ud800", "\udfff", "\ufeff", "\u200b"]  # NUL, lone surrogates, BOM, zero-width space
atoms = st.one_of(numbers, st.sampled_from(TOKENS))
latex = st.recursive(atoms, lambda inner: st.one_of(
    st.builds("\\frac{{{}}}{{{}}}".format, inner, inner),
    st.builds("\\sqrt{{{}}}".format, inner),
    st.builds("{}^{{{}}}".format, inner, inner),
    st.builds("\\left({}\\right)".format, inner),
    st.builds("\\{{{}\\}}".format, inner),
    st.builds("\\boxed{{{}}}".format, inner),
    st.builds("\\begin{{pmatrix}}{}\\\\{}\\end{{pmatrix}}".format, inner, inner),
    st.lists(inner, min_size=2, max_size=4).map(", ".join),
    st.lists(inner, min_size=2, max_size=4).map(" + ".join),
), max_leaves=12)
junk = st.one_of(
    st.text(max_size=200),  # any unicode, NULs and control characters included
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.text("{}\\$^_ boxed0123456789.", max_size=300),  # unbalanced braces and half commands
    st.builds(str.__mul__, st.sampled_from(["{", "\\boxed{", "$", "9", "answer is ", "1,"]), st.integers(1, 20_000)),
)
responses = st.one_of(
    latex.map("We get $\\boxed{{{}}}$.".format),
    latex.map("The answer is {}.".format),
    latex.map("Final Answer: The final answer is ${}$. I hope it is correct.".format),
    st.builds("{} {}".format, junk, latex),
    junk,
    latex,
    st.none(),
)
golds = st.one_of(latex, numbers, junk, st.none(), latex.map("\\boxed{{{}}}".format))

# ----------------------------------------------------------------------------- properties


@settings(max_examples=200, deadline=2000, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(response=responses, gold=golds, strict=st.booleans())
def test_local_stage_never_raises(response, gold, strict):
    """Extraction and pre-judgement on their own (no try/except around them) return well-formed
    values: `grade_batch`'s "error" guard is a last resort, not how content is handled."""
    extracted, method = extract_answer(response)
    assert method in METHODS and (extracted is None) == (method == "none")
    grade = _prejudge(extracted, method, _clean_gold(gold), strict)
    if grade is not None:
        assert grade.status in STATUSES and isinstance(grade.correct, bool)
        assert not grade.correct or grade.status == "ok"


TIMEOUT = 0.5  # per math-verify pair (a slow but sane pair timing out is still a valid outcome)


@pytest.fixture(scope="module")
def warm_pool():
    """Start the workers once so that the time bound below does not include their start-up."""
    grade_batch(["\\boxed{0.5}"], ["\\frac12"])


@settings(max_examples=20, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(items=st.lists(st.tuples(responses, golds), min_size=1, max_size=6))
def test_grade_batch_never_raises_and_is_bounded(warm_pool, items):
    """The whole pipeline, workers included: a Grade per item, in no more time than two workers
    need when every item runs to its timeout and the kill after it, plus slack for restarts."""
    start = time.monotonic()
    grades = grade_batch([r for r, _ in items], [g for _, g in items], timeout=TIMEOUT)
    elapsed = time.monotonic() - start
    assert len(grades) == len(items)
    for grade in grades:
        assert isinstance(grade, Grade) and grade.status in STATUSES and grade.method in METHODS
        assert isinstance(grade.correct, bool) and (not grade.correct or grade.status == "ok")
    assert elapsed < math.ceil(len(items) / 2) * (TIMEOUT + grading._KILL_GRACE) + 10.0, elapsed
