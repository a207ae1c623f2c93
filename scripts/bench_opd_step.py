"""One OPD step on the toy models: its parts in isolation vs the real step of methods/opd.py.

    python scripts/bench_opd_step.py [--student runs/demo/full/student/final] [--teacher runs/demo/full/teacher/final]

Isolated parts (same P x G batch, medians over --repeats): `generate` alone; the student's old-log-prob
forward; one teacher forward; one student forward + backward + optimizer step. Then methods/opd.py runs
--steps steps with the same settings (no eval) and the median perf/step_s (steps after the first 2) is
compared with the sum of the isolated parts. Target: step / sum <= 1.2.
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

from common.data import COT_INSTRUCTION, encode_prompts, load_rows  # noqa: E402
from common.logprobs import completion_logps  # noqa: E402
from common.models import load_model, load_tokenizer  # noqa: E402
from common.rollout import generate, sequence_logps  # noqa: E402
from methods.opd import opd_surrogate_BT  # noqa: E402


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="runs/demo/full/student/final")
    p.add_argument("--teacher", default="runs/demo/full/teacher/final")
    p.add_argument("--data", default="data/toy/train.jsonl")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max_completion_length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=12)
    a = p.parse_args()
    tok = load_tokenizer(a.student)
    student, teacher = load_model(a.student), load_model(a.teacher, trainable=False)
    prompts = encode_prompts(tok, load_rows(a.data)[: a.prompts], "chat", COT_INSTRUCTION)
    kw = dict(max_new_tokens=a.max_completion_length, num_samples=a.generations, temperature=1.0, seed=0)
    out = generate(student, tok, prompts, return_logps=True, **kw)
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    attn = torch.cat([out.prompt_mask, out.completion_mask], 1)
    T, mask = out.completion_ids.shape[1], out.completion_mask.float()
    opt = torch.optim.AdamW(student.parameters(), lr=0.0)  # lr 0: time the step without changing the model

    def update():
        logp = completion_logps(student, ids, attn, T, with_entropy=True, eos_id=tok.eos_token_id)["logps"]
        loss = (opd_surrogate_BT(logp, out.sampler_logps, torch.randn_like(logp), 0.2)[0] * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()

    def teacher_pass():
        with torch.no_grad():
            completion_logps(teacher, ids, attn, T, eos_id=tok.eos_token_id)

    parts = {"generate": timed(lambda: generate(student, tok, prompts, **kw), a.repeats),
             "old log-probs": timed(lambda: sequence_logps(student, out), a.repeats),
             "teacher forward": timed(teacher_pass, a.repeats),
             "student fwd+bwd+step": timed(update, a.repeats)}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "methods" / "opd.py"), "--run_dir", tmp, "--model_name_or_path", a.student,
               "--teacher_name_or_path", a.teacher, "--train_data", a.data, "--val_data", "", "--max_steps", str(a.steps),
               "--per_device_prompts", str(a.prompts), "--num_generations", str(a.generations),
               "--max_completion_length", str(a.max_completion_length), "--save_every", "0", "--resume_from", "none",
               "--learning_rate", "0"]
        subprocess.run(cmd, check=True, capture_output=True)
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/step_s" in r and r["step"] > 2]
    loop = {k: statistics.median(r[f"perf/{k}"] for r in rows) for k in ("step_s", "rollout_s", "teacher_s", "update_s")}
    total = sum(parts.values())
    print(f"P={a.prompts} x G={a.generations}, max_completion_length={a.max_completion_length}, mean rollout length "
          f"{mask.sum(-1).mean():.1f} tokens\n\n| part (isolated) | seconds |\n|---|---|")
    for k, v in parts.items():
        print(f"| {k} | {v:.3f} |")
    print(f"| **sum** | {total:.3f} |\n\n| in methods/opd.py (median) | seconds |\n|---|---|")
    for k, v in loop.items():
        print(f"| {k} | {v:.3f} |")
    print(f"\nstep / sum of isolated parts = {loop['step_s'] / total:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
