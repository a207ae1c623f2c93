"""Command line: one flat `Args` dataclass per method, parsed with `transformers.HfArgumentParser`.

Precedence: dataclass defaults < `--config file.yaml` (or .json) < command-line flags.
Unknown flags and unknown config keys are errors (never silently ignored), and the resolved
config is written to the run folder so every run can be reproduced from its own files.

What a flag accepts is declared with the flag and checked by `parse` for flags and config values alike:
  - choices: a `Literal[...]` type;
  - numeric bounds: `metadata={"range": "[1, inf)"}` (interval notation: `[` / `]` include the end, `(` / `)`
    exclude it; an end may name another field, e.g. "[1, per_device_prompts]"). The range is appended to `--help`;
  - `metadata={"divides": "per_device_prompts"}`: the value must split that field into equal parts.
A bad value exits with status 2 and ONE line naming the flag, the value and what is accepted, e.g.
    opd.py: error: --max_steps -5: must be >= 1 (see --help)
Negative numbers parse as values (`--learning_rate -1e-3` reaches the bounds check instead of argparse's
"expected one argument"). Every numeric field of every method and of eval/evaluate.py declares a range
(tests/test_bad_inputs.py checks that).

Start-up checks that need more than the flags, run by `common.run.start_run` before anything is loaded or
written (each a one-line error, status 2): `check_run_dir` (a run folder belongs to one run, below),
`check_positions` (prompt + completion within the models' max_position_embeddings) and
`check_quantization` (bitsandbytes usable on this machine). `check_golden_answers` checks golden responses
against the dataset's answers once both are loaded.

A run folder belongs to one run. `config.yaml` records the method and every setting; resuming with another
method is refused, and so is resuming with different identity settings: everything except `RESUME_FREE`
(bookkeeping, eval, monitoring, memory/engine knobs and `max_steps`, which may change when resuming).
`--force_resume true` continues with the new settings anyway (the old config is kept as
config.before_step_<N>.yaml); `--overwrite_run_dir true` deletes the old run's files and starts afresh.
Neither touches the folder before the models and data have loaded (`common.run.resume_run`).
`config.yaml` also records a `run_id` (made once per run), and every checkpoint carries a copy of it
(run_config.yaml), so a checkpoint says whose it is even when copied out of its folder: --resume_from refuses one of
another method, of another run (run_id) than the one in --run_dir, or one recording no run outside a run folder
(unless --force_resume). A run with logs or final/ but no intact checkpoint left is refused (not restarted from 0).

A `--config` file is read strictly: a key given twice (at any depth) and a second `--config` are errors.
"""

import copy
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import types
import typing
import warnings
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from common.errors import BadInput, unique_keys
from common.tracking import LOG_FILES


class ConfigError(BadInput, ValueError):
    """A malformed or unknown `--config` file or key."""


class RunDirError(BadInput, ValueError):
    """A --run_dir that holds another run (another method, other settings, or no config to tell)."""


