"""Answer grading: extract the final answer from a response and compare it with the gold answer.

Pipeline per item: `extract_answer` (last `\\boxed{}`/`\\fbox{}`, else "the answer is X", else
Minerva's "final answer is $X$", else the last number) -> a cheap exact pre-judgement (no answer,
normalised string match, integer vs integer, word vs word, scientific notation) -> math-verify
(`verify(parse(gold), parse(pred))`, gold first) for everything else.

The grader never raises on content and never hangs: whatever a response holds (huge or tiny numbers
such as `1e400` or a 5,000-digit integer, junk bytes, unbalanced braces), its item gets a Grade, with
status "error" when something failed on it, so one bad item never sinks a batch. Numbers are
compared as strings and `Decimal`s, so no float overflow and no int-string limit in this process.

math-verify can hang on pathological inputs (`9^{9^{9^{9}}}` vs `1` never returns) and its own
timeouts use `signal.alarm`, which fails outside the main thread. So `grade_batch` runs it in
worker processes with a hard per-item timeout: a worker's own SIGALRM ends most hangs (the item gets
status "timeout", the worker carries on), and a worker that has not answered `_KILL_GRACE` seconds
later (stuck in C code) is killed and replaced. Each worker is a fresh interpreter (`python -c`,
started with `subprocess`) that imports only this module and math-verify: it never inherits the
trainer's models, CUDA context or threads, and it never imports the caller's `__main__`, so
scripts need no `if __name__ == "__main__":` guard. (multiprocessing's spawn and forkserver, and
so pebble, re-run the caller's main script in every child; that is why they are not used here.)
Tasks and replies cross the pipes as pickled tuples of builtins; library output in a worker is
discarded, and at exit the workers are killed quietly.
"""

import atexit
import contextlib
import decimal
import importlib
import logging
import math
import multiprocessing.connection
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

STATUSES = ("ok", "no_answer", "timeout", "error")
METHODS = ("boxed", "answer_is", "final_answer", "last_number", "none")


@dataclass(frozen=True)
class Grade:
    """Outcome for one response. `correct` is False whenever `status` is not "ok"."""
    correct: bool
    extracted: str | None
    method: str  # one of METHODS
    status: str  # one of STATUSES


# ----------------------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_ANSWER_IS = re.compile(r"(?<!final )\banswer(?:\*\*)?\s*(?:is\b|:)[\s:*]*", re.IGNORECASE)
_FINAL_ANSWER = re.compile(r"\bfinal answer(?:\*\*)?\s*(?:is\b|:)[\s:*]*", re.IGNORECASE)
# A thousands group only counts when it is exactly 3 digits, so "(1,2)" yields "2", not "1,2".
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces matched, `\\{` skipped),
    or of the space form `\\boxed 5`. None when absent or when the last one is unbalanced."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    body = rest.lstrip()
    if not body.startswith("{"):
        space_form = re.match(r"\s+([^\s$]+)", rest)
        return space_form.group(1) if space_form else None
    depth, i = 0, 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            i += 2  # escaped char such as \{ or \}: not a grouping brace
            continue
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return body[1:i]
        i += 1
    return None


def _tidy(answer: str | None, prose: bool = False) -> str | None:
    """Strip whitespace, enclosing `$` and trailing punctuation; empty -> None. A trailing `!` is a factorial in
    math (`\\boxed{5!}` is 120) and is stripped only from `prose` (a sentence such as "the answer is 7!")."""
    if answer is None:
        return None
    answer = answer.strip().strip("$").strip().rstrip(".,;!" if prose else ".,;").strip().removesuffix("**").strip()
    return answer or None


def _after_last(pattern: re.Pattern, text: str) -> str | None:
    """The phrase after the last match of `pattern`: a `$...$` span, else up to the sentence end."""
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    if rest.startswith("$"):
        dollar = re.match(r"\$+([^$]+)\$", rest)
        if dollar:
            return _tidy(dollar.group(1))
    # A "." ends the sentence only when followed by whitespace or the end: "3.5" stays whole.
    return _tidy(re.split(r"\n|\.(?:\s|$)", rest, maxsplit=1)[0], prose=True)


