"""rl/algorithms.py where it parts from (or newly matches) verl's core_algos.py, issue 34's points 1-8, by
hand on small tensors with uneven lengths and padding; the estimator and aggregation registries and the
config's names; sequence-level truncated and masked importance sampling."""

import math
import typing

import pytest
import torch

from m1_align.config import PPOSection
from m1_align.rl.algorithms import (
    AdvantageInputs,
    advantage_estimator,
    advantage_estimators,
    agg_loss,
    discounted_returns,
    gae,
    group_baseline,
    grpo_advantages,
    kl_penalty,
    loss_aggregation,
    loss_aggregations,
    masked_importance_sampling,
    policy_loss,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    rollout_correction,
    truncated_importance_weights,
    whiten,
)

# ---------------------------------------------------------------------------------------------
# The registries and the config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lookup", "names"), [(advantage_estimator, advantage_estimators),
                                               (loss_aggregation, loss_aggregations)])
def test_unknown_names_give_one_line_listing_the_registered_ones(lookup, names):
    with pytest.raises(ValueError) as err:
        lookup("ppo2")
    message = str(err.value)
    assert "\n" not in message and "'ppo2'" in message
    assert message.endswith("registered: " + ", ".join(names()))


def test_config_names_are_the_registered_names():
    fields = PPOSection.model_fields
    assert set(typing.get_args(fields["advantage_estimator"].annotation)) == set(advantage_estimators())
    assert set(typing.get_args(fields["loss_agg_mode"].annotation)) == set(loss_aggregations())
    assert set(advantage_estimators()) == {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}
    assert {n for n in advantage_estimators() if advantage_estimator(n).needs_critic} == {"gae"}
    assert {n for n in advantage_estimators() if advantage_estimator(n).needs_groups} == {
        "grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"}


def test_config_dual_clip_and_masked_is_bounds():
    assert PPOSection().clip_ratio_c == 3.0
    assert PPOSection(clip_ratio_c=None).clip_ratio_c is None
    for bad in ({"clip_ratio_c": 1.0}, {"mis_low": 1.5}, {"mis_high": 0.9}):
        with pytest.raises(ValueError):
            PPOSection(**bad)


SCORES = torch.tensor([1.0, 0.0, 0.5, -0.5])
GROUPS = torch.tensor([7, 7, 3, 3])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float)


def test_every_registered_estimator_runs_on_one_signature():
    rewards = torch.tensor([[0.0, 0.1, 1.0, 0.0], [0.2, -0.3, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, -1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0], [0.1, 0.2, 9.0, 9.0], [0.0, 9.0, 9.0, 9.0], [0.3, 0.2, 0.1, 0.0]])
    x = AdvantageInputs(SCORES, GROUPS, rewards, MASK, values=values, gamma=0.9, lam=0.8, std_normalize=True)
    for name in advantage_estimators():
        adv, returns = advantage_estimator(name)(x)
        assert adv.shape == MASK.shape and adv[MASK == 0].abs().sum() == 0, name
        assert (returns is not None) == (name == "gae"), name
    # gae whitens the advantages, its value targets stay the raw returns
    raw_adv, raw_ret = gae(rewards, values, MASK, 0.9, 0.8)
    adv, ret = advantage_estimator("gae")(x)
    torch.testing.assert_close(adv, whiten(raw_adv, MASK))
    torch.testing.assert_close(ret, raw_ret)
    unwhitened, _ = advantage_estimator("gae")(AdvantageInputs(SCORES, GROUPS, rewards, MASK, values, 0.9, 0.8,
                                                               whiten_advantages=False))
    torch.testing.assert_close(unwhitened, raw_adv)
    # dr_grpo never divides by the std, whatever std_normalize says; grpo with std_normalize=false is dr_grpo
    dr, _ = advantage_estimator("dr_grpo")(x)
    assert dr[:, 0].tolist() == pytest.approx([0.5, -0.5, 0.5, -0.5])
    grpo_mean_only, _ = advantage_estimator("grpo")(AdvantageInputs(SCORES, GROUPS, rewards, MASK, std_normalize=False))
    torch.testing.assert_close(grpo_mean_only, dr)
    grpo, _ = advantage_estimator("grpo")(x)
    assert grpo[0, 0].item() == pytest.approx(0.5 / math.sqrt(0.5), rel=1e-5)  # unbiased std of {1, 0}
    with pytest.raises(ValueError, match="gae needs the critic's values"):
        advantage_estimator("gae")(AdvantageInputs(SCORES, GROUPS, rewards, MASK))


# ---------------------------------------------------------------------------------------------
# 1. seq_mean modes count only responses with tokens
# ---------------------------------------------------------------------------------------------

LOSS = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [5.0, 6.0, 100.0, 100.0]])
ROW_MASKED = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float)  # row 2 truncated away


