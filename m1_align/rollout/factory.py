"""Choosing an engine: `make_engine` for a model or a folder, `stage_engine` from a stage's config."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

from m1_align.config import ConfigError
from m1_align.rollout.engine import RolloutEngine
from m1_align.rollout.hf_engine import HFEngine
from m1_align.rollout.vllm_engine import VLLMEngine
from m1_align.rollout.weights import save_merged_model
from m1_align.training import compute_dtype

logger = logging.getLogger(__name__)




def engine_max_len(model_config: Any, wanted: int) -> int:
    """The engine's context: prompt budget + new tokens, but never past the model's position table
    (vLLM refuses a max_model_len above max_position_embeddings)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    return min(wanted, int(limit)) if limit else wanted


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    # ImportError, or a broken install (e.g. a torchvision built for another torch)
    except Exception as error:
        logger.warning("vLLM is not usable here (%s); rollouts use HF generate", error)
        return False
    return True


def engine_kind(engine: str) -> str:
    """`rollout.engine` resolved: "auto" is vLLM where it imports, else HF generate."""
    return engine if engine != "auto" else ("vllm" if vllm_available() else "hf")


def stage_engine(cfg: Any, model_dir: Path, tokenizer: Any, *, model_config: Any = None, world_size: int = 1, rank: int = 0,
                 policy: torch.nn.Module | None = None) -> RolloutEngine:
    """The engine a training stage samples with, from its config (`rollout`, `model.dtype`, `train.max_length`,
    `seed`). vLLM reads `model_dir` and samples in the dtype of the trainer's forward, so that its log-probs
    match the trainer's; with several processes each rank runs its own in-process engine inside the trainer's
    process group (vLLM's external_launcher), seeded `seed + rank`. HF generate samples from `policy` when given
    (the online stages' live model), else loads `model_dir`. `model_config` (vLLM only) defaults to model_dir's."""
    r = cfg.rollout
    if engine_kind(r.engine) == "hf":
        return make_engine("hf", model=policy, model_dir=None if policy is not None else model_dir, tokenizer=tokenizer)
    if world_size > 1 and (r.tensor_parallel_size > 1 or not r.in_process):
        raise ConfigError("with several processes every rank runs its own in-process vLLM engine; "
                          "set rollout.tensor_parallel_size=1 and rollout.in_process=true")
    if model_config is None:
        from transformers import AutoConfig

        import m1_align.model  # noqa: F401  registers baichuan_m1 with AutoConfig

        model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    return make_engine(
        "vllm", model_dir=str(model_dir), tokenizer=tokenizer,
        dtype=str(compute_dtype(cfg.model.dtype)).removeprefix("torch."), kv_cache_gib=r.kv_cache_gib,
        gpu_memory_utilization=r.gpu_memory_utilization, tensor_parallel_size=r.tensor_parallel_size,
        enforce_eager=r.enforce_eager, in_process=r.in_process, seed=cfg.seed + rank,
        max_model_len=engine_max_len(model_config, cfg.train.max_length + r.max_new_tokens),
        **({"distributed_executor_backend": "external_launcher"} if world_size > 1 else {}),
    )


class _OwnedCheckpoint(VLLMEngine):
    """A VLLMEngine on a checkpoint it wrote itself (from a model in memory); deletes it on close."""

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.model_dir, ignore_errors=True)


def make_engine(
    kind: Literal["auto", "vllm", "hf"] = "auto",
    *,
    model: torch.nn.Module | None = None,
    model_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
    **engine_kwargs: Any,
) -> RolloutEngine:
    """An engine of the given kind; "auto" is vLLM when it imports, else HF generate.

    vLLM reads `model_dir`; given only `model` (and `tokenizer`), they are saved to a temporary checkpoint
    first. HF generate uses `model`, or loads `model_dir` with AutoModelForCausalLM. `engine_kwargs` go to
    the engine's constructor.
    """
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
    if model is None and model_dir is None:
        raise ValueError("make_engine needs a model or a model_dir")
    if kind == "hf":
        if model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            import m1_align.model  # noqa: F401  registers baichuan_m1

            model = AutoModelForCausalLM.from_pretrained(model_dir)
            if tokenizer is None and (Path(model_dir) / "tokenizer_config.json").exists():
                tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return HFEngine(model, tokenizer, **engine_kwargs)
    if kind != "vllm":
        raise ValueError(f"unknown rollout engine {kind!r}; choose auto, vllm or hf")
    if model_dir is not None:
        return VLLMEngine(model_dir, tokenizer=tokenizer, **engine_kwargs)
    folder = tempfile.mkdtemp(prefix="m1_align_rollout_model_")
    save_merged_model(model, tokenizer, folder)
    return _OwnedCheckpoint(folder, tokenizer=tokenizer, **engine_kwargs)
