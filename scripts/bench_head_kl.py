"""Stable-OPD's lm_head work in one update, fused vs separate (issue 18): the student's log-probs + KL(pi_theta || pi_ref).

    python scripts/bench_head_kl.py                       # V = 151,936, H = 128, 1,024 positions, one thread
    python scripts/bench_head_kl.py --hidden 1536 --positions 512

separate: `chunked_head_logps` (the log-probs) and then `chunked_divergence_loss` (the reference KL), as in stable_opd.py
before the fusion: the student's block logits are computed twice in the forward and the gradient matmuls run twice.
fused:    `chunked_head_logps(..., kl_to=...)`: one pass per block for both outputs, one pair of gradient matmuls.
opd:      `chunked_head_logps` alone (what OPD's update does), the baseline of the ratio.
opd early / fused early: the same with `token_loss` (the loss per position): the gradient computed in the forward, so
          the backward recomputes no logits (what opd.py / stable_opd.py do since issue 18's last change).
Forward + backward of the same loss (sum of a PPO-like weight times the log-probs + 0.01 x the weighted KL), medians of
--repeats, alternating the three in each round so that machine load hits them alike. Prints seconds and ratios.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.logprobs import auto_chunk, chunked_head_logps  # noqa: E402
from common.losses import chunked_divergence_loss  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--positions", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    V, H, N = args.vocab, args.hidden, args.positions
    h = torch.randn(N, H, requires_grad=True)
    w = (torch.randn(V, H) / H**0.5).requires_grad_()
    h_ref, w_ref = h.detach() + 0.1 * torch.randn(N, H), w.detach() + 0.01 * torch.randn(V, H)
    targets = torch.randint(0, V, (N,))
    a, weights = torch.randn(N), torch.full((N,), 1.0 / N)

    def opd(early=False):
        logps = chunked_head_logps(h, w, targets, with_entropy=True, token_loss=(lambda lp, _: lp * a) if early else None)[0]
        (logps * a).sum().backward()

    def separate():
        logps = chunked_head_logps(h, w, targets, with_entropy=True)[0]
        kl, _ = chunked_divergence_loss(h, w, h_ref, w_ref, weights, chunk_size=auto_chunk(V, copies=5))
        ((logps * a).sum() + 0.01 * kl).backward()

    def fused(early=False):
        loss = lambda lp, kl: lp * a + 0.01 * kl * weights  # noqa: E731
        logps, _, _, kl = chunked_head_logps(h, w, targets, with_entropy=True, token_loss=loss if early else None,
                                             kl_to={"hidden": h_ref, "head": w_ref, "mask": torch.ones(N, dtype=torch.bool)})
        loss(logps, kl).sum().backward()

    runs = (("opd", opd), ("separate", separate), ("fused", fused), ("opd early", lambda: opd(True)), ("fused early", lambda: fused(True)))
    times = {name: [] for name, _ in runs}
    for _ in range(args.repeats):
        for name, fn in runs:
            h.grad = w.grad = None
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"V={V} H={H} N={N} threads={args.threads}, medians of {args.repeats}:")
    for k, v in med.items():
        print(f"  {k:11s} {v:7.3f} s  ({v / med['opd']:.2f}x opd)")


if __name__ == "__main__":
    main()
