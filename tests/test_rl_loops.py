"""The online loops' own methods on fake rollouts (no sampling): PPO's collect -> advantages -> minibatch
losses and ELO's update, on the tiny hybrid model. One-line bugs at the call sites (whitening over padding,
the ratio taken against the reference, Dr. GRPO dividing by the std anyway, ELO's reward left with a
gradient) pass every test of rl/algorithms.py alone; these catch them."""

from __future__ import annotations

import pytest
import torch
from conftest import stage_overrides

from m1_align.config import ELOConfig, PPOConfig, validate
from m1_align.rollout.engine import Completion

PROMPT_LENGTHS = (5, 9, 3, 7)  # uneven: prompts are left-padded
RESPONSE_LENGTHS = (4, 2, 6, 1)  # uneven: responses are right-padded


def prepared(loop_class, cfg, **kwargs):
    loop = loop_class(cfg, **kwargs)
    loop.prepare()
    return loop


def ppo_cfg(data_cache, tiny_model_dir, tmp_path, **extra) -> PPOConfig:
    values = {"rollout.engine": "hf", "train.max_steps": 1, "train.padding_free": False, "ppo.samples_per_prompt": 2,
              "ppo.prompts_per_step": 2, **extra}
    return validate(PPOConfig, stage_overrides(data_cache, tmp_path / "out", tiny_model_dir, **values), "test")


def fake_samples(loop, scores):
    """Four responses to two prompts (two each), of uneven prompt and response lengths; the engine's
    log-probs are arbitrary (they only enter the logged mismatch)."""
    from m1_align.rl.ppo import Sample

    generator = torch.Generator().manual_seed(0)
    vocab = loop.policy.config.vocab_size
    samples = []
    for i, (p, r) in enumerate(zip(PROMPT_LENGTHS, RESPONSE_LENGTHS, strict=True)):
        prompt = torch.randint(5, vocab, (p,), generator=generator).tolist()
        tokens = torch.randint(5, vocab, (r,), generator=generator).tolist()
        completion = Completion(tokens, [-1.0] * r, "stop" if i != 2 else "length", "")
        samples.append(Sample({"prompt": []}, prompt, completion, scores[i], "rule:test"))
    return samples


