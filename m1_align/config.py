"""Typed experiment configs: one schema per stage, loaded from YAML with `key=value` overrides.

A config file may inherit from others with `defaults: base.yaml` (or a list); later files and the
command line override earlier ones, mapping by mapping. Every error is a single `ConfigError` line
that names the file (or "command line"), the dotted key and what was expected. Every field carries its
description (Field(description=...)), which `m1-align STAGE --help` and `--print-config` show.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import shutil
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem the user can fix; the message is one line."""


class Section(BaseModel):
    """Base for every schema: unknown keys are errors, assignments are validated."""

    # inf and nan are never a meaningful setting (learning_rate=inf would train to NaN and finish)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _stage_section_defaults(cls, data: Any) -> Any:
        """A section whose default is set for this stage (grpo's ppo section, tdpo's rollout at temperature 0.7)
        keeps those defaults for the keys a file or override leaves out, as --help shows them."""
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, field in cls.model_fields.items():
            default = field.default
            if isinstance(default, BaseModel) and default.model_fields_set and isinstance(data.get(name), dict):
                merged[name] = deep_merge(default.model_dump(exclude_unset=True), data[name])
        return merged


_SAFE_PATH = re.compile(r"^[\w./~+@:=-]+$")


def _check_path(value: str | None) -> str | None:
    """Paths end up in file names and subprocess arguments: allow only plain path characters."""
    if value is not None and not _SAFE_PATH.match(value):
        raise ValueError(
            f"{value!r} is not a plain path: use letters, digits and . _ - / ~ + @ : = only (no spaces or quotes)"
        )
    return value


# ---------------------------------------------------------------------------------------------
# Shared sections
# ---------------------------------------------------------------------------------------------


class LoraConfig(Section):
    enabled: bool = Field(False, description=(
        "Train a LoRA adapter (Hu et al. 2021) on frozen base weights instead of all weights. The online stages "
        "and TDPO then take the adapter-disabled policy as their reference model."))
    r: int = Field(16, ge=1, description="Adapter rank: each adapted weight W becomes W + (alpha / r) B A, "
                   "with A of shape r x d_in and B of shape d_out x r.")
    alpha: int = Field(32, ge=1, description="Scaling numerator: the adapter's update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description=(
        "Dropout on the adapter's input, in [0, 1). Under model.compile a nonzero dropout takes away the "
        "compiled step's gain (docs/BENCHMARKS.md)."))
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description=(
        "Modules that get an adapter. all-linear: every linear layer of the body, whatever the architecture (the "
        "hybrid's W_pack, o_proj and MLP; a Llama's q/k/v/o and MLP), never the output head; or a list of "
        "module names."))
    merge_on_save: bool = Field(False, description=(
        "On: model/ gets the merged full weights (what the next stage and vLLM load) and adapter/ the adapter; "
        "off: model/ holds the adapter only."))


class ModelConfig(Section):
    path: str | None = Field(None, description=(
        "The model to start from: a Hugging Face model folder (ours or any causal LM) or a finished stage's "
        "output_dir; in a pipeline, null or 'previous' takes the previous policy stage's output."))
    preset: str | None = Field(None, description=(
        "pretrain only: the in-repo hybrid architecture trained from scratch, tiny | quickstart | baichuan-m1-14b "
        "(null: quickstart). Every other stage loads model.path."))
    tokenizer: str | None = Field(None, description="Tokenizer folder; null: the model folder's own tokenizer.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "Precision of the forward passes. auto: fp32 weights with bf16 autocast on a GPU, and on a CPU only where "
        "a 1 s probe finds bf16 matmuls faster; an explicit dtype loads the weights in it. Log-softmax, losses "
        "and optimiser states stay fp32."))
    trust_remote_code: bool = Field(False, description=(
        "Let transformers run Python code shipped in the model folder (custom architectures). Never on unless "
        "asked: it executes that code."))
    gradient_checkpointing: bool = Field(False, description=(
        "Recompute activations in the backward pass instead of keeping them: less memory for about one more "
        "forward per step."))
    compile: bool = Field(False, description=(
        "torch.compile each decoder layer in place (regional compilation: one compile serves every layer, for "
        "any sequence length); the first step pays the compile (~20 s on 2 CPU cores), generation runs eager. On "
        "the real model on a CPU: 0.84-0.94x the full-parameter SFT step, 0.79x LoRA's without dropout, no gain "
        "with LoRA dropout (docs/BENCHMARKS.md)."))
    lora: LoraConfig = Field(LoraConfig(), description="LoRA adapter training (off by default).")

    _paths = field_validator("path", "tokenizer")(_check_path)


class MedcalcData(Section):
    """The medcalc task family: MedCalc-Bench's calculators on sampled patients (m1_align.data.medcalc)."""

    train_per_calculator: int = Field(
        200, ge=1, description="patients per trained calculator in each training split (sft, preference, rl), "
        "each split its own patients"
    )
    eval_per_calculator: int = Field(
        30, ge=1, description="held-out patients per calculator in each of the test and dev sides of the eval split"
    )
    heldout_calculators: list[str] = Field(
        default_factory=lambda: list(_medcalc_default_heldout()),
        description="calculators kept out of all training data: evaluated only, as the task medcalc_unseen",
    )

    calculators: list[str] | None = Field(None, description=(
        "The calculators of the family, held-out ones included; null: all of them. RL on 2 CPU cores wants those "
        "whose worked explanation is short (equations such as bmi_calculator, mean_arterial_pressure, dates): a "
        "score's explanation runs to 400-700 tokens."))

    @field_validator("heldout_calculators", "calculators")
    @classmethod
    def _known_calculators(cls, value: list[str] | None, info) -> list[str] | None:
        from m1_align.data.medcalc import check_calculators

        if value is not None:
            check_calculators(value, info.field_name)
        return value

    @model_validator(mode="after")
    def _something_to_train_on(self):
        from m1_align.data.medcalc import CALCULATORS

        family = set(self.calculators if self.calculators is not None else CALCULATORS)
        if not family - set(self.heldout_calculators):
            raise ValueError("heldout_calculators holds every calculator of the family: leave at least one to train on")
        return self


def _medcalc_default_heldout() -> tuple[str, ...]:
    from m1_align.data.medcalc import DEFAULT_HELDOUT

    return DEFAULT_HELDOUT


