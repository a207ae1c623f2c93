"""Micro-batches under a token budget: every forward of a step sees at most `budget // width` rows (at least one).

`scored_forward`: a frozen model's teacher-forced pass (teacher scoring, the reference, golden-response scoring)
run a block of rows at a time, outputs concatenated, so it equals the one-forward result row for row.
`micro_batches`: the student's update split into micro-batches of whole prompt groups inside ONE optimizer step.
The RL losses are sums sum_bt w_bt * loss_bt with weights w normalised over the whole minibatch (and all ranks), so
the caller computes w on the whole minibatch and slices it: the sum of the micro-batches' losses (and gradients) is
the minibatch's exactly. `budget = 0` means no micro-batching (one pass) until a memory plan chooses it.
"""
import torch

from common.logprobs import completion_forward


def rows_per_micro(width: int, budget: int, n_rows: int) -> int:
    """Rows of `width` tokens that fit the token budget (at least 1; all of them when budget is 0)."""
    return n_rows if budget <= 0 else max(1, min(n_rows, budget // max(width, 1)))


def scored_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int, *args,
                   micro_batch_tokens: int = 0, forward=completion_forward, rows: torch.Tensor | None = None,
                   **kw) -> dict:
    """`forward(model, ids, attn, n_completion, ...)` (completion_forward by default) over micro-batches of rows
    of at most `micro_batch_tokens` tokens; the outputs [B, ...] are concatenated ("head" is kept once)."""
    if rows is not None and not bool(rows.all()):  # only these rows run (packed into micro-batches); the rest are 0
        part = scored_forward(model, input_ids[rows], attention_mask[rows], n_completion, *args,
                              micro_batch_tokens=micro_batch_tokens, forward=forward, **kw)
        full = lambda x: x.new_zeros(len(rows), *x.shape[1:]).index_copy(0, rows.nonzero().squeeze(-1), x)  # noqa: E731
        return {k: v if k == "head" else full(v) for k, v in part.items()}
    B = len(input_ids)
    step = rows_per_micro(input_ids.shape[1], micro_batch_tokens, B)
    if step >= B:
        return forward(model, input_ids, attention_mask, n_completion, *args, **kw)
    parts = [forward(model, input_ids[s : s + step], attention_mask[s : s + step], n_completion, *args, **kw)
             for s in range(0, B, step)]
    return {k: parts[0][k] if k == "head" else torch.cat([p[k] for p in parts]) for k in parts[0]}


def micro_batches(accelerator, minibatches, group_tokens: int, budget: int):
    """Yield (minibatch groups, positions of this micro-batch's groups in them, last micro-batch of the minibatch?)
    for every minibatch of prompt groups. A micro-batch holds as many whole groups as `budget` tokens allow
    (`group_tokens` = tokens of one group in the student forward; at least one group). The count of micro-batches
    uses the largest `group_tokens` of all ranks, so every rank runs the same number (and the same collectives)."""
    if budget > 0 and accelerator.num_processes > 1:
        group_tokens = int(accelerator.reduce(torch.tensor(group_tokens, device=accelerator.device), "max"))
    for mb_groups in minibatches:
        k = rows_per_micro(group_tokens, budget, len(mb_groups))
        parts = torch.arange(len(mb_groups)).split(k)
        for i, part in enumerate(parts):
            yield mb_groups, part, i == len(parts) - 1


def group_rows(groups: torch.Tensor, G: int) -> torch.Tensor:
    """The row indices of prompt groups (G consecutive rows each)."""
    return (groups[:, None] * G + torch.arange(G)).flatten()


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip the accumulated gradient's global norm, step the optimizer and the schedule, zero the gradients;
    returns the norm before clipping (nan when the backend gives none)."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm) if grad_norm is not None else float("nan")
