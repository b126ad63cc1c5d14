"""TDPO/DPO losses against computations written out by hand, token by token."""

import math

import pytest
import torch

from m1_align.preference.losses import preference_loss, response_window, token_terms

B, T, V = 3, 7, 11


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[1, 5:] = -100  # padding
    labels[4, 6:] = -100
    return logits, ref_logits, labels


def by_hand(logits, ref_logits, labels, loss, beta, alpha, rpo_alpha=0.0):
    """Plain Python loops over pairs, positions and vocabulary entries."""
    total = 0.0
    for i in range(B):
        terms = []
        for row in (i, i + B):  # chosen, rejected
            ratio, seq_kl, logp, n = 0.0, 0.0, 0.0, 0
            for t in range(T):
                y = int(labels[row, t])
                if y == -100:
                    continue
                p = torch.softmax(logits[row, t], -1)
                q = torch.softmax(ref_logits[row, t], -1)
                ratio = ratio + torch.log(p[y]) - torch.log(q[y])
                seq_kl = seq_kl + sum(q[v] * (torch.log(q[v]) - torch.log(p[v])) for v in range(V))
                logp, n = logp + torch.log(p[y]), n + 1
            terms.append((ratio, seq_kl, logp, n))
        (r_w, kl_w, logp_w, n_w), (r_l, kl_l, _, _) = terms
        total = total + rpo_alpha * (-logp_w / n_w)
        u = beta * (r_w - r_l)
        if loss == "tdpo1":
            z = u - beta * (kl_l - kl_w)
        elif loss == "tdpo2":
            z = u - alpha * beta * (kl_l - kl_w.detach())
        else:
            z = u
        total = total - torch.nn.functional.logsigmoid(z)
    return total / B


def ours(logits, ref_logits, labels, loss, beta, alpha, chunk_size, rpo_alpha=0.0):
    chosen, rejected = token_terms(logits, ref_logits, labels, chunk_size=chunk_size).halves()
    return preference_loss(chosen, rejected, loss=loss, beta=beta, alpha=alpha, rpo_alpha=rpo_alpha)


@pytest.mark.parametrize("loss", ["tdpo1", "tdpo2", "dpo"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_loss_and_gradient_match_hand_computation(loss, chunk_size):
    logits, ref_logits, labels = make_inputs()
    expected = by_hand(logits, ref_logits, labels, loss, beta=0.3, alpha=0.7)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    value, _ = ours(logits, ref_logits, labels, loss, beta=0.3, alpha=0.7, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(value, logits)
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["tdpo2", "dpo"])
def test_rpo_term_adds_the_chosen_token_mean_nll_by_hand(loss):
    logits, ref_logits, labels = make_inputs(2)
    expected = by_hand(logits, ref_logits, labels, loss, beta=0.3, alpha=0.7, rpo_alpha=0.6)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    value, metrics = ours(logits, ref_logits, labels, loss, beta=0.3, alpha=0.7, chunk_size=3, rpo_alpha=0.6)
    (grad,) = torch.autograd.grad(value, logits)
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
    plain, _ = ours(logits, ref_logits, labels, loss, beta=0.3, alpha=0.7, chunk_size=3)
    assert value.item() - plain.item() == pytest.approx(0.6 * metrics["nll/chosen"].item(), rel=1e-10)


def test_tdpo2_with_alpha_zero_is_dpo():
    logits, ref_logits, labels = make_inputs(1)
    tdpo2, _ = ours(logits, ref_logits, labels, "tdpo2", beta=0.1, alpha=0.0, chunk_size=4)
    dpo, _ = ours(logits, ref_logits, labels, "dpo", beta=0.1, alpha=0.5, chunk_size=4)
    g1 = torch.autograd.grad(tdpo2, logits)[0]
    g2 = torch.autograd.grad(dpo, logits)[0]
    assert tdpo2.item() == pytest.approx(dpo.item(), rel=1e-12)
    torch.testing.assert_close(g1, g2)


def test_chunked_sequential_kl_equals_unchunked():
    logits, ref_logits, labels = make_inputs(2)
    full = token_terms(logits, ref_logits, labels, chunk_size=None)
    for chunk in (1, 2, 5, T):
        part = token_terms(logits, ref_logits, labels, chunk_size=chunk)
        torch.testing.assert_close(part.sequential_kl, full.sequential_kl)
        torch.testing.assert_close(part.logratio, full.logratio)


def test_kl_is_zero_when_policy_equals_reference_and_loss_is_log2():
    _, ref_logits, labels = make_inputs(3)
    logits = ref_logits.clone().requires_grad_(True)
    terms = token_terms(logits, ref_logits, labels, chunk_size=2)
    assert terms.sequential_kl.abs().max().item() < 1e-12
    value, metrics = ours(logits, ref_logits, labels, "tdpo2", 0.1, 0.5, 2)
    assert value.item() == pytest.approx(math.log(2))
    assert metrics["rewards/margin"].item() == pytest.approx(0.0, abs=1e-12)


def test_unknown_loss_is_rejected():
    logits, ref_logits, labels = make_inputs()
    with pytest.raises(ValueError, match="tdpo1, tdpo2 or dpo"):
        ours(logits, ref_logits, labels, "ipo", 0.1, 0.5, None)


def test_the_response_window_with_the_head_per_chunk_equals_full_logits():
    """The trainer's path (final hidden states, only each row's response span, the output head applied one
    chunk at a time) must give the losses and gradients of the plain path over the full [B, T, V] logits:
    rows whose responses start at different columns, padding after them, and a row with one response token."""
    g = torch.Generator().manual_seed(3)
    batch, width, hidden_size = 4, 9, 5
    hidden = torch.randn(batch, width, hidden_size, generator=g, dtype=torch.float64, requires_grad=True)
    ref_hidden = torch.randn(batch, width, hidden_size, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(hidden_size, V, bias=False).double()
    labels = torch.randint(0, V, (batch, width), generator=g)
    for row, (start, end) in enumerate([(2, 9), (5, 7), (1, 4), (8, 9)]):
        labels[row, :start] = -100
        labels[row, end:] = -100
    plain = token_terms(head(hidden), head(ref_hidden), labels, chunk_size=None)
    window_labels, window_hidden, window_ref = response_window(labels, hidden, ref_hidden)
    assert window_labels.shape == (batch, 7) and (window_labels != -100).sum() == (labels != -100).sum()
    windowed = token_terms(window_hidden, head(window_ref), window_labels, chunk_size=3, head=head)
    for field in ("logratio", "sequential_kl", "logp", "n_tokens"):
        torch.testing.assert_close(getattr(windowed, field), getattr(plain, field), rtol=1e-10, atol=1e-12)
    loss_plain, _ = preference_loss(*plain.halves(), loss="tdpo2", beta=0.3, alpha=0.7)
    loss_windowed, _ = preference_loss(*windowed.halves(), loss="tdpo2", beta=0.3, alpha=0.7)
    grads_plain = torch.autograd.grad(loss_plain, [hidden, head.weight])
    grads_windowed = torch.autograd.grad(loss_windowed, [hidden, head.weight])
    for a, b in zip(grads_windowed, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
