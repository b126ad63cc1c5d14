"""Every command that runs one stage: its name, one line of help, and its entry point `run(config) -> StageResult`.

The CLI and the pipeline both read this table. Each runner imports its stage when called, so that
`m1-align --help` and config checks do not pay for importing torch, TRL or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from m1_align.runs import StageResult


@dataclass(frozen=True)
class Stage:
    name: str
    help: str

    def run(self, cfg: Any) -> StageResult:
        """Import the stage's module (here, not at start-up) and run it on its validated config."""
        if self.name == "pretrain":
            from m1_align.sft.pretrain import run
        elif self.name == "sft":
            from m1_align.sft.trainer import run
        elif self.name == "elo":
            from m1_align.rl.elo import run
        elif self.name == "tdpo":
            from m1_align.preference.trainer import run
        elif self.name == "rm":
            from m1_align.reward_models.trainer import run
        elif self.name == "ppo":
            from m1_align.rl.ppo import run
        elif self.name == "grpo":
            from m1_align.rl.ppo import run_grpo as run
        elif self.name == "rm-eval":
            from m1_align.reward_models.cli_eval import run
        elif self.name == "eval":
            from m1_align.evaluation.run import run
        else:
            raise KeyError(f"unknown stage {self.name!r}; known: {', '.join(STAGES)}")
        return run(cfg)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("pretrain", "train the tokenizer and a tiny hybrid base model on the medical corpus"),
    Stage("sft", "supervised fine-tuning on conversations (loss on assistant tokens)"),
    Stage("elo", "exploratory log-likelihood optimisation over sampled reasoning paths"),
    Stage("tdpo", "token-level DPO (TDPO1/TDPO2) or plain DPO on preference pairs"),
    Stage("rm", "train a Bradley-Terry reward model on preference pairs"),
    Stage("ppo", "PPO with rule rewards and the medical reward model, vLLM rollouts"),
    Stage("grpo", "critic-free RL (GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO options), same rewards and engine"),
    Stage("rm-eval", "evaluate a reward model: accuracy, calibration, length bias"),
    Stage("eval", "held-out medical evaluation of a model, stage output or run dir"),
)}
