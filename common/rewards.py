"""GRPO's reward, as a weighted sum of named reward functions (TRL's reward_funcs + reward_weights, as one string).

    R_i = sum_k w_k * r_k(y_i)

A spec lists the terms, comma-separated, each `name[:weight]` (weight 1.0 when left out):

    "correctness"                                  today's default with --format_reward 0
    "correctness:1.0,format:0.1"                   today's reward with --format_reward 0.1
    "correctness,format:0.1,overlong:1.0,my_pkg.rewards:bonus:0.5"

Built-in terms (each returns one float per completion):

    correctness  1[the boxed answer is correct]: the grader's verdict that GRPO computes anyway (kwargs
                 `correct`), else `grade_batch(strict=True)` here.
    format       1[the completion stopped with EOS (finish "stop") and wrote a \\boxed{}].
    length       -n / L, n = completion tokens, L = max_completion_length: a linear penalty in [-1, 0] on
                 every response, right or wrong (weight 0.05: a full-length response costs 0.05).
    overlong     DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), with L = max_completion_length
                 and a buffer B (kwargs `overlong_buffer`, default L // 4):
                   0 for n <= L - B;   (L - B - n) / B for L - B < n <= L (falls linearly to -1);   -1 past L.
                 Only responses within B tokens of the cap pay; a truncated response (n = L) pays -1.

A custom term is `module:function[:weight]`, `module` importable (a dotted name on sys.path) or a path
to a `.py` file, `function` with the signature

    fn(completions: list[str], answers: list[str], finish_reasons: list[str], token_counts: list[int],
       **kwargs) -> list[float]

one finite float per completion. kwargs (always passed by name; accept **kwargs, more may come):
`correct` (list[bool], the grader's verdicts), `problems` (list[str]), `max_completion_length` (int),
`overlong_buffer` (int), `step` (int). (`correctness` also takes `strict_boxed` / `grade_timeout`, used
only when it grades by itself, i.e. without `correct`.) A bad spec, a module or function that cannot be found, a function
that cannot take this call, or a wrong-length / non-finite result is a ValueError naming the term.
"""

import importlib
import importlib.util
import inspect
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from common.errors import BadInput
from common.grading import extract_boxed, grade_batch

RewardFn = Callable[..., list[float]]


class RewardSpecError(BadInput, ValueError):
    """A --rewards spec, or a reward hook, that cannot be used (its message names the term and the fix)."""


def correctness_reward(completions, answers, finish_reasons, token_counts, correct=None, strict_boxed=True,
                       grade_timeout=5.0, **kwargs) -> list[float]:
    """1[the boxed answer is correct] (the grader's verdicts `correct` when given, else graded here)."""
    if correct is None:
        correct = [g.correct for g in grade_batch(list(completions), list(answers), strict=strict_boxed,
                                                   timeout=grade_timeout)]
    return [float(bool(c)) for c in correct]


def format_reward(completions, answers, finish_reasons, token_counts, **kwargs) -> list[float]:
    """1[stopped with EOS and wrote a \\boxed{}]."""
    return [float(f == "stop" and extract_boxed(t) is not None) for t, f in zip(completions, finish_reasons)]


def length_reward(completions, answers, finish_reasons, token_counts, max_completion_length=None, **kwargs) -> list[float]:
    """-n / L: a linear length penalty in [-1, 0]."""
    L = _positive(max_completion_length, "length needs max_completion_length")
    return [-min(n, L) / L for n in token_counts]


