"""rl/algorithms.py against hand computation: every advantage estimator, every loss aggregation, the
clip-low/clip-high surrogate, the KL estimators' gradients and DAPO's pieces. Small tensors with uneven
response lengths, padding, and a group whose samples all scored the same."""

import math

import pytest
import torch

from m1_align.rl.algorithms import (
    agg_loss,
    equal_reward_groups,
    grpo_advantages,
    kl_penalty,
    overlong_penalty,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    tis_weights,
    token_level_rewards,
)

# three prompts, two samples each; prompt 2's samples score the same
SCORES = torch.tensor([1.0, 0.0, 0.5, -0.5, 0.3, 0.3])
GROUPS = torch.tensor([0, 0, 1, 1, 2, 2])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float)


def test_grpo_advantages_by_hand():
    adv = grpo_advantages(SCORES, GROUPS, MASK)
    std0 = math.sqrt(((1 - 0.5) ** 2 + (0 - 0.5) ** 2) / 1)  # unbiased, n - 1 = 1
    expected = [0.5 / std0, -0.5 / std0, 0.5 / std0, -0.5 / std0, 0.0, 0.0]
    for i, value in enumerate(expected):
        n = int(MASK[i].sum())
        assert adv[i, :n].tolist() == pytest.approx([value] * n, rel=1e-5)
        assert adv[i, n:].abs().sum() == 0  # nothing on padding
    dr = grpo_advantages(SCORES, GROUPS, MASK, std_normalize=False)  # Dr. GRPO: mean only
    assert dr[:, 0].tolist() == pytest.approx([0.5, -0.5, 0.5, -0.5, 0.0, 0.0])


def test_rloo_advantages_by_hand():
    scores = torch.tensor([1.0, 0.0, 4.0, 2.0, 2.0, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = rloo_advantages(scores, groups, torch.ones(6, 2))
    assert adv[:, 0].tolist() == pytest.approx([1 - 2.0, 0 - 2.5, 4 - 0.5, 0.0, 0.0, 0.0])


def test_reinforce_pp_returns_then_batch_whitening():
    rewards = torch.tensor([[0.0, -0.1, 1.0, 0.0], [-0.2, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float)
    adv = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    returns = [0.0 + 0.5 * (-0.1 + 0.5 * 1.0), -0.1 + 0.5 * 1.0, 1.0, -0.2 + 0.5 * 0.5, 0.5]
    mean = sum(returns) / 5
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / 5)
    got = adv[mask.bool()].tolist()
    assert got == pytest.approx([(r - mean) / std for r in returns], rel=1e-4)
    assert adv[~mask.bool()].abs().sum() == 0


def test_token_level_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 9.0, 9.0, 9.0]])  # 9.0 on padding
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float)
    r = token_level_rewards(torch.tensor([1.0, -1.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, -0.15 + 1.0, 0.0], [-0.2 - 1.0, 0.0, 0.0, 0.0]]))


LOSS = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])  # 100 on padding
LMASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token_mean", (1 + 2 + 3 + 4) / 4),
        ("seq_mean_token_mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),
        ("seq_mean_token_sum", ((1 + 2 + 3) + 4) / 2),
        ("token_sum_norm", (1 + 2 + 3 + 4) / (2 * 8)),
    ],
)
def test_loss_aggregation_by_hand(mode, expected):
    assert agg_loss(LOSS, LMASK, mode, max_length=8).item() == pytest.approx(expected)


def test_token_mean_over_two_ranks_is_the_global_token_mean():
    """Rank 0 holds the 3-token response, rank 1 the 1-token one. Data parallelism averages the ranks'
    losses (their gradients); dividing each by the ranks' mean token count gives the global token mean,
    (1+2+3+4)/4 = 2.5, where local means would give ((1+2+3)/3 + 4/1)/2 = 3."""
    counts = LMASK.sum(1)
    rank_mean = lambda count: counts.mean()  # noqa: E731  what the all-reduce returns on either rank
    per_rank = [agg_loss(LOSS[r : r + 1], LMASK[r : r + 1], "token_mean", mean_over_ranks=rank_mean) for r in (0, 1)]
    assert (sum(per_rank) / 2).item() == pytest.approx(agg_loss(LOSS, LMASK, "token_mean").item()) == pytest.approx(2.5)


def test_loss_aggregation_rejects_unknown_modes():
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        agg_loss(LOSS, LMASK, "mean")
    with pytest.raises(ValueError, match="needs a fixed length"):
        agg_loss(LOSS, LMASK, "token_sum_norm")