def test_seq_mean_modes_skip_fully_masked_rows():
    assert agg_loss(LOSS, ROW_MASKED, "seq_mean_token_mean").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert agg_loss(LOSS, ROW_MASKED, "seq_mean_token_sum").item() == pytest.approx((6 + 4) / 2)
    nothing = torch.zeros_like(ROW_MASKED)
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        assert agg_loss(LOSS, nothing, mode).item() == 0.0


def test_seq_mean_over_two_ranks_is_the_global_mean_over_rows_with_tokens():
    """Rank 0 holds rows 0 and 2 (row 2 masked), rank 1 row 1: one row with tokens each."""
    rank_mean = lambda count: torch.tensor(1.0)  # noqa: E731  the all-reduced mean of (1, 1)
    parts = [agg_loss(LOSS[[0, 2]], ROW_MASKED[[0, 2]], "seq_mean_token_sum", mean_over_ranks=rank_mean),
             agg_loss(LOSS[[1]], ROW_MASKED[[1]], "seq_mean_token_sum", mean_over_ranks=rank_mean)]
    assert (sum(parts) / 2).item() == pytest.approx(agg_loss(LOSS, ROW_MASKED, "seq_mean_token_sum").item())


# ---------------------------------------------------------------------------------------------
# 2. the two fixed normalisers
# ---------------------------------------------------------------------------------------------


def test_dr_grpo_and_verl_normalisers():
    loss, mask = LOSS[:2], ROW_MASKED[:2]  # token sum 10 over N = 2 responses
    assert agg_loss(loss, mask, "token_sum_norm", max_length=8).item() == pytest.approx(10 / (2 * 8))
    assert agg_loss(loss, mask, "seq_mean_token_sum_norm", max_length=8).item() == pytest.approx(10 / 8)
    # the same batch twice: Dr. GRPO's loss is unchanged, verl's (no 1/N) doubles
    twice, twice_mask = torch.cat([loss, loss]), torch.cat([mask, mask])
    assert agg_loss(twice, twice_mask, "token_sum_norm", max_length=8).item() == pytest.approx(10 / 16)
    assert agg_loss(twice, twice_mask, "seq_mean_token_sum_norm", max_length=8).item() == pytest.approx(20 / 8)
    with pytest.raises(ValueError, match="seq_mean_token_sum_norm needs a fixed length"):
        agg_loss(loss, mask, "seq_mean_token_sum_norm")


# ---------------------------------------------------------------------------------------------
# 3. dual-clip, and 8. the clip fractions and approximate KLs
# ---------------------------------------------------------------------------------------------


def dual_clip_case():
    # ratios e^1.5 = 4.48 (A < 0: capped at c = 3), e^1.5 (A > 0: clipped at 1.2), 2 (A < 0, below c:
    # unclipped), e^0.25 = 1.28 (A > 0: clipped at 1.2); the last column is padding whose ratio e^100 is inf
    # in float32 without the log-ratio clamp (inf x mask 0 = nan)
    logp = torch.tensor([[1.5, 1.5, math.log(2.0), 0.25, 100.0]], requires_grad=True)
    adv = torch.tensor([[-1.0, 1.0, -1.0, 1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    return logp, torch.zeros(1, 5), adv, mask


def test_dual_clip_caps_negative_advantages_above_c():
    logp, old, adv, mask = dual_clip_case()
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, 0.2, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx((3.0 - 1.2 + 2.0 - 1.2) / 4)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.0, 2.0 / 4, 0.0, 0.0])  # only the uncapped, unclipped token
    assert stats["clip/pg_clipfrac_lower"].item() == pytest.approx(1 / 4)
    assert stats["clip/pg_clipfrac"].item() == pytest.approx(2 / 4)  # the two A > 0 tokens
    assert stats["clip/ratio_outside_fraction"].item() == pytest.approx(4 / 4)
    # off: the A < 0 token's loss grows with its ratio
    logp, old, adv, mask = dual_clip_case()
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, 0.2)
    assert loss.item() == pytest.approx((math.exp(1.5) - 1.2 + 2.0 - 1.2) / 4)
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(math.exp(1.5) / 4)
    assert stats["clip/pg_clipfrac_lower"].item() == 0.0
    with pytest.raises(ValueError, match="clip_ratio_c=1.0 must be above 1"):
        policy_loss(logp, old, adv, mask, 0.2, 0.2, clip_ratio_c=1.0)


