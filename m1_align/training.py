"""What the trainer-based stages (SFT, TDPO, RM) share: loading models, LoRA, HF training arguments,
metrics.jsonl, resume and the final save. The algorithms live in their own folders."""

from __future__ import annotations

import copy
import ctypes
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)

from m1_align.config import ConfigError, DataConfig, LoraConfig, ModelConfig, StageConfig, dump_config
from m1_align.runs import (
    COMPLETE_FILE,
    DivergedError,
    MetricsLogger,
    StageResult,
    atomic_replace_dir,
    atomic_write_text,
    check_complete,
    mark_complete,
    prepare_output_dir,
)

CHECKPOINTS = "checkpoints"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
FINAL_MODEL = "model"
RECORDED_CONFIG = "m1_align_config.yaml"  # the config that made a model, saved beside it by every stage


class ModelPathError(FileNotFoundError):
    pass


def looks_like_hub_id(path: str | Path) -> bool:
    """`org/name` that is not here, under no folder that is: what the Hub calls a model, not a local path."""
    text = str(path)
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None and not Path(text).exists()
            and not Path(text.split("/")[0]).exists())


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder, or a stage output folder holding one in `model/`, checked before anything loads it."""
    if looks_like_hub_id(path):
        name = str(path).split("/")[1].lower()
        raise ModelPathError(
            f"model path {path} is no folder here and looks like a Hugging Face Hub id; m1-align reads local folders "
            f"and does not download (no internet): on a machine with internet run `hf download {path} --local-dir "
            f"models/{name}`, copy that folder here and set model.path=models/{name} (a .gguf file: m1-align import-gguf)")
    path = Path(path).expanduser()
    if (path / FINAL_MODEL / "config.json").is_file():
        path = path / FINAL_MODEL
    elif not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise ModelPathError(
            f"model path {path} holds no Hugging Face model (no config.json); point model.path at a model folder "
            "or at a finished stage's output_dir"
        )
    check_model_dir(path)
    return path


def check_model_dir(path: Path) -> None:
    """What transformers would otherwise report with a traceback: config.json that is not UTF-8 JSON, a
    model_type this transformers does not know, a weights file that is truncated or not safetensors."""
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelPathError(f"{config_file} is not valid UTF-8 JSON ({e}); restore the model's config.json") from None
        model_type = config.get("model_type") if isinstance(config, dict) else None
        from transformers import CONFIG_MAPPING  # baichuan_m1 is in it: `import m1_align` registers it

        if model_type not in CONFIG_MAPPING and not config.get("auto_map"):
            import transformers

            raise ModelPathError(
                f"{config_file}: model_type {model_type!r} is not one transformers {transformers.__version__} knows; "
                "check the folder is a Hugging Face causal LM (or upgrade transformers)")
    from safetensors import SafetensorError, safe_open

    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt"):  # reads and checks the header against the file's size only
                pass
        except (SafetensorError, OSError) as e:
            raise ModelPathError(f"{weights} is damaged or truncated ({e}); {_rewrite_model_hint(path)}") from None


def _rewrite_model_hint(path: Path) -> str:
    """How to get a damaged model folder back, by what wrote it."""
    if (path / RECORDED_CONFIG).is_file():
        stage = path.parent if path.name == FINAL_MODEL else path
        return f"run the stage that wrote {stage} again with overwrite=true, or copy the folder again from a good copy"
    if (path / "import.json").is_file():
        return f"import it again: m1-align import-gguf GGUF {path} --overwrite"
    return "copy the model folder again from where it came from (compare the file's size with the original's)"


# the shape of a stage's user data files (data.train_file / data.eval_file); answer_eval_file is always "rl"
DATA_KIND = {"SFTConfig": "sft", "TDPOConfig": "preference", "RMConfig": "preference", "ELOConfig": "rl",
             "PPOConfig": "rl", "GRPOConfig": "rl"}
# tdpo.pairs=on_policy samples its pairs from questions: its train_file is read as rl rows (stage_data.rl_rows)
ON_POLICY_HINT = ("tdpo.pairs=on_policy samples its pairs from these questions (keys prompt, answer[, rule]); "
                  "for written pairs (prompt, chosen, rejected) set tdpo.pairs=built")


def data_kind(cfg: StageConfig, name: str) -> str | None:
    """The shape in which a stage reads its data file `name` (a DataConfig field), None where it reads none."""
    if name == "answer_eval_file":
        return "rl"
    if name == "train_file" and getattr(getattr(cfg, "tdpo", None), "pairs", None) == "on_policy":
        return "rl"
    return DATA_KIND.get(type(cfg).__name__)


def check_data_files(cfg: StageConfig) -> None:
    """Each user data file read as the stage will read it; the DataError names the field (also as `.field`)."""
    from m1_align.data.user_data import DataError, load_user_data
    from m1_align.stage_data import check_open_rows

    for name in ("train_file", "eval_file", "answer_eval_file"):
        path, kind = getattr(cfg.data, name), data_kind(cfg, name)
        if not (path and kind):
            continue
        try:
            data = load_user_data(path, kind)
            if kind == "rl" and "rule" in data.column_names:
                check_open_rows(cfg, name, data["rule"])
        except DataError as e:
            on_policy = name == "train_file" and kind == "rl" and type(cfg).__name__ == "TDPOConfig"
            error = DataError(f"data.{name}: {e}" + (f" ({ON_POLICY_HINT})" if on_policy else ""))
            error.field = name
            raise error from None


BUILD_KEYS = ("seed", "max_per_task", "eval_per_task", "medcalc")  # what names a build of the data (build.build_dir)


def split_difference(here: DataConfig, there: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, here, there) for each build setting in which `here` differs from `there` (a recorded config's
    data section): another build holds out other questions, so some held out on one side were trained on by
    the other. Empty where either side does not use the built data."""
    defaults = DataConfig()
    if not (here.builtin and there.get("builtin", True)):
        return []
    here_values = here.model_dump(mode="json")
    recorded = {key: there.get(key, defaults.model_dump(mode="json")[key]) for key in BUILD_KEYS}
    return [(key, here_values[key], recorded[key]) for key in BUILD_KEYS if here_values[key] != recorded[key]]