def extract_answer(text: str) -> tuple[str | None, str]:
    """(answer, method); methods tried in order: boxed, answer_is, final_answer, last_number."""
    text = text if isinstance(text, str) else ("" if text is None else str(text))
    for method, find in (("boxed", lambda t: _tidy(extract_boxed(t))),
                         ("answer_is", lambda t: _after_last(_ANSWER_IS, t)),
                         ("final_answer", lambda t: _after_last(_FINAL_ANSWER, t))):
        answer = find(text)
        if answer is not None:
            return answer, method
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(",", ""), "last_number"  # the regex only admits true 3-digit groups
    return None, "none"


# ----------------------------------------------------------------------------- pre-judgement

_NORMALISE = [  # (pattern, replacement), applied in order; each only removes notation, never meaning
    (r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\displaystyle", ""),
    (r"\\[dt]frac", r"\\frac"),
    (r"\\[!,;: ]|\\q?quad(?![a-zA-Z])", ""),
    (r"\{,\}", ","),  # 1{,}234: a grouping comma in braces
    (r"\^\{?\\circ\}?", ""),
    (r"\\%", "%"),
    (r"\\\$|\$", ""),
    (r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", r"\1{}"),  # keep "\pi r" distinct from "\pir" after the next line
    (r"\s+", ""),
]
_NORMALISE = [(re.compile(p), r) for p, r in _NORMALISE]
_INTEGER = re.compile(r"-?\d+")
_WORD = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_SCIENTIFIC = re.compile(r"(-?\d+(?:\.\d+)?)[eE]([+-]?\d+)")


_GROUPED = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")  # after _normalise: 1,234 / 1{,}234 / 1\\,234 all read 1,234


def _ungroup(s: str) -> str:
    """A whole answer written with thousands groups (exactly 3 digits each, as `_NUMBER` reads them) without the
    commas, so 1\\,000 (normalised to 1000) and 1,000 compare as the same integer."""
    return s.replace(",", "") if _GROUPED.fullmatch(s) else s


def _normalise(s: str) -> str:
    """Notation-only normalisation used for the exact-match shortcut (true positives only)."""
    for pattern, replacement in _NORMALISE:
        s = pattern.sub(replacement, s)
    return s.rstrip(".")


def _as_word(s: str) -> str | None:
    """Lower-cased plain words ("Monday", "\\text{yes}"), else None. math-verify parses bare words as
    products of symbols, so "yes" == "sye"; we compare words as strings instead."""
    s = s.strip()
    wrapped = _TEXT_WRAPPER.fullmatch(s)
    s = wrapped.group(1).strip() if wrapped else s
    return " ".join(s.lower().split()) if _WORD.fullmatch(s) else None


def _clean_gold(gold: str) -> str:
    """Gold may arrive as `$...$` or with a `\\boxed{}`; reduce it to the bare answer."""
    gold = "" if gold is None else str(gold)
    return _tidy(extract_boxed(gold) if _BOXED.search(gold) else gold) or ""


def _prejudge(extracted: str | None, method: str, gold: str, strict: bool) -> Grade | None:
    """A Grade when the answer can be decided exactly without math-verify, else None."""
    if extracted is None or (strict and method != "boxed"):
        return Grade(False, extracted, method, "no_answer")
    if not gold:
        return Grade(False, extracted, method, "error")  # a data bug, counted rather than raised
    pred_n, gold_n = _ungroup(_normalise(extracted)), _ungroup(_normalise(gold))
    if pred_n == gold_n:
        return Grade(True, extracted, method, "ok")
    if _INTEGER.fullmatch(pred_n) and _INTEGER.fullmatch(gold_n):
        return Grade(_canonical_integer(pred_n) == _canonical_integer(gold_n), extracted, method, "ok")
    pred_w, gold_w = _as_word(extracted), _as_word(gold)
    if pred_w is not None and gold_w is not None:
        return Grade(pred_w == gold_w, extracted, method, "ok")
    pred_x, gold_x = _as_number(pred_n), _as_number(gold_n)
    if pred_x is not None and gold_x is not None and (_SCI_NUMBER.fullmatch(pred_n) or _SCI_NUMBER.fullmatch(gold_n)):
        # math-verify treats any two numbers below ~1e-16 as equal (3.2e-19 == 1.6e-19): compare relatively
        return Grade(_relatively_close(pred_x, gold_x), extracted, method, "ok")
    return None


_SCI_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)(?:[eE]|\\times10\^)\{?([+-]?\d+)\}?")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# Exponents up to ~1e18 and any number of digits, with no overflow, underflow or exceptions.
_WIDE = decimal.Context(prec=40, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[])


def _canonical_integer(s: str) -> str:
    """An integer string (`-?\\d+`) without leading zeros or a minus on zero, so that equal
    integers of any length compare equal as strings (`int()` refuses more than 4,300 digits)."""
    sign, digits = ("-", s[1:]) if s.startswith("-") else ("", s)
    digits = digits.lstrip("0") or "0"
    return digits if digits == "0" else sign + digits


def _as_number(s: str) -> decimal.Decimal | None:
    """The exact value of a plain decimal or scientific-notation string (already normalised), else
    None; also None when the exponent is beyond what `Decimal` represents (about 10**18)."""
    sci = _SCI_NUMBER.fullmatch(s)
    text = f"{sci.group(1)}e{sci.group(2)}" if sci else s if _PLAIN_NUMBER.fullmatch(s) else None
    if text is None:
        return None
    try:
        return decimal.Decimal(text)
    except decimal.InvalidOperation:
        return None


def _relatively_close(a: decimal.Decimal, b: decimal.Decimal, rel_tol: str = "1e-6") -> bool:
    """`math.isclose(a, b, rel_tol)` for Decimals of any magnitude: |a - b| <= rel_tol * max(|a|, |b|)."""
    with decimal.localcontext(_WIDE):
        return abs(a - b) <= decimal.Decimal(rel_tol) * max(abs(a), abs(b))


# ----------------------------------------------------------------------------- math-verify

def _to_math_verify(answer: str) -> str:
    """Wrap a bare answer for math-verify's LaTeX extractor; rewrite `4.5e33` (which it reads as
    4.5*e*33) as `4.5\\times10^{33}`."""
    sci = _SCIENTIFIC.fullmatch(answer)
    if sci:
        answer = f"{sci.group(1)}\\times10^{{{sci.group(2)}}}"
    return "\\boxed{" + answer + "}"


def verify_answer(pred: str, gold: str) -> bool:
    """math-verify on two bare answers, without its signal-based timeouts (the caller bounds time).
    Module-level so that workers can import it by name."""
    from math_verify import parse, verify  # lazy: sympy is heavy and only workers need it
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warnings
    gold_parsed = parse(_to_math_verify(gold), parsing_timeout=None)
    pred_parsed = parse(_to_math_verify(pred), parsing_timeout=None)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


class _ItemTimeout(BaseException):
    """Raised by the inline timer; BaseException so library `except Exception` cannot swallow it."""

    @classmethod
    def raise_(cls, signum, frame):
        raise cls()


def _verify_inline(pred: str, gold: str, timeout: float, verify_fn) -> tuple[bool, str]:
    """(correct, status) of `verify_fn(pred, gold)` in this process (the caller's, or a worker's).
    Never raises. The timeout uses SIGALRM, so it applies only on the main thread; elsewhere the
    call is unbounded."""
    use_alarm = bool(timeout) and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _ItemTimeout.raise_) if use_alarm else None
    try:
        try:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, timeout)
            return bool(verify_fn(pred, gold)), "ok"
        finally:  # an alarm landing here, after the work, still reaches the handlers below
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _ItemTimeout:
        return False, "timeout"
    except Exception:
        return False, "error"
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)