def test_asymmetric_clipping_by_hand():
    # ratios e^0.25 = 1.284 (A > 0, above 1 + clip_high = 1.28: clipped), e^-0.5 = 0.607 (A < 0, below
    # 1 - clip_low = 0.8: clipped), e^0.1 = 1.105 (inside: unclipped); the last column is padding
    logp = torch.tensor([[0.25, -0.5, 0.1, 3.0]], requires_grad=True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    r2 = math.exp(0.1)
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 2 * r2) / 3)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.0, -2 * r2 / 3, 0.0])
    # both out-of-band tokens take the clipped branch here (test_algorithms_verl tells the two apart)
    assert stats["clip/ratio_outside_fraction"].item() == pytest.approx(2 / 3)
    assert stats["clip/pg_clipfrac"].item() == pytest.approx(2 / 3)
    # the same ratio 1.284 is inside a symmetric clip of 0.3
    loss_sym, _ = policy_loss(logp, old, adv, mask, clip_low=0.3, clip_high=0.3)
    assert loss_sym.item() == pytest.approx((-math.exp(0.25) + 0.7 * 0 + max(math.exp(-0.5), 0.7) - 2 * r2) / 3)


def test_tis_weights_are_capped_and_carry_no_gradient():
    trainer = torch.tensor([-1.0, -2.0, -0.1], requires_grad=True)
    engine = torch.tensor([-1.5, -1.0, -3.0])
    w = tis_weights(trainer, engine, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([math.exp(0.5), math.exp(-1.0), 2.0]))
    assert not w.requires_grad


def test_overlong_penalty_is_soft_then_full():
    lengths = torch.tensor([10, 96, 112, 128])
    pen = overlong_penalty(lengths, max_new_tokens=128, buffer=32, penalty=1.0)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])
    assert overlong_penalty(lengths, 128, 0, 1.0).abs().sum() == 0


def test_equal_reward_groups_flags_groups_without_signal():
    assert equal_reward_groups(SCORES, GROUPS).tolist() == [False, False, False, False, True, True]


def exact_expected_gradient(estimator, ref_logits, seed=0):
    """E_{y ~ pi}[grad estimator(log pi(y), log ref(y))], summed exactly over a 6-token vocabulary."""
    theta = torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)
    logp = theta.log_softmax(-1)
    ref = ref_logits.log_softmax(-1)
    per_token = kl_penalty(logp, ref, estimator)
    (grad,) = torch.autograd.grad((logp.exp().detach() * per_token).sum(), theta)
    return theta, grad


@pytest.mark.parametrize(("estimator", "direction"), [("k2", "reverse"), ("k3", "forward"), ("k1", None)])
def test_kl_loss_gradients_pull_towards_the_reference(estimator, direction):
    ref_a = torch.tensor([2.0, 0.0, -1.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    # both references keep log ref / pi below 2.47, where k3 reaches its clamp of 10 (zero gradient beyond)
    ref_b = torch.tensor([-1.0, 1.0, -1.0, 0.0, 0.5, -2.0], dtype=torch.float64)
    grads = {}
    for name, ref in (("a", ref_a), ("b", ref_b)):
        theta, grad = exact_expected_gradient(estimator, ref)
        p, r = theta.softmax(-1), ref.softmax(-1)
        if direction == "reverse":  # grad KL(pi || ref)
            (expected,) = torch.autograd.grad((p * (p.log() - r.log())).sum(), theta)
        elif direction == "forward":  # grad KL(ref || pi)
            (expected,) = torch.autograd.grad((r * (r.log() - theta.log_softmax(-1))).sum(), theta)
        else:  # k1's gradient is E[grad log pi] = 0 whatever the reference
            expected = torch.zeros_like(grad)
        torch.testing.assert_close(grad, expected)
        grads[name] = grad
    if direction:
        assert not torch.allclose(grads["a"], grads["b"])  # the reference enters the gradient
        # a small step down the gradient moves pi towards the reference
        theta, grad = exact_expected_gradient(estimator, ref_a)
        before = torch.nn.functional.kl_div(ref_a.log_softmax(-1), theta.log_softmax(-1), log_target=True, reduction="sum")
        after = torch.nn.functional.kl_div(ref_a.log_softmax(-1), (theta - 0.1 * grad).log_softmax(-1), log_target=True,
                                           reduction="sum")
        assert after < before
