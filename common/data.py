"""Datasets of math problems: loading, validation, prompt rendering and length filtering.

A row has `problem` and `answer` (strings) and optionally `solution` (a golden, complete response
ending in `\\boxed{answer}`). Sources: a `.jsonl` file, a `.parquet` file, or a hub dataset id
(`name`, `name:split` or `name:config:split`). Bad rows fail loudly with the file and line named;
nothing is dropped silently.

Other datasets' shapes are read with column options (`row_options(args)`, i.e. --prompt_column,
--answer_column, --solution_column, --answer_format):

    GSM8K (openai/gsm8k:main:train)       question, answer = "...<<48/2=24>>...\\n#### 72"
        --prompt_column question --answer_format gsm8k            (+ --solution_column answer for SFT)
    NuminaMath (AI-MO/NuminaMath-CoT)      problem, solution (the answer is its last \\boxed{})
        --answer_column solution --answer_format boxed
    OpenR1-Math (open-r1/OpenR1-Math-220k) problem, answer, solution, generations (list[str])
        nothing to set; --solution_column generations takes the first generation that
        `correctness_math_verify` marks correct (the first one when that column is absent)

`--answer_format gsm8k` takes the text after the last "####" as the answer, and rewrites a GSM8K
solution as a golden response: calculator annotations <<...>> removed, "#### 72" replaced by
"The final answer is $\\boxed{72}$.". A --system_prompt is rendered through the chat template as a
system message (Qwen2.5-Math's own default is COT_INSTRUCTION; then pass --instruction '' too).
"""

import json
import os
import re
from pathlib import Path

import torch

from common.errors import BadInput, first_line, unique_keys
from common.grading import extract_answer, extract_boxed, verify_answer

REQUIRED_FIELDS = ("problem", "answer")
COT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
ANSWER_FORMATS = ("plain", "gsm8k", "boxed")
_GSM8K_CALC = re.compile(r"<<[^<>]*>>")


class DataError(BadInput, ValueError):
    """A dataset that cannot be used as it is (missing file or field, empty, over-long prompts)."""


def gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K answer text: what follows the last "####" ("1,080" -> "1080"); None if absent."""
    if "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", answer):
        answer = answer.replace(",", "")
    return answer or None


def gsm8k_solution(text: str) -> str:
    """A GSM8K answer text as a golden response: <<48/2=24>> annotations dropped, "#### 72" -> a boxed answer."""
    answer = gsm8k_answer(text)
    if answer is None:
        return text
    body = _GSM8K_CALC.sub("", text.rsplit("####", 1)[0]).rstrip()
    return f"{body}\nThe final answer is $\\boxed{{{answer}}}$."


def extract_reference_answer(text: str, answer_format: str = "plain") -> str | None:
    """The reference answer in a source column: the text as is (plain), after "####" (gsm8k), or the content
    of the last \\boxed{} (boxed, e.g. a NuminaMath solution). None when the format finds nothing."""
    if answer_format == "plain":
        return text if text.strip() else None
    if answer_format == "gsm8k":
        return gsm8k_answer(text)
    if answer_format == "boxed":
        boxed = extract_boxed(text)
        return boxed.strip() if boxed and boxed.strip() else None
    raise DataError(f"unknown answer format {answer_format!r}; choose one of {ANSWER_FORMATS}")


def decode_line(raw: bytes, where: str, first: bool = False) -> str:
    """One line of a text file as str, strictly UTF-8 (a BOM on the first line is dropped): a DataError naming the
    line and the column of the first byte that is not UTF-8, instead of a UnicodeDecodeError without a place."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}): re-save the "
                        "file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _no_duplicate_keys(pairs: list) -> dict:
    return unique_keys(pairs, lambda key: DataError(f"column {key!r} is given twice in one object: keep one of them"))