def fail(message: str, code: int = 2, prog: str | None = None) -> typing.NoReturn:
    """Print ONE line `prog: error: message` on stderr (rank 0 only under a launcher) and exit with `code`."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog or _prog()}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _prog() -> str:
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"


def method_name(args_or_cls) -> str:
    """The method a dataclass belongs to: the stem of the file that defines it (opd, sft, evaluate, ...)."""
    cls = args_or_cls if isinstance(args_or_cls, type) else type(args_or_cls)
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    return Path(path).stem if path else cls.__module__.rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------- declared ranges

_RANGE = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*$")


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval with optional ends; an end is a number, +-inf, or the name of another field."""

    lo: float | str | None
    lo_closed: bool
    hi: float | str | None
    hi_closed: bool

    @classmethod
    def parse(cls, spec: str) -> "Range":
        m = _RANGE.match(spec)
        if not m:
            raise ValueError(f"bad range {spec!r}: write an interval such as '[1, inf)', '(0, 1]' or '[0, max_steps]'")

        def end(tok: str):
            if tok.lstrip("+-") in ("inf", "infinity"):
                return None
            try:
                return float(tok)
            except ValueError:
                if not tok.isidentifier():
                    raise ValueError(f"bad range {spec!r}: {tok!r} is neither a number nor a field name") from None
                return tok

        return cls(end(m.group(2)), m.group(1) == "[", end(m.group(3)), m.group(4) == "]")

    def resolve(self, args) -> "Range":
        """The same range with field-name ends replaced by those fields' values."""
        val = lambda e: float(getattr(args, e)) if isinstance(e, str) else e  # noqa: E731
        return Range(val(self.lo), self.lo_closed, val(self.hi), self.hi_closed)

    def contains(self, x: float) -> bool:
        if isinstance(x, float) and math.isnan(x):
            return False
        ok_lo = self.lo is None or (x >= self.lo if self.lo_closed else x > self.lo)
        ok_hi = self.hi is None or (x <= self.hi if self.hi_closed else x < self.hi)
        return ok_lo and ok_hi

    def describe(self, names: tuple = (None, None)) -> str:
        """'>= 1', '> 0', 'in [0, 1]', 'in [0, max_steps=10]' (names: the field names of the ends, if any)."""
        fmt = lambda e, n: (f"{n}={_num(e)}" if n else _num(e))  # noqa: E731
        if self.hi is None:
            return f"{'>=' if self.lo_closed else '>'} {fmt(self.lo, names[0])}" if self.lo is not None else "any number"
        if self.lo is None:
            return f"{'<=' if self.hi_closed else '<'} {fmt(self.hi, names[1])}"
        return f"in {'[' if self.lo_closed else '('}{fmt(self.lo, names[0])}, {fmt(self.hi, names[1])}{']' if self.hi_closed else ')'}"


def _num(x) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x) if isinstance(x, float) else str(x)


def field_range(f: dataclasses.Field) -> Range | None:
    spec = f.metadata.get("range")
    return Range.parse(spec) if spec is not None else None


def _resolved_types(args_cls) -> dict:
    return typing.get_type_hints(args_cls)


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def numeric_fields(args_cls) -> list[str]:
    """Names of the int / float fields of `args_cls` (bools excluded)."""
    hints = _resolved_types(args_cls)
    return [f.name for f in dataclasses.fields(args_cls) if _strip_optional(hints[f.name]) in (int, float)]


MIN_TEMPERATURE = 1e-3  # below it sampling is greedy in all but name: a logit gap of 0.1 becomes 100 nats


def check_values(args, sources: dict[str, str] | None = None) -> None:
    """Every field's type, choices and declared range; raise ValueError with the first problem, as one line
    naming the flag, the value (and where it came from) and what is accepted. `range_if` declares a range that
    holds while a bool flag is on ({"adaptive_mix": "[mix_coef, inf)"}: two interacting flags checked where
    declared), and `choices_if` the choices of a Literal field while a bool flag is on ({"ref_kl_on_golden": ["full"]});
    a `*temperature` field may not be positive and below MIN_TEMPERATURE (0 is greedy where allowed)."""
    hints, sources = _resolved_types(type(args)), sources or {}
    for f in dataclasses.fields(args):
        v, tp = getattr(args, f.name), _strip_optional(hints[f.name])
        where = f" (from {sources[f.name]})" if f.name in sources else ""
        flag = f"--{f.name} {v!r}{where}" if isinstance(v, str) else f"--{f.name} {v}{where}"
        if v is None and tp is not hints[f.name]:
            continue  # Optional field left unset
        if typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            if v not in choices:
                raise ValueError(f"{flag}: choose one of {', '.join(map(str, choices))}")
            for when, allowed in f.metadata.get("choices_if", {}).items():  # e.g. {"ref_kl_on_golden": ["full"]}
                if getattr(args, when) is True and v not in allowed:
                    raise ValueError(f"{flag}: must be {' or '.join(map(str, allowed))} with --{when} true")
            continue
        if tp is bool:
            if not isinstance(v, bool):
                raise ValueError(f"{flag}: must be true or false")
            continue
        if tp is int:
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                    setattr(args, f.name, v)
                else:
                    raise ValueError(f"{flag}: must be an integer")
        elif tp is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{flag}: must be a number")
            v = float(v)
            setattr(args, f.name, v)
            if not math.isfinite(v):
                raise ValueError(f"{flag}: must be a finite number")
        elif tp is str:
            if not isinstance(v, str):
                raise ValueError(f"{flag}: must be a string")
            continue
        else:
            continue
        rng = field_range(f)
        if rng is not None:
            resolved = rng.resolve(args)
            if not resolved.contains(v):
                names = tuple(e if isinstance(e, str) else None for e in (rng.lo, rng.hi))
                raise ValueError(f"{flag}: must be {resolved.describe(names)}{_hint(f)}")
        for when, spec in f.metadata.get("range_if", {}).items():
            cond = Range.parse(spec)
            if getattr(args, when) is True and not cond.resolve(args).contains(v):
                names = tuple(e if isinstance(e, str) else None for e in (cond.lo, cond.hi))
                raise ValueError(f"{flag}: must be {cond.resolve(args).describe(names)} with --{when} true")
        if f.name.endswith("temperature") and 0 < v < MIN_TEMPERATURE:
            greedy = " (or 0 for greedy decoding)" if rng is not None and rng.resolve(args).contains(0.0) else ""
            raise ValueError(f"{flag}: must be >= {MIN_TEMPERATURE}{greedy}: colder than that, sampling is greedy "
                             "decoding in all but name, the sampled tokens' log-probs are ~0 and the loss vanishes "
                             "(or is inf / nan once logits / temperature overflow)")
        whole = f.metadata.get("divides")
        if whole is not None and v and getattr(args, whole) % v:
            raise ValueError(f"{flag}: must divide --{whole} {getattr(args, whole)} (equal parts)")


