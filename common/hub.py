"""Sharing a run: a generated model card, `--push_to_hub` of final/, and a completions table for wandb.

    write_model_card(run_dir / "final", method="grpo", config=..., metrics=final)  -> final/README.md
    push_to_hub(run_dir / "final", "me/qwen-grpo", private=True)                 -> the repo's URL
    push_final(accelerator, args, run_dir, final)        the end of a method's main() (main process only)
    check_push_to_hub(args)                              at start-up: a repo id and a token, before training

The card holds the method, base model, teacher, data, the resolved config (run_dir/config.yaml), the final
metrics (final_eval.json), the paper's citation (arXiv 2604.08527) and a link to the method's file in this
repository (STABLE_OPD_REPO_URL, else the git remote `origin`). A finished run can be pushed later too:

    python -m common.hub runs/grpo me/qwen-grpo [--private]

`completions_table(rows)` is a wandb.Table of prompt / completion / reward / advantage / finish per rollout;
`log_completions(accelerator, rows, step)` logs it when wandb is one of the trackers (else does nothing).
"""

import argparse
import json
import os
import re
import subprocess
from pathlib import Path

import yaml

from common.errors import BadInput

PAPER_CITATION = """@article{luo2026demystifying,
  title   = {Demystifying OPD: Length Inflation and Stabilization Strategies for Large Language Models},
  author  = {Luo and Chuang and Wang and Xu and Han and Zhang and Braverman},
  journal = {arXiv preprint arXiv:2604.08527},
  year    = {2026}
}"""
METHODS = {
    "sft": "supervised fine-tuning (SFT) on golden solutions",
    "grpo": "GRPO (group-relative policy optimisation with a verifiable math reward)",
    "opd": "on-policy distillation (OPD: the student samples, the teacher scores every token)",
    "stable_opd": "Stable-OPD (on-policy distillation with rollout-mixture distillation on golden solutions and "
                  "a KL constraint to the initial student)",
}
TABLE_COLUMNS = ("step", "prompt", "completion", "reward", "advantage", "finish", "length")


class HubError(BadInput, RuntimeError):
    """A push that cannot start (no repo id, no token, offline) or that failed (the model stays on disk)."""


def repo_url() -> str:
    """This repository's web address: $STABLE_OPD_REPO_URL, else the git remote `origin` (as https), else ''."""
    url = os.environ.get("STABLE_OPD_REPO_URL", "").strip()
    if not url:
        try:
            url = subprocess.run(["git", "remote", "get-url", "origin"], capture_output=True, text=True, timeout=5,
                                 cwd=Path(__file__).resolve().parents[1]).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            url = ""
    url = re.sub(r"^git@([^:]+):", r"https://\1/", url)
    return url.removesuffix(".git").rstrip("/")


def _hub_id(name) -> str | None:
    """`org/name` when `name` is a hub id (not a local path), minus a `:config:split` tail; else None."""
    if not isinstance(name, str) or not name or name.startswith((".", "/", "~")) or os.path.exists(name):
        return None
    name = name.split(":")[0]
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.endswith((".json", ".jsonl", ".parquet")) else None


def _metrics_section(metrics: dict) -> list[str]:
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    splits = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    lines = [f"- {k}: {v}" for k, v in scalars.items()]
    for split, stats in splits.items():
        keys = list(stats)
        lines += ["", f"**{split}** (greedy)", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                  "| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in stats.values()) + " |"]
    return lines or ["(no final evaluation was run)"]


def model_card(method: str, config: dict, metrics: dict | None = None, repo_id: str = "", source_url: str | None = None) -> str:
    """The README.md text of a trained model (YAML metadata for the hub, then markdown)."""
    base, teacher = config.get("model_name_or_path"), config.get("teacher_name_or_path")
    data = [config.get(k) for k in ("train_data", "golden_data") if config.get(k)]
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["stable-opd", method.replace("_", "-"), "math", "reasoning"]}
    if _hub_id(base):
        meta["base_model"] = _hub_id(base)
    if [d for d in data if _hub_id(d)]:
        meta["datasets"] = sorted({_hub_id(d) for d in data if _hub_id(d)})
    url = repo_url() if source_url is None else source_url.rstrip("/")
    where = f"[`methods/{method}.py`]({url}/blob/main/methods/{method}.py)" if url else f"`methods/{method}.py` of stable-opd"
    title = repo_id.split("/")[-1] if repo_id else f"stable-opd {method}"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
             f"Trained with {METHODS.get(method, method)}, by {where} (a readable HF transformers + accelerate "
             "reference implementation of SFT / GRPO / OPD / Stable-OPD for math reasoning).", "",
             f"- method: `{method}`", f"- base model: `{base}`"]
    if teacher:
        lines.append(f"- teacher: `{teacher}`")
    lines += [f"- data: {', '.join(f'`{d}`' for d in data) or '(none recorded)'}", "",
              "Prompts are rendered with the settings below (`prompt_template`, `system_prompt`, `instruction`); "
              "the model writes its final answer in `\\boxed{}`.", "", "## Final metrics", "",
              *_metrics_section(metrics or {}), "", "## Training configuration", "", "```yaml",
              yaml.safe_dump(config, sort_keys=False).rstrip(), "```", "", "## Citation", "", "```bibtex",
              PAPER_CITATION, "```", ""]
    return "\n".join(lines)