def split_refusal(differences: list[tuple[str, Any, Any]], source: str) -> str:
    here = ", ".join(f"data.{key}={value}" for key, value, _ in differences)
    there = ", ".join(f"{key} {value}" for key, _, value in differences)
    fix = " ".join(f"data.{key}={value}" for key, _, value in differences)
    return (f"{here}, but {source} was trained on the data built with {there}: another build holds out other "
            f"questions, some of which that model trained on; set {fix} (the shipped configs share configs/data.yaml)")


def check_same_split(cfg: StageConfig, model_dir: Path) -> None:
    """A stage that continues a model (its recorded config beside it) builds the same data split as that model's
    run, so its held-out questions stay held out."""
    record = model_dir / RECORDED_CONFIG
    if not record.is_file():
        return
    import yaml

    try:
        data = (yaml.safe_load(record.read_text(encoding="utf-8")) or {}).get("data")
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return  # not ours to judge: the model itself was checked
    differences = split_difference(cfg.data, data) if isinstance(data, dict) else []
    if differences:
        raise ConfigError(split_refusal(differences, f"the model in {model_dir} ({RECORDED_CONFIG})"))


def check_inputs(cfg: StageConfig, made_here: Collection[str] = ()) -> None:
    """Everything a stage reads, checked before its output folder is touched: a typo fails in seconds with
    one line and leaves a finished run where it was. Model folders (and the reward model), the tokenizer,
    user data files (shape, encoding, rule names, degenerate rows), the DeepSpeed config. `made_here`: the
    output folders that earlier stages of the same pipeline run write before this stage starts; a model
    there does not exist yet and is not looked for."""
    later = {Path(p) for p in made_here}
    if cfg.model.path and cfg.model.path != "previous" and Path(cfg.model.path) not in later:
        model_dir = resolve_model_dir(cfg.model.path)
        require_tokenizer(Path(cfg.model.tokenizer or model_dir))
        check_same_split(cfg, model_dir)
    reward_model = getattr(getattr(cfg, "reward", None), "model", None)
    if reward_model and Path(reward_model) not in later:
        resolve_model_dir(reward_model)
    check_data_files(cfg)
    from m1_align.stage_data import check_open_tasks

    check_open_tasks(cfg)
    source, launched = deepspeed_file(cfg.train), launched_deepspeed_file()
    if cfg.train.deepspeed and launched and Path(launched).resolve() != Path(source).resolve():
        if os.environ.get("RANK", "0") == "0":
            print(f"warning: DeepSpeed config {source} (train.deepspeed) is used, not {launched} (the accelerate "
                  "config's deepspeed_config_file); name one file in one place", file=sys.stderr)
    if source:
        field = "train.deepspeed" if cfg.train.deepspeed else "the accelerate config's deepspeed_config_file"
        try:
            json.loads(Path(source).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{field}: {source} not found; point it at a DeepSpeed JSON config "
                              "(e.g. configs/deepspeed/zero2.json)") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{field}: {source} is not valid JSON ({e})") from None