def parse_json_line(line: str, where: str):
    """One JSON value, strictly: invalid JSON, and a key given twice in one object (json keeps the last silently),
    are DataErrors naming `where` (file:line)."""
    try:
        return json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e})") from e
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _pick_generation(generations, verdicts) -> str | None:
    """OpenR1-Math style: the first generation marked correct (verdicts of the same length), else the first one."""
    texts = [g if isinstance(g, str) else None for g in generations]
    if isinstance(verdicts, (list, tuple)) and len(verdicts) == len(texts):
        good = [t for t, ok in zip(texts, verdicts) if ok and t and t.strip()]
        if good:
            return good[0]
    return next((t for t in texts if t and t.strip()), None)


def _check_row(row: dict, where: str, need_solution: bool, fields: dict | None = None,
               answer_format: str = "plain") -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    source = row
    if fields:  # e.g. {"problem": "question"}: our name -> the source's column
        row = {**row, **{ours: row.get(theirs) for ours, theirs in fields.items()}}
    if isinstance(row.get("solution"), (list, tuple)):  # e.g. OpenR1-Math `generations`
        row = {**row, "solution": _pick_generation(row["solution"], source.get("correctness_math_verify"))}
    required = REQUIRED_FIELDS + (("solution",) if need_solution else ())
    missing = [k for k in required if row.get(k) is None or str(row.get(k)).strip() == ""]
    if missing:
        cols = {k: fields[k] for k in missing if fields and fields.get(k, k) != k}
        read = f"; read from column(s) {cols}" if cols else ""
        raise DataError(f"{where}: missing required field(s) {missing} (has {sorted(source)}{read})")
    for k in REQUIRED_FIELDS:  # str() of a JSON object / list would be a gold string no answer ever equals
        if isinstance(row[k], (dict, list, tuple, bool)):
            col = (fields or {}).get(k, k)
            kind = "boolean" if isinstance(row[k], bool) else "object" if isinstance(row[k], dict) else "array"
            raise DataError(f"{where}: column {col!r} holds a JSON {kind} ({json.dumps(row[k], default=str)[:80]}), "
                            "not a string or number: give the value itself (e.g. \"30\")")
    if row.get("solution") is not None and not isinstance(row["solution"], str):  # the golden response is text
        col = (fields or {}).get("solution", "solution")
        raise DataError(f"{where}: column {col!r} holds {json.dumps(row['solution'], default=str)[:80]} "
                        f"({type(row['solution']).__name__}), not the text of a solution (or a list of texts)")
    out = dict(row)
    out["problem"] = str(row["problem"])
    out["answer"] = extract_reference_answer(str(row["answer"]), answer_format)
    if out["answer"] is None:
        col = (fields or {}).get("answer", "answer")
        raise DataError(f"{where}: no {answer_format} answer in column {col!r} ({str(row['answer'])[-80:]!r})")
    if answer_format == "gsm8k" and out.get("solution"):
        out["solution"] = gsm8k_solution(str(out["solution"]))
    return out


def row_options(args) -> dict:
    """`load_rows` keywords from a method's column options (common/flags.py DataFlags; '' reads as the default):
    {"fields": our name -> source column, "answer_format": ...}."""
    columns = {"problem": args.prompt_column or "problem", "answer": args.answer_column or "answer",
               "solution": args.solution_column or "solution"}
    answer_format = args.answer_format or "plain"
    if answer_format not in ANSWER_FORMATS:
        raise DataError(f"unknown --answer_format {answer_format!r}; choose one of {ANSWER_FORMATS}")
    return {"fields": {ours: theirs for ours, theirs in columns.items() if ours != theirs} or None,
            "answer_format": answer_format}


