"""The loop around an online RL algorithm (ELO, PPO): models, optimiser, rollout engine, resume,
checkpoints, metrics and the final save. An algorithm subclasses `OnlineLoop` and writes `step`.

Several processes (torchrun / accelerate launch) train data-parallel, each with its own rollout engine
beside it (vLLM's external_launcher mode, one engine per rank, as TRL's colocate mode): every rank
samples, scores and trains on its share of the step's prompts, gradients are averaged (DDP, or
DeepSpeed ZeRO-2/3 with `train.deepspeed`), and every rank pushes the new weights into its engine,
gathered first under ZeRO-3.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from m1_align.config import ConfigError, StageConfig
from m1_align.data.chat import prompt_ids
from m1_align.logprobs import packing_agrees
from m1_align.rewards.hacking import HackingGuard, hacking_guard
from m1_align.rewards.verifiable import verifiable_sets
from m1_align.rl.checkpoint import CHECKPOINT_DIR, load_loop_state, load_optimizers, save_loop_state
from m1_align.rollout.engine import SamplingSettings, StaleWeightsError
from m1_align.rollout.factory import engine_kind, stage_engine
from m1_align.runs import (
    DivergedError,
    MetricsLogger,
    StageResult,
    atomic_replace_dir,
    atomic_write_text,
    prepare_output_dir,
)
from m1_align.training import (
    check_adapter,
    check_inputs,
    compute_dtype,
    deepspeed_file,
    fresh_accelerator_state,
    load_model,
    load_tokenizer,
    peft_config,
    resolve_model_dir,
    write_json,
)


@dataclass
class Trainable:
    """A model the loop optimises. With DeepSpeed, `engine` is its DeepSpeedEngine (which averages and
    clips the gradients and keeps the partitioned optimizer state) and `model` is that engine."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    engine: Any = None

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage() if self.engine is not None else 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_config(source: str | dict, world_size: int, max_grad_norm: float, dtype: torch.dtype) -> dict:
    """A DeepSpeed config with its "auto" values filled in for the online loop: one micro-batch per
    rank per optimizer step (the loop batches itself), clipping at train.max_grad_norm, bf16 as the model."""
    config = copy.deepcopy(source) if isinstance(source, dict) else json.loads(Path(source).read_text())
    filled = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world_size,
              "gradient_clipping": max_grad_norm}
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for key, enabled in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        if key in config and config[key].get("enabled") == "auto":
            config[key]["enabled"] = enabled
    config.setdefault("zero_allow_untested_optimizer", True)  # our torch AdamW
    config.setdefault("steps_per_print", 10**9)
    return config


