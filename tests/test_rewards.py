"""common/rewards.py: the spec parser, the built-in terms, hooks from a module / a .py file, and that the default
spec reproduces GRPO's reward R = 1[correct] + format_reward * 1[stopped with EOS and wrote a \\boxed{}] bit for bit."""

import random
import sys
import textwrap

import pytest
import torch

from common.grading import extract_boxed
from common.rewards import (BUILTIN, compute_rewards, default_spec, overlong_reward, parse_rewards, resolve_spec,
                            reward_metrics)

TEXTS = ["so \\boxed{3}", "so \\boxed{4}", "the answer is 3", "\\boxed{3} and on and on", ""]
FINISH = ["stop", "stop", "stop", "length", "stop"]
COUNTS = [5, 6, 7, 16, 1]
ANSWERS = ["3"] * 5
CORRECT = [True, False, True, True, False]


def reference_reward(correct, texts, finish_reasons, format_coef) -> torch.Tensor:
    """GRPO's reward written out: R_i = 1[correct] + format_coef * 1[stopped with EOS and wrote a \\boxed{}]."""
    formatted = [f == "stop" and extract_boxed(t) is not None for t, f in zip(texts, finish_reasons)]
    return torch.tensor([float(c) + format_coef * float(f) for c, f in zip(correct, formatted)])


def test_default_spec_reproduces_grpo_reward_exactly():
    rng = random.Random(0)
    for coef in (0.0, 0.1, 0.25, 1 / 3, 0.7):
        for _ in range(20):
            n = rng.randint(1, 12)
            texts = [rng.choice(TEXTS) for _ in range(n)]
            finish = [rng.choice(["stop", "length"]) for _ in range(n)]
            correct = [rng.random() < 0.5 for _ in range(n)]
            want = reference_reward(correct, texts, finish, coef)
            got, parts = compute_rewards(parse_rewards(resolve_spec("", coef)), texts, ["3"] * n, finish, [4] * n,
                                         correct=correct)
            assert got.dtype == want.dtype and torch.equal(got, want), (coef, got, want)
    assert default_spec(0.0) == "correctness:1.0" and default_spec(0.1) == "correctness:1.0,format:0.1"
    texts = ["so \\boxed{3}", "so \\boxed{4}", "the answer is 3", "\\boxed{3} and on and on"]
    got, _ = compute_rewards(parse_rewards(resolve_spec("", 0.1)), texts, ["3"] * 4, ["stop", "stop", "stop", "length"], [4] * 4,
                             correct=[True, False, True, True])
    assert torch.allclose(got, torch.tensor([1.1, 0.1, 1.0, 1.0]))  # by hand


def test_builtin_terms():
    _, parts = compute_rewards(parse_rewards("correctness,format,length,overlong"), TEXTS, ANSWERS, FINISH, COUNTS,
                               correct=CORRECT, max_completion_length=16, overlong_buffer=8)
    assert parts["correctness"].tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert parts["format"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]  # boxed and stopped; truncated never counts
    assert parts["length"].tolist() == pytest.approx([-5 / 16, -6 / 16, -7 / 16, -1.0, -1 / 16])
    assert parts["overlong"].tolist() == pytest.approx([0.0, 0.0, 0.0, -1.0, 0.0])


def test_overlong_is_dapo_soft_punishment():
    # L = 20, buffer 4: free up to 16 tokens, then -1/4 per token, -1 at the cap (and past it)
    got = overlong_reward([""] * 7, [""] * 7, ["stop"] * 7, [0, 16, 17, 18, 19, 20, 25], max_completion_length=20,
                          overlong_buffer=4)
    assert got == pytest.approx([0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0])
    assert overlong_reward([""], [""], ["stop"], [15], max_completion_length=20) == [0.0]  # default buffer L // 4 = 5
    assert overlong_reward([""], [""], ["stop"], [16], max_completion_length=20) == pytest.approx([-0.2])
    with pytest.raises(ValueError, match="max_completion_length"):
        overlong_reward([""], [""], ["stop"], [1])


def test_correctness_grades_itself_without_verdicts():
    _, parts = compute_rewards(parse_rewards("correctness"), ["so \\boxed{3}", "the answer is 3"], ["3", "3"],
                               ["stop", "stop"], [3, 3])
    assert parts["correctness"].tolist() == [1.0, 0.0]  # strict: only a boxed answer counts


