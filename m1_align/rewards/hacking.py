"""Signs that the policy games its reward instead of getting better: each step, where its rewards came from
and how strongly the reward model's scores follow response length on the policy's own samples; at each
evaluation, the training reward rising while a held-out measure that nothing trains on falls (the pattern
reported for rubric-rewarded medical RL, where the training score rose as an independent judge's fell)."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from m1_align.config import HackingGuardSection


def batch_reward_metrics(sources: Sequence[str], known_sources: Iterable[str], model_scores: Sequence[float | None],
                         lengths: Sequence[int]) -> dict[str, float]:
    """reward/share:<source>, the fraction of the batch's responses each scorer scored (0 for a known source that
    scored none this step, so averages over steps and ranks count it), and reward/rm_length_corr, the Pearson
    correlation of the reward model's raw scores with the response lengths over the responses it scored (left out
    with fewer than 2 of them, or when the lengths or the scores do not vary)."""
    metrics = {f"reward/share:{s}": 0.0 for s in known_sources}
    for source in sources:
        metrics[f"reward/share:{source}"] = metrics.get(f"reward/share:{source}", 0.0) + 1 / len(sources)
    pairs = [(score, length) for score, length in zip(model_scores, lengths, strict=True) if score is not None]
    corr = pearson([s for s, _ in pairs], [float(n) for _, n in pairs])
    if corr is not None:
        metrics["reward/rm_length_corr"] = corr
    return metrics


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 2:
        return None
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


@dataclass(frozen=True)
class Trend:
    """Least-squares line through (step, value): its slope and the slope's standard error from the scatter
    about the line, se = sqrt(sum(residual^2) / (n - 2) / sum((step - mean step)^2))."""

    slope: float
    se: float

    @property
    def t(self) -> float:
        """Slope in standard errors; a perfect line (se 0) counts as infinitely sure of its sign."""
        if self.se > 0:
            return self.slope / self.se
        return math.copysign(math.inf, self.slope) if self.slope else 0.0


def trend(steps: Sequence[float], values: Sequence[float]) -> Trend:
    n = len(steps)
    if n < 3:
        raise ValueError(f"a trend with a standard error needs 3 or more points, got {n}")
    ms, mv = sum(steps) / n, sum(values) / n
    sxx = sum((s - ms) ** 2 for s in steps)
    if sxx == 0:
        raise ValueError("a trend needs points at different steps")
    slope = sum((s - ms) * (v - mv) for s, v in zip(steps, values, strict=True)) / sxx
    residuals = [v - mv - slope * (s - ms) for s, v in zip(steps, values, strict=True)]
    return Trend(slope, math.sqrt(sum(r * r for r in residuals) / (n - 2) / sxx))


@dataclass(frozen=True)
class Verdict:
    hacking: bool
    train: Trend | None = None  # None: too few evaluations yet
    heldout: Trend | None = None
    message: str = ""


def reward_hacking(history: Sequence[tuple[int, float, float]], window: int, threshold: float) -> Verdict:
    """The guard's rule on (step, training reward, held-out measure) per evaluation: over the last `window`
    evaluations the training reward's trend is above +threshold standard errors and the held-out measure's below
    -threshold. Fewer than `window` evaluations: no verdict (not hacking)."""
    if len(history) < window:
        return Verdict(False)
    recent = history[-window:]
    steps = [float(step) for step, _, _ in recent]
    train, heldout = trend(steps, [r for _, r, _ in recent]), trend(steps, [h for _, _, h in recent])
    hacking = train.t > threshold and heldout.t < -threshold
    message = (f"over steps {recent[0][0]}-{recent[-1][0]} the training reward rose ({train.slope:+.3g}/step, "
               f"t {train.t:+.1f}) while the held-out measure fell ({heldout.slope:+.3g}/step, t {heldout.t:+.1f})")
    return Verdict(hacking, train, heldout, message if hacking else "")


class HackingGuard:
    """The rule wired into a training loop: `observe` every step's metrics, `check` at each evaluation. The
    training reward of an evaluation is the mean of train_metric over the steps since the one before."""

    def __init__(self, cfg: HackingGuardSection):
        self.cfg = cfg
        self.history: list[tuple[int, float, float]] = []
        self.pending: list[float] = []

    def observe(self, metrics: dict[str, float]) -> None:
        value = metrics.get(self.cfg.train_metric)
        if value is not None and math.isfinite(value):
            self.pending.append(value)

    def check(self, step: int, evaluation: dict[str, float]) -> tuple[Verdict, dict[str, float]]:
        """The verdict after the evaluation at `step`, and the guard/ metrics to log with it."""
        heldout = evaluation.get(self.cfg.heldout_metric)
        if self.pending and heldout is not None and math.isfinite(heldout):
            self.history.append((step, sum(self.pending) / len(self.pending), heldout))
        self.pending = []
        verdict = reward_hacking(self.history, self.cfg.window, self.cfg.threshold)
        metrics = {"guard/reward_hacking": float(verdict.hacking)}
        if verdict.train is not None:
            finite = {"guard/train_trend_t": verdict.train.t, "guard/heldout_trend_t": verdict.heldout.t}
            metrics.update({k: v for k, v in finite.items() if math.isfinite(v)})
        return verdict, metrics


def hacking_guard(cfg, initial: dict[str, float]) -> HackingGuard | None:
    """The guard of a stage config (its reward.hacking section), checked against the initial evaluation's metrics:
    None where the stage has no reward section, the check is off or no evaluation runs during training."""
    section = getattr(getattr(cfg, "reward", None), "hacking", None)
    if section is None or section.heldout_metric is None or not cfg.train.eval_steps:
        return None
    if not initial:
        print("warning: no held-out evaluation in this stage (no eval questions): the reward-hacking check is off",
              file=sys.stderr)
        return None
    if section.heldout_metric not in initial:
        from m1_align.config import ConfigError

        known = ", ".join(sorted(initial))
        raise ConfigError(f"reward.hacking.heldout_metric={section.heldout_metric} is not a metric of the evaluation "
                          f"(it reports {known}); name one of them, or set reward.hacking.heldout_metric=null")
    return HackingGuard(section)
