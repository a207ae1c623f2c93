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

Parsing only: the start-up checks that read more than the flags live beside what they check (the run folder:
common/rundir.py; the models' positions and bitsandbytes: common/models.py; golden answers: common/data.py).

A `--config` file is read strictly: a key given twice (at any depth) and a second `--config` are errors.
"""

import copy
import dataclasses
import inspect
import json
import math
import re
import sys
import types
import typing
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from common.errors import BadInput, print_error, unique_keys


class ConfigError(BadInput, ValueError):
    """A malformed or unknown `--config` file or key."""


def fail(message: str, code: int = 2, prog: str | None = None) -> typing.NoReturn:
    """Print ONE line `prog: error: message` on stderr (rank 0 only under a launcher) and exit with `code`."""
    print_error(message, prog)
    raise SystemExit(code)


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


RUN_RECORD_KEYS = frozenset({"method", "run_id"})  # written into config.yaml beside the settings (save_config)


def save_config(args, run_dir: str | Path, method: str | None = None, run_id: str | None = None) -> Path:
    """Write the resolved config as `run_dir/config.yaml` (atomically), with `method:` first, then the run's
    `run_id` (kept for the life of the run; checkpoints copy this file, see common/checkpoint.py); loadable again
    with `--config` (the `method` and `run_id` keys are ignored there)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    values = {"method": method or method_name(args), **({"run_id": run_id} if run_id else {}), **plain_values(args)}
    tmp.write_text(yaml.safe_dump(values, sort_keys=False))
    tmp.replace(path)
    return path


def plain_values(args) -> dict:
    """The settings as JSON-plain values (what config.yaml records)."""
    return json.loads(json.dumps(dataclasses.asdict(args), default=str))