def overlong_reward(completions, answers, finish_reasons, token_counts, max_completion_length=None,
                    overlong_buffer=None, **kwargs) -> list[float]:
    """DAPO's soft overlong punishment: 0, then linearly down to -1 over the last `overlong_buffer` tokens."""
    L = _positive(max_completion_length, "overlong needs max_completion_length")
    B = overlong_buffer or max(L // 4, 1)
    if not 0 < B <= L:
        raise RewardSpecError(f"overlong_buffer must be in [1, max_completion_length={L}], got {B}")
    return [0.0 if n <= L - B else (-1.0 if n > L else (L - B - n) / B) for n in token_counts]


def _positive(value, message: str) -> int:
    if not value or value <= 0:
        raise RewardSpecError(message)
    return int(value)


BUILTIN: dict[str, RewardFn] = {"correctness": correctness_reward, "format": format_reward,
                                "length": length_reward, "overlong": overlong_reward}


@dataclass(frozen=True)
class RewardTerm:
    """One term of the reward: its name (as in the spec and in the metrics), weight and function."""

    name: str
    weight: float
    fn: RewardFn


def default_spec(format_coef: float = 0.0) -> str:
    """The spec of GRPO's reward before --rewards existed: correctness + format_coef * format."""
    return "correctness:1.0" + (f",format:{format_coef!r}" if format_coef else "")


def resolve_spec(rewards: str, format_coef: float = 0.0) -> str:
    """--rewards if given, else `default_spec(--format_reward)`; both set is an error (one place for a weight)."""
    if rewards.strip() and format_coef:
        raise RewardSpecError("set the format weight in --rewards (e.g. 'correctness,format:0.1'), not also --format_reward")
    return rewards if rewards.strip() else default_spec(format_coef)


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_rewards(spec: str) -> list[RewardTerm]:
    """The terms of a spec string (see the module docstring); a ValueError for a bad one."""
    terms = []
    for item in [i.strip() for i in spec.split(",")]:
        if not item:
            raise RewardSpecError(f"reward spec {spec!r}: empty term (expected name[:weight] or module:function[:weight], "
                             "comma-separated)")
        parts = [p.strip() for p in item.split(":")]
        weight = 1.0
        if len(parts) > 1 and _float(parts[-1]) is not None:
            weight, parts = _float(parts[-1]), parts[:-1]
        elif len(parts) == 3:
            raise RewardSpecError(f"reward term {item!r}: weight {parts[-1]!r} is not a finite number")
        if parts[0] in BUILTIN and len(parts) == 2:
            raise RewardSpecError(f"reward term {item!r}: weight {parts[1]!r} is not a finite number")
        if len(parts) == 1 and parts[0] in BUILTIN:
            fn = BUILTIN[parts[0]]
        elif len(parts) == 1:
            raise RewardSpecError(f"reward term {item!r}: unknown reward {parts[0]!r}; built-in: {sorted(BUILTIN)}, "
                             "or module:function[:weight]")
        elif len(parts) == 2 and all(parts):
            fn = load_hook(*parts)
        else:
            raise RewardSpecError(f"reward term {item!r}: expected name[:weight] or module:function[:weight]")
        name = parts[0] if len(parts) == 1 else f"{Path(parts[0]).stem if parts[0].endswith('.py') else parts[0]}.{parts[1]}"
        if any(t.name == name for t in terms):
            raise RewardSpecError(f"reward spec {spec!r}: {name!r} appears twice")
        terms.append(RewardTerm(name, weight, fn))
    return terms


def load_hook(module: str, function: str) -> RewardFn:
    """`function` of `module` (a dotted import name, or a path to a .py file), checked to take the reward call."""
    where = f"reward hook {module}:{function}"
    try:
        if module.endswith(".py"):
            path = Path(module)
            if not path.is_file():
                raise RewardSpecError(f"{where}: file {module} not found")
            spec = importlib.util.spec_from_file_location(f"_reward_hook_{path.stem}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
    except ImportError as e:
        raise RewardSpecError(f"{where}: cannot import {module!r} ({e}); is it on PYTHONPATH (sys.path[0] = "
                              f"{sys.path[0]!r})?") from e
    fn = getattr(mod, function, None)
    if not callable(fn):
        raise RewardSpecError(f"{where}: {module!r} has no function {function!r}")
    try:
        inspect.signature(fn).bind([], [], [], [], correct=[], problems=[], max_completion_length=1,
                                   overlong_buffer=1, step=0)
    except TypeError as e:
        raise RewardSpecError(f"{where}: must accept (completions, answers, finish_reasons, token_counts, "
                              f"**kwargs): {e}") from e
    except ValueError:  # no signature (a builtin): checked at the first call
        pass
    return fn


def compute_rewards(terms: list[RewardTerm], completions: list[str], answers: list[str], finish_reasons: list[str],
                    token_counts: list[int], **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(R [N] float32 = sum_k w_k * r_k, {name: r_k [N] float32 (unweighted)}), terms summed in spec order."""
    n = len(completions)
    if not (len(answers) == len(finish_reasons) == len(token_counts) == n):
        raise ValueError(f"reward inputs differ in length: {n} completions, {len(answers)} answers, "
                         f"{len(finish_reasons)} finish reasons, {len(token_counts)} token counts")
    total, parts = [0.0] * n, {}
    for term in terms:
        values = term.fn(list(completions), list(answers), list(finish_reasons), [int(c) for c in token_counts], **kwargs)
        values = list(values) if values is not None else []
        if len(values) != n:
            raise RewardSpecError(f"reward {term.name!r} returned {len(values)} values for {n} completions")
        values = [_finite(v, term.name) for v in values]
        total = [t + term.weight * v for t, v in zip(total, values)]
        parts[term.name] = torch.tensor(values)
    return torch.tensor(total), parts


def _finite(value, name: str) -> float:
    try:
        out = None if isinstance(value, (str, bytes)) or value is None else float(value)
    except (TypeError, ValueError):
        out = None
    if out is None or not math.isfinite(out):
        raise RewardSpecError(f"reward {name!r} returned {value!r}: return a finite float for every completion")
    return out


def reward_metrics(parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-term mean and std for the step log: reward/<name>/mean, reward/<name>/std (unweighted values)."""
    out = {}
    for name, values in parts.items():
        out[f"reward/{name}/mean"] = float(values.mean()) if len(values) else 0.0
        out[f"reward/{name}/std"] = float(values.std()) if len(values) > 1 else 0.0
    return out