def parse_field_map(spec: str) -> dict[str, str]:
    """"problem=question,answer=final" -> {"problem": "question", "answer": "final"}."""
    pairs = [p.split("=", 1) for p in spec.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise DataError(f"field map {spec!r}: expected ours=theirs pairs separated by commas")
    return {a.strip(): b.strip() for a, b in pairs}


def load_rows(
    source: str, split: str = "train", need_solution: bool = False, limit: int | None = None, fields: dict | None = None,
    answer_format: str = "plain",
) -> list[dict]:
    """Load and validate rows from a JSONL / Parquet file or a hub dataset id (`name`, `name:split` or
    `name:config:split`, e.g. "openai/gsm8k:main:test").

    `fields` renames source columns to ours ({"problem": "question"}); `answer_format` reads the reference
    answer out of its column (plain | gsm8k | boxed: `extract_reference_answer`). Raises DataError naming
    the file and line of the first bad row, or if nothing is left.
    """
    if answer_format not in ANSWER_FORMATS:
        raise DataError(f"unknown answer format {answer_format!r}; choose one of {ANSWER_FORMATS}")
    path = Path(source)
    rows: list[dict] = []
    if path.is_dir():
        raise DataError(f"dataset {source}: is a folder, not a .jsonl / .parquet file")
    if source.endswith(".jsonl"):
        if not path.is_file():
            raise DataError(f"dataset file not found: {source}")
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = decode_line(raw, f"{source}:{lineno}", first=lineno == 1)
                if not line.strip():
                    continue
                rows.append(_check_row(parse_json_line(line, f"{source}:{lineno}"), f"{source}:{lineno}", need_solution,
                                       fields, answer_format))
    elif source.endswith(".parquet"):
        if not path.is_file():
            raise DataError(f"dataset file not found: {source}")
        import datasets
        import pyarrow.parquet as pq

        try:
            pq.read_metadata(str(path))  # a torn / non-Parquet file fails here, before datasets logs its own error line
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 -- pyarrow's and datasets' errors for a torn / non-Parquet file
            raise DataError(f"{source}: not a readable Parquet file ({first_line(e)}): rewrite it, or give a "
                            ".jsonl") from e
        rows = [_check_row(r, f"{source}: row {i}", need_solution, fields, answer_format) for i, r in enumerate(ds)]
    else:
        if path.exists() or source.startswith((".", "/")):
            raise DataError(f"dataset {source}: expected a .jsonl or .parquet file or a hub id `org/name`")
        import datasets

        parts = source.split(":")
        if len(parts) > 3 or not all(parts):
            raise DataError(f"hub dataset {source!r}: expected `name`, `name:split` or `name:config:split`")
        name, config, hub_split = parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else split
        try:
            ds = datasets.load_dataset(name, config, split=hub_split)
        except Exception as e:  # noqa: BLE001 -- the hub's errors (offline, no such dataset / split / config)
            switches = [k for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(k) == "1"]
            offline = f" with {' / '.join(f'{k}=1' for k in switches)} set" if switches else ""
            raise DataError(f"hub dataset {source!r} cannot be loaded{offline} ({first_line(e)}): check the name, "
                            "split and config, or download it and pass a .jsonl / .parquet file") from e
        rows = [_check_row(r, f"{source}: row {i}", need_solution, fields, answer_format) for i, r in enumerate(ds)]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"dataset {source} is empty")
    return rows


def render_prompt(tokenizer, problem: str, template: str = "chat", instruction: str = COT_INSTRUCTION,
                  system_prompt: str = "") -> str:
    """The prompt text a model continues: the tokenizer's chat template, or a plain one for base models.

    `chat`: [system turn = system_prompt, if any] user turn = problem + instruction, then the generation
    prompt of the template (without a system_prompt the template's own default applies, e.g. Qwen's).
    `plain`: "Question: ...\\nAnswer:" style, for models without a chat template (a system_prompt is
    its first paragraph).
    """
    user = f"{problem}\n{instruction}" if instruction else problem
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("--prompt_template chat needs a tokenizer with a chat template; use --prompt_template plain")
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": user}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 -- e.g. jinja2's TemplateError: a template that refuses a system turn
            if system_prompt:
                raise DataError(f"this tokenizer's chat template does not take a system message ({e}); "
                                "drop --system_prompt or put the text in --instruction") from e
            # the template is the model folder's code: whatever it raises (jinja2's errors, a TypeError of its
            # expressions) is a broken template, not a bug here
            raise DataError(f"this tokenizer's chat template fails to render a prompt ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:160]}): repair chat_template in the model folder's tokenizer "
                            "files, or use --prompt_template plain") from e
    if template == "plain":
        return (f"{system_prompt}\n\n" if system_prompt else "") + f"Question: {user}\nAnswer: "
    raise DataError(f"unknown prompt template {template!r}; choose chat or plain")