def test_clip_fractions_and_approx_kls_by_hand():
    # ratio 0.5 with A > 0 and 1.5 with A < 0: both outside [0.8, 1.2], but the unclipped branch is the
    # larger loss for both, so neither is clipped (and both keep their gradient)
    log_ratio = [math.log(0.5), math.log(1.5)]
    logp = torch.tensor([log_ratio + [0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logp, torch.zeros(1, 3), adv, mask, 0.2, 0.2, clip_ratio_c=3.0)
    assert stats["clip/ratio_outside_fraction"].item() == pytest.approx(1.0)
    assert stats["clip/pg_clipfrac"].item() == 0.0
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-0.5 / 2, 1.5 / 2, 0.0])
    assert stats["approx_kl/k1"].item() == pytest.approx(-sum(log_ratio) / 2)
    assert stats["approx_kl/k3"].item() == pytest.approx(sum(math.exp(x) - 1 - x for x in log_ratio) / 2)


# ---------------------------------------------------------------------------------------------
# 4. the k3 clamp
# ---------------------------------------------------------------------------------------------


def test_k3_is_clamped_to_ten_with_no_gradient_beyond():
    logp = torch.tensor([-1.0, -5.0, -100.0], requires_grad=True)
    # log pi_ref / pi = 1, 5 (k3 = e^5 - 6 = 142) and 100 (e^100 is inf in float32: a nan gradient unclamped)
    ref = torch.zeros(3)
    k3 = kl_penalty(logp, ref, "k3")
    assert k3.tolist() == pytest.approx([math.e - 2, 10.0, 10.0])
    k3.sum().backward()
    assert logp.grad.tolist() == pytest.approx([1 - math.e, 0.0, 0.0])  # d/dx (e^-x - 1 + x) at x = -1


# ---------------------------------------------------------------------------------------------
# 5. a group of one
# ---------------------------------------------------------------------------------------------


def test_group_estimators_refuse_a_lone_sample():
    groups = torch.tensor([0, 0, 1])  # prompt 1 has one sample
    scores, mask = torch.tensor([1.0, 0.0, 1.0]), torch.ones(3, 2)
    calls = {
        "grpo": lambda: grpo_advantages(scores, groups, mask),
        "dr_grpo": lambda: grpo_advantages(scores, groups, mask, std_normalize=False),
        "rloo": lambda: rloo_advantages(scores, groups, mask),
        "reinforce_pp_baseline": lambda: reinforce_pp_baseline_advantages(mask * scores[:, None], groups, mask),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"estimator {name} compares .* group 1 has one sample: set "
                                             "ppo.samples_per_prompt to 2 or more"):
            call()
    # ELO's baseline keeps its rule: a lone path is its own baseline (advantage 0)
    assert (scores - group_baseline(scores, groups, leave_one_out=True)).tolist() == [1.0, -1.0, 0.0]
    assert (scores - group_baseline(scores, groups, leave_one_out=False)).tolist() == [0.5, -0.5, 0.0]


# ---------------------------------------------------------------------------------------------
# 6. REINFORCE++'s return on padding; 7. REINFORCE++ with a group baseline
# ---------------------------------------------------------------------------------------------


def test_reinforce_pp_return_ignores_a_reward_on_padding():
    rewards = torch.tensor([[0.0, 1.0, 5.0, 0.0], [0.5, 0.0, 0.0, 3.0]])  # 5.0 on row 0's first padding
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float)
    returns = discounted_returns(rewards, mask, gamma=0.5)
    torch.testing.assert_close(returns, torch.tensor([[0.5, 1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]))
    clean = rewards * mask
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, 0.5), reinforce_pp_advantages(clean, mask, 0.5))


def test_reinforce_pp_baseline_by_hand():
    # per response, the token rewards summed over real tokens (9.0 on padding is ignored)
    rewards = torch.tensor([[-0.1, 0.0, 1.0, 9.0], [0.0, -0.2, 9.0, 9.0], [0.5, 9.0, 9.0, 9.0], [0.1, 0.1, 0.1, -1.0]])
    adv = reinforce_pp_baseline_advantages(rewards, GROUPS, MASK)
    returns = [0.9, -0.2, 0.5, -0.7]  # group 7's mean 0.35, group 3's -0.1
    centred = [0.55, -0.55, 0.6, -0.6]
    assert [r - m for r, m in zip(returns, [0.35, 0.35, -0.1, -0.1], strict=True)] == pytest.approx(centred)
    tokens = [c for c, n in zip(centred, [3, 2, 1, 4], strict=True) for _ in range(n)]  # whitened over real tokens
    mean = sum(tokens) / len(tokens)
    std = math.sqrt(sum((t - mean) ** 2 for t in tokens) / len(tokens))
    assert adv[MASK.bool()].tolist() == pytest.approx([(t - mean) / std for t in tokens], rel=1e-4)
    assert adv[~MASK.bool()].abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# Mismatch correction: truncated and masked importance sampling, per token and per sequence
# ---------------------------------------------------------------------------------------------

