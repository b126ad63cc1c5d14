"""The transformers `generate` engine: the fallback where vLLM does not import, and the reference tests hold
vLLM to. Also plain batched greedy decoding, for evaluation on a model in memory."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from m1_align.rollout.engine import Completion, SamplingSettings, eos_ids_of, finish, resolve_stop_ids
from m1_align.rollout.weights import (
    check_probe,
    default_atol,
    default_probe,
    merged_state_dict,
    model_logprobs,
)
from m1_align.training import eager_generation


def accepts(function, name: str) -> bool:
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def repeatable(cache) -> bool:
    """Whether `batch_repeat_interleave` copies all of a cache's state: transformers' dynamic K/V layers (full and
    sliding) and the hybrid model's cache, which repeats its K/V convolution state too. Linear-attention and
    recurrent layers keep state it would not repeat."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    from m1_align.model.modeling import BaichuanM1Cache

    return type(cache) in (DynamicCache, BaichuanM1Cache) and all(
        type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers)


class HFEngine:
    """transformers `generate` on a model in memory. Prompts are left-padded into batches of `batch_size`;
    generate keeps every step's raw logits, (batch_size * n, max_new_tokens, vocab), so keep batches small
    for a large vocabulary.

    If the engine was built on the trainer's own model object, `update_weights` with that object is a no-op;
    otherwise the weights are copied into the engine's model.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_ids = eos_ids_of(model.config, getattr(model, "generation_config", None), tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.dtype = next(model.parameters()).dtype
        # n > 1: prefill each prompt once for its n samples (False: generate's own repetition of the prompt); not
        # where the model's generation config asks for a cache of its own (static, offloaded) or a chunked prefill
        generation_config = getattr(model, "generation_config", None)
        self.share_prefill = not any(getattr(generation_config, name, None)
                                     for name in ("cache_implementation", "prefill_chunk_size"))
        # the shared prefill needs the last position's logits only: no [B, T, V] where the forward can skip them
        self.prefill_head = {"logits_to_keep": 1} if accepts(model.forward, "logits_to_keep") else {}

    @torch.no_grad()
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingSettings
    ) -> list[list[Completion]]:
        from transformers import GenerationConfig

        stop_ids = resolve_stop_ids(params, self.eos_ids)
        greedy = params.temperature == 0
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy else 0,  # no top-k: the settings have none (vLLM's default too)
            max_new_tokens=params.max_new_tokens,
            eos_token_id=stop_ids,  # [] turns off the model's default EOS too
            pad_token_id=self.pad_id,
            num_return_sequences=1 if greedy else params.n,  # greedy: one answer, repeated n times below
            return_dict_in_generate=True,
            output_logits=True,  # raw logits, before temperature / top-p
        )
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        results: list[list[Completion]] = []
        try:
            with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]), eager_generation():
                if params.prompt_seeds is not None:  # prompt by prompt, each from its own seed
                    for ids, seed in zip(prompt_ids, params.prompt_seeds, strict=True):
                        torch.manual_seed(seed)
                        results += self._generate_batch([ids], config, stop_ids)
                else:
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    for start in range(0, len(prompt_ids), self.batch_size):
                        results += self._generate_batch(
                            prompt_ids[start : start + self.batch_size], config, stop_ids
                        )
        finally:
            self.model.train(was_training)
        if greedy and params.n > 1:  # as vLLM: n copies of the one greedy completion
            results = [[copy.copy(c) for _ in range(params.n)] for (c,) in results]
        return results

    def _generate_batch(self, prompts, config, stop_ids) -> list[list[Completion]]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids))
            attention_mask[row, width - len(ids) :] = 1
        n = config.num_return_sequences
        cache = None
        if self.share_prefill and n > 1 and width > 1:
            # generate would repeat each prompt n times before its first forward, so the prompts' FLOPs (often
            # more than the sampling's) are paid n times: prefill each prompt once, without its last token, and
            # let its n samples continue from copies of its cache (the same rows generate would build)
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # padding's positions are masked anyway
            cache = self.model(input_ids=input_ids[:, :-1].to(device), attention_mask=attention_mask[:, :-1].to(device),
                               position_ids=positions[:, :-1].to(device), use_cache=True,
                               **self.prefill_head).past_key_values
            if repeatable(cache):
                cache.batch_repeat_interleave(n)
                input_ids, attention_mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
                config = copy.copy(config)
                config.num_return_sequences = 1
            else:  # a cache with recurrent state (Mamba-style, linear attention...): generate's own way
                self.share_prefill, cache = False, None
        out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                  past_key_values=cache, generation_config=config)
        new_tokens = out.sequences[:, width:].cpu()  # (B*n, steps)
        # one step at a time: a (B*n, steps, V) fp32 copy would not fit for a large vocabulary
        logprobs = torch.stack(
            [
                logits.float().log_softmax(-1).gather(-1, new_tokens[:, step, None].to(logits.device))[:, 0]
                for step, logits in enumerate(out.logits)  # raw logits, (B*n, V) per step
            ],
            dim=1,
        ).cpu()  # (B*n, steps)
        completions = []
        for tokens, lps in zip(new_tokens.tolist(), logprobs.tolist(), strict=True):
            end = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
            completions.append(finish(tokens[:end], lps[:end], stop_ids, self.tokenizer))
        return [completions[i : i + n] for i in range(0, len(completions), n)]

    def update_weights(self, model: torch.nn.Module) -> None:
        if model is not self.model:
            self.model.load_state_dict(merged_state_dict(model), strict=True)

    def verify_weights(
        self, model: torch.nn.Module, probe_ids: Sequence[int] | None = None, atol: float | None = None
    ) -> float:
        ids = list(probe_ids) if probe_ids is not None else default_probe(self.model.config.vocab_size)
        atol = default_atol(self.dtype) if atol is None else atol
        return check_probe(model_logprobs(self.model, ids), model_logprobs(model, ids), atol, "HF generate", self.dtype)

    def close(self) -> None:
        self.model = None


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Batched greedy decoding with left padding; returns the decoded completions."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False, disable=len(prompts) <= batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with eager_generation():
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for row in generated[:, width:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return outputs
