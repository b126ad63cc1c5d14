"""ELO: the loss's gradient against the formula by hand; what the baseline does to the gradient."""

import pytest
import torch

from m1_align.rl.elo import degenerate, elo_advantages, elo_loss

V, A = 5, 3  # reasoning "tokens", answers
GOLD = 1


def toy_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)  # pi(c | Q)
    w = torch.randn(V, A, generator=g, dtype=torch.float64, requires_grad=True)  # pi(A | Q, c)
    return theta, w


def loss_of(theta, w, paths, groups, baseline, lam):
    """ELO's loss for one-token reasoning paths, through the stage's own functions."""
    reasoning_logp = theta.log_softmax(-1)[paths][:, None]  # [N, 1]: one reasoning token per path
    answer_logp = w.log_softmax(-1)[paths, GOLD]
    advantages = elo_advantages(answer_logp.detach(), groups, baseline)
    loss, _ = elo_loss(reasoning_logp, reasoning_logp.detach(), torch.ones_like(reasoning_logp), answer_logp, advantages, lam)
    return loss


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out", "none"])
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_gradient_equals_formula_by_hand(baseline, lam):
    theta, w = toy_model()
    paths = torch.tensor([0, 3, 3, 1, 4, 2, 2, 0])  # two questions, K = 4 fixed samples each
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    loss_of(theta, w, paths, groups, baseline, lam).backward()

    with torch.no_grad():
        p = theta.softmax(-1)
        q = w.softmax(-1)
        r = q[paths, GOLD].log()
        b = torch.zeros_like(r)
        for g in (0, 1):
            idx = groups == g
            if baseline == "mean":
                b[idx] = r[idx].mean()
            elif baseline == "leave_one_out":
                b[idx] = (r[idx].sum() - r[idx]) / 3
        n = len(paths)
        grad_theta = torch.zeros(V, dtype=torch.float64)
        grad_w = torch.zeros(V, A, dtype=torch.float64)
        for k, c in enumerate(paths.tolist()):
            # d/dtheta log softmax(theta)[c] = e_c - p
            grad_theta -= (r[k] - b[k]) * (torch.nn.functional.one_hot(torch.tensor(c), V) - p) / n
            # d/dw[c] log softmax(w[c])[GOLD] = e_GOLD - q[c]
            grad_w[c] -= lam * (torch.nn.functional.one_hot(torch.tensor(GOLD), A) - q[c]) / n
    torch.testing.assert_close(theta.grad, grad_theta)
    torch.testing.assert_close(w.grad, grad_w)


def gradient_samples(baseline, n_groups=3000, k=4, seed=0):
    theta, w = toy_model(1)
    torch.manual_seed(seed)
    grads = []
    p = theta.detach().softmax(-1)
    for _ in range(n_groups):
        paths = torch.multinomial(p, k, replacement=True)
        loss = loss_of(theta, w, paths, torch.zeros(k, dtype=torch.long), baseline, 0.0)
        (g,) = torch.autograd.grad(loss, theta)
        grads.append(g)
    return torch.stack(grads)


def test_baseline_keeps_expected_gradient_and_lowers_variance():
    plain = gradient_samples("none")
    loo = gradient_samples("leave_one_out")
    mean = gradient_samples("mean")
    stderr = (plain.std(0) ** 2 / len(plain) + loo.std(0) ** 2 / len(loo)).sqrt()
    # leave-one-out is unbiased: same expected gradient as no baseline (within 4 standard errors)
    assert ((plain.mean(0) - loo.mean(0)).abs() < 4 * stderr + 1e-4).all()
    # the in-group mean includes the path itself: its expectation shrinks by (K-1)/K
    torch.testing.assert_close(mean.mean(0), 0.75 * plain.mean(0), atol=float(4 * stderr.max()) + 1e-4, rtol=0)
    var_plain, var_loo = plain.var(0).sum().item(), loo.var(0).sum().item()
    print(f"gradient variance: no baseline {var_plain:.4g}, leave-one-out {var_loo:.4g}")
    assert var_loo < 0.5 * var_plain


def test_advantages_per_group():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    torch.testing.assert_close(elo_advantages(r, g, "mean"), r - torch.tensor([2.0, 2.0, 2.0, 15.0, 15.0]))
    torch.testing.assert_close(elo_advantages(r, g, "leave_one_out"), r - torch.tensor([2.5, 2.0, 1.5, 20.0, 10.0]))
    torch.testing.assert_close(elo_advantages(r, g, "none"), r)
    with pytest.raises(ValueError, match="unknown baseline"):
        elo_advantages(r, g, "median")


def test_degenerate_paths():
    assert degenerate(None) == "truncated"
    assert degenerate([]) == "empty"
    assert degenerate([1, 2, 3, 4] * 5) == "repeating"
    assert degenerate(list(range(40))) is None


def test_loss_over_two_ranks_with_unequal_path_counts_is_the_global_mean():
    """Dropped paths leave rank 0 with one path and rank 1 with three: averaging the ranks' losses (their
    gradients) must give the loss of all four paths in one process."""
    g = torch.Generator().manual_seed(0)
    reasoning_logp = -torch.rand(4, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.float64)
    answer_logp, advantages = -torch.rand(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)

    def loss(rows, ranks=None):
        return elo_loss(reasoning_logp[rows], reasoning_logp[rows], mask[rows], answer_logp[rows], advantages[rows], 0.7,
                        mean_over_ranks=ranks)[0]

    mean_count = lambda n: torch.tensor(2.0, dtype=n.dtype)  # noqa: E731  (1 + 3) / 2, as the all-reduce gives
    two_ranks = (loss(slice(0, 1), mean_count) + loss(slice(1, 4), mean_count)) / 2
    assert two_ranks.item() == pytest.approx(loss(slice(0, 4)).item())
    assert ((loss(slice(0, 1)) + loss(slice(1, 4))) / 2).item() != pytest.approx(loss(slice(0, 4)).item())
