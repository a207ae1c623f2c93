"""common/losses.py against brute-force float64 references written with plain loops on tiny vocabularies."""

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import math

import pytest
import torch

from tests import reference_losses as L

torch.set_num_threads(1)  # tiny tensors; threads only add noise on the shared 2-core machine


# ------------------------------------------------------------------------------ brute-force references
def ref_probs(logits_V):
    """softmax of one 1-D float64 logits vector, by loops."""
    m = max(x for x in logits_V)
    exps = [torch.exp(x - m) for x in logits_V]
    total = sum(exps)
    return [e / total for e in exps]


def ref_kl_probs(p, q):
    return sum(pi * (torch.log(pi) - torch.log(qi)) for pi, qi in zip(p, q))


def ref_rows(fn, s, t):
    """Apply fn(student_probs, teacher_probs) position by position; returns [...] float64."""
    s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    vals = [fn(ref_probs(list(a)), ref_probs(list(b))) for a, b in zip(s2, t2)]
    return torch.stack(vals).reshape(s.shape[:-1])


def ref_forward(s, t):
    return ref_rows(lambda S, T: ref_kl_probs(T, S), s, t)


def ref_reverse(s, t):
    return ref_rows(lambda S, T: ref_kl_probs(S, T), s, t)


def ref_jsd(s, t, beta):
    def one(S, T):
        M = [beta * ti + (1 - beta) * si for si, ti in zip(S, T)]
        return (beta * ref_kl_probs(T, M) + (1 - beta) * ref_kl_probs(S, M)) / (beta * (1 - beta))
    return ref_rows(one, s, t)


def ref_topk_tail(s, t, k, direction, support):
    def one(S, T):
        sup = T if support == "teacher" else S
        top = sorted(range(len(sup)), key=lambda v: -float(sup[v].detach()))[:k]
        cats = lambda P: [P[v] for v in top] + ([1 - sum(P[v] for v in top)] if k < len(P) else [])
        return ref_kl_probs(cats(S), cats(T)) if direction == "reverse" else ref_kl_probs(cats(T), cats(S))
    return ref_rows(one, s, t)


def pair(shape=(3, 4), V=7, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, V, generator=g, dtype=torch.float64) * scale).requires_grad_()
    t = torch.randn(*shape, V, generator=g, dtype=torch.float64) * scale
    return s, t


def check_against_ref(fn, ref, s, t):
    """Values and student gradients of fn (fed float32 and float64) against the float64 reference."""
    expected = ref(s, t)
    got32 = fn(s.detach().float(), t.float())
    assert got32.dtype == torch.float32 and got32.shape == s.shape[:-1]
    torch.testing.assert_close(got32.double(), expected.detach(), atol=2e-6, rtol=1e-5)
    got = fn(s, t)
    torch.testing.assert_close(got, expected.detach(), atol=1e-12, rtol=1e-10)
    w = torch.randn(s.shape[:-1], dtype=torch.float64)  # a non-uniform upstream gradient
    (g_ref,) = torch.autograd.grad((expected * w).sum(), s)
    (g_got,) = torch.autograd.grad((got * w).sum(), s)
    torch.testing.assert_close(g_got, g_ref, atol=1e-10, rtol=1e-8)


# -------------------------------------------------------------------------------------- divergences
@pytest.mark.parametrize("V", [5, 11])
def test_kl_values_and_grads(V):
    s, t = pair(V=V, seed=V)
    check_against_ref(L.forward_kl, ref_forward, s, t)
    check_against_ref(L.reverse_kl, ref_reverse, s, t)
    assert torch.autograd.gradcheck(lambda x: L.forward_kl(x, t), (s,))
    assert torch.autograd.gradcheck(lambda x: L.reverse_kl(x, t), (s,))
    # the teacher side is differentiable too (the chunked version detaches it, the pure one does not)
    tt = t.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: L.reverse_kl(s.detach(), x), (tt,))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_values_and_grads(beta):
    s, t = pair(V=9, seed=1)
    check_against_ref(lambda a, b: L.generalized_jsd(a, b, beta), lambda a, b: ref_jsd(a, b, beta), s, t)
    assert torch.autograd.gradcheck(lambda x: L.generalized_jsd(x, t, beta), (s,))