def launched_deepspeed_file() -> str | None:
    """The deepspeed_config_file of the accelerate config this process was launched with (accelerate launch
    passes it on as ACCELERATE_DEEPSPEED_CONFIG_FILE), or None."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true":
        return None
    return os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None


def deepspeed_file(train) -> str | None:
    """The one DeepSpeed config a stage runs with: train.deepspeed when set, else the accelerate config's
    deepspeed_config_file (check_inputs warns when they name different files). transformers' Trainer (SFT, TDPO,
    RM) reads them in this order, and the online loop (ELO, PPO, GRPO) through this function."""
    return train.deepspeed or launched_deepspeed_file()


def start_output_dir(cfg: StageConfig) -> Path:
    """check_inputs, then prepare_output_dir (which moves a finished run aside under overwrite=true)."""
    check_inputs(cfg)
    return prepare_output_dir(cfg.output_dir, cfg.overwrite)


def resolve_dtype(name: str) -> torch.dtype:
    """The dtype the weights are loaded in: "auto" keeps fp32 master weights (compute_dtype picks autocast)."""
    return torch.float32 if name == "auto" else getattr(torch, name)


def compute_dtype(name: str) -> torch.dtype:
    """The dtype of the forward passes. "auto": bf16 autocast over fp32 weights on a GPU, and on a CPU only
    where this machine's bf16 matmul is measurably faster than its fp32 one (bf16_matmul_faster); the
    log-softmax, losses and optimizer states stay fp32 either way. An explicit dtype is used as it is."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16
    return torch.bfloat16 if bf16_matmul_faster() else torch.float32


_PROBE: dict[str, bool] = {}


def bf16_matmul_faster(size: int = 1024, seconds: float = 0.25) -> bool:
    """A ~1 s probe, once per process: bf16 against fp32 matmul throughput on this CPU with the current
    thread count (two CPUs with the same avx512_bf16 flag measured 2.2x and 0.5x fp32: the flag does not
    tell). bf16 must win by 10% to be chosen, since autocast adds casts."""
    key = f"{torch.get_num_threads()}"
    if key not in _PROBE:
        rates = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            torch.mm(a, b)  # warm-up
            done, begin = 0, time.perf_counter()
            while time.perf_counter() - begin < seconds:
                torch.mm(a, b)
                done += 1
            rates[dtype] = done / (time.perf_counter() - begin)
        _PROBE[key] = rates[torch.bfloat16] > 1.1 * rates[torch.float32]
        print(f"dtype=auto: bf16 matmul {rates[torch.bfloat16] / rates[torch.float32]:.2f}x fp32 on this CPU -> "
              f"{'bf16 autocast' if _PROBE[key] else 'fp32'}")
    return _PROBE[key]