def encode_prompts(tokenizer, rows: list[dict], template: str, instruction: str, system_prompt: str = "") -> list[list[int]]:
    """Token ids of each row's rendered prompt (no special tokens added beyond the template's)."""
    texts = [render_prompt(tokenizer, r["problem"], template, instruction, system_prompt) for r in rows]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def filter_by_length(rows: list[dict], lengths: list[int], max_len: int, on_overflow: str = "skip",
                     limit_name: str = "max_prompt_length", what: str = "prompt") -> tuple[list[dict], int]:
    """Drop rows whose `lengths` exceed `max_len` ("skip", counted) or fail ("error"). Errors name the limit
    (`limit_name`, e.g. "max_completion_length" for SFT's solutions) and `what` is measured.

    Returns (kept rows, number skipped). Raises DataError if nothing is left.
    """
    if on_overflow not in ("skip", "error"):
        raise DataError(f"on_overflow must be skip or error, got {on_overflow!r}")
    over = [i for i, n in enumerate(lengths) if n > max_len]
    if over and on_overflow == "error":
        i = over[0]
        raise DataError(
            f"{len(over)} {what}(s) longer than {limit_name}={max_len}, e.g. row {i} "
            f"(id={rows[i].get('id', '?')}, {lengths[i]} tokens); raise the limit or use skip"
        )
    kept = [r for i, r in enumerate(rows) if lengths[i] <= max_len]
    if not kept:
        raise DataError(f"every {what} is longer than {limit_name}={max_len} (the longest has {max(lengths)} tokens)")
    return kept, len(over)


def load_prompts(args, tokenizer) -> tuple[list[dict], list[list[int]], int]:
    """(rows, prompt ids, how many were skipped) for an RL method: `args.train_data` read with the column
    options (`row_options`), rendered with --prompt_template / --instruction / --system_prompt, prompts over
    --max_prompt_length skipped (counted) or an error."""
    rows = load_rows(args.train_data, **row_options(args))
    prompts = encode_prompts(tokenizer, rows, args.prompt_template, args.instruction, args.system_prompt)
    rows, n_skipped = filter_by_length(rows, [len(p) for p in prompts], args.max_prompt_length, args.on_overflow)
    return rows, [p for p in prompts if len(p) <= args.max_prompt_length], n_skipped


