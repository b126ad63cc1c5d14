"""Weights between trainer and engine: LoRA merged on the fly, and the log-prob probe that proves a push arrived."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from m1_align.rollout.engine import StaleWeightsError
from m1_align.training import check_adapter


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the base model's checkpoint names, with active LoRA adapters merged in.

    The merged tensors are new ones: merge_adapter() + unmerge_adapter() would round the trainer's own weights.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return {name: tensor.detach() for name, tensor in model.state_dict().items()}
    check_adapter(model, "merging the adapter for the engine")

    base = model.get_base_model()
    deltas = {}  # module name -> W_delta
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters:
            if any(module.use_dora.get(a, False) for a in module.active_adapters):
                raise NotImplementedError("update_weights does not merge DoRA adapters")
            active = [a for a in module.active_adapters if a in module.lora_A]
            if active:
                deltas[f"{name}.weight"] = sum(module.get_delta_weight(a) for a in active)
    adapter = model.active_adapter
    merged = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name or ".original_module." in name:
            continue  # LoRA factors, and the frozen copy beside a trained `modules_to_save` module
        clean = name.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")
        merged[clean] = (
            tensor.detach() + deltas[clean].to(tensor.dtype) if clean in deltas else tensor.detach()
        )
    return merged


def default_probe(vocab_size: int, length: int = 48) -> list[int]:
    """A fixed pseudo-random token sequence: cheap, and touches many embedding and head rows."""
    generator = torch.Generator().manual_seed(20250214)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


@torch.no_grad()
def model_logprobs(model: torch.nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 under `model`, in fp32: (len(ids) - 1,)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout in the probe
    try:
        logits = model(input_ids=torch.tensor([list(ids)], device=device)).logits[0, :-1].float()
    finally:
        model.train(was_training)
    targets = torch.tensor(list(ids[1:]), device=device)
    return logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0].cpu()


def check_probe(engine_lp: torch.Tensor, model_lp: torch.Tensor, atol: float, engine: str, dtype: torch.dtype) -> float:
    """The probe's largest |log-prob difference| for an fp32 engine, its mean for a 16-bit one; raises above atol.

    In fp32 the two agree to ~1e-5 on every token, so one missed update shows. In 16-bit, rounding alone moves
    single tokens by up to ~0.25 on a 30-layer model (SmolLM2-135M: max 0.21, mean 0.04 against fp32 over a
    64-token probe), so the mean is checked: it catches a push that failed or loaded other weights, not a
    single missed small step."""
    gap = (engine_lp - model_lp).abs()
    diff, what = (float(gap.max()), "up to") if dtype == torch.float32 else (float(gap.mean()), "on average")
    if not diff <= atol:  # also catches NaN
        raise StaleWeightsError(
            f"{engine} log-probs differ from the trainer model's by {what} {diff:.4f} (tolerance {atol}) on the "
            "probe: the engine is not sampling from the current weights (update_weights missing or failed)"
        )
    return diff


def default_atol(dtype: torch.dtype) -> float:
    """Tolerance of check_probe's statistic: the max in fp32 (noise ~1e-5), the mean in 16-bit (noise ~0.04-0.07 on SmolLM2)."""
    return 2e-3 if dtype == torch.float32 else 0.2


def save_merged_model(model: torch.nn.Module, tokenizer: Any, folder: str | os.PathLike) -> None:
    """Save a (LoRA-merged) copy of `model` as a plain checkpoint vLLM can load."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.save_pretrained(folder, state_dict=merged_state_dict(model))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
