"""The teacher served by an inference engine (`--teacher_backend server`): OPD / Stable-OPD's teacher on its own GPUs
or node, reached over HTTP at an OpenAI-compatible completions endpoint (`vllm serve <teacher>`, docs/GPU.md).

What the methods need from the teacher with the sampled-token loss is log pi_T(y_t | c_t) at every completion
position: `server_forward` returns exactly what `completion_forward` returns for it ("logps" [B, T], the last T
positions of each row, 0 on padding), so `scored_forward(teacher, ..., forward=server_forward)` replaces the
in-process pass. Each row goes as TOKEN IDS (the teacher's prompt from `teacher_inputs` when its template differs,
then the student's completion ids; never re-tokenised text) with `echo` and prompt log-probs (`max_tokens: 0`), rows in
`concurrency` requests at once (a thread pool), round-robin over the urls. The response must give one log-prob per
token, for the ids sent (checked: a short or re-tokenised answer is an error, never a silent zero).

What a server cannot give, refused at start-up (`connect_teacher`, one `error:` line, exit 2, nothing written):
  * the full distribution (`--loss_type full_kl`, Stable-OPD's `--mix_loss *_kl`): only the sampled tokens' log-probs;
  * temperature != 1 where the server's prompt log-probs ignore it. vLLM's do up to at least 0.32 (read in its
    v1/worker/gpu_model_runner.py `_get_prompt_logprobs_dict`: "prompt tokens skip sampling processors", scores are
    log_softmax(logits) whatever `temperature` or `--logprobs-mode`; slime had to patch the same). Probed, not assumed:
    the probe's log-probs at temperature 1 and at --temperature must differ;
  * a server down, serving another model (the served id / root is not --teacher_name_or_path, up to its folder
    name) or another tokenizer (its /tokenize of a probe text differs from the local teacher tokenizer's), a
    max_model_len under prompt + completion, or a probe answered with fewer log-probs than tokens or values > 0 (logits,
    `--logprobs-mode raw_logits`).
The local teacher folder / hub id gives the tokenizer and config only (built on the meta device: no weights): the
compatibility check with the student (`check_compatible`) reads its shapes and stop ids as for the in-process teacher.

Mid-run, a request that fails (connection, timeout, 5xx / 429, a malformed or short response) is retried `retries`
times with exponential backoff on the next url; then `TeacherServerError`: `teacher_failures` turns it into a flag
that every rank sees, and the method checkpoints its last complete step and exits 130 as on SIGTERM (rerun to resume).

Deviations from the in-process teacher: "eos_logps" (the teacher's EOS log-prob at every position, a metric) is NaN:
not measured; the server normalises over all of the teacher's output rows, the in-process pass over the shared
vocabulary (`vocab_limit`): they differ by the log of the mass on the teacher's extra rows (untrained padding rows of
Qwen2.5-7B: 152,064 vs 151,936; none for the same vocabulary).
"""
import contextlib
import dataclasses
import itertools
import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.cli import fail
from common.flags import TeacherServerFlags
from common.models import meta_model
from common.remote_teacher import PROBE_TEXT, TEMPERATURE_ATOL, MetaTeacher
from common.vllm_teacher import check_vllm_teacher

class TeacherServerError(RuntimeError):
    """A teacher request failed after its retries, or the server answered what no retry changes (a 4xx)."""


class _Retry(Exception):
    """A failure worth another try: connection, timeout, 5xx / 429, a malformed or short response."""


@dataclass
class TeacherServer(MetaTeacher):
    """The teacher's server(s) and the teacher's config on the meta device (for `check_compatible`, `count_params`).
    Requests: `timeout` s each, `retries` more tries after a failure (backoff, backoff * 2, ... s), `concurrency`
    requests in flight per scoring call."""
    urls: list[str]
    model: str  # the served model's id
    meta: torch.nn.Module
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 1.0
    concurrency: int = 8
    _turn: itertools.count = field(default_factory=itertools.count, repr=False)  # round robin over the urls

    def row_logprobs(self, rows: list[list[int]], temperature: float) -> list[list[float]]:
        """The rows in `concurrency` requests at once (a thread pool), each a block of rows."""
        per = max(1, math.ceil(len(rows) / max(1, self.concurrency)))
        blocks = [rows[s : s + per] for s in range(0, len(rows), per)]
        with ThreadPoolExecutor(max_workers=max(1, len(blocks))) as pool:
            answers = list(pool.map(lambda blk: request_logprobs(self, blk, temperature), blocks))
        return [lp for ans in answers for lp in ans]

    def next_url(self) -> str:
        return self.urls[next(self._turn) % len(self.urls)]