def test_jsd_endpoints_and_continuity():
    s, t = pair(V=8, seed=2)
    s32, t32 = s.detach().float(), t.float()
    fkl, rkl = L.forward_kl(s32, t32), L.reverse_kl(s32, t32)
    assert torch.equal(L.generalized_jsd(s32, t32, 0.0), fkl)
    assert torch.equal(L.generalized_jsd(s32, t32, 1.0), rkl)
    for beta, limit in [(1e-6, fkl), (1e-7, fkl), (1 - 1e-6, rkl), (1 - 1e-7, rkl)]:
        got = L.generalized_jsd(s32, t32, beta)  # through the stable formula, not the switch
        torch.testing.assert_close(got.double(), ref_jsd(s.detach(), t, beta), atol=5e-6, rtol=1e-5)
        torch.testing.assert_close(got, limit, atol=1e-4, rtol=1e-4)
    # no visible jump where the switch to the limit happens
    for lo, hi in [(L.JSD_BETA_EPS / 2, L.JSD_BETA_EPS * 2), (1 - L.JSD_BETA_EPS * 2, 1 - L.JSD_BETA_EPS / 2)]:
        torch.testing.assert_close(L.generalized_jsd(s32, t32, lo), L.generalized_jsd(s32, t32, hi), atol=5e-6, rtol=1e-6)
    # gradients are continuous across the endpoints too
    (g0,) = torch.autograd.grad(L.forward_kl(s, t).sum(), s)
    (g_eps,) = torch.autograd.grad(L.generalized_jsd(s, t, 1e-7).sum(), s)
    torch.testing.assert_close(g_eps, g0, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        L.generalized_jsd(s32, t32, 1.5)


def test_zero_when_equal_and_nonnegative_in_bf16():
    s, _ = pair(shape=(4, 6), V=11, seed=3, scale=3.0)
    x = s.detach().float()
    fns = [L.forward_kl, L.reverse_kl] + [lambda a, b, be=be: L.generalized_jsd(a, b, be) for be in (0.0, 1e-6, 0.5, 1.0)]
    fns += [lambda a, b, k=k, d=d: L.topk_tail_kl(a, b, k, d) for k in (1, 4, 11) for d in ("reverse", "forward")]
    for fn in fns:
        torch.testing.assert_close(fn(x, x), torch.zeros(4, 6), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(4)
    a = (torch.randn(64, 16, 11, generator=g) * 4).bfloat16()
    b = (a.float() + torch.randn(64, 16, 11, generator=g) * 0.05).bfloat16()  # near-equal: rounding-level KLs
    for fn in fns:
        for u, v in [(a, b), (b, a), (a, a)]:
            out = fn(u, v)
            assert out.dtype == torch.float32 and torch.isfinite(out).all() and (out >= 0).all()


def test_divergence_dispatch():
    s, t = pair(V=6, seed=5)
    assert torch.equal(L.divergence(s, t, "jsd", 0.3), L.generalized_jsd(s, t, 0.3))
    assert torch.equal(L.divergence(s, t, "forward_kl"), L.forward_kl(s, t))
    with pytest.raises(ValueError):
        L.divergence(s, t, "kl")


# ------------------------------------------------------------------------------------------ chunked
def chunk_inputs(B=3, T=5, Hs=4, Ht=6, Vs=9, Vt=9, seed=6, bias=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64)
    hs, ws = r(B, T, Hs).requires_grad_(), r(Vs, Hs).requires_grad_()
    ht, wt = r(B, T, Ht).requires_grad_(), r(Vt, Ht)  # teacher requires grad, yet must get none
    bs = r(Vs).requires_grad_() if bias else None
    bt = r(Vt) if bias else None
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)[:B, :T]
    return hs, ws, bs, ht, wt, bt, mask


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3), ("jsd", 1.0)])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_unchunked(kind, beta, bias):
    hs, ws, bs, ht, wt, bt, mask = chunk_inputs(bias=bias)
    temp = 0.7
    logits_s = torch.nn.functional.linear(hs, ws, bs) / temp
    logits_t = torch.nn.functional.linear(ht, wt, bt) / temp
    expected = torch.where(mask, L.divergence(logits_s, logits_t.detach(), kind, beta), 0.0)
    w = torch.randn(mask.shape, dtype=torch.float64)
    params = [hs, ws] + ([bs] if bias else [])
    grads_ref = torch.autograd.grad((expected * w).sum(), params)
    for chunk in (1, 3, 8, 1024):  # 8 valid positions: 3 does not divide it, 8 does, 1024 > N
        got = L.chunked_divergence(hs, ws, ht, wt, mask, kind=kind, beta=beta, chunk_size=chunk,
                                   temperature=temp, student_bias=bs, teacher_bias=bt)
        assert got.shape == mask.shape and (got[~mask] == 0).all()
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
        grads = torch.autograd.grad((got * w).sum(), params)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # only the student carries gradients, even when the teacher's tensors require grad
    wt.requires_grad_()
    (g_t,) = torch.autograd.grad(L.chunked_divergence(hs, ws, ht, wt, mask, kind=kind, beta=beta).sum(), [ht],
                                 allow_unused=True)
    assert g_t is None
    assert not L.chunked_divergence(hs.detach(), ws.detach(), ht, wt, mask, kind=kind, beta=beta).requires_grad


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_chunked_divergence_loss_equals_aggregate(kind, beta, mode):
    """The fused variant: sum(weights * values) and its gradients == aggregate of the unchunked values."""
    hs, ws, bs, ht, wt, bt, mask = chunk_inputs(bias=True, Vs=10, Vt=9)
    temp = 1.3
    logits_s = torch.nn.functional.linear(hs, ws[:9], bs[:9]) / temp
    logits_t = torch.nn.functional.linear(ht, wt, bt).detach() / temp
    values = L.divergence(logits_s, logits_t, kind, beta)
    expected = L.aggregate(values, mask, mode)
    params = [hs, ws, bs]
    grads_ref = torch.autograd.grad(2.5 * expected, params)
    weights = L.aggregation_weights(mask, mode, torch.float64)
    for chunk in (1, 3, 1024):
        loss, got_values = L.chunked_divergence_loss(hs, ws, ht, wt, weights, kind=kind, beta=beta, chunk_size=chunk,
                                                     temperature=temp, vocab_limit=9, student_bias=bs, teacher_bias=bt)
        assert not got_values.requires_grad and (got_values[~mask] == 0).all()
        torch.testing.assert_close(got_values, torch.where(mask, values, 0.0).detach(), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-10)
        grads = torch.autograd.grad(2.5 * loss, params)  # an upstream gradient != 1
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
        assert (grads[1][9] == 0).all() and grads[2][9] == 0  # the row past vocab_limit
    loss, _ = L.chunked_divergence_loss(hs, ws, ht, wt, weights, kind=kind, beta=beta, temperature=temp,
                                        vocab_limit=9, student_bias=bs, teacher_bias=bt)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(ws.grad, grads_ref[1] / 2.5)  # upstream gradient 1: buffers handed over as is
    with pytest.raises(RuntimeError):
        loss.backward()
    with torch.no_grad():
        loss_ng, _ = L.chunked_divergence_loss(hs, ws, ht, wt, weights, kind=kind, beta=beta, temperature=temp,
                                               vocab_limit=9, student_bias=bs, teacher_bias=bt)
    torch.testing.assert_close(loss_ng, expected.detach())


