"""Divergences between a student S and a teacher T, masked aggregation, and sampled-token KL estimators.

Convention: every divergence takes the STUDENT first, `f(student_logits, teacher_logits)`, logits of
shape [..., V], and returns one value per position, shape [...], with no reduction. Inputs of any
dtype are upcast (float64 stays float64, everything else goes to float32); outputs are that dtype.
With S = softmax(student_logits), T = softmax(teacher_logits):
  forward_kl = KL(T || S) = sum_v T_v (log T_v - log S_v)   (mode-covering; SFT-like)
  reverse_kl = KL(S || T) = sum_v S_v (log S_v - log T_v)   (mode-seeking; what OPD minimises)
  generalized_jsd(beta) = [beta KL(T || M) + (1 - beta) KL(S || M)] / (beta (1 - beta)),
                          M = beta T + (1 - beta) S.
JSD limits: as beta -> 0, M -> S; KL(S || M) = beta^2 chi2(T || S) / 2 + O(beta^3), so
KL(S || M) / beta -> 0 and KL(T || M) / (1 - beta) -> KL(T || S): the limit is the FORWARD KL.
Symmetrically beta -> 1 gives the REVERSE KL (the GKD / TRL convention). For 0 < beta < 1 the
code never forms log M: it uses log M - log S = log(1-beta) + softplus(logit(beta) + log T - log S)
(and the mirror for log M - log T), which keeps KL(S || M) / beta accurate to ~1e-7 absolute even at
beta = 1e-6, where subtracting two rounded log M, log S loses ~3e-2. For beta <= 1e-8 (>= 1 - 1e-8)
the limit itself is returned; the jump there is ~beta * |KL - chi2 / 2|, below fp32 rounding unless
the two distributions differ by a factor ~1e8 somewhere. Divergences are clamped at 0 to remove
rounding-level negatives (the true value is >= 0); identical inputs give exactly 0.

Chunked versions take hidden states and lm_head weights and never hold more than one chunk of
positions' [C, V] logits of the two models, in the forward or the backward: `chunked_divergence`
returns per-position values and recomputes each chunk in the backward (activation checkpointing);
`chunked_divergence_loss` returns a weighted sum whose gradients it computes in the forward.
k3 estimates KL(p || q) from log-probs at tokens sampled from p. The unchunked per-position divergences
(`generalized_jsd`, `divergence`), masked means, `aggregate`, k1 / k2 and a top-k + tail KL are the tests'
brute-force references: tests/reference_losses.py.
"""

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

JSD_BETA_EPS = 1e-8  # below it (or above 1 - it) generalized_jsd returns its limit, forward / reverse KL
KINDS = ("reverse_kl", "forward_kl", "jsd")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean")


def _up(x: torch.Tensor) -> torch.Tensor:
    """Upcast to float32 (keep float64): bf16 log-softmax loses ~2 digits, and tests gradcheck in float64."""
    return x if x.dtype == torch.float64 else x.float()


def _kl_logp(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probs [..., V] -> [...], clamped at 0 (bf16-rounded inputs can give -1e-8)."""
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)


def _jsd_logp(logs: torch.Tensor, logt: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD from student / teacher log-probs; see the module docstring for the stable form."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta <= JSD_BETA_EPS:
        return _kl_logp(logt, logs)  # forward KL, the beta -> 0 limit
    if beta >= 1.0 - JSD_BETA_EPS:
        return _kl_logp(logs, logt)  # reverse KL, the beta -> 1 limit
    log_b, log_1mb = math.log(beta), math.log1p(-beta)  # in float64, so 1 - 1e-6 is not rounded
    d = logt - logs
    m_minus_s = log_1mb + F.softplus(d + (log_b - log_1mb))  # log M - log S = log(1-b + b T/S)
    m_minus_t = log_b + F.softplus((log_1mb - log_b) - d)  # log M - log T = log(b + (1-b) S/T)
    kl_t_m = -(logt.exp() * m_minus_t).sum(-1)
    kl_s_m = -(logs.exp() * m_minus_s).sum(-1)
    return (kl_t_m / (1.0 - beta) + kl_s_m / beta).clamp_min(0)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position: [..., V] x2 -> [...]."""
    return _kl_logp(torch.log_softmax(_up(teacher_logits), -1), torch.log_softmax(_up(student_logits), -1))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) per position: [..., V] x2 -> [...]."""
    return _kl_logp(torch.log_softmax(_up(student_logits), -1), torch.log_softmax(_up(teacher_logits), -1))


def _divergence_logp(logs: torch.Tensor, logt: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    if kind == "reverse_kl":
        return _kl_logp(logs, logt)
    if kind == "forward_kl":
        return _kl_logp(logt, logs)
    if kind == "jsd":
        return _jsd_logp(logs, logt, beta)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def aggregation_weights(mask: torch.Tensor, mode: str, dtype=torch.float32) -> torch.Tensor:
    """Weights [B, T] with sum(weights * values) == aggregate(values, mask, mode) for every values."""
    m = mask.bool().to(dtype)
    if mode == "token_mean":
        return m / m.sum().clamp_min(1)
    if mode == "seq_mean_token_mean":
        return m / (m.sum(-1, keepdim=True).clamp_min(1) * m.any(-1).sum().clamp_min(1))
    raise ValueError(f"mode must be one of {AGGREGATIONS}, got {mode!r}")


# ------------------------------------------------------------------------------------------- chunked
def _student_logp(z_s: torch.Tensor, temperature: float) -> torch.Tensor:
    z = _up(z_s)
    return torch.log_softmax(z if temperature == 1.0 else z / temperature, -1)


def _teacher_logp(h_t, w_t, b_t, temperature: float) -> torch.Tensor:
    """Teacher log-probs [C, V] in fp32 (no grad; the logits are freed at once), same ops as the student's."""
    return _student_logp(F.linear(h_t, w_t, b_t), temperature)


