"""Per-token log-probabilities and entropies without a B x T x V log-softmax tensor.

`selective_log_softmax` returns log p(chosen token) = logit[chosen] - logsumexp(logits), one row
block at a time, so only the logits themselves are ever [B, T, V]. `completion_logps` asks the model
for logits of the completion positions only (`logits_to_keep`), then applies the two functions above.
"""

import torch

DEFAULT_CHUNK = 4096  # positions per block: [chunk, V] fp32 is 2.5 GB at V = 152k, 4 MB on the toy vocab


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
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, torch.Tensor]:
    """Log-probs of the last `n_completion` tokens of `input_ids` under `model`, plus optional extras.

    input_ids / attention_mask: [B, P + n_completion], prompts left-padded, completions right-padded.
    Returns {"logps": [B, n]} (fp32), and "entropy" [B, n] if `with_entropy`, and "eos_logps" [B, n]
    = log p(eos_id | c_t) at every position if `eos_id` is given (how much the model wants to stop), and "hidden" [B, n, H] (the final hidden states that predict those tokens, for the
    chunked full-vocabulary losses) if `with_hidden`. Logits are divided by `temperature` (the sampling
    distribution) and sliced to the first `vocab_limit` entries (a vocabulary shared with another model
    whose embedding is padded).
    Works through DDP / FSDP wrappers (the model is called, never its submodules).
    """
    # Positions are counted from the first real token so left padding does not shift RoPE.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        logits_to_keep=n_completion + 1, use_cache=False, output_hidden_states=with_hidden,
    )
    logits = out.logits[:, :-1, :vocab_limit]  # the logit at position t predicts token t + 1
    if temperature != 1.0:
        logits = logits / temperature
    result = {"logps": selective_log_softmax(logits, input_ids[:, -n_completion:], chunk_size)}
    if with_entropy:
        result["entropy"] = entropy_from_logits(logits.detach(), chunk_size)
    if eos_id is not None:
        fixed = torch.full_like(input_ids[:, -n_completion:], eos_id)
        result["eos_logps"] = selective_log_softmax(logits.detach(), fixed, chunk_size)
    if with_hidden:
        _check_head_input(model, out.hidden_states[-1][:, -1:], out.logits[:, -1:])
        result["hidden"] = out.hidden_states[-1][:, -n_completion - 1 : -1]
    return result


def completion_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int):
    """Final hidden states [B, n, H] that predict the last `n_completion` tokens, and the lm_head weight.

    For the chunked full-vocabulary losses (common/losses.py), which apply the head themselves so the
    [B, n, V] logits never exist. The forward goes through the (possibly DDP-wrapped) model, asking for
    one position of logits only; those logits double as a check that hidden_states[-1] is the head's input.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = out.hidden_states[-1]
    _check_head_input(model, hidden[:, -1:], out.logits)
    return hidden[:, -n_completion - 1 : -1], _unwrap(model).get_output_embeddings().weight


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
                       hidden: bool = False, vocab_limit: int | None = None) -> dict[str, torch.Tensor]:
    """ONE forward of `model` over prompts + completions, returning what the caller's losses and metrics need:
    "logps", "entropy", "eos_logps" [B, n] (these need the [B, n, V] logits; `logps=False` skips them) and,
    with `hidden`, "hidden" [B, n, H] plus the lm_head "head" weight for the chunked full-vocabulary losses."""
    if not logps:
        h, w = completion_hidden(model, input_ids, attention_mask, n_completion)
        return {"hidden": h, "head": w}
    out = completion_logps(model, input_ids, attention_mask, n_completion, temperature, with_entropy=entropy,
                           eos_id=eos_id, vocab_limit=vocab_limit, with_hidden=hidden)
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
