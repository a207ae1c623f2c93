"""Peak memory of a Stable-OPD step (both terms on) with a full student, a LoRA student whose reference is its
adapter-disabled base (the default with --use_peft), and a LoRA student made to load the reference as a
second frozen copy (what the shared reference saves).

    python scripts/bench_lora_memory.py                   # V = 151,936 (the real Qwen tokenizer), ~2-4 min
    python scripts/bench_lora_memory.py --hidden 256 --layers 4

Fixture (built once under --cache): a random-init Qwen2 student at the real vocabulary, hidden --hidden x
--layers, untied head (as Qwen2.5-7B); a tiny teacher (hidden 64, 1 layer) at the same vocabulary so the student
dominates. Each configuration is one subprocess of methods/stable_opd.py (--steps steps, 2 prompts x 2 samples
x 16 tokens, golden NLL and the full-vocabulary reference KL on); peak RSS from the OS (/usr/bin/time, see
bench_opd_step.run_measured).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_opd_step import run_measured  # noqa: E402  (peak RSS of a child, measured right)


def build(cache: Path, hidden: int, layers: int) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from common.models import load_tokenizer
    from common.toy import build_toy_world
    from realtok import write_tokenizer

    root = cache / f"lora_h{hidden}_l{layers}"
    out = {"student": root / "student", "teacher": root / "teacher", "train": cache / "toy" / "train.jsonl",
           "ref_copy": root / "student_copy"}
    if not out["train"].exists():
        build_toy_world(cache / "toy", n_train=256, n_val=8, n_test=8, max_steps=2)
    tok_dir = cache / "v151936" / "tokenizer"
    if not tok_dir.exists():
        write_tokenizer("math", tok_dir)
    tok = load_tokenizer(str(tok_dir))
    for name, h, n, seed in (("student", hidden, layers, 0), ("teacher", 64, 1, 1)):
        if (out[name] / "config.json").exists():
            continue
        cfg = Qwen2Config(vocab_size=151936, hidden_size=h, intermediate_size=int(2.7 * h), num_hidden_layers=n,
                          num_attention_heads=max(2, h // 64), num_key_value_heads=max(1, h // 256), max_position_embeddings=1024,
                          tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.eos_token_id)
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(out[name])
        tok.save_pretrained(out[name])
    if not out["ref_copy"].exists():  # the same weights under another path: loaded as a separate frozen reference
        out["ref_copy"].symlink_to(out["student"].resolve(), target_is_directory=True)
    return out


def peak_rss(fx: dict, extra: list[str], steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "methods" / "stable_opd.py"), "--run_dir", tmp, "--model_name_or_path", str(fx["student"]),
               "--teacher_name_or_path", str(fx["teacher"]), "--train_data", str(fx["train"]), "--val_data", "",
               "--max_steps", str(steps), "--per_device_prompts", "2", "--num_generations", "2", "--max_completion_length", "16",
               "--golden_overflow", "truncate", "--mix_coef", "0.1", "--ref_kl_coef", "0.01", "--save_every", "0",
               "--resume_from", "none", "--max_prompt_length", "512", *extra]
        log = Path(tmp) / "stderr.txt"
        with log.open("w") as err:
            status, peak_kib = run_measured(cmd, err, ROOT, Path(tmp) / "maxrss.txt")
        if status != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return peak_kib / 2**20  # KiB -> GiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench_fixtures"))
    a = p.parse_args()
    fx = build(Path(a.cache), a.hidden, a.layers)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        n = sum(t.numel() for t in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(fx["student"])).parameters())
    lora = ["--use_peft", "true", "--lora_r", "16", "--lora_alpha", "32"]
    rows = [("full student, reference = a frozen copy", []),
            ("LoRA student, reference = the adapter-disabled base", lora),
            ("LoRA student, reference = a frozen copy", [*lora, "--ref_model_name_or_path", str(fx["ref_copy"])])]
    print(f"student {n / 1e6:.1f}M params ({4 * n / 2**30:.2f} GiB fp32), V = 151,936, {a.steps} steps of Stable-OPD\n")
    print("| configuration | peak RSS (GiB) |\n|---|---|")
    res = {}
    for name, extra in rows:
        res[name] = peak_rss(fx, extra, a.steps)
        print(f"| {name} | {res[name]:.2f} |", flush=True)
    shared, copy = res[rows[1][0]], res[rows[2][0]]
    print(f"\nthe shared reference saves {copy - shared:.2f} GiB; LoRA (shared reference) vs full: "
          f"{res[rows[0][0]] - shared:.2f} GiB less")


if __name__ == "__main__":
    main()
