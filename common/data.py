"""Datasets of math problems: loading, validation, prompt rendering and length filtering.

A row has `problem` and `answer` (strings) and optionally `solution` (a golden, complete response
ending in `\\boxed{answer}`). Sources: a `.jsonl` file, a `.parquet` file, or a hub dataset id
(`name` or `name:split`, with `field=column` remapping done by the caller). Bad rows fail loudly
with the file and line named; nothing is dropped silently.
"""

import json
from pathlib import Path

import torch

REQUIRED_FIELDS = ("problem", "answer")
COT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class DataError(ValueError):
    """A dataset that cannot be used as it is (missing file or field, empty, over-long prompts)."""


def _check_row(row: dict, where: str, need_solution: bool, fields: dict | None = None) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if fields:  # e.g. {"problem": "question"}: our name -> the source's column
        row = {**row, **{ours: row.get(theirs) for ours, theirs in fields.items()}}
    required = REQUIRED_FIELDS + (("solution",) if need_solution else ())
    missing = [k for k in required if row.get(k) is None or str(row.get(k)).strip() == ""]
    if missing:
        raise DataError(f"{where}: missing required field(s) {missing} (has {sorted(row)})")
    out = dict(row)
    out["problem"], out["answer"] = str(row["problem"]), str(row["answer"])
    return out


def parse_field_map(spec: str) -> dict[str, str]:
    """"problem=question,answer=final" -> {"problem": "question", "answer": "final"}."""
    pairs = [p.split("=", 1) for p in spec.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise DataError(f"field map {spec!r}: expected ours=theirs pairs separated by commas")
    return {a.strip(): b.strip() for a, b in pairs}


def load_rows(
    source: str, split: str = "train", need_solution: bool = False, limit: int | None = None, fields: dict | None = None
) -> list[dict]:
    """Load and validate rows from a JSONL / Parquet file or a hub dataset id (`name` or `name:split`).

    `fields` renames source columns to ours. Raises DataError naming the file and line of the first
    bad row, or if nothing is left.
    """
    path = Path(source)
    rows: list[dict] = []
    if source.endswith(".jsonl"):
        if not path.is_file():
            raise DataError(f"dataset file not found: {source}")
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{source}:{lineno}: invalid JSON ({e})") from e
                rows.append(_check_row(row, f"{source}:{lineno}", need_solution, fields))
    elif source.endswith(".parquet"):
        if not path.is_file():
            raise DataError(f"dataset file not found: {source}")
        import datasets

        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        rows = [_check_row(r, f"{source}: row {i}", need_solution, fields) for i, r in enumerate(ds)]
    else:
        if path.exists() or source.startswith((".", "/")):
            raise DataError(f"dataset {source}: expected a .jsonl or .parquet file or a hub id `org/name`")
        import datasets

        name, _, hub_split = source.partition(":")
        ds = datasets.load_dataset(name, split=hub_split or split)
        rows = [_check_row(r, f"{source}: row {i}", need_solution, fields) for i, r in enumerate(ds)]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"dataset {source} is empty")
    return rows


def render_prompt(tokenizer, problem: str, template: str = "chat", instruction: str = COT_INSTRUCTION) -> str:
    """The prompt text a model continues: the tokenizer's chat template, or a plain one for base models.

    `chat`: user turn = problem + instruction, then the generation prompt of the template.
    `plain`: "Question: ...\\nAnswer:" style, for models without a chat template.
    """
    user = f"{problem}\n{instruction}" if instruction else problem
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("--prompt_template chat needs a tokenizer with a chat template; use --prompt_template plain")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    if template == "plain":
        return f"Question: {user}\nAnswer: "
    raise DataError(f"unknown prompt template {template!r}; choose chat or plain")


def encode_prompts(tokenizer, rows: list[dict], template: str, instruction: str) -> list[list[int]]:
    """Token ids of each row's rendered prompt (no special tokens added beyond the template's)."""
    texts = [render_prompt(tokenizer, r["problem"], template, instruction) for r in rows]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def filter_by_length(rows: list[dict], lengths: list[int], max_len: int, on_overflow: str = "skip") -> tuple[list[dict], int]:
    """Drop rows whose `lengths` exceed `max_len` ("skip", counted) or fail ("error").

    Returns (kept rows, number skipped). Raises DataError if nothing is left.
    """
    if on_overflow not in ("skip", "error"):
        raise DataError(f"on_overflow must be skip or error, got {on_overflow!r}")
    over = [i for i, n in enumerate(lengths) if n > max_len]
    if over and on_overflow == "error":
        i = over[0]
        raise DataError(
            f"{len(over)} prompt(s) longer than max_prompt_length={max_len}, e.g. row {i} "
            f"(id={rows[i].get('id', '?')}, {lengths[i]} tokens); raise the limit or use skip"
        )
    kept = [r for i, r in enumerate(rows) if lengths[i] <= max_len]
    if not kept:
        raise DataError(f"every prompt is longer than max_prompt_length={max_len}")
    return kept, len(over)


def load_prompts(args, tokenizer) -> tuple[list[dict], list[list[int]], int]:
    """(rows, prompt ids, how many were skipped) for an RL method: `args.train_data` rendered with
    --prompt_template / --instruction, prompts over --max_prompt_length skipped (counted) or an error."""
    rows = load_rows(args.train_data)
    prompts = encode_prompts(tokenizer, rows, args.prompt_template, args.instruction)
    rows, n_skipped = filter_by_length(rows, [len(p) for p in prompts], args.max_prompt_length, args.on_overflow)
    return rows, [p for p in prompts if len(p) <= args.max_prompt_length], n_skipped


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
    from common.grading import extract_answer

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


def golden_batch(prompts: list[list[int]], golden: list[list[int]], pad_id: int):
    """Left-padded prompts + right-padded golden responses: (ids, attention mask, golden-token mask [P, T], T)."""
    import torch

    from common.rollout import left_pad

    g_ids, g_attn = left_pad(prompts, pad_id)
    T = max(1, max(len(g) for g in golden))
    comp, mask = torch.full((len(golden), T), pad_id, dtype=torch.long), torch.zeros((len(golden), T))
    for j, g in enumerate(golden):
        comp[j, : len(g)], mask[j, : len(g)] = torch.tensor(g, dtype=torch.long), 1.0
    return torch.cat([g_ids, comp], 1), torch.cat([g_attn, mask.long()], 1), mask, T


def load_golden(args, rows: list[dict], tokenizer) -> tuple[list[list[int]], dict[str, int]]:
    """Stable-OPD's golden responses, one per prompt row (ids + EOS, [] where there is none): from
    --golden_data (problem, solution) or else the rows' own `solution`; counts as in `golden_ids_for`.
    A DataError when no prompt has a usable one."""
    source = load_rows(args.golden_data) if args.golden_data else rows
    golden_by_problem = {r["problem"]: r.get("solution") for r in source if r.get("solution")}
    golden, counts = golden_ids_for(rows, golden_by_problem, tokenizer, args.max_completion_length, args.golden_overflow)
    if not any(golden):
        raise DataError(f"--mix_coef > 0 needs golden responses, and none of the {len(rows)} prompts has a usable one: add a "
                        f"`solution` field to {args.train_data}, or write a golden file with scripts/make_golden.py and pass "
                        f"--golden_data (and check --max_completion_length {args.max_completion_length}: {counts['over_long']} too long)")
    return golden, counts