def test_chunked_no_mask_flat_inputs_vocab_limit_and_fp32():
    hs, ws, _, ht, wt, _, _ = chunk_inputs(Vs=9, Vt=11)
    with pytest.raises(ValueError):
        L.chunked_divergence(hs, ws, ht, wt)
    hs2, ht2 = hs.reshape(15, -1), ht.reshape(15, -1)  # [N, H] inputs, no mask
    got = L.chunked_divergence(hs2, ws, ht2, wt, kind="forward_kl", chunk_size=4, vocab_limit=8)
    expected = L.forward_kl(hs2 @ ws[:8].T, ht2 @ wt[:8].T)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    (g_got,) = torch.autograd.grad(got.sum(), ws)
    (g_ref,) = torch.autograd.grad(expected.sum(), ws)
    torch.testing.assert_close(g_got, g_ref, atol=1e-12, rtol=1e-10)
    assert (g_got[8:] == 0).all()
    with pytest.raises(ValueError):
        L.chunked_divergence(hs, ws, ht, wt, vocab_limit=10)
    # bf16 / fp32 inputs: fp32 result; equal student and teacher give zero
    h32, w32 = hs.detach().float(), ws.detach().float()
    out = L.chunked_divergence(h32.bfloat16(), w32.bfloat16(), h32.bfloat16(), w32.bfloat16(), chunk_size=4)
    assert out.dtype == torch.float32 and (out == 0).all()
    with torch.no_grad():  # no checkpointing without grad; same values
        torch.testing.assert_close(L.chunked_divergence(hs, ws[:9], ht, wt[:9], chunk_size=2),
                                   L.reverse_kl(hs @ ws.T, ht @ wt[:9].T))