def keep_freed_memory() -> bool:
    """Have glibc serve every allocation from its heap and keep freed memory for reuse (the CLI calls this at
    start; call it yourself when training from Python). By default glibc maps each allocation above its mmap
    threshold (128 KB, rising to at most 32 MB) afresh and unmaps it when it is freed, so a training step's
    tensors, the same sizes every step (autocast's bf16 weight copies, the embedding's dense gradient, logit
    chunks), page-fault on every first touch: allocating a 57-113 MB tensor took 3.5-6x as long here
    (docs/BENCHMARKS.md). The cost: the process keeps its peak memory until it exits, and that peak grows
    (5-13% here: fragmentation). False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other libcs
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters, <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def require_tokenizer(folder: Path) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelPathError(f"no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer "
                             "files there or set model.tokenizer to a folder that has them")


def load_tokenizer(cfg: ModelConfig, model_dir: Path):
    source = Path(cfg.tokenizer or model_dir)
    require_tokenizer(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, UnicodeDecodeError, json.JSONDecodeError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelPathError(f"the tokenizer in {source} cannot be loaded ({message}); copy the tokenizer files again "
                             "or set model.tokenizer") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        warn_no_chat_template(source, model_dir)
    return tokenizer


_WARNED_TEMPLATE: set[Path] = set()


def warn_no_chat_template(source: Path, model_dir: Path) -> None:
    """A tokenizer without a chat template gets Baichuan-M1's (data/chat.py: chat_template_for). That is the
    hybrid model's own format, and a base model learns it in SFT; a chat model trained on another format
    would be prompted in one it has never seen, so say so, once per folder."""
    try:
        model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type == "baichuan_m1" or source in _WARNED_TEMPLATE:
        return
    _WARNED_TEMPLATE.add(source)
    print(f"warning: the tokenizer in {source} has no chat template, so conversations use Baichuan-M1's "
          f"(<B_SYS>, <C_Q>, <C_A>), which suits a base model you fine-tune; to keep the model's own format, save "
          f"its template as {source}/chat_template.jinja (or set model.tokenizer to a folder with one)", file=sys.stderr)


def load_model(cfg: ModelConfig, kind: str = "causal_lm", model_dir: Path | None = None, **kwargs: Any):
    """Load the hybrid model (registered with the Auto classes by `import m1_align`) or any HF model."""
    model_dir = model_dir or resolve_model_dir(cfg.path)
    _init_deepspeed_comm()
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    model = auto.from_pretrained(
        str(model_dir), dtype=resolve_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code, **kwargs
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.compile:
        compile_layers(model)
    return model


def load_scalar_model(cfg: ModelConfig, model_dir: Path, tokenizer: Any = None):
    """A sequence classifier with one output: a reward model, or the base of PPO's critic. Given the tokenizer,
    its pad id goes into the config: the score head reads the last token that is not padding."""
    model = load_model(cfg, kind="seq_cls", model_dir=model_dir, num_labels=1)
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile, in place, every block of each run of identical blocks (a ModuleList of one class: the
    decoder layers), with dynamic shapes: one compile serves all of them at every sequence length, the
    parameters' names do not change (checkpoints and weight sync read them) and module hooks (DeepSpeed's,
    PEFT's) still run. What compiling buys is fused elementwise work (norms, activations, rotary embeddings,
    residual adds) between the matmuls. Generation is left eager (`eager_generation`).

    Forwards stop building a KV cache they do not read (config.use_cache; generate keeps its own setting): a
    transformers Llama called without use_cache=False (the reward models) makes one per forward, and the
    compiled layer guards on each layer's cache slot: 8 recompiles, then the remaining layers ran eager."""
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            for block in module:
                block.compile(dynamic=True)


def eager_generation():
    """Run compiled blocks eagerly while generating: prefill and one-token decode steps against a cache would
    each need graphs of their own, which cost 17 s more compile on the real model and sampled no faster
    (docs/BENCHMARKS.md). Use it only as `with eager_generation():`: set_stance takes effect when it is
    called, so as a decorator it would switch compilation off for the whole process."""
    return torch.compiler.set_stance("force_eager")


