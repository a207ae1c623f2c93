"""Per-token log-probabilities and entropies without a [B, T, V] tensor anywhere.

`completion_logps` takes the final hidden states of the completion positions and applies the lm_head
itself, a block of positions at a time (`chunked_head_logps`, a custom autograd function that recomputes
each block's logits in the backward): only [chunk, V] logits ever exist, in the forward and the backward.
The block size comes from the vocabulary and a memory budget (`auto_chunk`), not a fixed position count.
Frozen models (teacher, reference) run their base model only, so no logits or per-layer hidden states are
kept. `selective_log_softmax` / `entropy_from_logits` do the same for logits a caller already has.
"""

import warnings

import torch

from common.losses import block_logits, exp_sum, rowdot, unflatten_positions

DEFAULT_CHUNK = 4096  # positions per block for callers' own logits: [chunk, V] fp32 is 2.5 GB at V = 152k
CHUNK_BUDGET_BYTES = 256 * 2**20  # the [chunk, V] fp32 temporaries of one block (logits, probabilities, gradient)


def auto_chunk(vocab: int, budget_bytes: int = CHUNK_BUDGET_BYTES, copies: int = 3) -> int:
    """Positions per block so that `copies` fp32 [chunk, vocab] tensors fit in `budget_bytes`
    (~147 positions at V = 152k, the whole batch on the toy vocabulary)."""
    return max(16, budget_bytes // (4 * vocab * copies))


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """log softmax(logits)[..., index] for logits [..., V] and integer index [...]; computed in fp32."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_index = index.reshape(-1)
    out = []
    for start in range(0, flat_logits.shape[0], chunk_size):
        block = flat_logits[start : start + chunk_size].float()  # bf16 logsumexp loses ~2 digits
        chosen = block.gather(-1, flat_index[start : start + chunk_size, None]).squeeze(-1)
        out.append(chosen - torch.logsumexp(block, dim=-1))
    return torch.cat(out).reshape(index.shape) if out else flat_logits.new_zeros(index.shape, dtype=torch.float32)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Entropy -sum_v p log p of softmax(logits) per position, [..., V] -> [...], fp32, in blocks."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for start in range(0, flat.shape[0], chunk_size):
        logp = torch.log_softmax(flat[start : start + chunk_size].float(), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out).reshape(logits.shape[:-1]) if out else flat.new_zeros(logits.shape[:-1], dtype=torch.float32)


def completion_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    eos_id: int | None = None,
    vocab_limit: int | None = None,
    with_hidden: bool = False,
    chunk_size: int | None = None,
    kl_to: dict | None = None,
    token_loss=None,
) -> dict[str, torch.Tensor]:
    """Log-probs of the last `n_completion` tokens of `input_ids` under `model`, plus optional extras.

    input_ids / attention_mask: [B, P + n_completion], prompts left-padded, completions right-padded.
    Returns {"logps": [B, n]} (fp32), and "entropy" [B, n] if `with_entropy`, and "eos_logps" [B, n]
    = log p(eos_id | c_t) if `eos_id` is given (how much the model wants to stop), each 0 at padding (the head skips it: the
    completion's attention mask), and "hidden" [B, n, H] (the final hidden states that predict those tokens, for the
    chunked full-vocabulary losses) if `with_hidden`, and "kl" [B, n] = KL(p || q) over the full vocabulary if
    `kl_to` (another model's final hidden states and head, see `chunked_head_logps`). Logits are divided by `temperature` (the sampling
    distribution) and sliced to the first `vocab_limit` entries (a vocabulary shared with another model
    whose embedding is padded). `token_loss(logps, kl)`: the loss per position these outputs feed, for the gradient in
    the forward (`chunked_head_logps`).
    Works through DDP / FSDP wrappers (a trained model is called, never its submodules). The lm_head is applied
    in blocks of `chunk_size` positions (default `auto_chunk(V)`): no [B, n, V] tensor exists.
    """
    hidden, head = completion_hidden(model, input_ids, attention_mask, n_completion)
    logps, entropy, eos_logps, kl = chunked_head_logps(hidden, head, input_ids[:, -n_completion:], temperature, vocab_limit,
                                                       eos_id, chunk_size, with_entropy=with_entropy, kl_to=kl_to,
                                                       valid=attention_mask[:, -n_completion:], token_loss=token_loss)
    result = {"logps": logps}
    if kl_to is not None:
        result["kl"] = kl
    if with_entropy:
        result["entropy"] = entropy
    if eos_id is not None:
        result["eos_logps"] = eos_logps
    if with_hidden:
        result["hidden"] = hidden
    return result


def completion_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int):
    """Final hidden states [B, n, H] that predict the last `n_completion` tokens, and the lm_head weight.

    A model being trained goes through its (possibly DDP-wrapped) forward, asking for one position of logits
    only; those logits double as a check that hidden_states[-1] is the head's input. A frozen model (no
    parameter requires grad: teacher, reference) runs its base model alone, which keeps neither logits nor
    the other layers' hidden states (its last_hidden_state is the lm_head input of transformers' causal LMs).
    """
    # Positions are counted from the first real token so left padding does not shift RoPE.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    inner = _unwrap(model)
    head = inner.get_output_embeddings()
    if head.bias is not None:
        raise ValueError(f"{type(inner).__name__}: an lm_head with a bias is not supported by the chunked log-probs")
    if not any(p.requires_grad for p in inner.parameters()):
        out = inner.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state[:, -n_completion - 1 : -1], head.weight
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = out.hidden_states[-1]
    _check_head_input(model, hidden[:, -1:], out.logits)
    return hidden[:, -n_completion - 1 : -1], head.weight


def _check_head_input(model, hidden_last: torch.Tensor, logits_last: torch.Tensor) -> None:
    """The chunked losses apply the head to hidden_states[-1] themselves: make sure that is its input
    (post-norm in transformers 5 for Qwen2 / Llama), using the one position of logits we have anyway."""
    head = _unwrap(model).get_output_embeddings()
    with torch.no_grad():
        check = head(hidden_last.to(head.weight.dtype)).float()
    if not torch.allclose(check, logits_last.float(), atol=2e-2, rtol=2e-2):  # loose: bf16 autocast
        raise RuntimeError(f"{type(_unwrap(model)).__name__}: hidden_states[-1] is not the lm_head input; "
                           "the chunked losses cannot be used with this model")


def _unwrap(model):
    return getattr(model, "module", model)  # DDP keeps the model in .module


def completion_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                       temperature: float = 1.0, *, logps: bool = True, entropy: bool = False, eos_id: int | None = None,
                       hidden: bool = False, vocab_limit: int | None = None, kl_to: dict | None = None,
                       chunk_size: int | None = None, rows: torch.Tensor | None = None, token_loss=None) -> dict[str, torch.Tensor]:
    """ONE forward of `model` over prompts + completions, returning what the caller's losses and metrics need:
    "logps", "entropy", "eos_logps" [B, n] (these need the [B, n, V] logits; `logps=False` skips them), "kl" [B, n]
    with `kl_to` (KL(pi_model || q) to a frozen model, from the same block logits as the log-probs) and, with
    `hidden`, "hidden" [B, n, H] plus the lm_head "head" weight for the chunked full-vocabulary losses. `chunk_size`:
    positions per block of the head (None = `auto_chunk`). `rows` [B] (bool): run the model on these rows alone; the
    others' outputs are zeros (e.g. the reference skips the golden rows its KL never reads). `token_loss(logps, kl)`: the
    caller's loss per position as a function of these two outputs, so the lm_head computes its gradient in the forward
    (`chunked_head_logps`; checked against the actual gradient in the backward)."""
    if rows is not None and not bool(rows.all()):
        if kl_to is not None or token_loss is not None:
            raise ValueError("completion_forward: rows with kl_to or token_loss is not supported")
        part = completion_forward(model, input_ids[rows], attention_mask[rows], n_completion, temperature, logps=logps,
                                  entropy=entropy, eos_id=eos_id, hidden=hidden, vocab_limit=vocab_limit, chunk_size=chunk_size)
        full = lambda x: x.new_zeros(len(rows), *x.shape[1:]).index_copy(0, rows.nonzero().squeeze(-1), x)  # noqa: E731
        return {k: v if k == "head" else full(v) for k, v in part.items()}
    if not logps and kl_to is None:
        h, w = completion_hidden(model, input_ids, attention_mask, n_completion)
        return {"hidden": h, "head": w}
    out = completion_logps(model, input_ids, attention_mask, n_completion, temperature, with_entropy=entropy,
                           eos_id=eos_id, vocab_limit=vocab_limit, with_hidden=hidden, kl_to=kl_to, chunk_size=chunk_size,
                           token_loss=token_loss)
    if hidden:
        out["head"] = _unwrap(model).get_output_embeddings().weight
    return out


def join_rows(a_ids, a_attn, a_T: int, b_ids, b_attn, b_T: int, pad_id: int):
    """Two teacher-forced batches (prompts left-padded, completions right-padded) as one: prompts right-aligned to
    the wider prompt, completions padded to the longer one. Returns (ids, attention mask, completion width)."""
    pw, T = max(a_ids.shape[1] - a_T, b_ids.shape[1] - b_T), max(a_T, b_T)
    ids = a_ids.new_full((len(a_ids) + len(b_ids), pw + T), pad_id)
    attn = torch.zeros_like(ids)
    for rows, x, m, t in ((slice(0, len(a_ids)), a_ids, a_attn, a_T), (slice(len(a_ids), None), b_ids, b_attn, b_T)):
        p = x.shape[1] - t
        ids[rows, pw - p : pw + t], attn[rows, pw - p : pw + t] = x, m
    return ids, attn, T


def stack_rows(a_BT: torch.Tensor, b_BT: torch.Tensor, T: int) -> torch.Tensor:
    """[a; b] with both right-padded with zeros to T columns (per-position weights on the join_rows layout)."""
    pad = lambda x: torch.nn.functional.pad(x, (0, T - x.shape[1]))  # noqa: E731
    return torch.cat([pad(a_BT), pad(b_BT)])


def split_rows(out: dict, n: int, a_T: int, b_T: int) -> tuple[dict, dict]:
    """A forward's outputs on the join_rows layout back into (first n rows, the rest), each at its own width."""
    take = lambda rows, t: {k: v if k == "head" else v[rows, :t] for k, v in out.items()}  # noqa: E731
    return take(slice(0, n), a_T), take(slice(n, None), b_T)