def perturb(model, scale: float = 0.05):
    """Move the policy away from its reference, so reference log-probs differ from the rollout's."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def test_ppo_batch_layout_advantages_and_first_ratio(data_cache, tiny_model_dir, tmp_path):
    from m1_align.rl.ppo import PPOLoop

    # two epochs of two minibatches and a KL reward: not the on-policy shortcut; a reference that differs
    cfg = ppo_cfg(data_cache, tiny_model_dir, tmp_path, **{"ppo.ppo_epochs": 2, "ppo.minibatch_size": 2,
                                                          "ppo.kl_coef": 0.1})
    loop = prepared(PPOLoop, cfg, needs_reference=True)
    perturb(loop.policy)
    samples = fake_samples(loop, [1.0, 0.0, 0.5, -1.0])
    batch = loop.collect(samples)
    assert not batch.on_policy

    # prompts end, and responses start, in one column
    for i, s in enumerate(samples):
        assert batch.ids[i, batch.start - len(s.prompt) : batch.start].tolist() == s.prompt
        assert batch.ids[i, batch.start : batch.start + len(s.completion.token_ids)].tolist() == s.completion.token_ids
    assert batch.response_mask.sum(1).tolist() == list(RESPONSE_LENGTHS)
    assert (batch.ref_logp - batch.old_logp).abs().max() > 1e-3  # the reference is not the policy

    loop.advantages(batch)
    real = batch.response_mask.bool()
    # GAE whitened over real tokens only: zero mean, unit variance there, zero on padding
    assert batch.advantages[~real].abs().max().item() == 0
    assert batch.advantages[real].mean().item() == pytest.approx(0.0, abs=1e-5)
    assert batch.advantages[real].var(unbiased=False).item() == pytest.approx(1.0, rel=1e-3)
    assert batch.returns is not None

    # before any update the ratio is 1 on every token and nothing is clipped
    _, stats = loop.minibatch_losses(batch, torch.arange(2))
    assert stats["ratio/max_dev"].item() < 1e-5
    assert stats["clip/ratio_outside_fraction"].item() == 0
    assert stats["clip/pg_clipfrac"].item() == 0


@pytest.mark.parametrize("estimator", [{"ppo.advantage_estimator": "grpo", "ppo.grpo_std_normalize": False},
                                       {"ppo.advantage_estimator": "dr_grpo"}])
def test_dr_grpo_advantages_are_mean_centred_only(estimator, data_cache, tiny_model_dir, tmp_path):
    from m1_align.rl.ppo import GRPOLoop

    cfg = ppo_cfg(data_cache, tiny_model_dir, tmp_path, **{"ppo.kl_coef": 0.0, "ppo.kl_loss_coef": 0.0, "ppo.ppo_epochs": 1,
                                                          "ppo.minibatch_size": 4, **estimator})
    loop = prepared(GRPOLoop, cfg, needs_reference=False)
    batch = loop.collect(fake_samples(loop, [1.0, 0.0, 3.0, 1.0]))
    assert batch.on_policy  # one update, one minibatch, no KL in the reward
    loop.advantages(batch)
    expected = torch.tensor([0.5, -0.5, 1.0, -1.0])[:, None] * batch.response_mask  # score - group mean
    assert torch.allclose(batch.advantages, expected, atol=1e-6)
    _, stats = loop.minibatch_losses(batch, torch.arange(4))  # on-policy: old log-probs from this forward
    assert stats["ratio/max_dev"].item() == 0


def test_grpo_advantages_divide_by_the_group_std(data_cache, tiny_model_dir, tmp_path):
    from m1_align.rl.ppo import GRPOLoop

    cfg = ppo_cfg(data_cache, tiny_model_dir, tmp_path, **{"ppo.advantage_estimator": "grpo", "ppo.kl_loss_coef": 0.0})
    loop = prepared(GRPOLoop, cfg, needs_reference=False)
    batch = loop.collect(fake_samples(loop, [1.0, 0.0, 3.0, 1.0]))
    loop.advantages(batch)
    std = 2**-0.5 * torch.tensor([1.0, 1.0, 2.0, 2.0])  # the unbiased std of each pair
    expected = (torch.tensor([0.5, -0.5, 1.0, -1.0]) / (std + 1e-6))[:, None] * batch.response_mask
    assert torch.allclose(batch.advantages, expected, atol=1e-5)


def test_elo_gradient_is_eq3_plus_the_pathwise_term(data_cache, tiny_model_dir, tmp_path):
    from m1_align.rl.elo import ELOLoop, ReasoningPath, path_batch, path_logprobs

    lam = 0.3
    cfg = validate(ELOConfig, stage_overrides(data_cache, tmp_path / "elo", tiny_model_dir, **{
        "rollout.engine": "hf", "train.max_steps": 1, "train.padding_free": False, "elo.lambda_answer": lam,
        "elo.kl_coef": 0.0, "elo.epochs_per_batch": 1}), "test")
    loop = prepared(ELOLoop, cfg)
    generator = torch.Generator().manual_seed(2)
    tokens = lambda n: torch.randint(5, loop.policy.config.vocab_size, (n,), generator=generator).tolist()  # noqa: E731
    paths = [ReasoningPath(g, tokens(p), tokens(r), tokens(a))
             for g, p, r, a in ((0, 4, 3, 2), (0, 4, 5, 2), (1, 6, 2, 3), (1, 6, 4, 3), (1, 6, 1, 3))]
    for i in (1, 4):  # two paths share their question's prompt
        paths[i].prompt = paths[i - 1].prompt

    captured = {}

    def capture(losses):  # backward only: the gradient the step would take
        losses["policy"].backward()
        captured.update({n: p.grad.clone() for n, p in loop.policy.named_parameters() if p.grad is not None})
        loop.policy.zero_grad(set_to_none=True)
        return 0.0

    loop.optimizer_step = capture
    loop.update(paths)

    # eq. 3 by hand: -mean_k (r_k - b_k) sum_t grad log pi(c_kt), r_k = log pi(A | Q, c_k) held fixed, b_k the
    # mean of its question's r; plus the pathwise term -lambda mean_k grad r_k
    batch = path_batch(paths, loop.tokenizer.pad_token_id, loop.device)
    reasoning_logp, answer_logp = path_logprobs(loop.policy, batch, 1.0, False)
    r = answer_logp.detach()
    b = torch.stack([r[:2].mean()] * 2 + [r[2:].mean()] * 3)
    loss = -((r - b) * reasoning_logp.sum(1)).mean() - lam * answer_logp.mean()
    loss.backward()
    expected = {n: p.grad for n, p in loop.policy.named_parameters() if p.grad is not None}
    assert captured.keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.allclose(captured[name], grad, atol=1e-6, rtol=1e-4), name


def tiny_lora_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def test_an_empty_or_inactive_adapter_fails_loudly_on_save_and_sync():
    from m1_align.rollout.weights import merged_state_dict
    from m1_align.training import AdapterError, check_adapter

    model = tiny_lora_llama()
    check_adapter(model, "fine")
    model.base_model.disable_adapter_layers()  # the engine would get the base model's weights
    with pytest.raises(AdapterError, match="no LoRA layer is active"):
        merged_state_dict(model)
    model.base_model.enable_adapter_layers()
    for module in model.modules():  # an adapter that was never loaded: no LoRA factors at all
        for factors in ("lora_A", "lora_B"):
            if "default" in getattr(module, factors, {}):
                del getattr(module, factors)["default"]
    with pytest.raises(AdapterError, match="holds no weights"):
        check_adapter(model, "saving runs/x/adapter")


def test_a_sync_of_unchanged_weights_after_a_real_step_fails_loudly():
    from m1_align.rl.loop import OnlineLoop
    from m1_align.rollout.engine import StaleWeightsError

    loop = OnlineLoop(cfg=None)
    model = tiny_lora_llama()
    loop.check_weights_moved(model)  # the first sync has nothing to compare with
    loop.check_weights_moved(model)  # no optimiser step in between (lr 0 under warm-up, or no gradient): fine
    loop.stepped_since_sync = (1e-4, 0.5)
    with pytest.raises(StaleWeightsError, match="did not change since the last sync"):
        loop.check_weights_moved(model)
    loop.stepped_since_sync = (1e-4, 0.5)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1e-3)
    loop.check_weights_moved(model)


def test_mismatch_correction_needs_the_sampled_distribution():
    from m1_align.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.temperature=1 and rollout.top_p=1"):
        validate(PPOConfig, {"ppo": {"tis_cap": 2.0}, "rollout": {"temperature": 0.7}}, "test")
    with pytest.raises(ConfigError, match="rollout.temperature=1 and rollout.top_p=1"):
        validate(PPOConfig, {"ppo": {"mis_level": "sequence"}, "rollout": {"top_p": 0.9}}, "test")
    validate(PPOConfig, {"ppo": {"tis_cap": 2.0, "mis_level": "token"}}, "test")