def test_chunked_never_saves_full_logits():
    """Outside the checkpoints autograd saves nothing of size N x V: only [N, H] / [V, H]-sized tensors."""
    hs, ws, _, ht, wt, _, _ = chunk_inputs(B=2, T=10, Hs=3, Ht=3, Vs=40, Vt=40)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
        out = L.chunked_divergence(hs, ws, ht, wt, chunk_size=4)
    out.sum().backward()
    assert max(sizes, default=0) <= 40 * 3 < 20 * 40


# -------------------------------------------------------------------------------------- aggregation
def test_masking_and_aggregation():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, float("nan"), 0.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    assert L.masked_sum(values, mask).item() == 36.0  # the masked NaN does not leak
    torch.testing.assert_close(L.masked_sum(values, mask, dim=1), torch.tensor([6.0, 30.0, 0.0]))
    torch.testing.assert_close(L.masked_mean(values, mask, dim=1), torch.tensor([2.0, 15.0, 0.0]))
    torch.testing.assert_close(L.masked_mean(values, mask, dim=0), torch.tensor([5.5, 11.0, 3.0, 0.0]))
    assert L.token_mean(values, mask).item() == pytest.approx(36.0 / 5)
    assert L.seq_mean_token_mean(values, mask).item() == pytest.approx((2.0 + 15.0) / 2)  # empty row excluded
    assert L.aggregate(values, mask, "token_mean").item() == pytest.approx(7.2)
    assert L.aggregate(values, mask, "seq_mean_token_mean").item() == pytest.approx(8.5)
    empty = torch.zeros_like(mask)
    assert L.token_mean(values, empty).item() == 0.0 and L.seq_mean_token_mean(values, empty).item() == 0.0
    with pytest.raises(ValueError):
        L.aggregate(values, mask, "sum")
    for mode in L.AGGREGATIONS:  # the weights form of each mode, NaN-free values only
        clean = torch.nan_to_num(values)
        assert (L.aggregation_weights(mask, mode) * clean).sum().item() == pytest.approx(L.aggregate(clean, mask, mode).item())
        assert (L.aggregation_weights(empty, mode) == 0).all()
    # brute force on random data, with gradients flowing only to valid positions
    g = torch.Generator().manual_seed(7)
    v = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.rand(4, 6, generator=g) > 0.4
    m[2] = False
    rows = [[float(v.detach()[b, t]) for t in range(6) if m[b, t]] for b in range(4)]
    flat = [x for r in rows for x in r]
    assert L.token_mean(v, m).item() == pytest.approx(sum(flat) / len(flat))
    per_seq = [sum(r) / len(r) for r in rows if r]
    assert L.seq_mean_token_mean(v, m).item() == pytest.approx(sum(per_seq) / len(per_seq))
    L.seq_mean_token_mean(v, m).backward()
    expected_grad = m / (m.sum(1, keepdim=True).clamp_min(1) * len(per_seq))  # 1 / (n_b * n_nonempty)
    torch.testing.assert_close(v.grad, expected_grad.double())