class DataConfig(Section):
    builtin: bool = Field(True, description=(
        "Use the built offline medical datasets (m1_align.data) where no user file takes their place: held-out "
        "answer accuracy (unless data.answer_eval_file is set) and eval's MMLU-medical. Training reads "
        "data.train_file when set, else the built data."))
    cache_dir: str = Field("data_cache", description=(
        "Where built datasets live, one folder per (seed, max_per_task, eval_per_task), shared across runs."))
    train_file: str | None = Field(None, description=(
        "User training data instead of the built data: JSONL, Parquet or a saved `datasets` folder, in the "
        "stage's shape (sft: conversations; tdpo, rm: preference pairs; elo, ppo, grpo: prompt, answer[, rule])."))
    eval_file: str | None = Field(None, description=(
        "User held-out data in the stage's training shape (conversations, pairs) for the held-out loss and "
        "preference accuracy; rm-eval: the pairs to score."))
    answer_eval_file: str | None = Field(None, description=(
        "Held-out questions with a checkable answer (prompt, answer[, rule, task]) for answer accuracy; null: the "
        "built medical eval split. Rows without a rule are checked by exact (normalised) match."))
    max_per_task: int = Field(2000, ge=1, description="Built data: rows per task in each training split.")
    eval_per_task: int = Field(200, ge=1, description=(
        "Built data: questions per task in each held-out split (test takes the first eval.limit, dev the last)."))
    seed: int = Field(0, description="Seed of the data build and of the SFT held-out split (independent of the "
                      "training seed).")
    tasks: list[str] | None = Field(None, description=(
        "Train on these built tasks only (null: all); held-out evaluation always covers every task. RL stages "
        "use it to drop tasks the starting policy never solves: their groups carry no signal."))
    medcalc: MedcalcData | None = Field(
        None, description="add the medcalc task family (MedCalc-Bench calculators; pip install medcalc-bench) to "
        "the built data; null: the build is exactly what it is without it"
    )
    rl_open_tasks: list[str] = Field(default_factory=list, description=(
        "Non-verifiable built tasks (icd_description, hpo_definition) whose questions also go to the RL split as "
        "open prompts: no rule, the reference text kept as `answer`; reward.mode=route scores them with the reward "
        "model (reward.model must be set) and the verifiable prompts of the same batch with their rules. Empty: "
        "the RL split holds verifiable prompts only, and the build is exactly what it is without this key."))

    _paths = field_validator("cache_dir", "train_file", "eval_file", "answer_eval_file")(_check_path)

    @field_validator("rl_open_tasks")
    @classmethod
    def _open_tasks(cls, value: list[str]) -> list[str]:
        from m1_align.data.tasks import TASKS

        open_tasks = sorted(name for name, task in TASKS.items() if not task.verifiable)
        wrong = [t for t in value if t not in open_tasks]
        if wrong:
            raise ValueError(f"{wrong} are not open (non-verifiable) built tasks; choose from {open_tasks} (verifiable "
                             "tasks are in the RL split already)")
        return sorted(set(value))

    @model_validator(mode="after")
    def _open_tasks_trained(self):
        dropped = [t for t in self.rl_open_tasks if self.tasks is not None and t not in self.tasks]
        if dropped:
            raise ValueError(f"rl_open_tasks {dropped} are left out by data.tasks={self.tasks}, so no open prompt "
                             "would reach RL; add them to data.tasks or remove them from data.rl_open_tasks")
        return self

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str] | None) -> list[str] | None:
        from m1_align.data.medcalc import TASKS as MEDCALC_TASKS
        from m1_align.data.tasks import TASKS

        known = [*TASKS, *MEDCALC_TASKS]
        if value is not None:
            unknown = [t for t in value if t not in known]
            if unknown or not value:
                raise ValueError(f"unknown task(s) {unknown or '[]'}; choose from {sorted(known)} (or null for all)")
        return value


class TrainConfig(Section):
    learning_rate: float = Field(2e-5, gt=0, description=(
        "Peak learning rate of AdamW (online stages: the policy's; the paper's SFT starts its cosine at 2e-5)."))
    num_epochs: float = Field(1.0, gt=0, description=(
        "Passes over the training data (online stages: over the prompts, steps = rows x num_epochs / "
        "prompts_per_step); ignored when max_steps > 0."))
    max_steps: int = Field(-1, description=(
        "> 0: train exactly this many optimiser steps (online stages: loop steps), overriding num_epochs; "
        "-1: num_epochs decides."))
    batch_size: int = Field(8, ge=1, description=(
        "Rows (conversations, pairs) per device per forward in pretrain, sft, tdpo and rm. The online stages "
        "batch by their own section (elo.prompts_per_step, ppo.minibatch_size)."))
    gradient_accumulation_steps: int = Field(1, ge=1, description=(
        "pretrain, sft, tdpo, rm: forwards accumulated per optimiser step; the effective batch is batch_size x "
        "this x processes."))
    lr_scheduler: Literal["cosine", "wsd", "linear", "constant"] = Field("cosine", description=(
        "Learning-rate schedule after the linear warm-up: cosine decay to 0, wsd (warmup-stable-decay: constant, "
        "then a cosine decay to 0 over the last decay_ratio of the steps), linear decay to 0, or constant."))
    warmup_ratio: float = Field(0.03, ge=0, le=1, description=(
        "Fraction of the optimiser steps spent warming up linearly from 0 to learning_rate."))
    decay_ratio: float = Field(0.1, ge=0, le=1, description="wsd only: fraction of the steps in the final decay.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay.")
    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.95), description="AdamW's (beta1, beta2): decay rates of the gradient's moving averages, each in [0, 1).")
    max_grad_norm: float = Field(1.0, gt=0, description=(
        "Clip the gradient's global L2 norm to this before each optimiser step (the online stages clip the "
        "policy and PPO's critic separately)."))
    max_length: int = Field(1024, ge=8, description=(
        "Tokens per sample (and per packed row); longer samples are truncated. Online stages: the reward model "
        "scores up to this many tokens, and the rollout engine's context is max_length + rollout.max_new_tokens. "
        "pretrain uses pretrain.tokens_per_row instead."))
    save_steps: int = Field(200, ge=1, description="Checkpoint every N optimiser steps (online stages: loop steps) "
                            "and at the end; an interrupted run resumes from the last one.")
    save_total_limit: int = Field(2, ge=1, description=(
        "pretrain, sft, tdpo, rm: keep the newest K checkpoints (online stages keep the latest only)."))
    logging_steps: int = Field(10, ge=1, description=(
        "pretrain, sft, tdpo, rm: log training metrics every N optimiser steps (online stages log every step)."))
    eval_steps: int | None = Field(None, description=(
        "Evaluate every N steps during training: the held-out loss (pretrain, sft, tdpo, rm) or dev answer "
        "accuracy (online stages); null: only at the end."))
    eval_max_new_tokens: int = Field(96, ge=1, description=(
        "sft, tdpo: generation length of the held-out answer accuracy checked at the end (online stages "
        "generate up to rollout.max_new_tokens)."))
    eval_limit: int | None = Field(None, ge=1, description=(
        "Held-out dev questions per task the stage checks itself on, and held-out preference pairs per task in "
        "tdpo and rm (null: all)."))
    report_to: list[Literal["tensorboard", "wandb"]] = Field([], description=(
        "Also send metrics to these trackers; metrics.jsonl in output_dir is always written."))
    deepspeed: str | None = Field(None, description=(
        "A DeepSpeed JSON config for ZeRO-2/3 across processes, e.g. configs/deepspeed/zero2.json; null: plain "
        "data parallelism (or a single process). Wins over the accelerate config's deepspeed_config_file (used when "
        "this is unset; a warning names the file ignored)."))
    resume: bool = Field(True, description="Continue from the last checkpoint in output_dir when there is one.")
    padding_free: bool = Field(True, description=(
        "Online stages (elo, ppo, grpo): pack the samples into rows without padding, positions restarting per "
        "sample (checked against the padded forward when the run starts; off where the model disagrees)."))

    _paths = field_validator("deepspeed")(_check_path)


