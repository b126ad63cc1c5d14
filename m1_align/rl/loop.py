"""The loop around an online RL algorithm (ELO, PPO): models, optimiser, rollout engine, resume,
checkpoints, metrics and the final save. An algorithm subclasses `OnlineLoop` and writes `step`."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from m1_align.config import StageConfig
from m1_align.evaluation.benchmarks import prompt_ids, verifiable_sets
from m1_align.rl.common import CHECKPOINT_DIR, load_checkpoint, load_optimizers, save_checkpoint
from m1_align.rl.rollout import SamplingSettings, make_engine, vllm_available
from m1_align.runs import (
    MetricsLogger,
    StageResult,
    atomic_replace_dir,
    atomic_write_text,
    prepare_output_dir,
)
from m1_align.training import (
    load_model,
    load_tokenizer,
    peft_config,
    resolve_dtype,
    resolve_model_dir,
    write_json,
)


@dataclass
class Trainable:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object


class OnlineLoop:
    stage = "online"

    def __init__(self, cfg: StageConfig, needs_reference: bool = False):
        self.cfg = cfg
        self.needs_reference = needs_reference
        self.last_eval_completions: list[list[int]] = []

    # -- to be written by the algorithm ------------------------------------------------------
    def setup(self) -> None: ...

    def total_steps(self) -> int: ...

    def step(self, step: int) -> dict[str, float]: ...

    def evaluate(self) -> dict[str, float]:
        return self.answer_accuracy(self.eval_set)

    def setup_trainables(self) -> None:
        """Add models besides the policy (PPO's critic) with `add_trainable`."""

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None: ...

    # -- shared machinery -----------------------------------------------------------------------
    def sampling(self, n: int = 1, greedy: bool = False) -> SamplingSettings:
        r = self.cfg.rollout
        return SamplingSettings(
            n=n,
            temperature=0.0 if greedy else r.temperature,
            top_p=1.0 if greedy else r.top_p,
            max_new_tokens=r.max_new_tokens,
            stop_token_ids=[self.tokenizer.eos_token_id],
            seed=self.cfg.seed,
        )

    def optimizer_step(self, loss: torch.Tensor, names: tuple[str, ...] = ("policy",)) -> float:
        """Backward once, then clip and step the optimiser of every named model; returns the first grad norm."""
        self.accelerator.backward(loss)
        norms = []
        for name in names:
            part = self.trainables[name]
            norms.append(float(self.accelerator.clip_grad_norm_(part.model.parameters(), self.cfg.train.max_grad_norm)))
            part.optimizer.step()
            part.scheduler.step()
            part.optimizer.zero_grad(set_to_none=True)
        return norms[0]

    def prompt_batch(self, step: int, per_step: int) -> list[dict]:
        """The prompts of one step: a fresh seeded shuffle every epoch, so a resumed run sees the same order."""
        order = list(range(len(self.rows)))
        epoch, offset = divmod(step * per_step, len(order))
        random.Random(self.cfg.seed + epoch).shuffle(order)
        return [self.rows[order[(offset + i) % len(order)]] for i in range(per_step)]

    @property
    def reference_model(self):
        return self.reference if self.reference is not None else self.policy

    def reference_context(self):
        """With LoRA the reference is the policy with its adapter switched off."""
        if self.reference is not None:
            return contextlib.nullcontext()
        return self.accelerator.unwrap_model(self.policy).disable_adapter()

    def add_trainable(self, name: str, model, learning_rate: float) -> None:
        """Register a model the loop optimises, checkpoints and resumes (policy; PPO adds the critic)."""
        t = self.cfg.train
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=t.adam_betas, weight_decay=t.weight_decay)
        total = self.total_steps() * self.updates_per_step()
        names = {"cosine": "cosine", "wsd": "warmup_stable_decay", "linear": "linear", "constant": "constant_with_warmup"}
        extra = {"num_decay_steps": max(1, int(t.decay_ratio * total))} if t.lr_scheduler == "wsd" else None
        scheduler = get_scheduler(
            names[t.lr_scheduler], optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total),
            num_training_steps=total, scheduler_specific_kwargs=extra,
        )
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self.trainables[name] = Trainable(model, optimizer, scheduler)

    def updates_per_step(self) -> int:
        """Optimiser steps per loop step (for the LR schedule's length)."""
        return 1

    def answer_accuracy(self, rows: list[dict]) -> dict[str, float]:
        """Greedy answers through the rollout engine, checked by each row's rule (as `m1-align eval` does)."""
        if not rows:
            return {}

        def generate(prompts):
            outputs = self.engine.generate([prompt_ids(self.tokenizer, p) for p in prompts], self.sampling(greedy=True))
            self.last_eval_completions = [o[0].token_ids for o in outputs]
            return [o[0].text for o in outputs]

        return verifiable_sets(rows, generate)[0]

    def _make_engine(self, model_dir: Path):
        """vLLM reads the starting checkpoint and is then kept in sync; HF generate samples from the policy itself."""
        r, policy = self.cfg.rollout, self.accelerator.unwrap_model(self.policy)
        kind = r.engine if r.engine != "auto" else ("vllm" if vllm_available() else "hf")
        if kind == "hf":
            return make_engine("hf", model=policy, tokenizer=self.tokenizer)
        threads = torch.get_num_threads()
        engine = make_engine(
            # the engine samples in the trainer's dtype, so its log-probs match the trainer's (vLLM's CPU default is bf16)
            "vllm", model_dir=str(model_dir), tokenizer=self.tokenizer,
            dtype=str(resolve_dtype(self.cfg.model.dtype)).removeprefix("torch."),
            kv_cache_gib=r.kv_cache_gib, gpu_memory_utilization=r.gpu_memory_utilization,
            tensor_parallel_size=r.tensor_parallel_size, enforce_eager=r.enforce_eager, in_process=r.in_process,
            seed=self.cfg.seed, max_model_len=self.cfg.train.max_length + r.max_new_tokens,
        )
        torch.set_num_threads(threads)  # in-process vLLM on CPU drops torch to one thread; the trainer wants them all
        return engine

    def _load_models(self, model_dir: Path) -> None:
        cfg = self.cfg
        self.policy = load_model(cfg.model, model_dir=model_dir)
        self.reference = None
        if self.needs_reference and not cfg.model.lora.enabled:  # LoRA: the adapter-disabled policy
            self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()
        if cfg.model.lora.enabled:
            from peft import get_peft_model

            self.policy = get_peft_model(self.policy, peft_config(cfg.model.lora))

    def _resume(self, output_dir: Path) -> int:
        state = load_checkpoint(output_dir)
        if state is None:
            return 0
        for name, part in self.trainables.items():
            weights_dir = output_dir / CHECKPOINT_DIR / name
            weights = {}
            for file in sorted(weights_dir.glob("*.safetensors")):
                weights.update(load_file(str(file)))
            model = self.accelerator.unwrap_model(part.model)
            if self.cfg.model.lora.enabled and name == "policy":
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(model, weights)
                continue
            # tied or re-derived weights may be absent from the file; anything else must match
            missing, unexpected = model.load_state_dict(weights, strict=False)
            if unexpected or len(missing) > 1:
                raise RuntimeError(f"checkpoint {weights_dir} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
            part.scheduler.load_state_dict(state["schedulers"][name])
        load_optimizers(output_dir, {name: part.optimizer for name, part in self.trainables.items()})
        self.load_extra_state(state)
        return state["step"]

    def save_checkpoint(self, step: int) -> None:
        models = {name: self.accelerator.unwrap_model(part.model) for name, part in self.trainables.items()}
        optimizers = {name: part.optimizer for name, part in self.trainables.items()}
        state = {"schedulers": {name: part.scheduler.state_dict() for name, part in self.trainables.items()}, **self.extra_state()}
        save_checkpoint(self.output_dir, step, models, optimizers, state)

    def save_final(self) -> None:
        model = self.accelerator.unwrap_model(self.policy)
        tmp = self.output_dir / ".model.tmp"
        if self.cfg.model.lora.enabled:
            model.save_pretrained(str(self.output_dir / ".adapter.tmp"), safe_serialization=True)
            atomic_replace_dir(self.output_dir / ".adapter.tmp", self.output_dir / "adapter")
            model = model.merge_and_unload() if self.cfg.model.lora.merge_on_save else model
        model.save_pretrained(str(tmp), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tmp))
        from m1_align.config import dump_config

        atomic_write_text(tmp / "m1_align_config.yaml", dump_config(self.cfg))
        atomic_replace_dir(tmp, self.output_dir / "model")

    def run(self) -> StageResult:
        start = time.time()
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.output_dir = prepare_output_dir(cfg.output_dir, cfg.overwrite)
        dtype = resolve_dtype(cfg.model.dtype)
        self.accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
        self.device = self.accelerator.device
        model_dir = resolve_model_dir(cfg.model.path)
        self.tokenizer = load_tokenizer(cfg.model, model_dir)
        self._load_models(model_dir)
        self.setup()
        total = self.total_steps()
        t = cfg.train

        self.trainables: dict[str, Trainable] = {}
        self.add_trainable("policy", self.policy, t.learning_rate)
        self.policy = self.trainables["policy"].model
        self.setup_trainables()
        if self.reference is not None:
            self.reference.to(self.device)
        first = self._resume(self.output_dir) if t.resume else 0

        self.engine = self._make_engine(model_dir)
        if first:
            self.engine.update_weights(self.accelerator.unwrap_model(self.policy))

        logger = MetricsLogger(self.output_dir, t.report_to, run_name=self.stage)
        logger.truncate_after(first)
        initial_file = self.output_dir / "initial_eval.json"
        if first == 0 or not initial_file.is_file():
            initial = self.evaluate()
            write_json(initial_file, initial)
            logger.log(0, **{f"eval/{k}": v for k, v in initial.items()})
        initial = json.loads(initial_file.read_text())
        self.policy.train()
        for step in tqdm(range(first, total), desc=self.stage, initial=first, total=total):
            metrics = self.step(step)
            logger.log(step + 1, lr=self.trainables["policy"].scheduler.get_last_lr()[0], **metrics)
            if t.eval_steps and (step + 1) % t.eval_steps == 0 and step + 1 < total:
                logger.log(step + 1, **{f"eval/{k}": v for k, v in self.evaluate().items()})
            if (step + 1) % t.save_steps == 0 or step + 1 == total:
                self.save_checkpoint(step + 1)

        final = self.evaluate()
        logger.log(total, **{f"eval/{k}": v for k, v in final.items()})
        logger.close()
        self.save_final()
        self.engine.close()
        metrics = {**{f"initial/{k}": v for k, v in initial.items()}, **final, "steps": total}
        write_json(self.output_dir / "eval.json", metrics)
        result = StageResult(self.stage, str(self.output_dir), metrics, time.time() - start)
        result.save()
        return result
