"""Reference implementations the tests compare common/losses.py against (moved out of the library: no method
calls them). Everything public in common.losses is re-exported, so tests can use one namespace."""

import torch
import torch.nn.functional as F  # noqa: F401

from common.losses import *  # noqa: F401,F403
from common.losses import AGGREGATIONS, KINDS, _divergence_logp, _jsd_logp, _kl_logp, _up


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """[b KL(T||M) + (1-b) KL(S||M)] / (b (1-b)), M = b T + (1-b) S; forward KL at b=0, reverse KL at b=1."""
    logs = torch.log_softmax(_up(student_logits), -1)
    logt = torch.log_softmax(_up(teacher_logits), -1)
    return _jsd_logp(logs, logt, beta)

def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Dispatch on kind in KINDS ("jsd" uses beta); the unchunked twin of `chunked_divergence`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    logs = torch.log_softmax(_up(student_logits), -1)
    return _divergence_logp(logs, torch.log_softmax(_up(teacher_logits), -1), kind, beta)

# ---------------------------------------------------------------------------------------------- masks
def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of values where mask != 0 (over all elements, or over `dim`); masked NaN/inf do not leak."""
    kept = torch.where(mask.bool(), _up(values), 0.0)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of values where mask != 0; 0 (not NaN) where there is nothing to average."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(values, mask, dim) / count.clamp_min(1)


def token_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean over every valid token of the batch: long responses weigh in proportion to their length."""
    return masked_mean(values_BT, mask_BT)


def seq_mean_token_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Token mean within each response, then mean over responses.

    Responses with zero valid tokens are excluded from the outer mean (counting them as 0 would
    shrink the loss with the number of empty rows); if every response is empty the result is 0.
    """
    per_seq = masked_mean(values_BT, mask_BT, dim=-1)
    return masked_mean(per_seq, mask_BT.bool().any(-1))

def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce per-token values [B, T] to a scalar with mode in AGGREGATIONS."""
    if mode == "token_mean":
        return token_mean(values, mask)
    if mode == "seq_mean_token_mean":
        return seq_mean_token_mean(values, mask)
    raise ValueError(f"mode must be one of {AGGREGATIONS}, got {mode!r}")

def k1(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """log p - log q: unbiased for KL(p || q), high variance, can be negative per sample."""
    return _up(logp) - _up(logq)


def k2(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """(log p - log q)^2 / 2: biased (exact to second order in log r), low variance, >= 0."""
    return 0.5 * (_up(logp) - _up(logq)).square()

# ----------------------------------------------------------------------------------------- top-k + tail
def topk_tail_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, direction: str = "reverse",
                 support: str = "teacher") -> torch.Tensor:
    """Exact KL over K + 1 categories: the top-k tokens of `support`, plus one tail bucket per model.

    direction "reverse" = KL(S_k || T_k), "forward" = KL(T_k || S_k), where X_k is X's probabilities
    on the top-k tokens followed by X's remaining mass. The tail log-mass is the logsumexp of the
    log-probs outside the top-k (no 1 - sum cancellation); k >= V gives the full-vocabulary KL.
    """
    if direction not in ("reverse", "forward") or support not in ("teacher", "student"):
        raise ValueError(f"direction in (reverse, forward), support in (teacher, student); got {direction}, {support}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    logs = torch.log_softmax(_up(student_logits), -1)
    logt = torch.log_softmax(_up(teacher_logits), -1)
    if k < logs.shape[-1]:
        idx = (logt if support == "teacher" else logs).detach().topk(k, dim=-1).indices
        logs, logt = (_topk_with_tail(x, idx) for x in (logs, logt))
    return _kl_logp(logs, logt) if direction == "reverse" else _kl_logp(logt, logs)


def _topk_with_tail(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[..., V] log-probs -> [..., K + 1]: log p at idx, then log of the mass outside idx."""
    rest = logp.scatter(-1, idx, float("-inf"))  # k < V, so at least one finite entry remains
    return torch.cat([logp.gather(-1, idx), torch.logsumexp(rest, -1, keepdim=True)], -1)
