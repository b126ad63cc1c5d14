"""Typed experiment configs: one schema per stage, loaded from YAML with `key=value` overrides.

A config file may inherit from others with `defaults: base.yaml` (or a list); later files and the
command line override earlier ones, mapping by mapping. Every error is a single `ConfigError` line
that names the file (or "command line"), the dotted key and what was expected.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem the user can fix; the message is one line."""


class Section(BaseModel):
    """Base for every schema: unknown keys are errors, assignments are validated."""

    # inf and nan are never a meaningful setting (learning_rate=inf would train to NaN and finish)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    enabled: bool = False  # train a LoRA adapter instead of all weights
    r: int = Field(16, ge=1)  # adapter rank
    alpha: int = Field(32, ge=1)  # scaling numerator (scale = alpha / r)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear": every linear layer of the body, whatever the architecture (the hybrid's W_pack, o_proj and
    # MLP; a Llama's q/k/v/o and MLP), never the output head; or a list of module names
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge_on_save: bool = False  # model/ gets the merged full weights (the adapter goes to adapter/); off: model/ is the adapter


class ModelConfig(Section):
    # A Hugging Face model folder (ours or any causal LM), or "previous" to take the previous
    # pipeline stage's output. Exactly one of path / preset is used; path wins.
    path: str | None = None
    preset: str | None = None  # in-repo hybrid preset when training from scratch: tiny | quickstart | baichuan-m1-14b
    tokenizer: str | None = None  # tokenizer folder; default: the model folder
    # auto: fp32 weights, bf16 autocast on a GPU, and on a CPU where a 1 s probe finds bf16 matmuls faster
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False  # never on unless asked: it runs code from the model folder
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer in place (regional compilation: one compile serves every layer, for any
    # sequence length); the first step pays the compile (~20 s on 2 CPU cores), generation runs eager. On the
    # real model on a CPU: 0.84-0.94x the full-parameter SFT step, 0.79x LoRA's without dropout, no gain with
    # LoRA dropout (docs/BENCHMARKS.md)
    compile: bool = False
    lora: LoraConfig = LoraConfig()

    _paths = field_validator("path", "tokenizer")(_check_path)


class DataConfig(Section):
    builtin: bool = True  # build the offline medical datasets (m1_align.data) for this stage
    cache_dir: str = "data_cache"  # where built datasets live (shared across runs)
    train_file: str | None = None  # user data: JSONL, Parquet or a saved `datasets` folder
    eval_file: str | None = None  # user held-out data in the stage's training shape (conversations, pairs, ...)
    # held-out questions with a checkable answer (prompt, answer[, rule, task]) for answer accuracy;
    # default: the built medical eval split
    answer_eval_file: str | None = None
    max_per_task: int = Field(2000, ge=1)  # rows per task and training split in the built data
    eval_per_task: int = Field(200, ge=1)  # rows per task in each held-out split
    seed: int = 0  # data build seed (independent of the training seed)
    # train on these built tasks only (None: all); held-out evaluation always covers every task. RL stages
    # use it to drop tasks the starting policy never solves: their groups carry no signal.
    tasks: list[str] | None = None

    _paths = field_validator("cache_dir", "train_file", "eval_file", "answer_eval_file")(_check_path)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str] | None) -> list[str] | None:
        from m1_align.data.tasks import TASKS

        if value is not None:
            unknown = [t for t in value if t not in TASKS]
            if unknown or not value:
                raise ValueError(f"unknown task(s) {unknown or '[]'}; choose from {sorted(TASKS)} (or null for all)")
        return value


class TrainConfig(Section):
    learning_rate: float = Field(2e-5, gt=0)  # peak LR (the paper's SFT starts its cosine at 2e-5)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # > 0 overrides num_epochs
    batch_size: int = Field(8, ge=1)  # per device
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr_scheduler: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    decay_ratio: float = Field(0.1, ge=0, le=1)  # wsd only: fraction of steps in the final decay
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)  # each in [0, 1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(1024, ge=8)  # tokens per sample (and per packed row)
    save_steps: int = Field(200, ge=1)  # checkpoint every N optimiser steps
    save_total_limit: int = Field(2, ge=1)  # keep the last K checkpoints
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = None  # held-out loss every N steps (None: only at the end)
    eval_max_new_tokens: int = Field(96, ge=1)  # generation length for held-out answer accuracy
    eval_limit: int | None = Field(None, ge=1)  # held-out dev questions per task the stage checks itself on (None: all)
    report_to: list[Literal["tensorboard", "wandb"]] = []  # metrics.jsonl is always written
    deepspeed: str | None = None  # a DeepSpeed JSON config, e.g. configs/deepspeed/zero2.json
    resume: bool = True  # continue from the last checkpoint in output_dir when there is one
    # online stages (ELO, PPO, GRPO): pack the samples into rows without padding, positions restarting per
    # sample (checked against the padded forward when the run starts; off where the model disagrees)
    padding_free: bool = True

    _paths = field_validator("deepspeed")(_check_path)