def test_weights_sum_in_spec_order():
    total, parts = compute_rewards(parse_rewards("correctness:2,format:-0.5,length:0.05"), TEXTS, ANSWERS, FINISH,
                                   COUNTS, correct=CORRECT, max_completion_length=16)
    want = [2 * c - 0.5 * f + 0.05 * ln for c, f, ln in zip(parts["correctness"].tolist(), parts["format"].tolist(),
                                                          parts["length"].tolist())]
    assert total.tolist() == pytest.approx(want)
    m = reward_metrics(parts)
    assert m["reward/correctness/mean"] == pytest.approx(0.6) and "reward/format/std" in m


HOOK = '''
def bonus(completions, answers, finish_reasons, token_counts, **kwargs):
    """1 per completion that mentions its problem's first word; uses the kwargs too."""
    return [float(p.split()[0] in c) + 0.5 * kwargs["step"] for c, p in zip(completions, kwargs["problems"])]

def too_few(completions, answers, finish_reasons, token_counts, **kwargs):
    return [1.0]

def not_finite(completions, answers, finish_reasons, token_counts, **kwargs):
    return [float("nan")] * len(completions)

def no_kwargs(completions, answers):
    return [0.0] * len(completions)
'''


@pytest.fixture
def hook_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_pkg").mkdir()
    (tmp_path / "my_rewards_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_rewards_pkg" / "rewards.py").write_text(textwrap.dedent(HOOK))
    (tmp_path / "loose_rewards.py").write_text(textwrap.dedent(HOOK))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("my_rewards_pkg")]:
        del sys.modules[name]


def test_hook_from_module_and_file(hook_module):
    problems, texts = ["apples and pears", "trains"], ["apples: \\boxed{3}", "no"]
    for spec, name in (("correctness,my_rewards_pkg.rewards:bonus:0.5", "my_rewards_pkg.rewards.bonus"),
                       (f"correctness,{hook_module / 'loose_rewards.py'}:bonus:0.5", "loose_rewards.bonus")):
        terms = parse_rewards(spec)
        assert [t.name for t in terms] == ["correctness", name] and terms[1].weight == 0.5
        total, parts = compute_rewards(terms, texts, ["3", "3"], ["stop", "stop"], [4, 1], correct=[True, False],
                                       problems=problems, step=0)
        assert parts[name].tolist() == [1.0, 0.0] and total.tolist() == [1.5, 0.0]
    assert parse_rewards("my_rewards_pkg.rewards:bonus")[0].weight == 1.0


@pytest.mark.parametrize("spec, msg", [
    ("", "empty term"),
    ("correctness,,format", "empty term"),
    ("corectness", "unknown reward 'corectness'.*built-in"),
    ("correctness:abc", "weight 'abc' is not a finite number"),
    ("correctness:inf", "weight 'inf' is not a finite number"),
    ("my_rewards_pkg.rewards:bonus:x", "weight 'x' is not a finite number"),
    ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
    ("my_rewards_pkg.rewards:missing", "has no function 'missing'"),
    ("my_rewards_pkg.rewards:no_kwargs", r"must accept \(completions, answers, finish_reasons, token_counts, \*\*kwargs\)"),
    ("/nowhere/r.py:fn", "not found"),
    ("correctness,correctness:2", "appears twice"),
    ("a:b:c:d", "expected name"),
])
def test_bad_specs_are_clear(hook_module, spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_rewards(spec)


def test_bad_hook_results_name_the_reward(hook_module):
    for fn, msg in (("too_few", "returned 1 values for 2"), ("not_finite", "returned nan")):
        terms = parse_rewards(f"my_rewards_pkg.rewards:{fn}")
        with pytest.raises(ValueError, match=f"reward 'my_rewards_pkg.rewards.{fn}' {msg}"):
            compute_rewards(terms, ["a", "b"], ["1", "1"], ["stop", "stop"], [1, 1])


def test_resolve_spec():
    assert resolve_spec("", 0.0) == "correctness:1.0"
    assert resolve_spec("correctness,overlong", 0.0) == "correctness,overlong"
    with pytest.raises(ValueError, match="not also --format_reward"):
        resolve_spec("correctness", 0.1)
    assert set(BUILTIN) == {"correctness", "format", "length", "overlong"}
