"""Hand-written mutants of the algorithm code: break one line at a time on purpose (a sign, a shift by one,
a mask, a temperature) and check that a fast test fails.

    .venv/bin/python scripts/mutants.py            # ~25 s per mutant on 1 core
    .venv/bin/python scripts/mutants.py rl/ppo.py  # only the mutants whose file or name contains a word

Works on a copy of m1_align/ and tests/ in a temporary folder, so the checkout is never modified.
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
MUTANTS = [
    ("m1_align/rl/algorithms.py", "rewards = -kl_coef * kl * mask", "rewards = kl_coef * kl * mask", "KL reward sign"),
    ("m1_align/rl/algorithms.py", "last = (mask.sum(1).long() - 1).clamp_min(0)", "last = (mask.sum(1).long() - 2).clamp_min(0)", "score one token early"),
    ("m1_align/rl/algorithms.py", "count = reduce_sum((mask.sum()).float())", "count = reduce_sum(torch.tensor(float(mask.numel())))", "whitening counts padding"),
    ("m1_align/rl/algorithms.py", "next_value = torch.where(m.bool(), values[:, t], torch.zeros_like(next_value))", "next_value = values[:, t]", "GAE bootstraps from padding"),
    ("m1_align/rl/algorithms.py", "std = (_group_sum(centred**2, inverse, len(counts)) / (n - 1)).sqrt()", "std = (_group_sum(centred**2, inverse, len(counts)) / n).sqrt()", "GRPO biased std"),
    ("m1_align/rl/algorithms.py", "return torch.where(n > 1, (sums - scores) / (n - 1).clamp_min(1), mean)", "return torch.where(n > 1, (sums - scores) / n, mean)", "RLOO denominator"),
    ("m1_align/rl/algorithms.py", "ratio.clamp(1 - clip_low, 1 + clip_high)", "ratio.clamp(1 - clip_low, 1 + clip_low)", "clip-high ignored"),
    ("m1_align/rl/algorithms.py", "per_seq = (loss * mask).sum(1) / tokens.clamp_min(1)", "per_seq = (loss * mask).sum(1) / mask.shape[1]", "seq-mean counts padding"),
    ("m1_align/rl/algorithms.py", "return (torch.expm1(-log_ratio) + log_ratio).clamp(-10.0, 10.0)", "return (torch.expm1(log_ratio) - log_ratio).clamp(-10.0, 10.0)", "k3 direction"),
    ("m1_align/rl/algorithms.py", "running = (token_rewards[:, t] + gamma * running) * mask[:, t]", "running = (token_rewards[:, t] + running) * mask[:, t]", "REINFORCE++ ignores gamma"),
    ("m1_align/rl/algorithms.py", "return torch.exp(trainer_logp.detach() - engine_logp).clamp(max=cap)", "return torch.exp(trainer_logp.detach() - engine_logp)", "TIS not truncated"),
    ("m1_align/rl/algorithms.py", "over = (lengths.float() - (max_new_tokens - buffer)).clamp_min(0)", "over = (lengths.float() - max_new_tokens).clamp_min(0)", "overlong buffer"),
    ("m1_align/rl/algorithms.py", "return per_seq.sum() / _count((tokens > 0).sum(), mean_over_ranks)  # point 1: rows with tokens only", "return per_seq.sum() / _count(torch.tensor(len(tokens)), mean_over_ranks)  # point 1: rows with tokens only", "seq-mean divides by masked rows"),
    ("m1_align/rl/algorithms.py", "return (loss * mask).sum() / _count((mask.sum(1) > 0).sum(), mean_over_ranks)  # point 1", "return (loss * mask).sum() / _count(torch.tensor(mask.shape[0]), mean_over_ranks)  # point 1", "seq-mean-token-sum divides by masked rows"),
    ("m1_align/rl/algorithms.py", 'return (loss * mask).sum() / _fixed_length("seq_mean_token_sum_norm", length)', 'return (loss * mask).sum() / (loss.shape[0] * _fixed_length("seq_mean_token_sum_norm", length))', "verl normaliser with 1/N"),
    ("m1_align/rl/algorithms.py", "losses = torch.where(advantages < 0, torch.min(losses, dual), losses)", "losses = torch.min(losses, dual)", "dual-clip on positive advantages"),
    ("m1_align/rl/algorithms.py", "dual_taken = (advantages < 0) & (losses > dual)", "dual_taken = losses > dual", "pg_clipfrac_lower counts A > 0"),
    ("m1_align/rl/algorithms.py", '"clip/pg_clipfrac": masked_mean((clipped > unclipped).float(), mask),', '"clip/pg_clipfrac": masked_mean((clipped != unclipped).float(), mask),', "pg_clipfrac counts the unclipped branch"),
    ("m1_align/rl/algorithms.py", '"approx_kl/k1": masked_mean(-log_ratio, mask),', '"approx_kl/k1": masked_mean(log_ratio, mask),', "k1 sign"),
    ("m1_align/rl/algorithms.py", "return (torch.expm1(-log_ratio) + log_ratio).clamp(-10.0, 10.0)", "return torch.expm1(-log_ratio) + log_ratio", "k3 not clamped"),
    ("m1_align/rl/algorithms.py", "if (counts < 2).any():", "if False:", "lone sample passes silently"),
    ("m1_align/rl/algorithms.py", "returns = (token_rewards * mask).sum(1)", "returns = token_rewards.sum(1)", "RF++ baseline sums padding"),
    ("m1_align/rl/algorithms.py", "centred = returns - (_group_sum(returns, inverse, len(counts)) / counts.to(returns.dtype))[inverse]", "centred = returns - returns.mean()", "RF++ baseline is the batch mean"),
    ("m1_align/rl/algorithms.py", "seq_log_ratio = log_ratio.sum(1)", "seq_log_ratio = log_ratio.mean(1)", "sequence TIS: a mean, not the product"),
    ("m1_align/rl/algorithms.py", "keep = ((seq_log_ratio >= math.log(low)) & (seq_log_ratio <= math.log(high))).expand_as(mask)", "keep = (seq_log_ratio <= math.log(high)).expand_as(mask)", "sequence MIS ignores the lower bound"),
    ("m1_align/rl/algorithms.py", "keep = (log_ratio >= math.log(low)) & (log_ratio <= math.log(high))", "keep = log_ratio <= math.log(high)", "token MIS ignores the lower bound"),
    ("m1_align/rl/algorithms.py", '"mismatch/mis_masked_seq_fraction": _seq_fraction(dropped, _rows_with_tokens(mask))}', '"mismatch/mis_masked_seq_fraction": dropped.float().mean()}', "MIS seq fraction counts empty rows"),
    ("m1_align/rl/algorithms.py", "mask, stats = masked_importance_sampling(trainer_logp, engine_logp, mask, mis_low, mis_high, mis_level)", "stats = masked_importance_sampling(trainer_logp, engine_logp, mask, mis_low, mis_high, mis_level)[1]", "MIS mask not applied"),
    ("m1_align/rl/algorithms.py", "return (whiten(advantages, x.mask, reduce_sum=x.reduce_sum) if x.whiten_advantages else advantages), returns", "return whiten(advantages, x.mask, reduce_sum=x.reduce_sum), returns", "gae always whitened"),
    ("m1_align/rl/algorithms.py", "return grpo_advantages(x.scores, x.groups, x.mask, std_normalize=False), None", "return grpo_advantages(x.scores, x.groups, x.mask, x.std_normalize), None", "dr_grpo divides by the std"),
    ("m1_align/rl/algorithms.py", "log_ratio = log_ratio.clamp(-20.0, 20.0)  # exp(20)", "log_ratio = log_ratio  # exp(20)", "k3 log-ratio unclamped"),
    ("m1_align/rl/algorithms.py", "log_ratio = (logp - old_logp).clamp(-20.0, 20.0)", "log_ratio = logp - old_logp", "PPO log-ratio unclamped"),
    ("m1_align/logprobs.py", "flat_h = hidden[rows, cols - 1]", "flat_h = hidden[rows, cols]", "log-prob columns off by one"),
    ("m1_align/logprobs.py", "where_col = torch.tensor(offset, device=input_ids.device)[rows] + index[rows, cols] - 1", "where_col = torch.tensor(offset, device=input_ids.device)[rows] + index[rows, cols]", "packed log-prob columns off by one"),
    ("m1_align/rl/ppo.py", "batch.scores, batch.groups, token_rewards, batch.response_mask, batch.old_values, p.gamma, p.lam,", "batch.scores, batch.groups, token_rewards, torch.ones_like(batch.response_mask), batch.old_values, p.gamma, p.lam,", "advantages whitened over padding"),
    ("m1_align/rl/ppo.py", "pg_loss, stats = policy_loss(logp, batch.old_logp[rows],", "pg_loss, stats = policy_loss(logp, (batch.ref_logp if batch.ref_logp is not None else batch.old_logp)[rows],", "ratio against the reference"),
    ("m1_align/rl/ppo.py", "p.whiten_advantages, p.grpo_std_normalize, reduce_sum=self.reduce_sum))", "p.whiten_advantages, reduce_sum=self.reduce_sum))", "grpo_std_normalize dropped at the call"),
    ("m1_align/rl/elo.py", "rewards = answer_logp.detach()", "rewards = answer_logp", "ELO reward not detached"),
    ("m1_align/rollout/weights.py", 'check_adapter(model, "merging the adapter for the engine")', "None", "sync merges an inactive adapter"),
    ("m1_align/rl/loop.py", "if previous is not None and trained and stepped and torch.equal(previous, fingerprint):", "if False:", "unchanged sync passes"),
    ("m1_align/config.py", "if (p.tis_cap is not None or p.mis_level != \"off\") and (r.temperature != 1.0 or r.top_p != 1.0):", "if False:", "correction at another temperature"),
    ("m1_align/rl/ppo.py", "return critic(ids, mask, positions(mask))[:, start - 1 : -1]", "return critic(ids, mask, positions(mask))[:, start:]", "value columns off by one"),
    ("m1_align/logprobs.py", "packed_pos[r, at : at + n] = torch.arange(n, device=input_ids.device)", "packed_pos[r, at : at + n] = torch.arange(at, at + n, device=input_ids.device)", "packed samples attend to each other"),
    ("m1_align/logprobs.py", "z = logits / temperature if temperature != 1.0 else logits", "z = logits", "temperature ignored"),
    ("m1_align/logprobs.py", "h, y = flat_h[begin : begin + chunk_tokens], flat_y[begin : begin + chunk_tokens]", "h, y = flat_h[begin : begin + chunk_tokens], flat_y[begin + 1 : begin + chunk_tokens + 1]", "head chunks misaligned"),
    ("m1_align/rl/elo.py", "reasoning = span_mask([(len(p.prompt), m) for p, m in zip(paths, mids, strict=True)], ids.shape[1], device)", "reasoning = span_mask([(len(p.prompt) + 1, m) for p, m in zip(paths, mids, strict=True)], ids.shape[1], device)", "ELO reasoning span off by one"),
    ("m1_align/logprobs.py", "raw = logp if temperature == 1.0 or not with_raw else", "raw = logp if True else", "temperature-1 log-probs taken at T (ELO reward)"),
    ("m1_align/rl/elo.py", "return score_term - lambda_answer * answer_logp.mean(), stats", "return score_term + lambda_answer * answer_logp.mean(), stats", "ELO pathwise sign"),
    ("m1_align/rl/elo.py", "return tokens[:lo] + (tokenizer.encode(rest, add_special_tokens=False) if rest else [])", "return tokens[:lo]", "straddling token dropped"),
    ("m1_align/preference/trainer.py", "return logits[:, :-1], input_ids.masked_fill(completion_mask == 0, -100)[:, 1:]", "return logits[:, :-1], input_ids.masked_fill(completion_mask == 0, -100)[:, :-1]", "TDPO labels not shifted"),
    ("m1_align/preference/losses.py", "kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [B, c]", "kl = (logp.exp() * (logp - ref_logp)).sum(-1)  # [B, c]", "TDPO reverse KL"),
    ("m1_align/preference/losses.py", "chosen_reward = beta * (chosen.logratio.detach() + kl_term(chosen))", "chosen_reward = beta * chosen.logratio.detach()", "TDPO reward without SeqKL"),
    ("m1_align/reward_models/evaluate.py", 'tokenizer.truncation_side = "left"', 'tokenizer.truncation_side = "right"', "RM cuts the response end"),
    ("m1_align/rewards/router.py", "reward.value -= cfg.length_penalty * response_lengths[i]", "reward.value += cfg.length_penalty * response_lengths[i]", "length penalty sign"),
]
TESTS = ["tests/test_algorithms.py", "tests/test_algorithms_verl.py", "tests/test_rl_loops.py", "tests/test_plumbing.py", "tests/test_ppo.py", "tests/test_elo.py", "tests/test_tdpo_losses.py", "tests/test_rules.py"]


def main() -> int:
    root = pathlib.Path(tempfile.mkdtemp(prefix="m1_mutants_"))
    try:
        for part in ("m1_align", "tests"):
            shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")  # pytest's settings and markers
        survived = []
        chosen = [m for m in MUTANTS if not sys.argv[1:] or any(s in m[0] or s in m[3] for s in sys.argv[1:])]
        for path, old, new, name in chosen:
            f = root / path
            text = f.read_text()
            assert text.count(old) == 1, f"{path}: the line to mutate is gone or repeated: {old}"
            f.write_text(text.replace(old, new))
            try:
                done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS], cwd=root,
                                      capture_output=True, text=True,
                                      env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})
            finally:
                f.write_text(text)
            failing = next((line[7:90] for line in done.stdout.splitlines() if line.startswith("FAILED")), "")
            print(f"{'killed ' if done.returncode else 'SURVIVED'}  {name:40s} {failing}", flush=True)
            if not done.returncode:
                survived.append(name)
        print(f"{len(chosen) - len(survived)} of {len(chosen)} killed")
        return 1 if survived else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