class RolloutConfig(Section):
    engine: Literal["auto", "vllm", "hf"] = "auto"  # auto: vLLM when installed, else HF generate
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)
    kv_cache_gib: float = Field(1.0, gt=0)  # vLLM on CPU: VLLM_CPU_KVCACHE_SPACE
    gpu_memory_utilization: float = Field(0.35, gt=0, le=1)  # vLLM on GPU, shared with the trainer
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = True  # skip graph capture/compilation: starts in seconds
    in_process: bool = True  # VLLM_ENABLE_V1_MULTIPROCESSING=0
    # seed each prompt's samples by (seed, step, its place in the step's global batch): the same samples on any
    # number of processes (without dynamic sampling, whose extra draws are per rank), at the cost of sampling
    # prompt by prompt (HF generate, and vLLM on CPU)
    seed_per_prompt: bool = False


class StageConfig(Section):
    """Fields every stage has."""

    output_dir: str = "runs/default"  # the stage writes here; an existing finished output is never overwritten
    overwrite: bool = False  # allow writing into an output_dir that holds a finished run
    seed: int = 42
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    _paths = field_validator("output_dir")(_check_path)


# ---------------------------------------------------------------------------------------------
# Stage schemas
# ---------------------------------------------------------------------------------------------


class DataStageConfig(StageConfig):
    pass


class PretrainSection(Section):
    vocab_size: int = Field(4096, ge=300)  # byte-level BPE trained on the medical corpus
    tokens_per_row: int = Field(256, ge=16)  # packed corpus rows
    heldout_texts: int = Field(256, ge=1)  # held-out corpus texts for the perplexity


class PretrainConfig(StageConfig):
    pretrain: PretrainSection = PretrainSection()


class SFTSection(Section):
    packing: bool = True  # several conversations per row with sample masking (hybrid model default)
    assistant_only_loss: bool = True


class SFTConfig(StageConfig):
    sft: SFTSection = SFTSection()


class TDPOSection(Section):
    loss: Literal["tdpo1", "tdpo2", "dpo"] = "tdpo2"
    alpha: float = Field(0.5, ge=0)  # TDPO2 weight of the sequential-KL difference
    beta: float = Field(0.1, gt=0)  # strength of the KL constraint
    rpo_alpha: float = Field(0.0, ge=0)  # weight of the chosen response's token-mean NLL (RPO); 0: the paper's loss
    kl_chunk_size: int = Field(128, ge=1)  # positions per chunk of the full-vocabulary KL
    ref_model: str | None = None  # default: a frozen copy of model.path (or the adapter-disabled policy)
    # built: the data's written pairs; on_policy: the starting model's own samples, a right answer against a wrong
    # one of the same question (m1_align/preference/on_policy.py), sampled with the `rollout` settings; the questions
    # come from the built rl split, or from data.train_file read in the rl format (prompt, answer, rule)
    pairs: Literal["built", "on_policy"] = "built"
    pair_prompts: int = Field(256, ge=1)  # on_policy: verifiable training questions sampled
    pair_samples: int = Field(4, ge=2)  # on_policy: responses sampled per question
    pairs_per_prompt: int = Field(2, ge=1)  # on_policy: at most this many pairs from one question

    _paths = field_validator("ref_model")(_check_path)


class TDPOConfig(StageConfig):
    tdpo: TDPOSection = TDPOSection()
    rollout: RolloutConfig = RolloutConfig(temperature=0.7, max_new_tokens=96)  # tdpo.pairs=on_policy only