def _hint(f: dataclasses.Field) -> str:
    """' (0 = off)'-style notes from the help text, so the error says what 0 means."""
    helptext = f.metadata.get("help", "")
    m = re.search(r"\(([^()]*\b0 = [^()]*)\)", helptext)
    return f" ({m.group(1)})" if m else ""


# ----------------------------------------------------------------------------- parsing


class _DuplicateKey(ValueError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last value silently)."""


def _mapping_without_duplicates(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged by construct_mapping
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if first is not None:
            raise _DuplicateKey(f"key {key!r} is given twice (lines {first} and {key_node.start_mark.line + 1}): "
                                "keep one of them")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _read_config(path: str) -> dict:
    """Read a YAML or JSON mapping of field name -> value (each key once), with errors that name the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config {path}: is a folder, not a YAML / JSON file")
    if not p.is_file():
        raise ConfigError(f"--config {path}: file not found")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"--config {path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}): re-save it as "
                          "UTF-8") from None
    if p.suffix == ".json":  # a .json file is read as JSON, strictly (YAML would accept a trailing comma)
        try:
            data = json.loads(text, object_pairs_hook=_json_without_duplicates)
        except _DuplicateKey as e:
            raise ConfigError(f"--config {path}: {e}") from None
        except ValueError as e:
            raise ConfigError(f"--config {path}: not valid JSON: {e}") from None
        return _mapping_or_fail(data, path)
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # YAML is a superset of JSON
    except _DuplicateKey as e:
        raise ConfigError(f"--config {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML/JSON: {' '.join(str(e).split())}") from e
    return _mapping_or_fail(data, path)