def _call(url: str, path: str, payload: dict | None, timeout: float) -> dict:
    """GET (payload None) or POST JSON; the answer's JSON. Raises _Retry for what another try may fix."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode(errors="replace")
        if e.code >= 500 or e.code == 429:
            raise _Retry(f"{url}{path}: HTTP {e.code} {detail}") from e
        raise TeacherServerError(f"{url}{path}: HTTP {e.code} {detail}") from e
    except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out (socket.timeout is an OSError)
        raise _Retry(f"{url}{path}: {getattr(e, 'reason', e)}") from e
    try:
        return json.loads(body)
    except ValueError as e:
        raise _Retry(f"{url}{path}: not JSON ({body[:100]!r})") from e


def _logprobs_of(answer: dict, rows: list[list[int]]) -> list[list[float]]:
    """Per row, log pi(x_i | x_<i) for i = 1..n-1 from an echo completions answer; _Retry if it does not hold one
    finite log-prob per token of the ids sent."""
    choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != len(rows):
        raise _Retry(f"{len(choices)} choices for {len(rows)} prompts")
    out = []
    for row, choice in zip(rows, choices):
        lp = (choice.get("logprobs") or {}).get("token_logprobs") or []
        tokens = (choice.get("logprobs") or {}).get("tokens") or []
        if len(lp) < len(row):
            raise _Retry(f"{len(lp)} log-probs for a row of {len(row)} tokens")
        ids = [int(t.split(":", 1)[1]) for t in tokens[: len(row)] if str(t).startswith("token_id:")]
        if ids and ids != row:  # the server scored other tokens than those sent (re-tokenised?)
            raise _Retry("the server's tokens differ from the ids sent")
        values = lp[1 : len(row)]
        if any(v is None or not math.isfinite(v) for v in values):
            raise _Retry("a missing or non-finite log-prob")
        out.append([float(v) for v in values])
    return out


def request_logprobs(server: TeacherServer, rows: list[list[int]], temperature: float, retries: int | None = None,
                     url: str = ""):
    """One completions request for `rows` (token ids) with echo + prompt log-probs, retried with backoff (on the next
    url, or on `url` alone); per row the log-probs of its tokens 1..n-1. TeacherServerError after the last try."""
    payload = {"model": server.model, "prompt": rows, "max_tokens": 0, "echo": True, "logprobs": 0,
               "temperature": temperature, "top_p": 1.0, "return_tokens_as_token_ids": True}
    tries = 1 + (server.retries if retries is None else retries)
    for attempt in range(tries):
        try:
            return _logprobs_of(_call(url or server.next_url(), "/v1/completions", payload, server.timeout), rows)
        except _Retry as e:
            if attempt == tries - 1:
                raise TeacherServerError(f"teacher request failed {tries} time(s), last: {e}") from e
            time.sleep(server.backoff * 2**attempt)
    raise AssertionError("unreachable")


def server_forward(server: MetaTeacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                   temperature: float = 1.0, *, hidden: bool = False, **_) -> dict[str, torch.Tensor]:
    """`completion_forward`'s "logps" [B, T] for the last T = n_completion positions, from the server (or a colocated
    vLLM teacher, common/vllm_teacher.py): each row's attended ids (left-padded prompt, right-padded completion) sent
    as ids; 0 on padded completion positions. "eos_logps" is NaN (not measured). Other keywords of completion_forward
    (vocab_limit, eos_id) are ignored."""
    if hidden:
        raise ValueError("a teacher server gives the sampled tokens' log-probs only, not hidden states")
    B, T = input_ids.shape[0], n_completion
    lengths = attention_mask[:, -T:].sum(-1).tolist()  # completion tokens per row
    rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), attention_mask.cpu())]
    todo = [b for b in range(B) if lengths[b] > 0]
    answers = server.row_logprobs([rows[b] for b in todo], temperature) if todo else []
    if len(answers) != len(todo):
        raise RuntimeError(f"the teacher scored {len(answers)} rows of {len(todo)}")
    logps = torch.zeros(B, T, dtype=torch.float32)
    for b, lp in zip(todo, answers):
        n = int(lengths[b])
        if len(lp) < n:
            raise RuntimeError(f"the teacher gave {len(lp)} log-probs for a row of {n} completion tokens")
        logps[b, :n] = torch.tensor(lp[len(lp) - n :])
    return {"logps": logps.to(input_ids.device), "eos_logps": torch.full((B, T), float("nan"), device=input_ids.device)}


def _names_match(served: dict, name: str) -> bool:
    """The served id or root names the local teacher: the same string, or the same final folder name
    (`vllm serve /models/X` for `--teacher_name_or_path org/X`)."""
    want = {name.rstrip("/"), Path(name.rstrip("/")).name}
    return any(s and (s.rstrip("/") in want or Path(s.rstrip("/")).name in want)
               for s in (served.get("id"), served.get("root")))


def probe(server: TeacherServer, name: str, tokenizer, temperature: float, max_len: int) -> str:
    """The start-up checks of every url (see the module docstring); a one-line summary, or ValueError saying what
    is wrong. Each request is tried once: a server that is down is reported at once."""
    models = {}
    for url in server.urls:
        try:
            listed = _call(url, "/v1/models", None, server.timeout).get("data") or []
        except (_Retry, TeacherServerError) as e:
            raise ValueError(f"teacher server not reachable ({e}); is `vllm serve` up at {url}?") from e
        match = [m for m in listed if _names_match(m, name)]
        if not match:
            served = ", ".join(str(m.get("root") or m.get("id")) for m in listed) or "nothing"
            raise ValueError(f"teacher server {url} serves {served}, not --teacher_name_or_path {name}")
        models[url] = match[0]
    if len({m["id"] for m in models.values()}) > 1:
        raise ValueError(f"the teacher urls serve different model ids: {sorted({m['id'] for m in models.values()})}")
    server.model = next(iter(models.values()))["id"]
    served_len = min(int(m.get("max_model_len") or 0) or max_len for m in models.values())
    if served_len < max_len:
        raise ValueError(f"teacher server max_model_len {served_len} < max_prompt_length + max_completion_length "
                         f"{max_len}: serve it with --max-model-len {max_len} or more")
    text = PROBE_TEXT + tokenizer.decode(list(range(0, len(tokenizer), max(1, len(tokenizer) // 200))))
    want = tokenizer(text, add_special_tokens=False)["input_ids"]
    for url in server.urls:
        try:
            got = _call(url, "/tokenize", {"model": server.model, "prompt": text, "add_special_tokens": False},
                        server.timeout).get("tokens")
        except (_Retry, TeacherServerError) as e:
            raise ValueError(f"teacher server {url}: /tokenize failed ({e}): cannot compare its tokenizer") from e
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got or [], want)) if a != b), min(len(got or []), len(want)))
            raise ValueError(f"teacher server {url} tokenizes differently from {name}'s tokenizer (first difference at "
                             f"token {first} of a probe text): it serves another tokenizer")
    ids = want[:64]
    try:
        base = [request_logprobs(server, [ids], 1.0, retries=0, url=url)[0] for url in server.urls]
        if any(v > 1e-4 for row in base for v in row):
            raise ValueError("the teacher server returns values > 0 as log-probs (logits? serve it with the default "
                             "--logprobs-mode raw_logprobs)")
        if temperature != 1.0:
            tempered = request_logprobs(server, [ids], temperature, retries=0)[0]
            if max(abs(a - b) for a, b in zip(tempered, base[0])) < TEMPERATURE_ATOL:
                raise ValueError(f"the teacher server's prompt log-probs ignore the temperature (equal at 1 and "
                                 f"{temperature}; vLLM <= 0.32 computes them from the raw logits): run with "
                                 "--temperature 1, or --teacher_backend hf")
    except TeacherServerError as e:
        raise ValueError(f"teacher server probe failed: {e}") from e
    return (f"teacher server: {server.model} at {', '.join(server.urls)} (max_model_len {served_len}; tokenizer and "
            f"probe log-probs checked{'' if temperature == 1.0 else f', temperature {temperature} applied'})")


def server_flags(args) -> dict:
    """The values of the TeacherServerFlags group (common/flags.py) in `args`: connect_teacher's keywords (with
    --teacher_backend vllm also the engine's dtype, quantization and seed: common/vllm_teacher.py)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherServerFlags)} | {
        "model_kwargs": args.teacher_model_init_kwargs}
    if kw["teacher_backend"] != "vllm":
        kw.pop("teacher_vllm_gpu_memory_utilization", None)
        return kw
    return kw | {"dtype": args.teacher_dtype or args.dtype, "seed": args.seed, "quantization": args.teacher_quantization}