def _block_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """fp32 logits / T of one block into the reused fp32 buffer `out` (`block_logits`), outside autocast: the same
    numbers under bf16 mixed precision or not (a bf16 head still does its matmul in bf16)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return block_logits(hidden, weight, None, temperature, out)


class _ChunkedHeadLogps(torch.autograd.Function):
    """(log p(target), entropy, log p(eos), KL(p || q)) per position from hidden [N, H] and the head weight [V, H], a
    block of positions at a time; q = softmax of another model's logits (its final hidden states `kl_hidden` [N, H']
    and head `kl_weight`), at the positions `kl_rows` [N] (bool) only, 0 elsewhere; None = no KL. log p(target)
    and the KL are differentiable, entropy and log p(eos) are not. With p = softmax(z / T) the gradient is
        grad z = [g_logp (onehot(target) - p) + g_kl p (log p - log q - KL)] / T       (`_grad_logits`)
    By default each block's logits are computed once in the forward and once more in the backward (not kept).
    `grad_of(logps, kl, s, e)` -> the loss's (g_logp, g_kl) at positions s:e, given the outputs so far: the gradient is
    then computed in the forward, while each block's p is at hand (one logits pass per block instead of two, as
    fused linear-cross-entropy kernels do), and the backward only checks that the loss's actual gradient is these
    g's (times one scalar, e.g. a loss scale) and returns the stored result; any other gradient is recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, vocab, eos_id, chunk, with_entropy=True,
                kl_hidden=None, kl_weight=None, kl_rows=None, grad_of=None):
        logps, entropy, eos, lse, kl, lse_q, g_all, g_kl_all = (hidden.new_zeros(hidden.shape[0], dtype=torch.float32) for _ in range(8))
        w = weight[:vocab]
        early = grad_of is not None and any(ctx.needs_input_grad[:2])  # the gradient in this forward
        grad_h, grad_w = _grad_buffers(ctx, hidden, weight) if early else (None, None)
        # [chunk, V] buffers reused by every block: log p, exp / p, and the other model's logits (the `auto_chunk` budget)
        buf, pbuf = (hidden.new_empty(min(chunk, hidden.shape[0]), vocab, dtype=torch.float32) for _ in range(2))
        qbuf = torch.empty_like(buf) if kl_rows is not None else None
        with torch.autocast(hidden.device.type, enabled=False):  # fp32 softmax math even under bf16 mixed precision
            for s in range(0, hidden.shape[0], chunk):
                logp = _block_logits(hidden[s : s + chunk], w, temperature, buf)
                sel = _kl_rows(kl_rows, s, chunk)
                if sel is not None:  # the other model's logits and logsumexp first (its exp pass borrows pbuf)
                    z_q = _block_logits(kl_hidden[s : s + chunk][sel], kl_weight[:vocab], temperature, qbuf)
                    lse_q[s + sel] = exp_sum(z_q, pbuf)[2]
                p, total, lse[s : s + chunk] = exp_sum(logp, pbuf)  # p = exp(z - max) until divided by its sum
                logp.sub_(lse[s : s + chunk, None])
                logps[s : s + chunk] = logp.gather(-1, targets[s : s + chunk, None]).squeeze(-1)
                eos[s : s + chunk] = logp[:, eos_id] if eos_id is not None else 0.0
                if not (with_entropy or early) and sel is None:
                    continue
                p.div_(total)
                if with_entropy:
                    entropy[s : s + chunk] = -rowdot(p, logp)
                d = None
                if sel is not None:  # KL = sum_v p (log p - log q), log q = z_q / T - lse_q
                    lp, p_sel = (logp, p) if len(sel) == len(logp) else (logp[sel], p[sel])
                    d = torch.sub(lp, z_q, out=z_q).add_(lse_q[s + sel, None])  # log p - log q, in place on z_q
                    kl[s + sel] = rowdot(p_sel, d).clamp_min(0)
                if early:
                    g, g_kl = grad_of(logps, kl, s, s + chunk)
                    g_all[s : s + chunk], g_kl_all[s : s + chunk] = g, g_kl
                    dz = _grad_logits(p, d, sel, g, g_kl[sel] if sel is not None else None, None if sel is None else -kl[s + sel], s, targets, temperature)
                    _add_grads(dz, hidden, w, grad_h, grad_w, s, chunk, vocab)
        ctx.save_for_backward(hidden, weight, targets, lse, kl, lse_q, kl_hidden, kl_weight, kl_rows)
        ctx.spec = (temperature, vocab, chunk)
        ctx.early = (g_all, g_kl_all, grad_h, grad_w) if early else None
        ctx.mark_non_differentiable(entropy, eos)
        return logps, entropy, eos, kl

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy, _grad_eos, grad_kl):
        hidden, weight, targets, lse, kl, lse_q, kl_hidden, kl_weight, kl_rows = ctx.saved_tensors
        temperature, vocab, chunk = ctx.spec
        nones = (None,) * 10
        if ctx.early is not None:
            g_all, g_kl_all, grad_h, grad_w = ctx.early
            ctx.early = None  # a second backward (retain_graph) recomputes
            scale = _scale_of(torch.cat([grad_logps, grad_kl]), torch.cat([g_all, g_kl_all]))
            if scale is not None:
                return (None if grad_h is None else grad_h if scale == 1.0 else grad_h * scale,
                        None if grad_w is None else grad_w if scale == 1.0 else grad_w * scale, *nones)
            warnings.warn("the loss's gradient differs from the one computed in the lm_head's forward (token_loss): recomputed",
                          stacklevel=2)  # Python's default filter shows it once per place
        w = weight[:vocab]
        grad_h, grad_w = _grad_buffers(ctx, hidden, weight)
        buf = hidden.new_empty(min(chunk, hidden.shape[0]), vocab, dtype=torch.float32)
        qbuf = torch.empty_like(buf) if kl_rows is not None else None
        for s in range(0, hidden.shape[0], chunk):
            g = grad_logps[s : s + chunk].float()
            logp = _block_logits(hidden[s : s + chunk], w, temperature, buf).sub_(lse[s : s + chunk, None])
            sel, d = _kl_rows(kl_rows, s, chunk), None
            if sel is not None:  # log p - z_q / T on the KL rows (log q = z_q / T - lse_q), before p overwrites log p
                lp = logp if len(sel) == len(logp) else logp[sel]
                d = torch.sub(lp, _block_logits(kl_hidden[s : s + chunk][sel], kl_weight[:vocab], temperature, qbuf), out=qbuf[: len(sel)])
            g_kl, offset = (None, None) if sel is None else (grad_kl[s + sel].float(), lse_q[s + sel] - kl[s + sel])
            dz = _grad_logits(logp.exp_(), d, sel, g, g_kl, offset, s, targets, temperature)
            _add_grads(dz, hidden, w, grad_h, grad_w, s, chunk, vocab)
        return grad_h, grad_w, *nones