def exp_sum(z: torch.Tensor, buf: torch.Tensor):
    """(exp(z - max) written into `buf`, its row sums [n, 1], logsumexp(z) [n]): one exp pass over a [n, V] block."""
    top = z.amax(-1, keepdim=True)
    e = torch.sub(z, top, out=buf[: z.shape[0]]).exp_()
    total = e.sum(-1, keepdim=True)
    return e, total, (top + total.log()).squeeze(-1)


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[i, v] b[i, v] per row (a batched matmul: ~3x faster on CPU than torch.linalg.vecdot, and no temporary)."""
    return torch.einsum("iv,iv->i", a, b)


def block_logits(h, w, b, temperature: float, buf: torch.Tensor) -> torch.Tensor:
    """Logits / T of one block of positions, written into `buf` (a [chunk, V] buffer reused by every block, in the dtype
    the softmax math runs in): on CPU a fresh [chunk, V] tensor is a fresh mmap the OS zeroes on first touch, a third
    of the head's time at V = 152k (docs/LOG.md). The matmul runs in the weight's dtype; under autocast or with a
    lower-precision weight F.linear does it (autocast's / the weight's dtype) and the logits are copied into `buf`."""
    if w.dtype == buf.dtype and not torch.is_autocast_enabled(h.device.type):
        z = torch.mm(h.to(w.dtype), w.T, out=buf[: h.shape[0]])
        z = z.add_(b) if b is not None else z
    else:
        z = buf[: h.shape[0]].copy_(F.linear(h.to(w.dtype), w, b))
    return z.div_(temperature) if temperature != 1.0 else z


def _kl_chunk(h_s, w_s, b_s, h_t, w_t, b_t, kind: str, temperature: float, bufs, g=None):
    """(values [C], gradient of sum(g * values) w.r.t. the student's logits [C, V], or None without g) of reverse_kl /
    forward_kl, by hand in four reused [chunk, V] buffers, one exp pass per model (the autograd path below makes ~10
    fresh [C, V] tensors a chunk). p = softmax(z_s / T) the student's, q the teacher's:
        reverse KL(p || q) = sum_v p (log p - log q),   grad z_s = g p (log p - log q - KL) / T
        forward KL(q || p) = sum_v q (log q - log p),   grad z_s = g (p - q) / T"""
    logp = block_logits(h_s, w_s, b_s, temperature, bufs[0])
    logq = block_logits(h_t, w_t, b_t, temperature, bufs[1])
    p, p_sum, lse_p = exp_sum(logp, bufs[2])
    q, q_sum, lse_q = exp_sum(logq, bufs[3])
    logp.sub_(lse_p[:, None])
    logq.sub_(lse_q[:, None])
    p.div_(p_sum)
    if kind == "reverse_kl":
        d = torch.sub(logp, logq, out=logq)  # log p - log q
        raw = rowdot(p, d)
    else:
        d = torch.sub(logq, logp, out=logq)  # log q - log p
        raw = rowdot(q.div_(q_sum), d)
    if g is None:
        return raw.clamp_min(0), None
    scale = (g.to(raw.dtype) * (raw >= 0) / temperature)[:, None]  # clamp_min(0) passes no gradient below 0
    dz = d.sub_(raw[:, None]).mul_(p).mul_(scale) if kind == "reverse_kl" else p.sub_(q).mul_(scale)
    return raw.clamp_min(0), dz


def _chunk_loop(h_s, w_s, b_s, h_t, w_t, b_t, spec, grad_values=None, need=(False, False, False)):
    """Values [N] chunk by chunk; with grad_values [N], also the gradients of sum(grad_values * values)
    w.r.t. (h_s, w_s, b_s) where `need` says so. The weight gradient is accumulated IN PLACE in one
    full-size [Vs, Hs] buffer (rows past `vocab` stay 0), in the weight's dtype as autograd does.
    reverse_kl / forward_kl are computed by hand (`_kl_chunk`), jsd through autograd on each chunk's logits."""
    kind, beta, chunk_size, temperature, vocab = spec
    grad_h = torch.empty_like(h_s) if need[0] else None
    grad_w = torch.zeros_like(w_s) if need[1] else None
    grad_b = torch.zeros_like(b_s) if need[2] else None
    w_s, b_s = w_s[:vocab], None if b_s is None else b_s[:vocab]
    by_hand = kind != "jsd"
    if by_hand:  # float64 stays float64 (the tests), anything else is computed in fp32
        dtype = torch.float64 if torch.float64 in (h_s.dtype, w_s.dtype) else torch.float32
        bufs = [h_s.new_empty(min(chunk_size, h_s.shape[0]), vocab, dtype=dtype) for _ in range(4)]
    values = []
    for start in range(0, h_s.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if by_hand:
            chunk_values, dz = _kl_chunk(h_s[sl], w_s, b_s, h_t[sl], w_t, b_t, kind, temperature, bufs,
                                         None if grad_values is None else grad_values[sl])
            values.append(chunk_values)
            if grad_values is None:
                continue
            dz = dz.to(w_s.dtype)
        else:
            # No local name holds the teacher's [C, V] log-probs: autograd frees them unless it needs them.
            logt = [_teacher_logp(h_t[sl], w_t, b_t, temperature)]
            z_s = F.linear(h_s[sl], w_s, b_s)  # in the inputs' dtype, the point where autograd takes over
            if grad_values is None:
                values.append(_divergence_logp(_student_logp(z_s, temperature), logt.pop(), kind, beta))
                continue
            with torch.enable_grad():
                z_s.requires_grad_()
                chunk_values = _divergence_logp(_student_logp(z_s, temperature), logt.pop(), kind, beta)
                (dz,) = torch.autograd.grad(chunk_values, z_s, grad_values[sl])
            del z_s  # free before the [V, H] matmuls below
            values.append(chunk_values.detach())
        if need[0]:
            grad_h[sl] = (dz @ w_s).to(grad_h.dtype)
        if need[1]:
            grad_w[:vocab].addmm_(dz.T.to(grad_w.dtype), h_s[sl].to(grad_w.dtype))  # in place: no autocast, cast here
        if need[2]:
            grad_b[:vocab] += dz.sum(0).to(grad_b.dtype)
    flat = torch.cat(values) if values else h_s.new_zeros(0, dtype=torch.float32)
    return flat, (grad_h, grad_w, grad_b)


class _ChunkedDivergence(torch.autograd.Function):
    """Activation checkpointing by hand: the forward saves only the inputs; the backward recomputes one
    chunk at a time. (torch.utils.checkpoint gives every chunk its own [V, H] weight gradient, summed
    out of place: measured on CPU at V = 152k, H = 1536 / 3584, 4 chunks: 2.7 x V x H of weight
    gradients at peak instead of 1 x, and 1.7x the backward time of this version.)"""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, spec):
        ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t)
        ctx.spec = spec
        return _chunk_loop(h_s, w_s, b_s, h_t, w_t, b_t, spec)[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values):
        grads = _chunk_loop(*ctx.saved_tensors, ctx.spec, grad_values, ctx.needs_input_grad[:3])[1]
        return (*grads, None, None, None, None)