def check_server(name: str, tokenizer, temperature: float, max_len: int, *, full_distribution: bool = False,
                 teacher_url: str = "", teacher_timeout: float = 120.0, teacher_retries: int = 3,
                 teacher_backoff: float = 1.0, teacher_concurrency: int = 8, model_kwargs: str = "", meta=None,
                 teacher_backend: str = "server") -> tuple[TeacherServer, str]:
    """(the teacher `name` behind `teacher_url` (comma-separated urls), `probe`'s summary), or ValueError saying what
    is wrong: `full_distribution` (the objective has a term over the teacher's full distribution, a method's
    `vocab_terms`), no url, or a failed probe (every prompt + completion of `max_len` tokens must fit). `meta`: the
    teacher's model on the meta device (default: built from `name`'s config)."""
    if full_distribution:
        raise ValueError("--loss_type full_kl (and Stable-OPD's --mix_loss forward_kl / reverse_kl) needs the "
                         "teacher's full distribution over the vocabulary; --teacher_backend server gives the sampled "
                         "tokens' log-probs only: use --loss_type sampled (--mix_loss nll), or --teacher_backend hf")
    url_list = [u.strip() for u in teacher_url.split(",") if u.strip()]
    if not url_list:
        raise ValueError("--teacher_backend server needs --teacher_url (one or more, comma-separated: "
                         "http://host:port)")
    server = TeacherServer(url_list, name, meta if meta is not None else meta_model(name, model_kwargs),
                           timeout=teacher_timeout, retries=teacher_retries, backoff=teacher_backoff,
                           concurrency=teacher_concurrency)
    return server, probe(server, name, tokenizer, temperature, max_len)