class RolloutConfig(Section):
    engine: Literal["auto", "vllm", "hf"] = Field("auto", description=(
        "What samples the responses: vllm, hf (transformers generate on the policy itself), or auto: vLLM "
        "where it imports, else HF generate."))
    temperature: float = Field(1.0, ge=0, description=(
        "Sampling temperature T; the RL losses score the sampled distribution softmax(logits / T). 0 samples "
        "greedily, and then log-probs are taken at T = 1."))
    top_p: float = Field(1.0, gt=0, le=1, description=(
        "Nucleus sampling: sample from the smallest set of tokens whose probability sums to top_p; 1: off."))
    max_new_tokens: int = Field(128, ge=1, description=(
        "Most tokens per sampled response; a response cut here has no EOS (see ppo.missing_eos_penalty, "
        "ppo.mask_truncated, ppo.overlong_buffer)."))
    kv_cache_gib: float | None = Field(1.0, gt=0, description=(
        "vLLM's KV-cache size in GiB (its kv_cache_memory_bytes). On a GPU a set size takes precedence over "
        "rollout.gpu_memory_utilization; null lets that fraction size the engine (null on a CPU: 2 GiB)."))
    gpu_memory_utilization: float = Field(0.35, gt=0, le=1, description=(
        "vLLM on a GPU: the fraction of the card's memory the engine may take, the rest left to the trainer; "
        "used only when rollout.kv_cache_gib is null."))
    tensor_parallel_size: int = Field(1, ge=1, description=(
        "GPUs one vLLM engine shards the model over; must be 1 when several training processes each run their "
        "own engine."))
    enforce_eager: bool = Field(True, description=(
        "vLLM: skip CUDA-graph capture and compilation, so the engine starts in seconds; false decodes faster "
        "on a GPU after a slower start."))
    in_process: bool = Field(True, description=(
        "Run vLLM inside the training process (VLLM_ENABLE_V1_MULTIPROCESSING=0), which hands the new weights "
        "over in memory; false: a separate engine process, weights passed through a file in /dev/shm. Must be "
        "true with several processes and for seeded sampling on a CPU."))
    seed_per_prompt: bool = Field(False, description=(
        "Seed each prompt's samples by (seed, step, its place in the step's global batch): the same samples on "
        "any number of processes (without dynamic sampling, whose extra draws are per rank), at the cost of "
        "sampling prompt by prompt (HF generate, and vLLM on CPU)."))


class StageConfig(Section):
    """Fields every stage has."""

    output_dir: str = Field("runs/default", description=(
        "The stage writes here (checkpoints, metrics, model/, result.json); an existing finished output is "
        "never overwritten."))
    overwrite: bool = Field(False, description=(
        "Allow starting over in an output_dir that holds a finished run (it is kept as <output_dir>.previous "
        "until the new run finishes); an unfinished run there is resumed either way."))
    seed: int = Field(42, description="Training seed: initialisation, data order, dropout and sampling.")
    model: ModelConfig = Field(ModelConfig(), description="The model to train and how to load it.")
    data: DataConfig = Field(DataConfig(), description="Training and held-out data: the built medical sets or "
                             "your own files.")
    train: TrainConfig = Field(TrainConfig(), description="Optimiser, schedule, lengths, checkpoints and logging.")

    _paths = field_validator("output_dir")(_check_path)


# ---------------------------------------------------------------------------------------------
# Stage schemas
# ---------------------------------------------------------------------------------------------


class DataStageConfig(StageConfig):
    pass


class PretrainSection(Section):
    vocab_size: int = Field(4096, ge=300, description=(
        "Vocabulary size of the byte-level BPE tokenizer trained on the medical corpus (256 bytes + merges + "
        "special tokens)."))
    tokens_per_row: int = Field(256, ge=16, description=(
        "Tokens per packed pretraining row (documents concatenated, positions restarting per document)."))
    heldout_texts: int = Field(256, ge=1, description="Held-out corpus texts the perplexity is measured on.")


class PretrainConfig(StageConfig):
    pretrain: PretrainSection = Field(PretrainSection(), description="The tokenizer and base model trained from "
                                      "scratch (model.preset sets the architecture).")


class SFTSection(Section):
    packing: bool = Field(True, description=(
        "Pack several conversations into each row of train.max_length tokens (best-fit decreasing), attention "
        "and positions kept within each; off: one padded conversation per row."))
    assistant_only_loss: bool = Field(True, description=(
        "Loss on the assistant's tokens only (system and user turns are masked); off: on every token."))


class SFTConfig(StageConfig):
    sft: SFTSection = Field(SFTSection(), description="Supervised fine-tuning on conversations.")


class TDPOSection(Section):
    loss: Literal["tdpo1", "tdpo2", "dpo"] = Field("tdpo2", description=(
        "With u = beta (log-ratio_chosen - log-ratio_rejected): tdpo1 = -log sigmoid(u - beta (SeqKL_rejected - "
        "SeqKL_chosen)), tdpo2 = -log sigmoid(u - alpha beta (SeqKL_rejected - sg(SeqKL_chosen))) (Zeng et al. "
        "2024), dpo = -log sigmoid(u)."))
    alpha: float = Field(0.5, ge=0, description="TDPO2 weight of the sequential-KL difference.")
    beta: float = Field(0.1, gt=0, description=(
        "Strength of the KL constraint: scales the log-ratios to the reference (and TDPO's KL terms); larger "
        "keeps the policy closer to the reference."))
    rpo_alpha: float = Field(0.0, ge=0, description=(
        "Weight of the chosen response's token-mean NLL added to the loss (RPO, Pang et al. 2024); 0: the "
        "paper's loss."))
    kl_chunk_size: int = Field(128, ge=1, description=(
        "Response positions per chunk of the full-vocabulary KL: smaller uses less memory, recomputed in the "
        "backward pass."))
    ref_model: str | None = Field(None, description=(
        "Reference model folder; null: a frozen copy of model.path (with LoRA: the adapter-disabled policy)."))
    pairs: Literal["built", "on_policy"] = Field("built", description=(
        "built: the data's written pairs; on_policy: the starting model's own samples, a right answer against a "
        "wrong one of the same question (m1_align/preference/on_policy.py), sampled with the `rollout` settings; "
        "the questions come from the built rl split, or from data.train_file read in the rl format (prompt, "
        "answer, rule)."))
    pair_prompts: int = Field(256, ge=1, description="on_policy: verifiable training questions sampled.")
    pair_samples: int = Field(4, ge=2, description="on_policy: responses sampled per question.")
    pairs_per_prompt: int = Field(2, ge=1, description="on_policy: at most this many pairs from one question.")

    _paths = field_validator("ref_model")(_check_path)