def _grad_buffers(ctx, hidden, weight):
    """Zeroed gradients of the hidden states and the head weight (None where not needed; head rows past `vocab` stay 0)."""
    return (torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None,
            torch.zeros_like(weight) if ctx.needs_input_grad[1] else None)


def _grad_logits(p, d, sel, g, g_kl, offset, s: int, targets, temperature: float):
    """grad z of the block at s, in place on its probabilities p [n, V] (and on d): [g (onehot(target) - p) + g_kl p
    (log p - log q - KL)] / T, where log p - log q - KL = d + offset on the KL rows `sel` (d [k, V], offset [k])."""
    g = g.float()
    if sel is not None:  # g_kl (log p - log q - KL) - g on the KL rows
        d.mul_(g_kl[:, None]).add_((offset * g_kl - g[sel])[:, None])
    if sel is None:
        p.mul_(-g[:, None])
    elif len(sel) == len(p):
        p.mul_(d)
    else:
        d.mul_(p[sel])  # the KL rows' p (g_kl (...) - g), before the others' -g p
        p.mul_(-g[:, None]).index_copy_(0, sel, d)
    p.scatter_add_(-1, targets[s : s + len(p), None], g[:, None])
    return p.div_(temperature) if temperature != 1.0 else p


def _add_grads(dz, hidden, w, grad_h, grad_w, s: int, chunk: int, vocab: int) -> None:
    """The block's share of the gradients: dz @ W into the hidden states' rows, dz^T h added to the head weight."""
    dz = dz.to(w.dtype)
    if grad_h is not None:
        grad_h[s : s + chunk] = (dz @ w).to(hidden.dtype)
    if grad_w is not None:
        grad_w[:vocab].addmm_(dz.T, hidden[s : s + chunk].to(w.dtype))