class ELOSection(Section):
    """Log-probs: the score-function term and the KL use the sampled distribution, softmax(logits /
    rollout.temperature); the reward r_k = log pi(A | Q, c_k) is the model's own (temperature 1)."""

    k: int = Field(4, ge=2)  # reasoning paths sampled per question
    baseline: Literal["mean", "leave_one_out", "none"] = "mean"
    lambda_answer: float = Field(0.0, ge=0)  # weight of the pathwise answer-likelihood term
    answer_delimiter: str = "\nAnswer:"
    length_normalize: bool = False  # divide r_k by the answer length
    drop_degenerate: bool = True  # drop empty, truncated or repeating paths
    kl_coef: float = Field(0.0, ge=0)  # KL(pi || pi_start) as a loss term over the reasoning tokens
    kl_estimator: Literal["k2", "k3"] = "k3"  # loss-term estimators whose gradient pulls towards the reference
    prompts_per_step: int = Field(8, ge=1)
    epochs_per_batch: int = Field(1, ge=1)  # > 1: reuse the paths with PPO's clipped importance ratio
    clip_range: float = Field(0.2, gt=0)  # the ratio's clip when epochs_per_batch > 1


class ELOConfig(StageConfig):
    elo: ELOSection = ELOSection()
    rollout: RolloutConfig = RolloutConfig()


class RewardSection(Section):
    model: str | None = None  # learned reward model folder (for open questions)
    mode: Literal["route", "rule", "model", "mix"] = "route"  # route: rule when verifiable, else model
    rule_weight: float = Field(1.0, ge=0)  # mix only
    model_weight: float = Field(1.0, ge=0)  # mix only
    length_penalty: float = Field(0.0, ge=0)  # subtracted per response token
    normalize: bool = False  # whiten scores per batch

    _paths = field_validator("model")(_check_path)


class PPOSection(Section):
    """Log-probs: the ratio, the KL (reward and loss) and the entropy use the sampled distribution,
    softmax(logits / rollout.temperature); the engine mismatch and TIS compare temperature-1 log-probs."""

    # gae: PPO with a critic; grpo, rloo, reinforce_pp: critic-free (m1_align/rl/algorithms.py)
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    grpo_std_normalize: bool = True  # grpo: divide by the group's std (false: Dr. GRPO, mean only)
    # token_mean (DAPO), seq_mean_token_mean (GRPO), seq_mean_token_sum, token_sum_norm (Dr. GRPO; over max_new_tokens)
    loss_agg_mode: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"] = "token_mean"
    prompts_per_step: int = Field(16, ge=1)
    samples_per_prompt: int = Field(1, ge=1)
    ppo_epochs: int = Field(2, ge=1)
    minibatch_size: int = Field(8, ge=1)
    clip_range: float = Field(0.2, gt=0)  # ratio clip below 1 (and above, unless clip_range_high is set)
    clip_range_high: float | None = Field(None, gt=0)  # DAPO's clip-higher, e.g. 0.28
    value_clip_range: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_coef: float = Field(0.05, ge=0)  # KL to the reference in the reward, per token
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_loss_coef: float = Field(0.0, ge=0)  # KL to the reference as a loss term (GRPO)
    kl_loss_estimator: Literal["k2", "k3"] = "k3"
    adaptive_kl_target: float | None = None  # set to adapt kl_coef towards this KL
    target_approx_kl: float | None = None  # stop an epoch early above this approximate KL
    whiten_advantages: bool = True  # gae only
    missing_eos_penalty: float = Field(1.0, ge=0)
    critic_from: Literal["reward_model", "policy"] = "policy"
    critic_learning_rate: float = Field(1e-5, gt=0)
    # DAPO: drop prompts whose samples all scored the same and draw more, up to this many sampling rounds
    dynamic_sampling: bool = False
    max_sampling_rounds: int = Field(3, ge=1)
    overlong_buffer: int = Field(0, ge=0)  # soft penalty over the last N tokens before rollout.max_new_tokens
    overlong_penalty: float = Field(1.0, ge=0)  # reached at max_new_tokens
    mask_truncated: bool = False  # no loss on responses that hit max_new_tokens
    tis_cap: float | None = Field(None, gt=0)  # truncated importance weight min(pi_trainer / pi_engine, cap)


class PPOConfig(StageConfig):
    ppo: PPOSection = PPOSection()
    reward: RewardSection = RewardSection()
    rollout: RolloutConfig = RolloutConfig()


GRPO_DEFAULTS = {"advantage_estimator": "grpo", "samples_per_prompt": 4, "kl_coef": 0.0, "kl_loss_coef": 0.01,
                 "ppo_epochs": 1, "minibatch_size": 16}