def write_model_card(folder, method: str, config: dict, metrics: dict | None = None, repo_id: str = "",
                     source_url: str | None = None) -> Path:
    """Write `model_card(...)` as folder/README.md; returns its path."""
    path = Path(folder) / "README.md"
    path.write_text(model_card(method, config, metrics, repo_id, source_url), encoding="utf-8")
    return path


def push_to_hub(folder, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str = "stable-opd: upload final model") -> str:
    """Create the model repo (kept if it exists) and upload `folder`; returns the repo's URL. A HubError on
    failure, saying the model is still on disk and how to retry."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=getattr(url, "repo_id", repo_id), folder_path=str(folder), repo_type="model",
                          commit_message=commit_message)
    except Exception as e:  # network, auth, permissions: the run itself is done and saved
        raise HubError(f"push of {folder} to {repo_id} failed ({type(e).__name__}: {e}); the model is saved there: "
                       f"retry with `python -m common.hub {Path(folder).parent} {repo_id}`") from e
    return str(url)


def hub_repo_id(args) -> str:
    """--hub_model_id, else the run folder's name (the hub puts it under the token's user)."""
    return args.hub_model_id or Path(args.run_dir).name


def check_push_to_hub(args) -> None:
    """At start-up, with --push_to_hub: a usable repo id, not offline, and a token (`hf auth login` or HF_TOKEN),
    so a missing login fails now instead of after training. Reads no network."""
    if not args.push_to_hub:
        return
    repo_id = hub_repo_id(args)
    if not re.fullmatch(r"([\w.-]+/)?[\w.-]+", repo_id) or repo_id.startswith((".", "-")):
        raise ValueError(f"--hub_model_id {repo_id!r}: expected `name` or `org/name`")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError("--push_to_hub with HF_HUB_OFFLINE=1: unset it, or push later with `python -m common.hub`")
    from huggingface_hub import get_token

    if not get_token():
        raise ValueError("--push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")


def push_run(run_dir, repo_id: str, private: bool = False, method: str | None = None, token: str | None = None) -> str:
    """Card from run_dir/config.yaml + final_eval.json into run_dir/final, then the upload; returns the URL."""
    run_dir = Path(run_dir)
    final_dir = run_dir / "final"
    if not (final_dir / "config.json").is_file():
        raise HubError(f"{final_dir} holds no saved model (config.json): is the run finished?")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    metrics = json.loads((run_dir / "final_eval.json").read_text()) if (run_dir / "final_eval.json").is_file() else {}
    method = method or config.pop("method", None) or "unknown"
    config.pop("method", None)
    write_model_card(final_dir, method, config, metrics, repo_id)
    return push_to_hub(final_dir, repo_id, private=private, token=token)


def push_final(accelerator, args, run_dir, final: dict | None = None) -> str | None:
    """The end of a method's main() with --push_to_hub: card + upload from the main process; the URL (None elsewhere
    or without the flag)."""
    if not args.push_to_hub or not accelerator.is_main_process:
        return None
    url = push_run(run_dir, hub_repo_id(args), private=args.hub_private)
    accelerator.print(f"pushed {Path(run_dir) / 'final'} to {url}")
    return url


# ----------------------------------------------------------------------------- wandb completions table


def completions_table(rows: list[dict], step: int | None = None):
    """A wandb.Table with TABLE_COLUMNS, one row per rollout dict (missing keys are empty; `step` fills a row's
    missing step)."""
    import wandb

    data = [[row.get("step", step) if c == "step" else row.get(c) for c in TABLE_COLUMNS] for row in rows]
    return wandb.Table(columns=list(TABLE_COLUMNS), data=data)


def log_completions(accelerator, rows: list[dict], step: int, key: str = "completions") -> bool:
    """Log `completions_table(rows)` to the wandb run when wandb is a tracker (main process); True if logged."""
    if not accelerator.is_main_process or not rows:
        return False
    tracker = next((t for t in getattr(accelerator, "trackers", []) if t.name == "wandb"), None)
    if tracker is None:
        return False
    tracker.tracker.log({key: completions_table(rows, step)}, step=step)
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Push a finished run's final/ model (with a generated card) to the hub.")
    p.add_argument("run_dir")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    a = p.parse_args(argv)
    print(push_run(a.run_dir, a.repo_id, private=a.private))


if __name__ == "__main__":
    main()
