"""PPO's pieces against computations written out by hand, and the reward router's choices."""

import math

import pytest
import torch
from conftest import CharTokenizer

from m1_align.config import RewardSection
from m1_align.rewards.router import RewardRouter
from m1_align.rl.algorithms import gae, kl_penalty, ppo_losses, whiten
from m1_align.rl.ppo import AdaptiveKLController


def test_gae_matches_the_recursion_by_hand():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.3, 0.5, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.2, 9.0], [0.1, -0.3, 9.0, 9.0]])  # 9.0: padding, must not leak
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for row in range(2):
        n = int(mask[row].sum())
        expected, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_v = values[row, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[row, t].item() + gamma * next_v - values[row, t].item()
            running = delta + gamma * lam * running
            expected[t] = running
        assert adv[row, :n].tolist() == pytest.approx(expected)
        assert ret[row, :n].tolist() == pytest.approx([a + v for a, v in zip(expected, values[row, :n].tolist(), strict=True)])
        assert adv[row, n:].abs().sum() == 0 and ret[row, n:].abs().sum() == 0


def test_ppo_losses_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.0, -0.5]])
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    values = torch.tensor([[0.5, 0.0, 1.0]], requires_grad=True)
    old_values = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    policy, value, stats = ppo_losses(logp, old, adv, values, old_values, returns, mask, clip_range=0.2, value_clip_range=0.2)
    r = [math.exp(0.2), math.exp(-1.0)]
    pg = [max(-1.0 * r[0], -1.0 * min(max(r[0], 0.8), 1.2)), max(1.0 * r[1], 1.0 * min(max(r[1], 0.8), 1.2))]
    assert policy.item() == pytest.approx(sum(pg) / 2)
    v = [max((0.5 - 1) ** 2, (0.2 - 1) ** 2), max((0.0 - 1) ** 2, (0.0 - 1) ** 2)]
    assert value.item() == pytest.approx(0.5 * sum(v) / 2)
    assert stats["clip/ratio_outside_fraction"].item() == pytest.approx(1.0)  # both ratios leave [0.8, 1.2]
    assert stats["approx_kl/k3"].item() == pytest.approx(((r[0] - 1 - 0.2) + (r[1] - 1 + 1.0)) / 2)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor(k3))
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.125, 0.5]))
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_penalty(logp, ref, "k4")


def test_whiten_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = whiten(x, mask)
    assert out[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert out[0, :3].pow(2).mean().item() == pytest.approx(1.0, rel=1e-4)
    assert out[0, 3].item() == 0.0


def test_adaptive_kl_moves_towards_target():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(kl=3.0, n_samples=10)  # too much KL: raise the coefficient (error clipped at +0.2)
    assert ctl.coef == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    fixed = AdaptiveKLController(0.1, target=None)
    fixed.update(5.0, 10)
    assert fixed.coef == 0.1


class ConstantRM(torch.nn.Module):
    """A 'reward model' that scores every conversation 0.25, for the router's bookkeeping."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": torch.full((input_ids.shape[0], 1), 0.25)})()


ROWS = [
    {"prompt": [{"role": "user", "content": "code?"}], "answer": "I24.0", "rule": "icd10_code"},
    {"prompt": [{"role": "user", "content": "explain"}], "answer": None, "rule": None},
]


def test_router_uses_rules_when_verifiable_and_the_model_otherwise():
    router = RewardRouter(RewardSection(mode="route"), ConstantRM(), CharTokenizer())
    rewards = router(ROWS, ["Answer: I24.0", "some explanation"], [5, 9])
    assert [r.source for r in rewards] == ["rule:icd10_code", "model"]
    assert [r.value for r in rewards] == pytest.approx([1.0, 0.25])


def test_router_mix_and_length_penalty():
    router = RewardRouter(RewardSection(mode="mix", rule_weight=1.0, model_weight=2.0, length_penalty=0.01), ConstantRM(), CharTokenizer())
    rewards = router(ROWS[:1], ["Answer: I24.1"], [10])
    assert rewards[0].value == pytest.approx(0.0 + 2 * 0.25 - 0.1)


def test_router_explains_what_is_missing():
    from m1_align.config import ConfigError

    with pytest.raises(ConfigError, match="no reward model"):
        RewardRouter(RewardSection(mode="route"))(ROWS, ["a", "b"], [1, 1])
    with pytest.raises(ConfigError, match="needs a reward model"):
        RewardRouter(RewardSection(mode="model"))