class TDPOConfig(StageConfig):
    tdpo: TDPOSection = Field(TDPOSection(), description="Token-level DPO (TDPO1/TDPO2) or DPO on preference pairs.")
    rollout: RolloutConfig = Field(RolloutConfig(temperature=0.7, max_new_tokens=96), description=(
        "Sampling of the on-policy pairs (tdpo.pairs=on_policy only)."))


class ELOSection(Section):
    """Log-probs: the score-function term and the KL use the sampled distribution, softmax(logits /
    rollout.temperature); the reward r_k = log pi(A | Q, c_k) is the model's own (temperature 1)."""

    k: int = Field(4, ge=2, description=(
        "Reasoning paths sampled per question (K); a question left with fewer than 2 usable paths is dropped."))
    baseline: Literal["mean", "leave_one_out", "none"] = Field("mean", description=(
        "Baseline b in the advantage r_k - b: the mean reward of the question's K paths, the mean of its other "
        "K-1 paths (leave_one_out), or none (b = 0)."))
    lambda_answer: float = Field(0.0, ge=0, description=(
        "Weight of the pathwise term -lambda_answer mean_k log pi(A | Q, c_k), the part of the Jensen bound's "
        "gradient that eq. 3 leaves out; 0: eq. 3 alone."))
    answer_delimiter: str = Field("\nAnswer:", description=(
        "Text that ends the reasoning: a sampled path is cut before it, and the gold answer is teacher-forced "
        "after it as delimiter + ' ' + answer + EOS."))
    length_normalize: bool = Field(False, description="Divide the reward r_k by the answer's length in tokens.")
    drop_degenerate: bool = Field(True, description=(
        "Drop paths that never reach the delimiter, are empty, or repeat a 4-gram more than 3 times; off: keep "
        "them (a path without the delimiter then counts whole as reasoning)."))
    kl_coef: float = Field(0.0, ge=0, description=(
        "Weight of KL(pi || pi_start) as a loss term over the reasoning tokens; 0: no reference model is kept."))
    kl_estimator: Literal["k2", "k3"] = Field("k3", description=(
        "Per-token KL estimator of the loss term (Schulman's k2 or k3: estimators whose gradient pulls towards "
        "the reference)."))
    prompts_per_step: int = Field(8, ge=1, description=(
        "Questions per step, over all processes (a multiple of the process count)."))
    epochs_per_batch: int = Field(1, ge=1, description=(
        "Optimiser steps on each batch of paths; > 1 reuses the paths with PPO's clipped importance ratio."))
    clip_range: float = Field(0.2, gt=0, description="The ratio's clip when epochs_per_batch > 1.")


class ELOConfig(StageConfig):
    elo: ELOSection = Field(ELOSection(), description=(
        "Exploratory log-likelihood optimisation (Baichuan-M1 5.2.2): reasoning paths as a latent variable, "
        "rewarded by the gold answer's log-likelihood after them."))
    rollout: RolloutConfig = Field(RolloutConfig(), description="Sampling of the reasoning paths.")


class HackingGuardSection(Section):
    """Rule (m1_align/rewards/hacking.py): over the last `window` evaluations, the training reward's least-squares
    trend is more than `threshold` standard errors above zero while the held-out measure's is more than `threshold`
    below zero; the standard errors come from each series' scatter about its own trend."""

    heldout_metric: str | None = Field("verifiable/accuracy", description=(
        "The evaluation's metric (a key of eval.json, without eval/) the policy is not trained on and that must not "
        "fall while the reward rises; null: no check."))
    train_metric: str = Field("reward/mean", description=(
        "The step metric averaged over the steps between evaluations as the training reward (reward/model: the "
        "reward model's scores only)."))
    window: int = Field(4, ge=3, description="Evaluations the two trends are fitted over (3 or more).")
    threshold: float = Field(3.0, gt=0, description=(
        "Standard errors a trend must clear; with 4 evaluations a fall this steep in pure noise has about a 5% chance "
        "(Student's t, 2 degrees of freedom)."))
    stop: bool = Field(False, description=(
        "End the run at the evaluation that fires (final evaluation and save as usual); false: a warning and the "
        "guard/reward_hacking metric only."))


class RewardSection(Section):
    model: str | None = Field(None, description=(
        "Learned reward model folder (an `m1-align rm` output) that scores open questions; needed by modes "
        "model and mix, and by route when some prompts have no checkable answer."))
    mode: Literal["route", "rule", "model", "mix"] = Field("route", description=(
        "route: the rule where a prompt has an answer and a rule, else the reward model; rule or model: that "
        "one only; mix: rule_weight x rule + model_weight x model."))
    rule_weight: float = Field(1.0, ge=0, description="mix only: weight of the rule score.")
    model_weight: float = Field(1.0, ge=0, description="mix only: weight of the reward model's score.")
    length_penalty: float = Field(0.0, ge=0, description=(
        "Subtracted from the score per response token (of the responses length_penalty_on names): a reward model "
        "that favours long answers then has to pay for each token it rewards."))
    length_penalty_on: Literal["all", "model"] = Field("all", description=(
        "Which responses length_penalty charges: all, or only those the reward model scored (route: the open "
        "prompts; model and mix: every response), leaving the rules' 0/1 scores of verifiable answers as they are."))
    model_length_control: bool = Field(False, description=(
        "Take out of the reward model's scores their least-squares fit on response length over the batch's "
        "model-scored responses, s - slope x (L - mean L): whatever the model prefers in length on the policy's own "
        "samples then adds nothing to the reward (the regression idea of length-controlled AlpacaEval, Dubois et al. "
        "2024). Logged before it: reward/rm_length_corr."))
    normalize: bool = Field(False, description=(
        "Whiten the scores of each batch to zero mean and unit std (before ppo's EOS and overlong penalties)."))
    hacking: HackingGuardSection = Field(HackingGuardSection(), description=(
        "The reward-hacking check at each evaluation (train.eval_steps): training reward up, held-out measure down."))

    _paths = field_validator("model")(_check_path)