class _FusedDivergenceLoss(torch.autograd.Function):
    """sum(weights * values) with the gradients computed during the forward (no recomputation)."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, weights, spec):
        values, ctx.grads = _chunk_loop(h_s, w_s, b_s, h_t, w_t, b_t, spec, weights, ctx.needs_input_grad[:3])
        ctx.mark_non_differentiable(values)
        return (weights * values).sum(), values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_values):
        grads, ctx.grads = ctx.grads, None  # drop our reference so autograd can take the buffers as .grad
        if grads is None:
            raise RuntimeError("chunked_divergence_loss supports a single backward (no retain_graph reuse)")
        if not bool(grad_loss == 1):
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        return (*grads, None, None, None, None, None)


def _prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, kind, beta, chunk_size,
             temperature, vocab_limit, student_bias, teacher_bias):
    """Validate, flatten to [N, H], keep the valid rows, detach the teacher; returns apply() args."""
    if kind not in KINDS or chunk_size < 1:
        raise ValueError(f"kind must be one of {KINDS} and chunk_size >= 1, got {kind!r}, {chunk_size}")
    if vocab_limit is None and student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"vocab sizes differ ({student_weight.shape[0]} vs {teacher_weight.shape[0]}): pass vocab_limit")
    vocab = student_weight.shape[0] if vocab_limit is None else vocab_limit
    if vocab > min(student_weight.shape[0], teacher_weight.shape[0]):
        raise ValueError(f"vocab_limit {vocab} exceeds a vocabulary ({student_weight.shape[0]}, {teacher_weight.shape[0]})")
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    keep = None if mask is None else mask.reshape(-1).bool().nonzero().squeeze(-1)
    if keep is not None:  # skip padding / prompt positions entirely
        h_s, h_t = h_s[keep], h_t[keep]
    # The student weight goes in whole and is sliced inside: a slice here would cost a second
    # full-size [Vs, Hs] gradient in its backward.
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()[:vocab]
    args = (h_s, student_weight, student_bias, h_t, teacher_weight.detach()[:vocab], teacher_bias)
    return args, (kind, beta, chunk_size, temperature, vocab), keep


def unflatten_positions(flat: torch.Tensor, keep, shape) -> torch.Tensor:
    """Values of the kept flat positions `keep` back to `shape`, 0 at the others (gradients pass to `flat`)."""
    if keep is not None:
        flat = flat.new_zeros(shape.numel()).index_copy(0, keep, flat)
    return flat.reshape(shape)


def chunked_divergence(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, mask: torch.Tensor | None = None, kind: str = "reverse_kl", beta: float = 0.5,
    chunk_size: int = 1024, temperature: float = 1.0, vocab_limit: int | None = None,
    student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position divergence(student, teacher) from final hidden states and lm_head weights.

    student_hidden [B, T, Hs] (or [N, Hs]) with weight [Vs, Hs]; teacher_hidden [B, T, Ht] with weight
    [Vt, Ht]; mask [B, T] (None = all valid). Returns fp32 [B, T] with exactly 0 at masked positions,
    which are never computed. Logits are divided by `temperature`. Only the student side gets
    gradients (teacher inputs are detached). `vocab_limit` keeps the first N vocabulary rows of both
    (needed when Vs != Vt, e.g. Qwen2.5 1.5B 151,936 vs 7B 152,064 padded rows; the student's extra
    rows get zero gradient). Matmuls run in the inputs' dtype (as the models' lm_head), softmax math in
    fp32. Peak memory: a few [chunk_size, V] fp32 tensors plus one [Vs, Hs] weight gradient. Cost: the
    backward recomputes both models' chunk logits (about +1 forward); `chunked_divergence_loss` avoids it.
    """
    args, spec, keep = _prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, kind, beta,
                                chunk_size, temperature, vocab_limit, student_bias, teacher_bias)
    return unflatten_positions(_ChunkedDivergence.apply(*args, spec), keep, student_hidden.shape[:-1])