def _mapping_or_fail(data, path: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def _json_without_duplicates(pairs: list) -> dict:
    return unique_keys(pairs, lambda key: _DuplicateKey(f"key {key!r} is given twice: keep one of them"))


class _Parser(HfArgumentParser):
    """HfArgumentParser that knows the `range` metadata (kept out of argparse, added to the help) and reports
    every error as one line, status 2, without the (long) usage block."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        if {"range", "range_if", "choices_if", "divides"} & set(field.metadata):
            field = copy.copy(field)
            meta = dict(field.metadata)
            if "range" in meta:
                rng = Range.parse(meta.pop("range"))
                names = tuple(e if isinstance(e, str) else None for e in (rng.lo, rng.hi))
                meta["help"] = (meta.get("help", "") + f" Accepted: {rng.describe(names)}.").strip()
            for when, spec in meta.pop("range_if", {}).items():
                meta["help"] = (meta.get("help", "") + f" With --{when}: {Range.parse(spec).describe()}.").strip()
            for when, allowed in meta.pop("choices_if", {}).items():
                meta["help"] = (meta.get("help", "") + f" With --{when}: {' or '.join(allowed)}.").strip()
            if "divides" in meta:
                meta["help"] += f" Must divide --{meta.pop('divides')}."
            field.metadata = types.MappingProxyType(meta)
        HfArgumentParser._parse_dataclass_field(parser, field)

    def _add_dataclass_arguments(self, dtype):
        """Every field, grouped in --help by the class that declared it (common/flags.py): the method's own first."""
        hints = typing.get_type_hints(dtype)
        owner = {f.name: next(c for c in reversed(dtype.__mro__) if f.name in inspect.get_annotations(c))
                 for f in dataclasses.fields(dtype)}
        for cls in dict.fromkeys(c for c in dtype.__mro__ if c in owner.values()):
            group = self.add_argument_group((inspect.getdoc(cls) or cls.__name__).splitlines()[0].rstrip("."))
            for f in dataclasses.fields(dtype):
                if owner[f.name] is cls and f.init:
                    f.type = hints[f.name]
                    self._parse_dataclass_field(group, f)

    def error(self, message):
        fail(f"{message} (see --help)", prog=self.prog)


def _join_negative_values(argv: list[str], numeric: set[str]) -> list[str]:
    """`--lr -1e-3` -> `--lr=-1e-3` for numeric flags, so argparse reads it as a value, not as an option."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        name = tok[2:].replace("-", "_") if tok.startswith("--") and "=" not in tok else None
        if name in numeric and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            try:
                float(argv[i + 1])
                out.append(f"{tok}={argv[i + 1]}")
                i += 2
                continue
            except ValueError:
                pass
        out.append(tok)
        i += 1
    return out


def parse(args_cls, argv: list[str] | None = None):
    """Parse `argv` (default `sys.argv[1:]`) into an instance of the dataclass `args_cls`, then check every
    value against its type, choices and declared range. Any problem: one line on stderr, exit status 2.

    `--config FILE` may appear anywhere; its keys must be fields of `args_cls` (a `method` key, as written
    into run folders' config.yaml, is allowed and ignored).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _parse(args_cls, argv)
    except (ConfigError, ValueError) as e:
        fail(f"{e}")


def _parse(args_cls, argv: list[str]):
    config_path, given_configs = None, []
    i = 0
    while i < len(argv):  # take every --config out of argv: exactly one file is read, so a second one is an error
        tok = argv[i]
        if tok == "--config" or tok.startswith("--config="):
            config_path = tok.split("=", 1)[1] if "=" in tok else (argv[i + 1] if i + 1 < len(argv) else None)
            if config_path is None:
                raise ConfigError("--config needs a file path")
            given_configs.append(config_path)
            del argv[i : i + (1 if "=" in tok else 2)]
            continue
        i += 1
    if len(given_configs) > 1:
        raise ConfigError(f"--config is given {len(given_configs)} times ({', '.join(given_configs)}); one config "
                          "file is read, not merged: put the settings in one file, or pass the ones that differ as "
                          "flags")
    names = {f.name for f in dataclasses.fields(args_cls)}
    argv = _join_negative_values(argv, set(numeric_fields(args_cls)))
    parser = _Parser(args_cls)
    parser.add_argument("--config", default=None, help="YAML/JSON file of field: value defaults; flags override it.")
    sources = {}
    if config_path is not None:
        values = _read_config(config_path)
        for key in RUN_RECORD_KEYS - names:
            values.pop(key, None)  # recorded by save_config: which method wrote it, and which run
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"--config {config_path}: unknown field(s) {unknown}; see --help for valid names")
        parser.set_defaults(**values)
        for action in parser._actions:  # a required field given in the config is given
            if action.dest in values:
                action.required = False
        given = {tok[2:].split("=", 1)[0].replace("-", "_") for tok in argv if tok.startswith("--")}
        sources = {k: f"--config {config_path}" for k in values if k not in given}
    # unknown flags raise ValueError in HfArgumentParser: report them like argparse's own errors
    try:
        outputs = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as e:
        m = re.match(r"Some specified arguments are not used by the HfArgumentParser: (\[.*\])", str(e))
        parser.error(f"unknown flag(s) {' '.join(map(str, yaml.safe_load(m.group(1))))}" if m else str(e))
    args = outputs[0]  # outputs[1], if present, only holds the (already consumed) --config
    check_values(args, sources)
    return args


def save_config(args, run_dir: str | Path, method: str | None = None, run_id: str | None = None) -> Path:
    """Write the resolved config as `run_dir/config.yaml` (atomically), with `method:` first, then the run's
    `run_id` (kept for the life of the run; checkpoints copy this file, see common/checkpoint.py); loadable again
    with `--config` (the `method` and `run_id` keys are ignored there)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    values = {"method": method or method_name(args), **({"run_id": run_id} if run_id else {}), **_plain(args)}
    tmp.write_text(yaml.safe_dump(values, sort_keys=False))
    tmp.replace(path)
    return path


def _plain(args) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(args), default=str))


# ----------------------------------------------------------------------------- the run folder

# Settings that may differ when a run is resumed: where and how it resumes, how long it runs, bookkeeping,
# evaluation, monitoring, and memory / engine knobs that leave the numbers alone. Every other setting (model,
# teacher, data, seed, learning rate and schedule, batch shape, objective, lengths, dtype...) is the run's
# identity: a new field is identity unless listed here.
RESUME_FREE = frozenset({
    "run_dir", "resume_from", "overwrite_run_dir", "force_resume", "max_steps", "dry_run", "plan_gpu",
    "push_to_hub", "hub_model_id", "hub_private", "attn_implementation",
    "report_to", "project", "log_every", "samples_every", "log_groups", "save_every", "keep_last",
    "eval_every", "eval_samples", "eval_batch_size", "val_data", "test_data", "target_val_acc",
    "alarm_threshold", "alarm_jump", "alarm_window", "stop_on_alarm",
    "rollout_backend", "vllm_gpu_memory_utilization", "vllm_sleep", "vllm_check_sync",
    "gradient_checkpointing", "chunk_size", "micro_batch_tokens",  # memory knobs: the same gradients (tested)
    "teacher_backend", "teacher_url", "teacher_timeout", "teacher_retries", "teacher_backoff", "teacher_concurrency",
    "teacher_vllm_gpu_memory_utilization",
})
RUN_RECORD_KEYS = frozenset({"method", "run_id"})  # written into config.yaml beside the settings (save_config)
RUN_FILES = ("config.yaml", "final_eval.json", *LOG_FILES)  # plus checkpoints/, final/, final_adapter/, config.before_step_*.yaml


@dataclasses.dataclass
class RunDirPlan:
    """What `check_run_dir` found: the saved config (None if none), whether the folder holds a run, the identity
    settings that differ (name -> (saved, now)), and whether the old run is to be deleted first."""

    run_dir: Path
    saved: dict | None
    has_run: bool
    changed: dict
    overwrite: bool


def _has_checkpoints(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.is_dir() and re.match(r"^step_\d+$", p.name) for p in root.iterdir())


def _contents(run_dir: Path) -> list[str]:
    """What of a run the folder holds (names, for messages)."""
    out = []
    if (run_dir / "config.yaml").is_file():
        out.append("config.yaml")
    if _has_checkpoints(run_dir):
        out.append("checkpoints")
    if (run_dir / "final").exists():
        out.append("final/")
    out += [n for n in LOG_FILES if (run_dir / n).is_file() and (run_dir / n).stat().st_size > 0]
    return out


def _same_value(key: str, a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b:  # the same local path spelt two ways
        try:
            return Path(a).exists() and Path(a).resolve() == Path(b).resolve()
        except OSError:
            return False
    return False


def read_saved_config(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise RunDirError(f"--run_dir {run_dir}: its config.yaml is unreadable ({' '.join(str(e).split())[:200]}); "
                          "cannot tell whose run it is: choose another --run_dir, or --overwrite_run_dir true") from e
    if not isinstance(data, dict):
        raise RunDirError(f"--run_dir {run_dir}: its config.yaml is not a mapping; choose another --run_dir, or --overwrite_run_dir true")
    return data


def identity_changes(args, saved: dict) -> dict:
    """{name: (saved value, current value)} for the identity settings (not in RESUME_FREE) that differ.
    A setting missing from an older config counts as its default."""
    now, changed = _plain(args), {}
    defaults = {f.name: f.default for f in dataclasses.fields(args) if f.default is not dataclasses.MISSING}
    for key, value in now.items():
        if key in RESUME_FREE:
            continue
        old = saved.get(key, _plain_value(defaults.get(key)))
        if not _same_value(key, old, value):
            changed[key] = (old, value)
    return changed


def _plain_value(v):
    return json.loads(json.dumps(v, default=str))


def _saved_method(saved: dict, args) -> str | None:
    """The method recorded in a config.yaml; for configs written before it was recorded, this method if every
    saved key is one of its fields, else None (another method)."""
    if "method" in saved and "method" not in {f.name for f in dataclasses.fields(args)}:
        return str(saved["method"])
    names = {f.name for f in dataclasses.fields(args)}
    return method_name(args) if set(saved) <= names else None


def _fmt_changes(changed: dict, limit: int = 6) -> str:
    items = [f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in list(changed.items())[:limit]]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(items) + more


def _short(v) -> str:
    s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= 60 else s[:28] + "..." + s[-28:]


def check_run_dir(args, method: str | None = None) -> RunDirPlan:
    """Read-only: may this run use `args.run_dir`? Raises RunDirError (one line) when the folder holds another
    method's run, a run with other identity settings (unless --force_resume), a run that --resume_from none
    would restart and mix into (unless --overwrite_run_dir), or run files without a config.yaml. Also checks an
    explicit --resume_from checkpoint's own run. Returns the plan for `common.run.resume_run`."""
    method = method or method_name(args)
    if not str(args.run_dir).strip():  # Path("") is the current folder: a run would be written into it
        raise RunDirError("--run_dir '': give the run's folder (e.g. runs/my_run)")
    run_dir = Path(args.run_dir)
    in_the_way = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise RunDirError(f"--run_dir {run_dir}: {in_the_way} is a file, not a folder: choose another --run_dir")
    overwrite = bool(getattr(args, "overwrite_run_dir", False))
    force = bool(getattr(args, "force_resume", False))
    resume_from = (getattr(args, "resume_from", "auto") or "none").strip()
    fresh = resume_from.lower() in ("", "none")
    contents = _contents(run_dir) if run_dir.is_dir() else []
    has_run = bool(contents)
    saved = None
    explicit = None if fresh or resume_from.lower() == "auto" else Path(resume_from).expanduser()
    if explicit is not None:
        _check_complete(explicit)
    if overwrite:
        if explicit is not None and _inside(explicit, run_dir):
            raise RunDirError(f"--overwrite_run_dir true would delete --resume_from {explicit}: resume from a checkpoint "
                              "outside --run_dir, or drop one of the two flags")
        if explicit is not None:
            _check_checkpoint_run(args, method, explicit, force)
        return RunDirPlan(run_dir, None, has_run, {}, overwrite=has_run)
    if not has_run:
        if explicit is not None:
            _check_checkpoint_run(args, method, explicit, force)
        return RunDirPlan(run_dir, None, False, {}, overwrite=False)
    where = f"--run_dir {run_dir}"
    saved = read_saved_config(run_dir)
    if saved is None:
        raise RunDirError(f"{where} holds {', '.join(contents)} but no config.yaml, so it cannot tell whose run they are: "
                          "choose another --run_dir, or --overwrite_run_dir true to delete them and start afresh")
    saved_method = _saved_method(saved, args)
    finished = " finished" if (run_dir / "final").exists() else ""
    if saved_method != method:
        what = f"a{finished} {saved_method} run" if saved_method else "a run of another method (its config.yaml has other settings)"
        raise RunDirError(f"{where} holds {what} ({', '.join(contents)}); {method} will not resume, overwrite or mix into it: "
                          "choose another --run_dir, or --overwrite_run_dir true to delete it and start afresh")
    changed = identity_changes(args, saved)
    if changed and not force:
        raise RunDirError(f"{where} holds a{finished} {method} run with other settings: {_fmt_changes(changed)}; resume it "
                          f"with its own settings (--config {run_dir / 'config.yaml'}), --force_resume true to continue it "
                          "with these, --overwrite_run_dir true to start afresh, or choose another --run_dir")
    if fresh and any(c != "config.yaml" for c in contents):
        raise RunDirError(f"{where} holds a{finished} {method} run ({', '.join(contents)}) and --resume_from {resume_from or 'none'} "
                          "would restart it from step 0 and mix the two runs' logs and checkpoints: resume it (--resume_from auto), "
                          "--overwrite_run_dir true to start afresh, or choose another --run_dir")
    if explicit is not None:
        _check_checkpoint_run(args, method, explicit, force, saved, inside=_inside(explicit, run_dir))
    elif resume_from.lower() == "auto":
        intact, bad = _newest_intact(run_dir)
        if intact is None and any(c != "config.yaml" for c in contents):
            found = "; ".join(f"{run_dir.name}/checkpoints/{name}: {problem}" for name, problem in bad)
            wrote = ", ".join(c for c in contents if c != "checkpoints")
            raise RunDirError(f"{where} holds a{finished} {method} run ({wrote}) but no intact checkpoint to resume it "
                              f"from ({found or 'no checkpoint was ever completed'}); starting it again from step 0 "
                              "would replace what it wrote, so nothing was changed: restore a checkpoint or "
                              "--resume_from a good one, or --overwrite_run_dir true to delete this run and start "
                              "afresh")
        if intact is not None:
            _check_checkpoint_run(args, method, intact, force, saved, inside=True)
    return RunDirPlan(run_dir, saved, True, changed, overwrite=False)


def _newest_intact(run_dir: Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """(the newest complete checkpoint of the folder or None, [(name, first problem)] of the newer ones that are
    not): the size check of `common.checkpoint.verify_checkpoint`, without its warnings."""
    from common.checkpoint import _final_dirs, verify_checkpoint

    bad = []
    for d in reversed(_final_dirs(run_dir / "checkpoints")):
        problems = verify_checkpoint(d)
        if not problems:
            return d, bad
        bad.append((d.name, problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")))
    return None, bad


def _check_complete(ckpt: Path) -> None:
    """An explicit --resume_from must be a complete checkpoint: refused before anything loads."""
    from common.checkpoint import _newest_complete, _step_of, verify_checkpoint

    problems = verify_checkpoint(ckpt)
    if problems:
        step = _step_of(ckpt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-line error says it all
            prev = (_newest_complete(ckpt.parent, False, before_step=step)
                    if step is not None and ckpt.parent.is_dir() else None)
        hint = f"; the previous complete checkpoint is {prev}" if prev else ""
        raise RunDirError(f"--resume_from {ckpt}: not a complete checkpoint: {'; '.join(problems)}{hint}")


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _checkpoint_config(ckpt: Path) -> dict | None:
    """The run a checkpoint belongs to: its own copy of the run's config.yaml (common/checkpoint.py RUN_CONFIG), or, for
    a checkpoint saved before it carried one, the config.yaml of the run folder it sits in; None if neither."""
    from common.checkpoint import RUN_CONFIG

    own = ckpt / RUN_CONFIG
    if own.is_file():
        try:
            data = yaml.safe_load(own.read_text())
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            why = " ".join(str(e).split())[:200]
            raise RunDirError(f"--resume_from {ckpt}: its {RUN_CONFIG} is unreadable ({why})") from e
        return data if isinstance(data, dict) else None
    return read_saved_config(ckpt.parent.parent) if ckpt.parent.name == "checkpoints" else None


def _check_checkpoint_run(args, method: str, ckpt: Path, force: bool, run_saved: dict | None = None,
                          inside: bool = False) -> None:
    """The checkpoint to resume must be this method's, of the run in --run_dir if that holds one (same run_id), and,
    from another folder, of the same identity settings (unless --force_resume). A checkpoint from another folder that
    records no run at all is refused unless --force_resume (nothing can vouch for it)."""
    saved = _checkpoint_config(ckpt)
    if saved is None:
        if inside or force:
            return  # an older checkpoint of this folder's run (its config.yaml says whose), or forced
        raise RunDirError(f"--resume_from {ckpt} records no run (no run_config.yaml, and not in a run folder's "
                          f"checkpoints/): nothing says it is a {method} checkpoint of these settings; --force_resume "
                          "true to resume it anyway")
    saved_method = _saved_method(saved, args)
    if saved_method != method:
        raise RunDirError(f"--resume_from {ckpt} is a checkpoint of a {saved_method or 'another method'} run; {method} cannot resume it")
    ours, theirs = (run_saved or {}).get("run_id"), saved.get("run_id")
    if ours and theirs and ours != theirs:
        raise RunDirError(f"--resume_from {ckpt} is a checkpoint of another run (run_id {theirs}), not of the run in "
                          f"--run_dir {args.run_dir} (run_id {ours}): resuming it there would mix two runs' logs and "
                          "checkpoints; resume it into a new --run_dir, or --overwrite_run_dir true to replace this "
                          "run")
    if inside:
        return  # this run's own checkpoint: --force_resume may have changed settings since it was saved
    changed = identity_changes(args, saved)
    if changed and not force:
        raise RunDirError(f"--resume_from {ckpt} comes from a run with other settings: {_fmt_changes(changed)}; "
                          "--force_resume true to continue it with these")


# ----------------------------------------------------------------------------- checks that read more than flags

MODEL_FIELDS = ("model_name_or_path", "teacher_name_or_path", "ref_model_name_or_path")
LONG_CONTEXT_ENV = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"  # the switch scripts/paper already export for vLLM


def _model_positions(name: str) -> int | None:
    """max_position_embeddings from a model folder's / hub id's / config file's config (None if unknown)."""
    if not name:
        return None
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(name)
    except Exception:  # noqa: BLE001 -- unreadable here: the model loader reports it with its own message
        return None
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_positions(args) -> None:
    """Prompt + completion (max_prompt_length + max_completion_length) must fit every model's
    max_position_embeddings (student, teacher, reference). Raises ValueError naming the flags and the model;
    `VLLM_ALLOW_LONG_MAX_MODEL_LEN=1` (as scripts/paper export: their known gap) turns the error into a warning."""
    if not hasattr(args, "max_completion_length"):
        return
    total = getattr(args, "max_prompt_length", 0) + args.max_completion_length
    for key in MODEL_FIELDS:
        name = getattr(args, key, "")
        if key == "ref_model_name_or_path" and not name:
            continue
        limit = _model_positions(name)
        if limit is None or total <= limit:
            continue
        msg = (f"--max_prompt_length {getattr(args, 'max_prompt_length', 0)} + --max_completion_length {args.max_completion_length} "
               f"= {total} tokens exceeds the max_position_embeddings {limit} of --{key} {name}")
        if os.environ.get(LONG_CONTEXT_ENV, "") in ("1", "true", "True"):
            print(f"warning: {msg}; running past its trained positions ({LONG_CONTEXT_ENV}=1)", file=sys.stderr)
            continue
        raise ValueError(f"{msg}: lower them, or export {LONG_CONTEXT_ENV}=1 to run past the positions it was trained on")


def check_quantization(args) -> None:
    """--*_quantization 4bit/8bit and --optim adamw8bit need bitsandbytes, working on this machine's device:
    a tiny probe at start-up, instead of an error deep inside the first forward. Raises ValueError (one line)."""
    wanted = [(f"--{f.name}", getattr(args, f.name)) for f in dataclasses.fields(args)
              if f.name.endswith("quantization") and getattr(args, f.name) not in ("none", "", None)]
    if getattr(args, "optim", "adamw") in ("adamw8bit", "adamw_8bit"):
        wanted.append(("--optim", args.optim))
    if not wanted:
        return
    flags = ", ".join(f"{k} {v}" for k, v in wanted)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{flags} needs bitsandbytes (pip install bitsandbytes==0.50.2): {e}") from e
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for flag, value in wanted:
        try:
            _probe_bnb(value, device)
        except Exception as e:  # noqa: BLE001 -- whatever bitsandbytes raises here, it would raise mid-run
            first = " ".join(str(e).split())[:160] or type(e).__name__
            raise ValueError(f"{flag} {value}: bitsandbytes {getattr(bitsandbytes, '__version__', '?')} does not work on this "
                             f"machine ({device}{', no CUDA device' if device == 'cpu' else ''}: {type(e).__name__}: {first}); "
                             f"use {flag} {'adamw' if flag == '--optim' else 'none'} or a GPU") from e


def _probe_bnb(kind: str, device: str) -> None:
    import bitsandbytes as bnb
    import torch

    if kind in ("adamw8bit", "adamw_8bit"):
        p = torch.nn.Parameter(torch.zeros(4096, device=device))  # 8-bit state only from 4096 values up
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        return
    layer = (bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32) if kind == "4bit"
             else bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False))
    layer = layer.to(device)
    with torch.no_grad():
        layer(torch.ones(2, 64, device=device))


def check_golden_answers(rows: list[dict], golden_by_problem: dict[str, str], source: str, max_frac: float = 0.05) -> int:
    """Golden responses whose final answer contradicts the dataset's answer for the same problem: raises
    DataError (naming the file, how many, and one example) when more than `max_frac` of the checked ones do
    (a golden file for another dataset, or shifted rows); returns the number of contradictions otherwise.
    Goldens without a parsable final answer are not checked (golden_ids_for counts them)."""
    from common.data import DataError
    from common.grading import extract_answer, verify_answer

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