class PPOSection(Section):
    """Log-probs: the ratio, the KL (reward and loss) and the entropy use the sampled distribution,
    softmax(logits / rollout.temperature); the engine mismatch and TIS compare temperature-1 log-probs."""

    # the values are the names registered in m1_align/rl/algorithms.py (a test checks that they agree)
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = Field(
        "gae", description="gae: PPO with a critic. Critic-free: grpo (group mean and std), dr_grpo (group mean only), "
        "rloo (leave-one-out mean), reinforce_pp (whitened discounted return, KL in the reward), reinforce_pp_baseline "
        "(return minus the group mean, then whitened over the batch; verl's reinforce_plus_plus_baseline). The group "
        "estimators (grpo, dr_grpo, rloo, reinforce_pp_baseline) refuse a prompt with one sample: "
        "samples_per_prompt must be 2 or more (a lone sample has no baseline; verl would pass its raw score through).")
    grpo_std_normalize: bool = Field(
        True, description="grpo only: divide by the group's std; false is the same as advantage_estimator=dr_grpo")
    loss_agg_mode: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm",
                           "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="How per-token losses (policy, entropy, KL loss) become one number: token_mean "
        "(DAPO: over the batch's tokens), seq_mean_token_mean (GRPO: mean over responses of their token means), "
        "seq_mean_token_sum (mean over responses of their token sums); the seq_mean modes count only responses with "
        "tokens left (mask_truncated, masked IS), as verl. Two fixed normalisers: token_sum_norm divides the token "
        "sum by N x L (Dr. GRPO's constant, N responses), seq_mean_token_sum_norm by L alone, without 1/N (verl's "
        "loss_scale_factor: the step grows with the batch size); L is loss_scale_factor or rollout.max_new_tokens.")
    loss_scale_factor: int | None = Field(
        None, ge=1, description="L of token_sum_norm and seq_mean_token_sum_norm; None: rollout.max_new_tokens "
        "(verl's default is the padded response length, which verl pads to its max response length)")
    prompts_per_step: int = Field(16, ge=1, description=(
        "Prompts sampled per step, over all processes (a multiple of the process count)."))
    samples_per_prompt: int = Field(1, ge=1, description=(
        "Responses sampled per prompt (the group of grpo and rloo, which need 2 or more)."))
    ppo_epochs: int = Field(2, ge=1, description="Passes over each step's samples.")
    minibatch_size: int = Field(8, ge=1, description=(
        "Responses per optimiser step, over all processes (a multiple of the process count)."))
    clip_range: float = Field(0.2, gt=0, description=(
        "The ratio is clipped to [1 - clip_range, 1 + clip_range] (the upper end: clip_range_high when set)."))
    clip_range_high: float | None = Field(None, gt=0, description=(
        "Upper clip of the ratio, 1 + clip_range_high (DAPO's clip-higher, e.g. 0.28); null: clip_range."))
    clip_ratio_c: float | None = Field(
        3.0, gt=1, description="Dual-clip (Ye et al. 2020): for a negative advantage the policy loss is capped at "
        "-clip_ratio_c x A, so a token whose ratio ran past c stops pushing (several epochs, stale rollouts). "
        "3.0 as verl and OpenRLHF; null: off. Logged: clip/pg_clipfrac_lower, the fraction of tokens capped.")
    value_clip_range: float = Field(0.2, gt=0, description=(
        "gae: the critic's new values are clipped to within this of the sampling-time values in the value loss."))
    vf_coef: float = Field(0.5, ge=0, description=(
        "gae: weight of the value loss. The critic has its own optimiser and backward pass, so under Adam it "
        "matters mostly through the gradient clip (train.max_grad_norm)."))
    entropy_coef: float = Field(0.0, ge=0, description=(
        "Weight of the entropy bonus subtracted from the policy loss (entropy of the sampled distribution, "
        "aggregated by loss_agg_mode)."))
    gamma: float = Field(1.0, ge=0, le=1, description=(
        "Per-token discount of the returns (gae, reinforce_pp); 1: the final score counts fully at every token."))
    lam: float = Field(0.95, ge=0, le=1, description=(
        "gae: GAE's lambda, trading bias for variance: 1 gives Monte-Carlo returns minus V, 0 one-step TD errors."))
    kl_coef: float = Field(0.05, ge=0, description=(
        "Per-token KL to the reference subtracted from the reward, r_t = -kl_coef KL_t (+ the score on the last "
        "token); reaches the advantages of gae and reinforce_pp only (grpo, rloo: use kl_loss_coef)."))
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k1", description="Per-token KL estimate in the reward (Schulman's k1, k2, k3); k3 is clamped to [-10, 10] "
        "as verl, its log-ratio first to [-20, 20]")
    kl_loss_coef: float = Field(0.0, ge=0, description=(
        "Weight of the KL to the reference as a loss term added to the policy loss (GRPO's); 0: none."))
    kl_loss_estimator: Literal["k2", "k3"] = Field(
        "k3", description="KL loss term's estimator; k3 is clamped to [-10, 10] as verl, so an outlier token "
        "(log pi_ref/pi above ~2.4) adds a bounded loss and no gradient")
    adaptive_kl_target: float | None = Field(None, description=(
        "Adapt kl_coef after every step so that the KL per response tracks this target (Ziegler et al. 2019: "
        "proportional, error clipped to +-20%, horizon 10,000 samples); null: kl_coef stays fixed."))
    target_approx_kl: float | None = Field(
        None, description="Stop an epoch early when the minibatch's approx_kl/k3 (mean of ratio - 1 - log ratio "
        "against the sampling-time policy) exceeds this. approx_kl/k1 (verl's ppo_kl) is logged beside it.")
    whiten_advantages: bool = Field(True, description=(
        "gae: normalise the advantages to zero mean and unit variance over the step's response tokens."))
    missing_eos_penalty: float = Field(1.0, ge=0, description=(
        "Subtracted from the score of a response that stopped at rollout.max_new_tokens without EOS."))
    critic_from: Literal["reward_model", "policy"] = Field("policy", description=(
        "gae: the critic's starting weights. policy: model.path with a new scalar head set to zero (V = 0); "
        "reward_model: reward.model with its trained head."))
    critic_learning_rate: float = Field(1e-5, gt=0, description=(
        "gae: the critic's peak AdamW learning rate (same schedule as the policy's)."))
    dynamic_sampling: bool = Field(False, description=(
        "DAPO: drop prompts whose samples all scored the same (zero advantage) and draw more, up to "
        "max_sampling_rounds."))
    max_sampling_rounds: int = Field(3, ge=1, description=(
        "dynamic_sampling: most sampling rounds per step; a step still short trains on the samples it has."))
    overlong_buffer: int = Field(0, ge=0, description=(
        "DAPO's soft overlong penalty: 0 up to rollout.max_new_tokens - overlong_buffer tokens, then falling "
        "linearly to -overlong_penalty at rollout.max_new_tokens; 0: off."))
    overlong_penalty: float = Field(1.0, ge=0, description="The overlong penalty reached at rollout.max_new_tokens.")
    mask_truncated: bool = Field(False, description=(
        "DAPO's overlong filtering: no policy loss on responses that hit rollout.max_new_tokens without EOS."))
    # Engine/trainer mismatch correction (m1_align/rl/algorithms.py: rollout_correction)
    tis_cap: float | None = Field(
        None, gt=0, description="Truncated importance sampling (Yao et al. 2025): each token's loss is weighted by "
        "min(pi_trainer / pi_engine, tis_cap); null: off. Logged: mismatch/tis_truncated_fraction.")
    tis_level: Literal["token", "sequence"] = Field(
        "token", description="token: one weight per token; sequence: one per response, the product of its tokens' "
        "ratios (exp of the summed log ratio) truncated at tis_cap, unbiased for the whole sequence but of higher "
        "variance (set tis_cap larger, e.g. 5-10)")
    mis_level: Literal["off", "token", "sequence"] = Field(
        "off", description="Masked importance sampling: drop tokens (token) or whole responses (sequence: the product "
        "of the ratios) whose pi_trainer / pi_engine leaves [mis_low, mis_high] from the loss. Logged: "
        "mismatch/mis_masked_token_fraction, mismatch/mis_masked_seq_fraction. Applied before TIS.")
    mis_low: float = Field(0.5, gt=0, lt=1, description="masked importance sampling's lower bound (verl: 1 / upper)")
    mis_high: float = Field(2.0, gt=1, description="masked importance sampling's upper bound")