# -------------------------------------------------------------------------------------- k1 / k2 / k3
def test_k_estimators_hand_numbers():
    logp, logq = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.2)])
    torch.testing.assert_close(L.k1(logp, logq), torch.tensor([math.log(2), 0.0]))
    torch.testing.assert_close(L.k2(logp, logq), torch.tensor([0.5 * math.log(2) ** 2, 0.0]))
    torch.testing.assert_close(L.k3(logp, logq), torch.tensor([0.5 - 1 + math.log(2), 0.0]))
    assert L.k3(logp.bfloat16(), logq.bfloat16()).dtype == torch.float32
    x = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([-0.4, 0.5], dtype=torch.float64)
    for fn in (L.k1, L.k2, L.k3):
        assert torch.autograd.gradcheck(lambda a: fn(a, y), (x,))
    (g,) = torch.autograd.grad(L.k3(x, y).sum(), x)  # d/dlogp [e^(q-p) - 1 - (q-p)] = 1 - e^(q-p)
    torch.testing.assert_close(g, 1 - torch.exp(y - x.detach()))


def test_k_estimators_monte_carlo():
    g = torch.Generator().manual_seed(8)
    logp = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    logq = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    true_kl = (logp.exp() * (logp - logq)).sum().item()
    y = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    for fn in (L.k1, L.k3):
        samples = fn(logp[y], logq[y])
        se = samples.std().item() / math.sqrt(len(y))
        assert abs(samples.mean().item() - true_kl) < 4 * se + 1e-3
    assert (L.k3(logp[y], logq[y]) >= 0).all() and (L.k2(logp[y], logq[y]) >= 0).all()


# ------------------------------------------------------------------------------------------ top-k tail
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("support", ["teacher", "student"])
def test_topk_tail_kl(direction, support):
    s, t = pair(V=7, seed=9)
    for k in (1, 3, 6):
        fn = lambda a, b, k=k: L.topk_tail_kl(a, b, k, direction, support)
        check_against_ref(fn, lambda a, b, k=k: ref_topk_tail(a, b, k, direction, support), s, t)
        assert torch.autograd.gradcheck(lambda x: fn(x, t), (s,))
    # k = V (and beyond): empty tail, the full KL, finite gradients
    full = L.reverse_kl if direction == "reverse" else L.forward_kl
    for k in (7, 10):
        out = L.topk_tail_kl(s, t, k, direction, support)
        torch.testing.assert_close(out, full(s, t), atol=1e-12, rtol=1e-10)
        (grad,) = torch.autograd.grad(out.sum(), s)
        assert torch.isfinite(grad).all()
    # a near-empty tail (top-k mass ~ 1 - 1e-12) stays finite and accurate: no 1 - sum cancellation
    peaked = torch.tensor([[30.0, 29.0, 28.0, 0.0, 0.0]], dtype=torch.float64)
    peaked_t = torch.tensor([[29.0, 30.0, 28.5, 0.5, 0.0]], dtype=torch.float64)
    got = L.topk_tail_kl(peaked.float(), peaked_t.float(), 3, direction, support)
    torch.testing.assert_close(got.double(), ref_topk_tail(peaked, peaked_t, 3, direction, support), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError):
        L.topk_tail_kl(s, t, 0)


def test_chunked_loss_under_bf16_autocast_with_fp32_weights():
    """Mixed precision as the paper recipes run it: bf16 hidden states, fp32 master weights, autocast on. The
    in-place gradient accumulation casts itself (it crashed with 'BFloat16 and Float' before), and the
    gradients stay close to the fp32 ones."""
    torch.manual_seed(0)
    h = torch.randn(6, 16)
    w = torch.randn(40, 16, requires_grad=True)
    h_t, w_t = torch.randn(6, 16), torch.randn(40, 16)
    weights = torch.full((6,), 1 / 6)
    ref_loss, _ = L.chunked_divergence_loss(h.clone().requires_grad_(), w, h_t, w_t, weights, chunk_size=4)
    ref_loss.backward()
    ref_grad, w.grad = w.grad.clone(), None
    hb = h.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = L.chunked_divergence_loss(hb, w, h_t.bfloat16(), w_t, weights, chunk_size=4)
    loss.backward()
    assert w.grad.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16
    assert abs(float(loss) - float(ref_loss)) < 0.05 * abs(float(ref_loss)) + 0.05
    assert torch.nn.functional.cosine_similarity(w.grad.flatten(), ref_grad.flatten(), dim=0) > 0.99