class GRPOConfig(PPOConfig):
    """The same stage with critic-free defaults (GRPO_DEFAULTS): GRPO advantages over 4 samples per prompt,
    token-mean loss, KL as a k3 loss term; the reward is the same router (rules, reward model, or both).
    Its `ppo` section takes every key of PPO's; keys a file leaves out keep these defaults."""

    ppo: PPOSection = PPOSection(**GRPO_DEFAULTS)

    @model_validator(mode="before")
    @classmethod
    def _grpo_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("ppo"), dict):
            data = {**data, "ppo": {**GRPO_DEFAULTS, **data["ppo"]}}
        return data


class RMSection(Section):
    margin_column: str | None = None  # optional per-pair margin in the data
    center_rewards_coef: float | None = None


class RMConfig(StageConfig):
    rm: RMSection = RMSection()


class EvalSection(Section):
    mmlu_medical: bool = True  # MMLU's six medical subjects: generated letter and option log-likelihood
    verifiable_sets: bool = True  # the held-out verifiable questions (split `eval` or data.eval_file)
    max_new_tokens: int = Field(96, ge=1)
    limit: int | None = Field(None, ge=1)  # at most this many questions per task (verifiable) or benchmark (open)
    split: Literal["test", "dev"] = "test"  # verifiable sets: test = first `limit` per task (reported), dev = last
    mmlu_limit: int | None = Field(None, ge=1)  # MMLU-medical questions by option log-likelihood, spread over the subjects (None: all 1,089)
    mmlu_generation_limit: int | None = Field(60, ge=1)  # of those, how many are also answered by free generation
    batch_size: int = Field(32, ge=1)  # sequences per generation / scoring batch (32 decodes 2.6x faster than 8 on CPU)
    max_length: int = Field(1024, ge=8)  # tokens per conversation the reward model scores
    reward_model: str | None = None  # average RM score on open questions

    _paths = field_validator("reward_model")(_check_path)


class EvalConfig(StageConfig):
    # model.path: a model folder, a finished stage's output_dir, or a pipeline run_dir (its last
    # finished policy stage).
    output_dir: str | None = None  # unset: <stage dir>/eval, else runs/eval/<model folder name>
    eval: EvalSection = EvalSection()
    rollout: RolloutConfig = RolloutConfig(temperature=0.0)


class RMEvalConfig(Section):
    # model.path: a reward model folder or a finished `rm` stage's output_dir.
    model: ModelConfig = ModelConfig()
    # data.eval_file: pairs to score (ours or RewardBench-style); unset: the built `eval_preference` split.
    data: DataConfig = DataConfig()
    output_dir: str | None = None  # unset: <rm stage dir>/rm_eval, else runs/rm-eval/<model name>
    max_length: int = Field(1024, ge=8)  # tokens per scored conversation
    batch_size: int = Field(16, ge=1)
    limit: int | None = Field(None, ge=1)  # at most this many pairs, spread over the subsets

    _paths = field_validator("output_dir")(_check_path)


class PipelineStages(Section):
    pretrain: PretrainConfig | None = None
    sft: SFTConfig | None = None
    elo: ELOConfig | None = None
    tdpo: TDPOConfig | None = None
    rm: RMConfig | None = None
    ppo: PPOConfig | None = None
    grpo: GRPOConfig | None = None


class PipelineConfig(Section):
    """Stages run in the order pretrain, sft, elo, tdpo, rm, ppo, grpo; a stage left out is skipped. Within
    a stage, output_dir, seed and data (field by field) default to the pipeline's, and model.path to the
    previous policy stage's output (rm and ppo's critic start from the policy; ppo's and grpo's reward.model
    from rm). The RL stages ppo and grpo both start from the policy before them, so one run can compare them.
    User data files belong to the stage that reads them (stages.sft.data.train_file=chats.jsonl): the pipeline's
    own data.train_file would reach every stage, and each reads its own shape."""

    run_dir: str = "runs/quickstart"  # every stage writes run_dir/<stage>/
    seed: int = 42
    data: DataConfig = DataConfig()
    stages: PipelineStages = PipelineStages()
    eval: EvalConfig = EvalConfig()  # run after every stage on its model

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


def _describe(err: dict[str, Any], schema: type[BaseModel], source: str) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, _known_keys(schema), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        owners = [name for name, other in SCHEMAS.items() if other is not schema and key in _known_keys(other)]
        if not close and owners:
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