class PPOConfig(StageConfig):
    ppo: PPOSection = Field(PPOSection(), description=(
        "The policy-gradient algorithm: advantage estimator, clipping, KL, critic and DAPO's options."))
    reward: RewardSection = Field(RewardSection(), description=(
        "What scores a response: the rule that checks a verifiable answer, the learned reward model, or both."))
    rollout: RolloutConfig = Field(RolloutConfig(), description="Sampling of the responses.")

    @model_validator(mode="after")
    def _correction_at_the_sampled_distribution(self):
        # the engines return temperature-1 log-probs (the probe's and the logs'); they are those of the
        # distribution that was sampled only at temperature 1 without top-p, and an importance ratio
        # between other distributions would correct for the wrong thing
        p, r = self.ppo, self.rollout
        if (p.tis_cap is not None or p.mis_level != "off") and (r.temperature != 1.0 or r.top_p != 1.0):
            raise ValueError(f"ppo.tis_cap / ppo.mis_level correct the engine's sampled distribution, known here only "
                             f"at rollout.temperature=1 and rollout.top_p=1 (got {r.temperature}, {r.top_p}): set "
                             "both to 1, or turn the correction off (ppo.tis_cap=null ppo.mis_level=off)")
        return self


GRPO_DEFAULTS = {"advantage_estimator": "grpo", "samples_per_prompt": 4, "kl_coef": 0.0, "kl_loss_coef": 0.01,
                 "ppo_epochs": 1, "minibatch_size": 16}


class GRPOConfig(PPOConfig):
    """The same stage with critic-free defaults (GRPO_DEFAULTS): GRPO advantages over 4 samples per prompt,
    token-mean loss, KL as a k3 loss term; the reward is the same router (rules, reward model, or both).
    Its `ppo` section takes every key of PPO's; keys a file leaves out keep these defaults."""

    ppo: PPOSection = Field(PPOSection(**GRPO_DEFAULTS), description=(
        "The policy-gradient algorithm (grpo's settings live in this ppo section too), with critic-free "
        "defaults: grpo advantages over 4 samples per prompt, KL as a k3 loss term."))


class RMSection(Section):
    margin_column: str | None = Field(None, description=(
        "A column of the preference data holding a per-pair margin m: the loss becomes -log sigmoid(r_chosen "
        "- r_rejected - m); null: no margin."))
    center_rewards_coef: float | None = Field(None, description=(
        "Adds this x mean((r_chosen + r_rejected)^2) to the loss, keeping rewards centred on 0 (Eisenstein et "
        "al. 2023); null: off."))


class RMConfig(StageConfig):
    rm: RMSection = Field(RMSection(), description="A Bradley-Terry reward model trained on preference pairs.")


class EvalSection(Section):
    mmlu_medical: bool = Field(True, description=(
        "MMLU's six medical subjects: the generated letter and the option log-likelihood (needs data.builtin)."))
    verifiable_sets: bool = Field(True, description=(
        "The held-out verifiable questions (built split `eval`, or data.answer_eval_file), answered greedily "
        "and checked by rule."))
    max_new_tokens: int = Field(96, ge=1, description="Most tokens generated per answer.")
    limit: int | None = Field(None, ge=1, description=(
        "At most this many questions per task (verifiable) or benchmark (open); null: all."))
    split: Literal["test", "dev"] = Field("test", description=(
        "Verifiable sets: test = the first `limit` per task (reported), dev = the last (for tuning)."))
    mmlu_limit: int | None = Field(None, ge=1, description=(
        "MMLU-medical questions scored by option log-likelihood, spread over the subjects (null: all 1,089)."))
    mmlu_generation_limit: int | None = Field(60, ge=1, description=(
        "Of those, how many are also answered by free generation."))
    batch_size: int = Field(32, ge=1, description=(
        "Sequences per generation / scoring batch (32 decodes 2.6x faster than 8 on CPU)."))
    max_length: int = Field(1024, ge=8, description="Tokens per conversation the reward model scores.")
    reward_model: str | None = Field(None, description=(
        "Reward model folder: report its average score of the answers to the open questions; null: skipped."))

    _paths = field_validator("reward_model")(_check_path)


class EvalConfig(StageConfig):
    output_dir: str | None = Field(None, description=(
        "Where the report goes; null: <stage dir>/eval for a stage output, else runs/eval/<model folder name>."))
    model: ModelConfig = Field(ModelConfig(), description=(
        "The model to evaluate: model.path is a model folder, a finished stage's output_dir, or a pipeline "
        "run_dir (its last finished policy stage)."))
    train: TrainConfig = Field(TrainConfig(), description="Not read by eval.")
    eval: EvalSection = Field(EvalSection(), description="Which benchmarks run, and how much of each.")
    rollout: RolloutConfig = Field(RolloutConfig(temperature=0.0), description=(
        "The generation engine and vLLM's memory settings; evaluation decodes greedily up to "
        "eval.max_new_tokens, so the sampling keys are not used."))


class RMEvalConfig(Section):
    model: ModelConfig = Field(ModelConfig(), description=(
        "The reward model: model.path is a reward model folder or a finished `rm` stage's output_dir."))
    data: DataConfig = Field(DataConfig(), description=(
        "data.eval_file: pairs to score (ours or RewardBench-style); unset: the built `eval_preference` split."))
    output_dir: str | None = Field(None, description=(
        "Where the report goes; null: <rm stage dir>/rm_eval, else runs/rm-eval/<model name>."))
    max_length: int = Field(1024, ge=8, description="Tokens per scored conversation (longer ones lose their start).")
    batch_size: int = Field(16, ge=1, description="Conversations scored per forward.")
    limit: int | None = Field(None, ge=1, description="At most this many pairs, spread over the subsets; null: all.")

    _paths = field_validator("output_dir")(_check_path)