def _init_deepspeed_comm() -> None:
    """ZeRO-3 partitions weights while loading (deepspeed.zero.Init), which needs DeepSpeed's process
    group up before the Trainer would start it; otherwise it counts one process and rejects the batch sizes."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed()


def check_adapter(model, where: str) -> None:
    """A LoRA model must carry a non-empty adapter with at least one LoRA layer in use: users of peft and of
    other RL toolkits have trained for weeks with an adapter that was empty or never loaded, looking like a
    run that merely learnt slowly. Raises AdapterError; a model without adapters passes."""
    from peft import PeftModel, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return
    state = get_peft_model_state_dict(model)
    if not any(".lora_" in name for name in state):
        raise AdapterError(f"{where}: the LoRA adapter holds no weights ({len(state)} tensors, no lora_A/lora_B); "
                           "check model.lora.target_modules against the model's module names")
    active = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.disable_adapters
              and any(a in m.lora_A for a in m.active_adapters)]
    if not active:
        raise AdapterError(f"{where}: no LoRA layer is active (adapters disabled or another adapter selected); "
                           "the engine would sample from the base model")


class AdapterError(RuntimeError):
    """A LoRA adapter that is empty or not in use, found before it is saved or pushed to an engine."""


def peft_config(lora: LoraConfig, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
        task_type=task_type,
    )


def training_arguments(cfg: StageConfig, output_dir: Path) -> dict[str, Any]:
    """Our TrainConfig as keyword arguments of transformers' TrainingArguments (and TRL's configs)."""
    train = cfg.train
    scheduler = {"cosine": "cosine", "wsd": "warmup_stable_decay", "linear": "linear", "constant": "constant_with_warmup"}
    dtype = compute_dtype(cfg.model.dtype)
    return dict(
        output_dir=str(output_dir / CHECKPOINTS),
        learning_rate=train.learning_rate,
        num_train_epochs=train.num_epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        lr_scheduler_type=scheduler[train.lr_scheduler],
        warmup_steps=train.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_betas[0],
        adam_beta2=train.adam_betas[1],
        max_grad_norm=train.max_grad_norm,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        logging_steps=train.logging_steps,
        eval_strategy="steps" if train.eval_steps else "no",
        eval_steps=train.eval_steps,
        prediction_loss_only=True,  # evaluation keeps losses and metrics, not every batch's logits
        report_to=list(train.report_to) or "none",
        deepspeed=train.deepspeed,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.model.gradient_checkpointing else None,
        dataloader_num_workers=0,
        logging_nan_inf_filter=False,  # a NaN loss is logged and stops the run (MetricsCallback), never averaged away
        remove_unused_columns=False,
    )


class WSDScheduleMixin:
    """transformers' WSD schedule wants a decay length in steps; we configure it as a ratio."""

    decay_ratio: float = 0.1

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.args.lr_scheduler_type == "warmup_stable_decay":
            self.args.lr_scheduler_kwargs = {"num_decay_steps": max(1, int(self.decay_ratio * num_training_steps))}
        return super().create_scheduler(num_training_steps, optimizer)


# what a Trainer checkpoint must hold to resume as if never stopped (weights are checked through the marker)
TRAINER_STATE_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint, which must be complete (CheckpointMarker's complete.json, every file at its
    size, the optimizer state): a checkpoint cut short while saving (no marker) is removed; one that lost
    a file later stops the resume with a one-line error rather than resuming with a fresh optimizer."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    found = sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for path in reversed(found):
        if not (path / COMPLETE_FILE).is_file():
            print(f"note: {path} was cut short while saving; removed")
            shutil.rmtree(path, ignore_errors=True)
            continue
        check_complete(path, TRAINER_STATE_FILES)
        return str(path)
    return None


