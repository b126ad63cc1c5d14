"""Rollout engines: sample completions from the policy, and keep the sampler's weights equal to the trainer's."""

from m1_align.rollout.engine import Completion, RolloutEngine, SamplingSettings, StaleWeightsError
from m1_align.rollout.factory import engine_kind, engine_max_len, make_engine, stage_engine, vllm_available

__all__ = ["Completion", "RolloutEngine", "SamplingSettings", "StaleWeightsError", "engine_kind", "engine_max_len",
           "make_engine", "stage_engine", "vllm_available"]