def _stage(name: str) -> Any:
    return Field(None, description=f"The {name} stage: any key of `m1-align {name}` (m1-align {name} --help "
                 "lists them); keys left out take that stage's defaults and the pipeline's wiring. null: skipped.")


class PipelineStages(Section):
    pretrain: PretrainConfig | None = _stage("pretrain")
    sft: SFTConfig | None = _stage("sft")
    elo: ELOConfig | None = _stage("elo")
    tdpo: TDPOConfig | None = _stage("tdpo")
    rm: RMConfig | None = _stage("rm")
    ppo: PPOConfig | None = _stage("ppo")
    grpo: GRPOConfig | None = _stage("grpo")


class PipelineConfig(Section):
    """Stages run in the order pretrain, sft, elo, tdpo, rm, ppo, grpo; a stage left out is skipped. Within
    a stage, output_dir, seed and data (field by field) default to the pipeline's, and model.path to the
    previous policy stage's output (rm and ppo's critic start from the policy; ppo's and grpo's reward.model
    from rm). The RL stages ppo and grpo both start from the policy before them, so one run can compare them.
    User data files belong to the stage that reads them (stages.sft.data.train_file=chats.jsonl): the pipeline's
    own data.train_file would reach every stage, and each reads its own shape."""

    run_dir: str = Field("runs/quickstart", description="Every stage writes run_dir/<stage>/, and the report "
                         "run_dir/report.md.")
    seed: int = Field(42, description="Training seed of every stage that does not set its own.")
    data: DataConfig = Field(DataConfig(), description=(
        "Data of every stage; a stage's own data keys override these field by field."))
    stages: PipelineStages = Field(PipelineStages(), description=(
        "The stages, run in the order pretrain, sft, elo, tdpo, rm, ppo, grpo. In each, output_dir, seed and "
        "data default to the pipeline's, and model.path to the previous policy stage's output (ppo and grpo "
        "both start from the policy before RL; their reward.model from rm)."))
    eval: EvalConfig = Field(EvalConfig(), description=(
        "The evaluation run on the starting model and after every policy stage (its model.path, data and "
        "output_dir are set per stage)."))

    _paths = field_validator("run_dir")(_check_path)


SCHEMAS: dict[str, type[BaseModel]] = {
    "data": DataStageConfig,
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "elo": ELOConfig,
    "tdpo": TDPOConfig,
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
    "rm": RMConfig,
    "rm-eval": RMEvalConfig,
    "eval": EvalConfig,
    "pipeline": PipelineConfig,
}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML file and everything it inherits through `defaults:`, merged in order."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: `defaults` forms a cycle ({' -> '.join(p.name for p in chain)})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    parents = data.pop("defaults", [])
    merged: dict[str, Any] = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = deep_merge(merged, _read_yaml(path.parent / parent, (*chain, path.resolve())))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`train.lr=1e-5 model.path=/ckpt` -> nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    seen: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
            raise ConfigError(f"command line: override {item!r} is not of the form dotted.key=value")
        if key in seen:
            raise ConfigError(f"command line: {key} is given twice; give it once")
        seen.add(key)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: {key!r} sets a key inside a value that is not a mapping")
        # a mapping given after dotted keys of the same section merges with them instead of dropping them
        node[leaf] = deep_merge(node[leaf], value) if isinstance(value, dict) and isinstance(node.get(leaf), dict) else value
    return nested


