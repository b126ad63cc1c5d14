"""`m1-align pretrain`: a byte-level BPE tokenizer and a tiny hybrid base model, trained from scratch
on the offline medical corpus, so that the quickstart has a base model to align without any download.

Documents are packed into padding-free rows (TRL's best-fit-decreasing packing) with the position
ids restarting per document, so neither attention nor the K/V convolution crosses documents.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from datasets import Dataset
from transformers import set_seed
from trl import SFTConfig as TRLSFTConfig

from m1_align.config import ConfigError, PretrainConfig
from m1_align.data.build import corpus_texts
from m1_align.runs import MetricsLogger, StageResult
from m1_align.sft.trainer import M1SFTTrainer
from m1_align.stage_data import built_dir
from m1_align.training import (
    CheckpointMarker,
    MetricsCallback,
    compile_layers,
    finish_stage,
    fresh_accelerator_state,
    last_checkpoint,
    resolve_dtype,
    save_final,
    start_output_dir,
    training_arguments,
    whole_run_train_loss,
)


def tokenizer_for(cfg: PretrainConfig, data_dir: Path, output_dir: Path):
    """Train the tokenizer once; an interrupted run reuses the saved one so checkpoints stay valid."""
    from transformers import AutoTokenizer

    from m1_align.data.tokenizer import train_tokenizer

    tok_dir = output_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(corpus_texts(data_dir, "train"), cfg.pretrain.vocab_size, tok_dir)
    return AutoTokenizer.from_pretrained(str(tok_dir))


def base_model(cfg: PretrainConfig, tokenizer):
    from m1_align.model import BaichuanM1ForCausalLM, preset_config

    config = preset_config(
        cfg.model.preset or "quickstart",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = BaichuanM1ForCausalLM(config).to(resolve_dtype(cfg.model.dtype))
    if cfg.model.compile:
        compile_layers(model)
    return model


def run(cfg: PretrainConfig) -> StageResult:
    start = time.time()
    if cfg.model.path:
        raise ConfigError("pretrain trains from scratch: set model.preset (e.g. quickstart), not model.path")
    output_dir = start_output_dir(cfg)
    data_dir = built_dir(cfg)
    tokenizer = tokenizer_for(cfg, data_dir, output_dir)
    train = Dataset.from_dict({"text": list(corpus_texts(data_dir, "train"))}).shuffle(seed=cfg.seed)
    heldout = Dataset.from_dict({"text": list(corpus_texts(data_dir, "heldout"))[: cfg.pretrain.heldout_texts]})

    logger = MetricsLogger(output_dir, run_name="pretrain")
    args = TRLSFTConfig(
        **training_arguments(cfg, output_dir),
        max_length=cfg.pretrain.tokens_per_row,
        packing=True,
        eval_packing=True,
        eos_token=tokenizer.eos_token,
    )
    fresh_accelerator_state()
    set_seed(cfg.seed)  # the model's initial weights: torch seeds itself at random in every new process
    trainer = M1SFTTrainer(  # packed rows and the output head as in SFT
        model=base_model(cfg, tokenizer),
        args=args,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
        callbacks=[MetricsCallback(logger), CheckpointMarker()],
    )
    trainer.decay_ratio = cfg.train.decay_ratio
    initial_loss = trainer.evaluate()["eval_loss"]
    resume = last_checkpoint(output_dir) if cfg.train.resume else None
    train_output = trainer.train(resume_from_checkpoint=resume)
    save_final(trainer, tokenizer, cfg, output_dir)

    eval_loss = trainer.evaluate()["eval_loss"]
    metrics = {
        "train_loss": whole_run_train_loss(trainer, train_output, resume),
        "heldout_loss_init": initial_loss,
        "heldout_loss": eval_loss,
        "heldout_perplexity": math.exp(eval_loss),
        "steps": trainer.state.global_step,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
    }
    return finish_stage(trainer, logger, "pretrain", output_dir, metrics, start)