def _scale_of(actual: torch.Tensor, predicted: torch.Tensor, rtol: float = 1e-5) -> float | None:
    """c with actual == c * predicted within rtol (of actual's largest entry), or None: the backward's check of the
    gradient computed in the forward (c is 1 unless the loss was scaled after, e.g. by a mixed-precision loss scaler)."""
    actual, predicted = actual.double(), predicted.double()
    norm = float(predicted.square().sum())
    if norm == 0.0:
        return 1.0 if not bool(actual.any()) else None
    c = float((actual * predicted).sum()) / norm
    c = 1.0 if abs(c - 1.0) < 1e-6 else c
    return c if float((actual - c * predicted).abs().max()) <= rtol * float(actual.abs().max()) else None


def _kl_rows(kl_rows, s: int, chunk: int):
    """Indices (within the block at s) of the positions that take the KL, or None when there are none."""
    if kl_rows is None:
        return None
    sel = kl_rows[s : s + chunk].nonzero().squeeze(-1)
    return sel if len(sel) else None


def chunked_head_logps(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                       vocab_limit: int | None = None, eos_id: int | None = None, chunk_size: int | None = None,
                       with_entropy: bool = True, kl_to: dict | None = None, valid: torch.Tensor | None = None,
                       token_loss=None):
    """(log p(targets), entropy, log p(eos_id), KL(p || q)) of p = softmax(hidden @ head_weight[:vocab_limit].T /
    temperature), each [...] for hidden [..., H] and targets [...], in fp32, without a [..., V] tensor: blocks of
    `chunk_size` positions (default `auto_chunk(V)`). Gradients flow to hidden and head_weight through log p(targets)
    and the KL. `with_entropy=False` skips the entropy (returned as zeros): one [chunk, V] exp and product less per
    block. `kl_to` = {"hidden": [..., H'], "head": [V', H'], "mask": [...] bool}: q = softmax of that (frozen) model's
    logits / temperature, the KL computed where mask is set (0 elsewhere), sharing the student's block logits with
    the log-probs; None: the KL is all zeros. `valid` [...] (bool): compute only there (padding costs no head work),
    0 elsewhere in every output. `token_loss(logps, kl)` -> [...]: the loss these outputs feed, per position (its sum is
    the loss; elementwise: each position's term reads that position's values only), e.g. a PPO surrogate times
    aggregation weights; given, the gradient is computed in the forward (`_ChunkedHeadLogps`), checked in the backward."""
    vocab = head_weight.shape[0] if vocab_limit is None else min(vocab_limit, head_weight.shape[0])
    shape = targets.shape
    flat_h, flat_t, kl_h, kl_w, kl_rows = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), None, None, None
    if kl_to is not None:
        if kl_to["head"].shape[0] < vocab:
            raise ValueError(f"the KL's other model has {kl_to['head'].shape[0]} vocabulary rows, fewer than {vocab}")
        kl_h, kl_w = kl_to["hidden"].detach().reshape(-1, kl_to["hidden"].shape[-1]), kl_to["head"].detach()
        kl_rows = kl_to["mask"].reshape(-1).bool()
    keep = None if valid is None else valid.reshape(-1).bool().nonzero().squeeze(-1)
    if keep is not None:
        flat_h, flat_t = flat_h[keep], flat_t[keep]
        kl_h, kl_rows = (None, None) if kl_to is None else (kl_h[keep], kl_rows[keep])
    chunk = chunk_size or auto_chunk(vocab, copies=4 if kl_to is not None else 3)
    grad_of = None
    if token_loss is not None and torch.is_grad_enabled() and (flat_h.requires_grad or head_weight.requires_grad):
        def grad_of(lp, kl, s, e):  # d sum(token_loss) / d (log-probs, KL) at the kept positions s:e, by autograd
            with torch.enable_grad():
                lp, kl = lp.detach().requires_grad_(), kl.detach().requires_grad_()
                total = token_loss(unflatten_positions(lp, keep, shape), unflatten_positions(kl, keep, shape)).sum()
                grads = torch.autograd.grad(total, (lp, kl), allow_unused=True)
            return tuple(torch.zeros_like(lp[s:e]) if x is None else x[s:e] for x in grads)
    outs = _ChunkedHeadLogps.apply(flat_h, head_weight, flat_t, temperature, vocab, eos_id, chunk, with_entropy, kl_h, kl_w, kl_rows,
                                   grad_of)
    return tuple(unflatten_positions(o, keep, shape) for o in outs)  # 0 at skipped positions