def chunked_divergence_loss(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, weights: torch.Tensor, kind: str = "reverse_kl", beta: float = 0.5,
    chunk_size: int = 1024, temperature: float = 1.0, vocab_limit: int | None = None,
    student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum(weights * values), values detached) for values = chunked_divergence(...), weights [B, T].

    Same arguments as `chunked_divergence` with `weights` (e.g. `aggregation_weights(mask, mode)`) in
    place of the mask: positions with weight 0 are skipped. The gradients are computed during the
    forward, so there is no recomputation (the same time as unchunked) and the same memory bound;
    the price is that the loss must be this fixed weighted sum, backpropagated once.
    """
    args, spec, keep = _prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, weights != 0,
                                kind, beta, chunk_size, temperature, vocab_limit, student_bias, teacher_bias)
    w = _up(weights.detach().reshape(-1)[keep])
    if torch.is_grad_enabled():
        loss, flat = _FusedDivergenceLoss.apply(*args, w, spec)
    else:  # no gradient work under no_grad (needs_input_grad does not see grad mode)
        flat = _chunk_loop(*args, spec)[0]
        loss = (w * flat).sum()
    return loss, unflatten_positions(flat, keep, student_hidden.shape[:-1])


# ------------------------------------------------------------------------------ sampled-token estimators
# Schulman's estimators of KL(p || q) from log-probs at tokens y ~ p (p = the sampling policy, q = the
# other model), with r = q(y) / p(y). All are fp32 per-token values, no reduction.
def k3(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """r - 1 - log r with log r = log q - log p: unbiased for KL(p || q) and >= 0 per sample."""
    log_r = _up(logq) - _up(logp)
    return torch.expm1(log_r) - log_r  # expm1: no cancellation when p and q agree