def connect_teacher(name: str, tokenizer, temperature: float, max_len: int, **kw) -> MetaTeacher:
    """`check_server` (or, with teacher_backend "vllm", common/vllm_teacher.py's `check_vllm_teacher`: the engine
    built here), for a run: its summary printed, or any refusal as one `error:` line and exit 2, before anything is
    written."""
    check = check_vllm_teacher if kw.get("teacher_backend") == "vllm" else check_server
    try:
        server, summary = check(name, tokenizer, temperature, max_len, **kw)
    except (ValueError, OSError) as e:
        fail(" ".join(str(e).split()))
    print(summary, flush=True)
    return server


@contextlib.contextmanager
def teacher_failures(accelerator, teacher):
    """Around the teacher's scoring: a TeacherServerError becomes `failure["error"]` (its message) instead of an
    exception, on every rank (one collective when several ranks score through a server), so that all ranks stop
    together: the caller checkpoints its last complete step and exits."""
    failure = {"error": ""}
    try:
        yield failure
    except TeacherServerError as e:
        failure["error"] = str(e)
    if isinstance(teacher, TeacherServer) and accelerator.num_processes > 1:
        flag = torch.tensor(float(bool(failure["error"])), device=accelerator.device)
        if accelerator.reduce(flag, "max").item() and not failure["error"]:
            failure["error"] = "another rank's teacher requests failed"