class OnlineLoop:
    stage = "online"

    def __init__(self, cfg: StageConfig, needs_reference: bool = False):
        self.cfg = cfg
        self.needs_reference = needs_reference
        self.last_eval_completions: list[list[int]] = []
        self.current_step = 0
        # (learning rate, grad norm) of an optimiser step that must have moved the policy since the last sync
        self.stepped_since_sync: tuple[float, float] | None = None

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

    # -- processes -------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def per_rank(self, total: int, field: str) -> int:
        """A global batch size split evenly over the processes; a one-line error if it does not split."""
        if total % self.world_size:
            raise ConfigError(f"{field}={total} does not split over {self.world_size} processes; make it a multiple of {self.world_size}")
        return total // self.world_size

    def shard(self, items: list) -> list:
        """This rank's contiguous share of a global batch."""
        size = len(items) // self.world_size
        return items[self.accelerator.process_index * size : (self.accelerator.process_index + 1) * size]

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(value.clone(), reduction="sum") if self.world_size > 1 else value

    def rank_mean(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor averaged over the ranks (all-reduce)."""
        return self.reduce_sum(value) / self.world_size

    def mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Per-rank step metrics averaged over the ranks that have each key."""
        if self.world_size == 1:
            return metrics
        merged: dict[str, list[float]] = {}
        for rank_metrics in gather_object([metrics]):
            for key, value in rank_metrics.items():
                merged.setdefault(key, []).append(value)
        return {key: sum(values) / len(values) for key, values in merged.items()}

    # -- sampling through this rank's engine ----------------------------------------------------
    def sampling(self, n: int = 1, greedy: bool = False, prompts: int | None = None, draw: int = 0) -> SamplingSettings:
        """Sampling settings for this rank's `prompts` (a shard of the step's batch; `draw` counts extra draws)."""
        r = self.cfg.rollout
        seed = self.cfg.seed + self.current_step  # a new draw every step, the same one on resume
        prompt_seeds = None
        if r.seed_per_prompt and prompts is not None:
            first = self.accelerator.process_index * prompts  # this shard's place in the global batch
            prompt_seeds = tuple(random.Random(f"{seed}-{draw}-{first + i}").getrandbits(31) for i in range(prompts))
        return SamplingSettings(
            n=n,
            temperature=0.0 if greedy else r.temperature,
            top_p=1.0 if greedy else r.top_p,
            max_new_tokens=r.max_new_tokens,
            stop_token_ids=[self.tokenizer.eos_token_id],
            seed=seed,
            prompt_seeds=prompt_seeds,
        )

    def sync_engine(self, probe_ids: list[int]) -> float:
        """Push the policy's weights into this rank's engine, then check a log-prob probe against the trainer
        (under ZeRO-3 every rank runs that forward together); a stale engine raises StaleWeightsError instead
        of sampling the next batch from old weights. Returns the largest probe difference over the ranks (per token
        for an fp32 engine, the mean for a 16-bit one: check_probe)."""
        policy = self.accelerator.unwrap_model(self.policy)
        check_adapter(policy, "weight sync")
        with self.full_weights("policy"):
            self.check_weights_moved(policy)
            self.engine.update_weights(policy)
        diff = self.engine.verify_weights(policy, probe_ids)
        return max(gather_object([diff])) if self.world_size > 1 else diff

    def check_weights_moved(self, policy) -> None:
        """The trained weights must differ from those of the last sync once an optimiser step with a learning
        rate and a gradient ran in between; otherwise the engine is handed the same weights again (a frozen or
        detached adapter, an optimiser over other tensors) and the run only looks stale. StaleWeightsError."""
        # fp32 weights only: a small step can round away entirely in 16-bit weights
        trained = [p for p in policy.parameters() if p.requires_grad and p.dtype == torch.float32]
        fingerprint = torch.stack([p.detach().sum() for p in trained] or [torch.zeros(())]).cpu()
        previous, self._fingerprint = getattr(self, "_fingerprint", None), fingerprint
        stepped, self.stepped_since_sync = self.stepped_since_sync, None
        if previous is not None and trained and stepped and torch.equal(previous, fingerprint):
            lr, norm = stepped
            raise StaleWeightsError(f"step {self.current_step + 1}: the policy's trained weights did not change since the "
                                    f"last sync although the optimiser stepped (lr {lr:.2e}, grad norm {norm:.3g}): its "
                                    "parameters are not the ones the engine is given; check the LoRA adapter setup")

    def full_weights(self, name: str):
        """Under ZeRO-3, gather a model's partitioned weights on every rank for the duration of the block."""
        part = self.trainables[name]
        if part.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(part.engine.module.parameters()), modifier_rank=None)

    # -- optimisation ----------------------------------------------------------------------------
    def optimizer_step(self, losses: dict[str, torch.Tensor]) -> float:
        """Backward each model's loss, then clip and step its optimiser; returns the policy's grad norm.
        The models share no parameters, so separate backwards equal one backward of the summed loss."""
        for name, loss in losses.items():
            if not torch.isfinite(loss.detach()).item():  # before backward: the weights stay those of the last good step
                raise DivergedError(self.stage, self.current_step + 1, f"the {name} loss", loss.item(), self.output_dir)
            part = self.trainables[name]
            if part.engine is not None:
                part.engine.backward(loss)
            else:
                self.accelerator.backward(loss)
        lr = self.trainables["policy"].optimizer.param_groups[0]["lr"]  # what this step moves the policy by
        norms = []
        for name in losses:
            part = self.trainables[name]
            if part.engine is not None:
                part.engine.step()  # averages gradients across ranks, clips, steps, zeroes
                norms.append(float(part.engine.get_global_grad_norm() or 0.0))
            else:
                norms.append(float(self.accelerator.clip_grad_norm_(part.model.parameters(), self.cfg.train.max_grad_norm)))
                if not math.isfinite(norms[-1]):
                    raise DivergedError(self.stage, self.current_step + 1, f"the {name} gradient norm", norms[-1], self.output_dir)
                part.optimizer.step()
                part.optimizer.zero_grad(set_to_none=True)
            part.scheduler.step()
        if lr > 0 and norms[0] > 0:
            self.stepped_since_sync = (lr, norms[0])
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
        # on the torch optimizer: DeepSpeed's ZeRO optimizer wraps it and reads the same param groups' lr
        scheduler = get_scheduler(
            names[t.lr_scheduler], optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total),
            num_training_steps=total, scheduler_specific_kwargs=extra,
        )
        engine = None
        if self.ds_config is not None:
            import deepspeed

            if self.world_size == 1:  # one plain process: give DeepSpeed the rendezvous a launcher would have
                for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(free_port())}.items():
                    os.environ.setdefault(key, value)
            engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
            model = engine
        else:
            model, optimizer = self.accelerator.prepare(model, optimizer)
        self.trainables[name] = Trainable(model, optimizer, scheduler, engine)

    def updates_per_step(self) -> int:
        """Optimiser steps per loop step (for the LR schedule's length)."""
        return 1

    def answer_accuracy(self, rows: list[dict]) -> dict[str, float]:
        """Greedy answers through the rollout engine, checked by each row's rule (as `m1-align eval` does)."""
        if not rows:
            return {}

        def answer(prompts):  # every rank answers every question (greedy: the same answers), so all agree
            outputs = self.engine.generate([prompt_ids(self.tokenizer, p) for p in prompts], self.sampling(greedy=True))
            self.last_eval_completions = [o[0].token_ids for o in outputs]
            return [o[0].text for o in outputs]

        return verifiable_sets(rows, answer)[0]

    # -- setup -------------------------------------------------------------------------------------
    def _deepspeed_config(self) -> dict | None:
        t, dtype = self.cfg.train, compute_dtype(self.cfg.model.dtype)
        source = deepspeed_file(t)
        return deepspeed_config(source, self.world_size, t.max_grad_norm, dtype) if source else None

    def _make_engine(self, model_dir: Path):
        """vLLM reads the starting checkpoint and is then kept in sync; HF generate samples from the policy itself."""
        policy = self.accelerator.unwrap_model(self.policy)
        if (self.world_size > 1 and engine_kind(self.cfg.rollout.engine) == "hf"
                and self.trainables["policy"].zero_stage == 3):
            raise ConfigError("rollout.engine=hf cannot sample from a ZeRO-3-partitioned policy rank by rank; "
                              "use rollout.engine=vllm or a ZeRO-2 DeepSpeed config")
        return stage_engine(self.cfg, model_dir, self.tokenizer, model_config=policy.config, world_size=self.world_size,
                            rank=self.accelerator.process_index, policy=policy)

    def _load_models(self, model_dir: Path) -> None:
        cfg = self.cfg
        self.policy = load_model(cfg.model, model_dir=model_dir)
        self.reference = None
        if self.needs_reference and not cfg.model.lora.enabled:  # LoRA: the adapter-disabled policy
            self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()
        if cfg.model.lora.enabled:
            from peft import get_peft_model

            self.policy = get_peft_model(self.policy, peft_config(cfg.model.lora))

    # -- checkpoints -------------------------------------------------------------------------------
    def _resume(self, output_dir: Path) -> int:
        state = load_loop_state(output_dir, self.accelerator.process_index)
        if state is None:
            return 0
        written_with_deepspeed = (output_dir / CHECKPOINT_DIR / "policy" / "deepspeed").is_dir()
        if written_with_deepspeed != (self.ds_config is not None):
            raise ConfigError(f"{output_dir / CHECKPOINT_DIR} was written {'with' if written_with_deepspeed else 'without'} "
                              f"DeepSpeed; resume it the same way, or delete it to start over")
        plain = {}
        for name, part in self.trainables.items():
            part.scheduler.load_state_dict(state["schedulers"][name])
            if part.engine is not None:
                # DeepSpeed's own checkpoint: weights and this rank's optimizer partition
                part.engine.load_checkpoint(str(output_dir / CHECKPOINT_DIR / name / "deepspeed"), tag="state",
                                            load_optimizer_states=True, load_lr_scheduler_states=False)
                continue
            plain[name] = part.optimizer
            weights_dir = output_dir / CHECKPOINT_DIR / name
            weights = {}
            for file in sorted(weights_dir.glob("*.safetensors")):
                weights.update(load_file(str(file)))
            model = self.accelerator.unwrap_model(part.model)
            model = getattr(model, "pretrained", model)  # PPO's critic wraps its PreTrainedModel
            if self.cfg.model.lora.enabled and name == "policy":
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(model, weights)
                continue
            # tied or re-derived weights may be absent from the file; anything else must match
            missing, unexpected = model.load_state_dict(weights, strict=False)
            if unexpected or len(missing) > 1:
                raise RuntimeError(f"checkpoint {weights_dir} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        load_optimizers(output_dir, plain)
        self.load_extra_state(state)
        return state["step"]

    def save_checkpoint(self, step: int) -> None:
        check_adapter(self.accelerator.unwrap_model(self.policy), f"checkpoint at step {step}")
        plain = {name: part for name, part in self.trainables.items() if part.engine is None}
        state = {"schedulers": {name: part.scheduler.state_dict() for name, part in self.trainables.items()}, **self.extra_state()}
        save_loop_state(
            self.output_dir, step,
            {name: self.accelerator.unwrap_model(part.model) for name, part in plain.items()},
            {name: part.optimizer for name, part in plain.items()},
            state, rank=self.accelerator.process_index, world_size=self.world_size,
            before_commit=self._save_deepspeed_states, barrier=self.accelerator.wait_for_everyone,
        )

    def _save_deepspeed_states(self, tmp: Path) -> None:
        for name, part in self.trainables.items():
            if part.engine is not None:  # collective: every rank writes its partition
                part.engine.save_checkpoint(str(tmp / name / "deepspeed"), tag="state", save_latest=False)

    def save_final(self) -> None:
        model = self.accelerator.unwrap_model(self.policy)
        tmp = self.output_dir / ".model.tmp"
        with self.full_weights("policy"):
            if not self.is_main:
                return
            if self.cfg.model.lora.enabled:
                check_adapter(model, f"saving {self.output_dir / 'adapter'}")
                model.save_pretrained(str(self.output_dir / ".adapter.tmp"), safe_serialization=True)
                atomic_replace_dir(self.output_dir / ".adapter.tmp", self.output_dir / "adapter")
                model = model.merge_and_unload() if self.cfg.model.lora.merge_on_save else model
            model.save_pretrained(str(tmp), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tmp))
        from m1_align.config import dump_config

        atomic_write_text(tmp / "m1_align_config.yaml", dump_config(self.cfg))
        atomic_replace_dir(tmp, self.output_dir / "model")

    def check_hacking(self, guard: HackingGuard, step: int, evaluation: dict[str, float], logger) -> bool:
        """The reward-hacking guard after an evaluation (the same verdict on every rank: the metrics are averaged
        over the ranks and every rank evaluates the same questions): its metrics logged and a warning when it
        fires; True when it fires and reward.hacking.stop asks to end the run there."""
        verdict, metrics = guard.check(step, evaluation)
        if logger:
            logger.log(step, **metrics)
            if verdict.hacking:
                then = "; stopping (reward.hacking.stop=true)" if guard.cfg.stop else ""
                print(f"warning: step {step}: possible reward hacking: {verdict.message}{then}", file=sys.stderr)
        return verdict.hacking and guard.cfg.stop

    # -- the run -----------------------------------------------------------------------------------
    def prepare(self) -> int:
        """Everything before the first step: processes, inputs check, output folder, models, the algorithm's
        setup, optimisers, the resumed state and the engine. Returns the step to start from."""
        cfg = self.cfg
        dtype = compute_dtype(cfg.model.dtype)
        # cpu=True: accelerate forms a process group of CPU processes only when told it runs on CPU; under
        # `accelerate launch` with a DeepSpeed config, precision comes from that config
        precision = {} if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" else {
            "mixed_precision": "bf16" if dtype == torch.bfloat16 else "no"}
        fresh_accelerator_state()
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), **precision)
        torch.manual_seed(cfg.seed)
        check_inputs(cfg)  # on every rank, so a bad input stops them all before anything is written
        if self.is_main:
            self.output_dir = prepare_output_dir(cfg.output_dir, cfg.overwrite)
        self.accelerator.wait_for_everyone()
        self.output_dir = Path(cfg.output_dir)
        self.device = self.accelerator.device
        self.ds_config = self._deepspeed_config()
        model_dir = resolve_model_dir(cfg.model.path)
        self.tokenizer = load_tokenizer(cfg.model, model_dir)
        self._load_models(model_dir)
        self.pack = cfg.train.padding_free and packing_agrees(self.policy, next(self.policy.parameters()).device,
                                                              tolerance=1e-3 if dtype == torch.float32 else 5e-2)
        self.setup()
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
            policy = self.accelerator.unwrap_model(self.policy)
            with self.full_weights("policy"):
                self.engine.update_weights(policy)
        return first

    def run(self) -> StageResult:
        start, t = time.time(), self.cfg.train
        first = self.prepare()
        total = self.total_steps()
        logger = MetricsLogger(self.output_dir, t.report_to, run_name=self.stage) if self.is_main else None
        if logger:
            logger.truncate_after(first)
        initial_file = self.output_dir / "initial_eval.json"
        if first == 0 or not initial_file.is_file():
            initial = self.evaluate()
            if logger:
                write_json(initial_file, initial)
                logger.log(0, **{f"eval/{k}": v for k, v in initial.items()})
        self.accelerator.wait_for_everyone()
        initial = json.loads(initial_file.read_text())
        guard, stopped = hacking_guard(self.cfg, initial), None
        self.policy.train()
        for step in tqdm(range(first, total), desc=self.stage, initial=first, total=total, disable=not self.is_main):
            self.current_step = step
            metrics = self.mean_over_ranks(self.step(step))
            if logger:
                logger.log(step + 1, lr=self.trainables["policy"].scheduler.get_last_lr()[0], **metrics)
            if guard:
                guard.observe(metrics)
            if t.eval_steps and (step + 1) % t.eval_steps == 0 and step + 1 < total:
                evaluation = self.evaluate()
                if logger:
                    logger.log(step + 1, **{f"eval/{k}": v for k, v in evaluation.items()})
                if guard and self.check_hacking(guard, step + 1, evaluation, logger):
                    stopped = step + 1
                    break
            if (step + 1) % t.save_steps == 0 or step + 1 == total:
                self.save_checkpoint(step + 1)

        final = self.evaluate()
        if guard and not stopped:
            self.check_hacking(guard, total, final, logger)
        self.save_final()
        metrics = {**{f"initial/{k}": v for k, v in initial.items()}, **final, "steps": stopped or total}
        if stopped:
            metrics["stopped_for_reward_hacking"] = 1.0
        result = StageResult(self.stage, str(self.output_dir), metrics, time.time() - start)
        if logger:
            logger.log(stopped or total, **{f"eval/{k}": v for k, v in final.items()})
            logger.close()
            write_json(self.output_dir / "eval.json", metrics)
            result.save()
        self.accelerator.wait_for_everyone()
        self.engine.close()  # last: a colocated vLLM engine takes the process group down with it
        return result