def _known_keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in schema.model_fields.items():
        keys.append(prefix + name)
        sub = field.annotation
        for candidate in getattr(sub, "__args__", (sub,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                keys += _known_keys(candidate, f"{prefix}{name}.")
    return keys


def _leaves(value: Any, key: str) -> list[str]:
    """The dotted keys of every value under `key` (itself when the value is not a mapping)."""
    if isinstance(value, dict) and value:
        return [leaf for name, sub in value.items() for leaf in _leaves(sub, f"{key}.{name}")]
    return [key]


def _misplaced(key: str, value: Any, known: list[str]) -> list[str]:
    """Known keys that end the way the unknown key's leaves end, longest ending first: what a key written under
    the wrong section (`grpo.advantage_estimator` for `ppo.advantage_estimator`) was meant to be."""
    found: list[str] = []
    for leaf in _leaves(value, key):
        parts = leaf.split(".")
        for n in range(len(parts), 0, -1):
            tail = ".".join(parts[-n:])
            matches = [k for k in known if k.endswith("." + tail) or (k == tail and n < len(parts))]
            if matches:
                found += [m for m in matches if m not in found]
                break
    return found


def _describe(err: dict[str, Any], schema: type[BaseModel], source: str) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        known = _known_keys(schema)
        misplaced = _misplaced(key, err.get("input"), known)
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        owners = [name for name, other in SCHEMAS.items() if other is not schema and key in _known_keys(other)]
        hint = ""
        if misplaced:
            hint = f"; did you mean {' or '.join(repr(k) for k in misplaced[:3])}?"
        elif close:
            hint = f"; did you mean '{close[0]}'?"
        elif owners:
            hint = f"; it is a key of {', '.join(owners)} (m1-align {owners[0]} ...), not of this command"
        return f"unknown key '{key}' in {source}{hint}"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return f"{source}: '{key}' {err['msg'].lower()} (got {shown})"


def validate(schema: type[BaseModel], data: dict[str, Any], source: str) -> BaseModel:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # The same bad value can fail several union members; report the first distinct key.
        raise ConfigError(_describe(errors[0], schema, source)) from None


def load_config(stage: str, path: str | Path | None, overrides: list[str] = ()) -> BaseModel:
    """Load, merge and validate the config of one stage; raises ConfigError with one clear line."""
    schema = SCHEMAS[stage]
    data = _read_yaml(Path(path)) if path else {}
    source = str(path) if path else "the defaults"
    validate(schema, data, source)  # file errors are reported against the file, not the command line
    if overrides:
        data = deep_merge(data, parse_overrides(list(overrides)))
        source = f"{source} + command line"
    return validate(schema, data, source)


def load_data_config(path: str | Path | None, overrides: list[str] = ()) -> DataStageConfig:
    """The `data` section of any config (a stage's, a pipeline's), for `m1-align data build|show`."""
    data = _read_yaml(Path(path)) if path else {}
    section = {"data": data["data"]} if isinstance(data.get("data"), dict) else {}
    source = str(path) if path else "the defaults"
    if overrides:
        section = deep_merge(section, parse_overrides(list(overrides)))
        source = f"{source} + command line"
    return validate(DataStageConfig, section, source)


def dump_config(config: BaseModel) -> str:
    """The merged config as YAML, with every default filled in; loads back to the same object."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Documentation: `m1-align STAGE --help` and the documented `--print-config`
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldDoc:
    key: str  # dotted, as an override names it
    type: str  # e.g. "FLOAT > 0", "{cosine,wsd,linear,constant}", "STR|null"
    default: Any  # this schema's default, JSON-like (a section's default may differ by stage)
    description: str


@dataclass(frozen=True)
class SectionDoc:
    key: str  # "" for the top level
    description: str
    fields: list[FieldDoc]


_SCALAR_TYPES = {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config model a field always holds (a section); None for values and for optional sub-configs."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _optional_section(annotation: Any) -> type[BaseModel] | None:
    """The config model of an optional sub-config (`X | None`, e.g. data.medcalc); None for anything else."""
    models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 and type(None) in get_args(annotation) else None


def type_label(annotation: Any) -> str:
    """A field's type as --help shows it: INT, FLOAT, STR, BOOL, {choice,...}, [ITEM,...], X|null."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation in _SCALAR_TYPES:
        return _SCALAR_TYPES[annotation]
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin is Annotated:
        return type_label(args[0])
    if origin in (Union, types.UnionType):
        return "|".join("null" if a is type(None) else type_label(a) for a in args)
    if origin is list:
        return f"[{type_label(args[0])},...]"
    if origin is tuple:
        return "[" + ",".join(type_label(a) for a in args) + "]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "MAPPING"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: list[Any]) -> str:
    """pydantic's ge/gt/le/lt as `>= 1`, or `in [0, 1)` when bounded on both sides."""
    found = {attr: getattr(m, attr) for m in metadata for attr, _ in _BOUNDS if getattr(m, attr, None) is not None}
    low = next(((a, found[a]) for a in ("ge", "gt") if a in found), None)
    high = next(((a, found[a]) for a in ("le", "lt") if a in found), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]:g}, {high[1]:g}{']' if high[0] == 'le' else ')'}"
    return " ".join(f"{symbol} {found[attr]:g}" for attr, symbol in _BOUNDS if attr in found)


def section_docs(schema: type[BaseModel]) -> list[SectionDoc]:
    """Every key of a schema with its type, this schema's default and its description, grouped by section:
    the top-level keys first, then each section (and its subsections) in the schema's order."""
    sections: list[SectionDoc] = []

    def walk(model: type[BaseModel], defaults: dict[str, Any], prefix: str, description: str) -> None:
        fields = []
        sections.append(SectionDoc(prefix.rstrip("."), description, fields))
        for name, field in model.model_fields.items():
            if _section_model(field.annotation) is None:
                label = " ".join(filter(None, (type_label(field.annotation), _bounds(field.metadata))))
                fields.append(FieldDoc(prefix + name, label, defaults[name], field.description or ""))
        for name, field in model.model_fields.items():
            sub = _section_model(field.annotation)
            if sub is not None:
                walk(sub, defaults[name], f"{prefix}{name}.", field.description or "")
            elif (optional := _optional_section(field.annotation)) is not None:  # off by default; its keys when on
                walk(optional, optional().model_dump(mode="json"), f"{prefix}{name}.",
                     f"when {prefix}{name} is set: " + (field.description or ""))

    walk(schema, schema().model_dump(mode="json"), "", "")
    return [s for s in sections if s.fields]


def yaml_value(value: Any) -> str:
    """One JSON-like value as a one-line YAML value that loads back to it."""
    if isinstance(value, str) and not value.isprintable():  # "\nAnswer:": a double-quoted escape, not a line break
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("\n...\n").strip()


def _wrap(text: str, width: int, default: str | None = None) -> list[str]:
    """Lines of at most `width`, ending with "(default: ...)" kept whole on one line."""
    if default is not None:
        text += " " + f"(default: {default})".replace(" ", "\0")
    return [line.replace("\0", " ") for line in textwrap.wrap(text, width, break_on_hyphens=False)]


def settings_help(schema: type[BaseModel], sections: set[str] | None = None, width: int | None = None) -> str:
    """The settings part of `m1-align STAGE --help`: each key with its type, description and default, grouped
    by section, in the layout of argparse's option help (TRL's CLI help lists its dataclass fields this way)."""
    width = width or max(60, min(shutil.get_terminal_size().columns - 2, 120))
    indent = 24  # argparse's help column
    lines = _wrap("settings: set any of them in the YAML file, or on the command line as dotted.key=value; "
                  "the defaults shown are this command's.", width)
    for section in section_docs(schema):
        if sections is not None and section.key.split(".")[0] not in sections:
            continue
        title = f"{section.key}: {section.description}" if section.key else "top level:"
        lines += ["", *textwrap.wrap(title, width, subsequent_indent="  ", break_on_hyphens=False)]
        for doc in section.fields:
            head = f"  {doc.key}={doc.type}"
            text = _wrap(doc.description, width - indent, yaml_value(doc.default))
            if len(head) <= indent - 2:
                lines.append(head.ljust(indent) + text[0])
                text = text[1:]
            else:
                lines.append(head)
            lines += [" " * indent + t for t in text]
    return "\n".join(lines) + "\n"


def documented_config(config: BaseModel, header: str = "", sections: set[str] | None = None, width: int = 100) -> str:
    """The config as YAML with every key's description above it as a comment, and its default where the value
    differs: a documented starting file that loads back to the same config. A pipeline's stages show only the
    keys they set, since the pipeline fills in the rest (stage_configs); `sections` keeps only those top-level
    keys."""
    def walk(value: BaseModel, data: dict[str, Any], default: dict[str, Any], indent: int, only_set: bool) -> list[str]:
        lines, pad = [], " " * indent
        for name, field in type(value).model_fields.items():
            if (only_set and name not in value.model_fields_set) or (sections and not indent and name not in sections):
                continue
            current = getattr(value, name)
            changed = not isinstance(current, BaseModel) and data[name] != default.get(name)
            if isinstance(current, BaseModel) and not indent and lines:
                lines.append("")
            lines += [f"{pad}# {line}" for line in _wrap(field.description or "", width - indent - 2,
                                                         yaml_value(default.get(name)) if changed else None)]
            if not isinstance(current, BaseModel):
                lines.append(f"{pad}{name}: {yaml_value(data[name])}")
                continue
            # an optional sub-config (a pipeline's stage) is only what was written for it
            optional = _section_model(field.annotation) is None
            sub_default = type(current)().model_dump(mode="json") if optional else default[name]
            inner = walk(current, data[name], sub_default, indent + 2, only_set or optional)
            lines += [f"{pad}{name}:" + ("" if inner else " {}"), *inner]
        return lines

    header_lines = [f"# {line}" for line in _wrap(header, width - 2)]
    body = walk(config, config.model_dump(mode="json"), type(config)().model_dump(mode="json"), 0, False)
    return "\n".join(header_lines + body) + "\n"