class CheckpointMarker(TrainerCallback):
    """Writes complete.json into each Trainer checkpoint once everything in it is saved."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def whole_run_train_loss(trainer, train_output, resumed_from: str | None) -> float:
    """transformers' training_loss after a resume averages only the steps run since; weigh in the steps
    before the checkpoint from the logged losses (log_history is restored with the checkpoint)."""
    if resumed_from is None:
        return train_output.training_loss
    start = int(Path(resumed_from).name.split("-")[-1])
    done, total, previous = 0, 0.0, 0
    for entry in trainer.state.log_history:
        if "loss" in entry and entry["step"] <= start:
            total += entry["loss"] * (entry["step"] - previous)
            done, previous = entry["step"], entry["step"]
    after = trainer.state.global_step - start
    if done == 0:
        return train_output.training_loss
    return (total + train_output.training_loss * after) / (done + after)


class MetricsCallback(TrainerCallback):
    """Mirrors the trainer's logs into metrics.jsonl (always) and adds tokens/s."""

    def __init__(self, logger: MetricsLogger):
        self.logger = logger
        self._last = (time.time(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.logger.truncate_after(state.global_step)
        self._last = (time.time(), 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        for key in ("loss", "grad_norm"):  # logged before the step's checkpoint, so no NaN model is saved
            if key in logs and not math.isfinite(float(logs[key])):
                if state.is_world_process_zero:
                    self.logger.log(state.global_step, **{key: float(logs[key])})
                raise DivergedError(self.logger.run_name or "training", state.global_step, key, logs[key], self.logger.path.parent)
        if not state.is_world_process_zero:
            return
        record = {k: v for k, v in logs.items() if isinstance(v, int | float)}
        if "num_tokens" in record:
            now, tokens = time.time(), record["num_tokens"]
            last_time, last_tokens = self._last
            if last_tokens and now > last_time:
                record["tokens_per_s"] = (tokens - last_tokens) / (now - last_time)
            self._last = (now, tokens)
        self.logger.log(state.global_step, **record)


def save_final(trainer, tokenizer, cfg: StageConfig, output_dir: Path) -> Path:
    """Write the final model (HF format, safetensors) with its tokenizer and config, atomically. Under LoRA
    with merge_on_save, model/ holds the merged full weights (what the next stage and vLLM load) and
    adapter/ the adapter; without it, model/ holds the adapter."""
    final = output_dir / FINAL_MODEL
    tmp = output_dir / f".{FINAL_MODEL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))  # collective under ZeRO-3 (gathers the shards); writes on the main process
    if not trainer.is_world_process_zero():
        return final
    model = trainer.model
    check_adapter(getattr(model, "module", model), f"saving {final}")
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config that made the model is the YAML below
    if cfg.model.lora.enabled and cfg.model.lora.merge_on_save and hasattr(model, "merge_and_unload"):
        atomic_replace_dir(tmp, output_dir / "adapter")
        # merge a copy: merge_and_unload strips the adapter from the model it is called on
        merged = copy.deepcopy(getattr(model, "module", model)).merge_and_unload()
        merged.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    atomic_write_text(tmp / RECORDED_CONFIG, dump_config(cfg))
    atomic_replace_dir(tmp, final)
    return final


def trainer_hooks(cfg: StageConfig, logger: MetricsLogger, task_type: str = "CAUSAL_LM") -> dict[str, Any]:
    """The keyword arguments every stage's HF trainer takes alike: the LoRA config (or None), the metrics log
    and the marker that makes a checkpoint resumable."""
    lora = peft_config(cfg.model.lora, task_type) if cfg.model.lora.enabled else None
    return {"peft_config": lora, "callbacks": [MetricsCallback(logger), CheckpointMarker()]}


def source_model(cfg: StageConfig) -> tuple[Path, Any]:
    """The folder of the model a stage starts from, and its tokenizer."""
    model_dir = resolve_model_dir(cfg.model.path)
    return model_dir, load_tokenizer(cfg.model, model_dir)


def fresh_accelerator_state() -> None:
    """Forget the precision an earlier stage of this process (a pipeline) set: accelerate keeps one per process
    and refuses an Accelerator with another ("AcceleratorState has already been initialized"), so an fp32
    stage after a bf16 one would fail. The process group (PartialState) is kept. accelerate is pinned exactly:
    this is its private API."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def run_trainer_stage(cfg: StageConfig, stage: str, build, evaluate) -> StageResult:
    """The steps every trainer-based stage (SFT, TDPO, RM) takes, in order: check its inputs and prepare the
    output folder; `build(cfg, output_dir, logger) -> (trainer, tokenizer, metrics)`; train, resuming from the
    last checkpoint; save the final model; `evaluate(trainer, tokenizer, final_dir) -> metrics`; write eval.json
    and result.json. What a stage keeps for itself lives in its `build` and `evaluate`."""
    start = time.time()
    output_dir = start_output_dir(cfg)
    fresh_accelerator_state()
    logger = MetricsLogger(output_dir, run_name=stage)
    trainer, tokenizer, metrics = build(cfg, output_dir, logger)
    trainer.decay_ratio = cfg.train.decay_ratio  # read by WSDScheduleMixin
    resume = last_checkpoint(output_dir) if cfg.train.resume else None
    train_output = trainer.train(resume_from_checkpoint=resume)
    final_dir = save_final(trainer, tokenizer, cfg, output_dir)
    metrics.update({"train_loss": whole_run_train_loss(trainer, train_output, resume), "steps": trainer.state.global_step})
    metrics.update(evaluate(trainer, tokenizer, final_dir))
    return finish_stage(trainer, logger, stage, output_dir, metrics, start)


def finish_stage(trainer, logger: MetricsLogger, stage: str, output_dir: Path, metrics: dict, start: float):
    """Log the final metrics and write eval.json, then result.json last (the finished marker);
    under several processes only the main one writes."""
    result = StageResult(stage, str(output_dir), metrics, time.time() - start)
    if trainer.is_world_process_zero():
        logger.log(trainer.state.global_step, **metrics)
        write_json(output_dir / "eval.json", metrics)
        result.save()
    logger.close()
    return result


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")