# ----------------------------------------------------------------------------- worker processes

_START_TIMEOUT = 60.0  # seconds a fresh worker may take to import and warm up math-verify
_KILL_GRACE = 1.0  # a worker that has not answered this long after its own timeout is killed
_CPU_SLACK = 5.0  # plus this, a worker's own CPU-time limit per task (see `_limit_cpu`)
_READY = "ready"
_log = logging.getLogger(__name__)


def _serve() -> None:
    """A worker's main loop, run in a fresh interpreter by `_WorkerPool`: warm up math-verify, reply
    "ready", then answer tasks read from stdin until it closes. A task is (module, function name,
    (pred, gold), timeout); the reply is `_verify_inline`'s (correct, status). The timeout is
    SIGALRM in this worker's main thread, so most hangs end without killing the worker; the
    parent kills it for the rest (a long computation in C that never checks for signals)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which then kills us
    inbox, outbox = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries go to stderr (discarded), never into the replies
    verify_answer("1", "1")  # the first timed task should not pay for imports and parser set-up
    _reply(outbox, _READY)
    while True:
        try:
            module, name, (pred, gold), timeout = pickle.load(inbox)
        except EOFError:  # the parent closed the pipe or exited
            return
        _limit_cpu(timeout + _KILL_GRACE + _CPU_SLACK if timeout else None)
        try:
            fn = getattr(importlib.import_module(module), name)
        except Exception:
            _reply(outbox, (False, "error"))
            continue
        _reply(outbox, _verify_inline(pred, gold, timeout, fn))


def _reply(outbox, message) -> None:
    """Write one pickled message to the parent and flush it."""
    pickle.dump(message, outbox)
    outbox.flush()


def _limit_cpu(seconds: float | None) -> None:
    """Backstop for a worker orphaned while stuck (parent killed before it could kill us): the
    kernel ends this process after `seconds` more CPU time. The parent's wall-clock timeout
    normally acts first. No-op where `resource` is missing."""
    try:
        import resource
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        if seconds is None:
            resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
            return
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))  # no core file
        limit = math.ceil(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) + seconds)
        resource.setrlimit(resource.RLIMIT_CPU, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    except (ImportError, ValueError, OSError):
        pass


def _worker_command() -> list[str]:
    """`python -c` that puts the parent's sys.path first, imports this module by name and serves.
    Nothing else is imported: not the caller's `__main__`, not torch."""
    path = [p or os.getcwd() for p in sys.path]
    return [sys.executable, "-c", f"import sys; sys.path[:0] = {path!r}; from {__name__} import _serve; _serve()"]