def build_examples(tokenizer, rows: list[dict], args) -> tuple[list[tuple[list[int], list[int]]], int]:
    """SFT's examples: (prompt ids, completion ids = solution + EOS) per row; over-long ones skipped (counted) or an
    error (--on_overflow). Also run by the --dry_run preflight (common/preflight.py)."""
    prompts = encode_prompts(tokenizer, rows, args.prompt_template, args.instruction, args.system_prompt)
    rows, skipped_p = filter_by_length(rows, [len(p) for p in prompts], args.max_prompt_length, args.on_overflow)
    prompts = [p for p in prompts if len(p) <= args.max_prompt_length]
    completions = [tokenizer(r["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in rows]
    rows, skipped_c = filter_by_length(rows, [len(c) for c in completions], args.max_completion_length, args.on_overflow,
                                       limit_name="max_completion_length", what="solution")
    keep = [i for i, c in enumerate(completions) if len(c) <= args.max_completion_length]
    return [(prompts[i], completions[i]) for i in keep], skipped_p + skipped_c


def shuffled_indices(n: int, cursor: int, count: int, seed: int) -> list[int]:
    """`count` indices from global position `cursor` of an endless stream of seeded per-epoch shuffles
    of range(n). A run's data order is a pure function of (seed, cursor): resume is exact, and ranks
    slice one global batch without a DistributedSampler."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(cursor, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        take = perm[offset : offset + count - len(out)]
        out, cursor = out + take, cursor + len(take)
    return out


def golden_ids_for(rows: list[dict], golden_by_problem: dict[str, str], tokenizer, max_len: int, overflow: str):
    """Per prompt row, its golden response as token ids + EOS ([] if it has none), and counts of what was
    missing, over-long (skipped or truncated to max_len) and unparsable (no final answer we can extract)."""
    out, counts = [], {"missing": 0, "over_long": 0, "unparsable": 0}
    for row in rows:
        text = golden_by_problem.get(row["problem"])
        if not text:
            counts["missing"] += 1
            out.append([])
            continue
        counts["unparsable"] += extract_answer(text)[0] is None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) > max_len:
            counts["over_long"] += 1
            ids = ids[:max_len] if overflow == "truncate" else []
        out.append(ids)
    return out, counts


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length id lists into left-padded ids and mask tensors [B, max_len]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def golden_batch(prompts: list[list[int]], golden: list[list[int]], pad_id: int):
    """Left-padded prompts + right-padded golden responses: (ids, attention mask, golden-token mask [P, T], T)."""
    g_ids, g_attn = left_pad(prompts, pad_id)
    T = max(1, max(len(g) for g in golden))
    comp, mask = torch.full((len(golden), T), pad_id, dtype=torch.long), torch.zeros((len(golden), T))
    for j, g in enumerate(golden):
        comp[j, : len(g)], mask[j, : len(g)] = torch.tensor(g, dtype=torch.long), 1.0
    return torch.cat([g_ids, comp], 1), torch.cat([g_attn, mask.long()], 1), mask, T


def check_golden_answers(rows: list[dict], golden_by_problem: dict[str, str], source: str, max_frac: float = 0.05) -> int:
    """Golden responses whose final answer contradicts the dataset's answer for the same problem: raises
    DataError (naming the file, how many, and one example) when more than `max_frac` of the checked ones do
    (a golden file for another dataset, or shifted rows); returns the number of contradictions otherwise.
    Goldens without a parsable final answer are not checked (golden_ids_for counts them)."""
    checked, bad = 0, []
    for row in rows:
        text = golden_by_problem.get(row["problem"])
        if not text or row.get("answer") in (None, ""):
            continue
        pred = extract_answer(text)[0]
        if pred is None:
            continue
        checked += 1
        if not verify_answer(pred, str(row["answer"])):
            bad.append((row, pred))
    if checked and len(bad) > max_frac * checked:
        row, pred = bad[0]
        raise DataError(f"golden responses ({source}) contradict the dataset's answers for {len(bad)} of {checked} problems, "
                         f"e.g. {row['problem'][:60]!r}: golden answer {pred!r}, dataset answer {row['answer']!r}; "
                         "is the golden file for this --train_data?")
    return len(bad)


def load_golden(args, rows: list[dict], tokenizer) -> tuple[list[list[int]], dict[str, int]]:
    """Stable-OPD's golden responses, one per prompt row (ids + EOS, [] where there is none): from
    --golden_data (problem, answer, solution: our own columns, as scripts/make_golden.py writes them; its final
    answers are checked against the rows' answers, `check_golden_answers`) or else the rows' own
    `solution` (see --solution_column); counts as in `golden_ids_for`.
    A DataError when no prompt has a usable one."""
    source = load_rows(args.golden_data) if args.golden_data else rows
    golden_by_problem = {r["problem"]: r.get("solution") for r in source if r.get("solution")}
    if args.golden_data:  # a golden file for another dataset (or shifted rows) fails here, not as a silent mismatch
        check_golden_answers(rows, golden_by_problem, args.golden_data)
    golden, counts = golden_ids_for(rows, golden_by_problem, tokenizer, args.max_completion_length, args.golden_overflow)
    if not any(golden):
        raise DataError(f"--mix_coef > 0 needs golden responses, and none of the {len(rows)} prompts has a usable one: add a "
                        f"`solution` field to {args.train_data}, or write a golden file with scripts/make_golden.py and pass "
                        f"--golden_data (and check --max_completion_length {args.max_completion_length}: {counts['over_long']} too long)")
    return golden, counts