# log pi_trainer / pi_engine per token: row 0 (0.1, 0.2), row 1 (0.5, 0.8), row 2 (-0.3), row 3 no tokens;
# the trainer's log-probs on padding are garbage (5.0)
IS_MASK = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float)
ENGINE = torch.full((4, 3), -1.0)
TRAINER = ENGINE + torch.tensor([[0.1, 0.2, 6.0], [0.5, 0.8, 6.0], [-0.3, 6.0, 6.0], [6.0, 6.0, 6.0]])


def test_token_level_truncated_is_by_hand():
    w, stats = truncated_importance_weights(TRAINER, ENGINE, IS_MASK, cap=2.0, level="token")
    expected = torch.tensor([[math.exp(0.1), math.exp(0.2), 0], [math.exp(0.5), 2.0, 0], [math.exp(-0.3), 0, 0], [0, 0, 0]])
    torch.testing.assert_close(w, expected)
    assert stats["mismatch/tis_truncated_fraction"].item() == pytest.approx(1 / 5)


def test_sequence_level_truncated_is_by_hand():
    trainer = TRAINER.clone().requires_grad_()
    w, stats = truncated_importance_weights(trainer, ENGINE, IS_MASK, cap=2.0, level="sequence")
    # one weight per response: exp(0.3), exp(1.3) = 3.67 -> 2, exp(-0.3); the empty row none
    expected = torch.tensor([[math.exp(0.3)] * 2 + [0], [2.0, 2.0, 0], [math.exp(-0.3), 0, 0], [0, 0, 0]])
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad
    assert stats["mismatch/tis_truncated_fraction"].item() == pytest.approx(1 / 3)  # of the 3 responses with tokens
    # the product over a long response is taken in log space: 2000 tokens at ratio e^0.5 give the cap, not inf
    long_w, _ = truncated_importance_weights(torch.full((1, 2000), -0.5), torch.full((1, 2000), -1.0),
                                             torch.ones(1, 2000), cap=5.0, level="sequence")
    assert torch.isfinite(long_w).all() and long_w.max().item() == pytest.approx(5.0)


def test_masked_is_by_hand():
    # token level, band [0.5, 2] = log [-0.69, 0.69]: only row 1's 0.8 token leaves it
    mask, stats = masked_importance_sampling(TRAINER, ENGINE, IS_MASK, 0.5, 2.0, level="token")
    torch.testing.assert_close(mask, torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float))
    assert stats["mismatch/mis_masked_token_fraction"].item() == pytest.approx(1 / 5)
    assert stats["mismatch/mis_masked_seq_fraction"].item() == pytest.approx(1 / 3)
    # sequence level: row sums 0.3, 1.3, -0.3: row 1 leaves the band and is dropped whole
    mask, stats = masked_importance_sampling(TRAINER, ENGINE, IS_MASK, 0.5, 2.0, level="sequence")
    torch.testing.assert_close(mask, torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float))
    assert stats["mismatch/mis_masked_token_fraction"].item() == pytest.approx(2 / 5)
    assert stats["mismatch/mis_masked_seq_fraction"].item() == pytest.approx(1 / 3)
    # ratios below the band are dropped too: e^-1 < 0.5 per token, and e^-2, e^-2, e^-1 per response
    for level in ("token", "sequence"):
        mask, _ = masked_importance_sampling(ENGINE - 1.0, ENGINE, IS_MASK, 0.5, 2.0, level=level)
        assert mask.sum() == 0, level
    with pytest.raises(ValueError, match=r"0 < low < 1 < high, got \[1.5, 2.0\]"):
        masked_importance_sampling(TRAINER, ENGINE, IS_MASK, 1.5, 2.0)


def test_rollout_correction_masks_then_weights_and_the_loss_skips_dropped_rows():
    weights, mask, stats = rollout_correction(TRAINER, ENGINE, IS_MASK, tis_cap=2.0, tis_level="sequence",
                                              mis_level="sequence", mis_low=0.5, mis_high=2.0)
    torch.testing.assert_close(mask, torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float))
    assert weights[1].abs().sum() == 0 and weights[0, 0].item() == pytest.approx(math.exp(0.3))
    assert set(stats) == {"mismatch/tis_truncated_fraction", "mismatch/mis_masked_token_fraction",
                          "mismatch/mis_masked_seq_fraction"}
    assert stats["mismatch/tis_truncated_fraction"].item() == 0.0  # the truncated row was dropped first
    # the dropped row does not dilute the seq-mean loss (point 1): mean over rows 0 and 2 only
    per_token = torch.tensor([[1.0, 3.0, 0.0], [7.0, 7.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert agg_loss(per_token * weights, mask, "seq_mean_token_mean").item() == pytest.approx(
        (2 * math.exp(0.3) + 4 * math.exp(-0.3)) / 2)
    none, same, no_stats = rollout_correction(TRAINER, ENGINE, IS_MASK)
    assert none is None and same is IS_MASK and no_stats == {}