@dataclass(eq=False)
class _Worker:
    """A worker process and its state: starting (not `ready`), idle, or on item `index` until `deadline`."""
    proc: subprocess.Popen
    deadline: float
    ready: bool = False
    index: int | None = None


class _WorkerPool:
    """`size` persistent workers, started on demand; one that dies or overruns its item is killed
    and replaced in the background. One batch at a time: callers hold `_pool_lock`."""

    def __init__(self, size: int):
        self.size, self.workers, self.started, self.closed = size, [], 0, False

    def run(self, fn, pairs: list[tuple[str, str]], timeout: float) -> list[tuple[bool, str]]:
        """(correct, status) per pair: `fn(*pair)` in a worker, which gives up after `timeout`
        seconds (SIGALRM there) and is killed if it has not answered `_KILL_GRACE` later."""
        results = [(False, "error")] * len(pairs)
        todo = deque(range(len(pairs)))
        try:
            while (todo or self._busy()) and not self.closed:
                while len(self.workers) < self.size:
                    self._start()
                for worker in [w for w in self.workers if w.ready and w.index is None]:
                    if todo:
                        index = todo.popleft()
                        self._send(worker, index, (fn.__module__, fn.__name__, pairs[index], timeout), timeout, todo)
                self._collect(results, todo)
        finally:
            for worker in self._busy():  # interrupted mid-batch: no stale task may answer the next batch
                self._stop(worker)
        while len(self.workers) < self.size and not self.closed:  # replacements warm up before the next batch
            self._start()
        return results

    def kill(self) -> None:
        """Kill every worker and refuse further work. Safe while a batch runs in another thread:
        that batch sees its workers die and ends at once, its unfinished items marked "error"."""
        self.closed = True
        for worker in list(self.workers):
            worker.proc.kill()

    def close(self) -> None:
        """Kill, reap and close every worker (the caller holds `_pool_lock`)."""
        self.kill()
        for worker in list(self.workers):
            self._stop(worker)

    def _busy(self) -> list[_Worker]:
        return [w for w in self.workers if w.index is not None]

    def _start(self) -> None:
        proc = subprocess.Popen(_worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        self.workers.append(_Worker(proc, time.monotonic() + _START_TIMEOUT))
        self.started += 1

    def _stop(self, worker: _Worker) -> None:
        """Kill (SIGKILL: nothing is printed) and reap a worker."""
        self.workers.remove(worker)
        worker.proc.kill()
        worker.proc.wait()
        for pipe in (worker.proc.stdin, worker.proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()

    def _send(self, worker: _Worker, index: int, task: tuple, timeout: float, todo: deque) -> None:
        """Hand item `index` to an idle worker; if the worker has died meanwhile, requeue the item."""
        try:
            pickle.dump(task, worker.proc.stdin)
            worker.proc.stdin.flush()
        except OSError:
            todo.appendleft(index)
            self._stop(worker)
            return
        worker.index, worker.deadline = index, time.monotonic() + (timeout + _KILL_GRACE if timeout else math.inf)

    def _collect(self, results: list, todo: deque) -> None:
        """Wait for the first reply or deadline, then settle every worker that replied, died or ran out of time."""
        waiting = [w for w in self.workers if w.index is not None or not w.ready]
        if not waiting:
            return
        left = min(w.deadline for w in waiting) - time.monotonic()
        readable = multiprocessing.connection.wait([w.proc.stdout for w in waiting],
                                                   None if math.isinf(left) else max(0.0, left))
        now = time.monotonic()
        for worker in waiting:
            if worker.proc.stdout in readable:
                self._receive(worker, results, todo)
            elif now >= worker.deadline:
                self._give_up(worker, results, todo, "timeout")

    def _receive(self, worker: _Worker, results: list, todo: deque) -> None:
        """Read one message: "ready", or the result of the worker's item; end of file means it died."""
        try:
            message = pickle.load(worker.proc.stdout)
        except Exception:  # EOF or a torn message: the worker died (os._exit, a crash, out of memory)
            message = None
        if message == _READY and not worker.ready:
            worker.ready = True
        elif isinstance(message, tuple) and len(message) == 2 and worker.index is not None:
            correct, status = message
            results[worker.index] = (bool(correct) and status == "ok", status if status in STATUSES else "error")
            worker.index = None
        else:
            self._give_up(worker, results, todo, "error")

    def _give_up(self, worker: _Worker, results: list, todo: deque, status: str) -> None:
        """Stop a worker that died or overran: its item gets `status`; if it never started, something
        is wrong with the environment, so the batch's remaining items get "error" instead of retries."""
        if worker.index is not None:
            results[worker.index] = (False, status)
        elif todo and not self.closed:
            _log.warning("a grading worker failed to start (%s); %d items marked error", status, len(todo))
            todo.clear()
        self._stop(worker)


_pool: _WorkerPool | None = None  # created lazily, reused across batches
_pool_lock = threading.Lock()
_inherited_pools: list[_WorkerPool] = []  # in a forked child: the parent's, kept and never touched


def _shutdown_pool() -> None:
    """Close the pool (when it is resized or broken; the caller holds `_pool_lock`)."""
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.close()


def _shutdown_pool_at_exit() -> None:
    """Kill the workers; then, once a batch still running in a daemon thread has seen them die and
    let go of the lock (at most a few seconds), reap them and close their pipes."""
    pool = _pool
    if pool is None:
        return
    pool.kill()
    if _pool_lock.acquire(timeout=5):
        try:
            _shutdown_pool()
        finally:
            _pool_lock.release()


def _forget_pool_after_fork() -> None:
    """In a forked child the parent's workers and lock are not ours: start afresh (and keep the
    parent's pool object alive, so that collecting it here does not poll the parent's workers)."""
    global _pool, _pool_lock
    if _pool is not None:
        _inherited_pools.append(_pool)
    _pool, _pool_lock = None, threading.Lock()


atexit.register(_shutdown_pool_at_exit)
os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _verify_in_pool(pairs: list[tuple[str, str]], timeout: float, max_workers: int,
                    verify_fn) -> list[tuple[bool, str]]:
    """(correct, status) per (pred, gold) pair from the workers; if the pool itself fails (say, no
    process can be started), every pair gets "error" and the next batch starts a fresh pool."""
    global _pool
    with _pool_lock:
        try:
            if _pool is None or _pool.size != max_workers:
                _shutdown_pool()
                _pool = _WorkerPool(max_workers)
            return _pool.run(verify_fn, pairs, timeout)
        except Exception as exc:
            _log.warning("grading pool failed (%s: %s); %d items marked error", type(exc).__name__, exc, len(pairs))
            with contextlib.suppress(Exception):
                _shutdown_pool()
            return [(False, "error")] * len(pairs)


# ----------------------------------------------------------------------------- entry points

def _prepare(response: str, gold: str, strict: bool) -> tuple[Grade, tuple[str, str] | None]:
    """(grade, pair): the final Grade when decided here, else a placeholder and the (pred, gold) pair
    for math-verify. Never raises: an exception on this item's content becomes status "error"."""
    extracted, method = None, "none"
    try:
        extracted, method = extract_answer(response)
        gold = _clean_gold(gold)
        grade = _prejudge(extracted, method, gold, strict)
    except Exception:
        return Grade(False, extracted, method, "error"), None
    if grade is not None:
        return grade, None
    return Grade(False, extracted, method, "error"), (extracted, gold)


def grade_batch(responses: list[str], golds: list[str], *, strict: bool = False, timeout: float = 5.0,
                max_workers: int | None = None, _verify_fn=verify_answer) -> list[Grade]:
    """Grade responses against golds; never raises on content and never hangs.

    Items decided by `_prejudge` stay in this process; distinct (pred, gold) pairs left over go to
    math-verify in worker processes (`max_workers` default min(2, cpus); 0 = inline in this
    process, where the timeout needs the main thread). `timeout` is per pair, in seconds.
    `_verify_fn` is a test hook: a module-level (pred, gold) -> bool run in place of math-verify
    (workers import it by module and name).
    """
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
    if max_workers is None:
        max_workers = min(2, os.cpu_count() or 1)
    grades: list[Grade] = []
    pending: dict[tuple[str, str], list[int]] = {}  # dedupe: GRPO groups repeat the same answer
    for i, (response, gold) in enumerate(zip(responses, golds)):
        grade, pair = _prepare(response, gold, strict)
        grades.append(grade)
        if pair is not None:
            pending.setdefault(pair, []).append(i)
    pairs = list(pending)
    if not pairs:
        verdicts = []
    elif max_workers == 0:
        verdicts = [_verify_inline(p, g, timeout, _verify_fn) for p, g in pairs]
    else:
        verdicts = _verify_in_pool(pairs, timeout, max_workers, _verify_fn)
    for pair, (correct, status) in zip(pairs, verdicts):
        for i in pending[pair]:
            grades[i] = Grade(correct, grades[i].extracted, grades[i].method, status)
    return grades


def grade_one(response: str, gold: str, strict: bool = False, *, timeout: float = 5.0) -> Grade:
    """Grade one response in this process; the timeout uses SIGALRM, so only on the main thread."""
    return grade_batch([response], [gold], strict=strict, timeout=timeout, max_workers=0)[0]


def is_correct(response: str, gold: str) -> bool:
    """True when `response`'s final answer matches `gold` (pool-backed, hard 5 s timeout)."""
    return grade_batch([response], [gold])[0].correct


def grade_stats(grades: list[Grade]) -> dict[str, float]:
    """`acc`, `n`, `<status>_count`/`<status>_frac` and `method_<method>_frac` for logging."""
    n = len(grades)
    statuses = Counter(g.status for g in grades)
    methods = Counter(g.method for g in grades)
    stats = {"n": float(n), "acc": sum(g.correct for g in grades) / max(n, 1)}
    for s in STATUSES:
        stats[f"{s}_count"] = float(statuses[s])
        stats[f"{s}_frac"] = statuses[s] / max(n, 1)
    for m in METHODS:
        stats[f"method_{m}_frac"] = methods[m] / max(n, 1)
    return stats
