"""Every command that runs one stage: its name, one line of help, and its entry point `run(config) -> StageResult`.

The CLI and the pipeline both read this table. Each runner imports its stage when called, so that
`m1-align --help` and config checks do not pay for importing torch, TRL or vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from m1_align.runs import StageResult


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    run: Callable[[Any], StageResult]


def _pretrain(cfg):
    from m1_align.sft.pretrain import run

    return run(cfg)


def _sft(cfg):
    from m1_align.sft.trainer import run

    return run(cfg)


def _elo(cfg):
    from m1_align.rl.elo import run

    return run(cfg)


def _tdpo(cfg):
    from m1_align.preference.trainer import run

    return run(cfg)


def _rm(cfg):
    from m1_align.reward_models.trainer import run

    return run(cfg)


def _ppo(cfg):
    from m1_align.rl.ppo import run

    return run(cfg)


def _grpo(cfg):
    from m1_align.rl.ppo import run_grpo

    return run_grpo(cfg)


def _rm_eval(cfg):
    from m1_align.reward_models.cli_eval import run

    return run(cfg)


def _eval(cfg):
    from m1_align.evaluation.run import run

    return run(cfg)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("pretrain", "train the tokenizer and a tiny hybrid base model on the medical corpus", _pretrain),
    Stage("sft", "supervised fine-tuning on conversations (loss on assistant tokens)", _sft),
    Stage("elo", "exploratory log-likelihood optimisation over sampled reasoning paths", _elo),
    Stage("tdpo", "token-level DPO (TDPO1/TDPO2) or plain DPO on preference pairs", _tdpo),
    Stage("rm", "train a Bradley-Terry reward model on preference pairs", _rm),
    Stage("ppo", "PPO with rule rewards and the medical reward model, vLLM rollouts", _ppo),
    Stage("grpo", "critic-free RL (GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO options), same rewards and engine", _grpo),
    Stage("rm-eval", "evaluate a reward model: accuracy, calibration, length bias", _rm_eval),
    Stage("eval", "held-out medical evaluation of a model, stage output or run dir", _eval),
)}
