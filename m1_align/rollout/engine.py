"""The rollout engine interface: what the online stages, evaluation and pair sampling ask of an engine.

Two engines implement it (`m1_align.rollout.vllm_engine`, `m1_align.rollout.hf_engine`); `make_engine` /
`stage_engine` (`m1_align.rollout.factory`) pick one.

Both take token ids and return, per prompt, `n` `Completion`s with the sampled token ids and the
log-probability of each sampled token under the model's own distribution: log_softmax of the raw logits,
before temperature, top-p or any other processing (vLLM: `logprobs_mode="raw_logprobs"`; HF: the
`output_logits` of generate). At temperature 1 and top_p 1 that is the sampling distribution; otherwise it
is the policy's log-prob, not the sampler's. Each engine computes it from logits in its own dtype (16-bit
for a bf16 engine: about 0.02 from an fp32 recomputation), so PPO recomputes log-probs in the trainer and
uses these for logging and sanity checks only.

After every policy update, `update_weights(model)` pushes the trainer's weights (LoRA merged on the fly,
the trainer's model untouched) and `verify_weights(model)` compares log-probs on a probe sequence, raising
`StaleWeightsError` if the engine still samples from other weights (`m1_align.rollout.weights`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

FinishReason = Literal["stop", "length"]

@dataclass(frozen=True)
class SamplingSettings:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS ids; () never stops early
    seed: int | None = None  # same seed, prompts and weights -> same samples (per engine)
    # one seed per prompt (overrides seed): a prompt's samples then do not depend on the other prompts of the
    # call, so a batch split over several processes samples what one process would (exactly with HF generate and
    # vLLM on CPU, which sample prompt by prompt; on a GPU vLLM's logits can still differ with the batch)
    prompt_seeds: tuple[int, ...] | None = None


@dataclass
class Completion:
    token_ids: list[int]  # the sampled tokens, the stop token included when finish_reason == "stop"
    logprobs: list[float]  # log p(token_ids[i] | prompt, token_ids[:i]) under the raw model distribution
    finish_reason: FinishReason  # "stop": a stop token was sampled; "length": max_new_tokens reached
    text: str  # decoded token_ids without the stop token ("" when the engine has no tokenizer)


class StaleWeightsError(RuntimeError):
    """The engine's log-probs differ from the trainer model's: its weights were not (fully) updated."""


class RolloutEngine(Protocol):
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingSettings
    ) -> list[list[Completion]]:
        """n completions for each prompt, in prompt order."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Load the trainer's current weights (a transformers model, or a peft model around one)."""
        ...

    def verify_weights(
        self, model: torch.nn.Module, probe_ids: Sequence[int] | None = None, atol: float | None = None
    ) -> float:
        """|log-prob difference| between engine and model on a probe (max in fp32, mean in 16-bit: check_probe);
        raises StaleWeightsError above atol."""
        ...

    def close(self) -> None: ...


def resolve_stop_ids(params: SamplingSettings, eos_ids: Sequence[int]) -> list[int]:
    return list(eos_ids) if params.stop_token_ids is None else list(params.stop_token_ids)


def eos_ids_of(config: Any, generation_config: Any = None, tokenizer: Any = None) -> list[int]:
    """EOS ids from the generation config, else the model config, else the tokenizer."""
    for source in (generation_config, config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


def finish(
    token_ids: list[int], logprobs: list[float], stop_ids: Sequence[int], tokenizer: Any
) -> Completion:
    stopped = bool(token_ids) and token_ids[-1] in stop_ids
    text = ""
    if tokenizer is not None:
        text = tokenizer.decode(token_ids[:-1] if stopped else token_ids, skip_special_tokens=True)
    return Completion(token_ids, logprobs, "stop" if stopped else "length", text)
