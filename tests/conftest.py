"""Shared fixtures: one small build of the medical data, a tokenizer trained on it and a tiny hybrid
model saved in Hugging Face format, made once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL_DATA = {"max_per_task": 120, "eval_per_task": 20, "seed": 0}


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """A DataConfig-style cache folder holding one small build; returns the cache dir."""
    from m1_align.config import DataConfig
    from m1_align.data.build import build_from_config

    cache = tmp_path_factory.mktemp("data_cache")
    build_from_config(DataConfig(cache_dir=str(cache), **SMALL_DATA))
    return cache


@pytest.fixture(scope="session")
def built_data(data_cache):
    from m1_align.config import DataConfig
    from m1_align.data.build import build_from_config

    return build_from_config(DataConfig(cache_dir=str(data_cache), **SMALL_DATA))


@pytest.fixture(scope="session")
def tokenizer_dir(built_data, tmp_path_factory):
    from m1_align.data.build import corpus_texts
    from m1_align.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus_texts(built_data, "train"), 1024, out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory):
    """A randomly initialised tiny hybrid model with head dims 64 and 32 (vLLM's CPU attention needs >= 32)."""
    import torch
    from transformers import AutoTokenizer

    from m1_align.model import BaichuanM1ForCausalLM, preset_config

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = preset_config(
        "tiny", vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    model = BaichuanM1ForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def stage_overrides(data_cache, output_dir, model_dir=None, **extra) -> dict:
    """Config values that point a stage at the session's small data and a tmp output folder."""
    # float32: the tests compare numbers at fp32 tolerances; dtype=auto would pick bf16 autocast on CPUs
    # with fast bf16 matmuls (tests/test_hf_models.py checks that choice)
    values = {"output_dir": str(output_dir), "data": {"cache_dir": str(data_cache), **SMALL_DATA}, "model": {"dtype": "float32"}}
    if model_dir is not None:
        values["model"]["path"] = str(model_dir)
    for key, value in extra.items():
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return values


CHATML_TEMPLATE = (  # SmolLM2-Instruct's template: ChatML, no {% generation %} markers
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llama_dir(tokenizer_dir, tmp_path_factory):
    """A randomly initialised tiny LlamaForCausalLM with a ChatML template whose end of turn <|im_end|> is
    its EOS and whose pad token differs from it: the shape of SmolLM2-Instruct, a few MB."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML_TEMPLATE
    assert tok.pad_token_id != tok.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


class CharTokenizer:
    """A tokenizer stand-in for reward-model scoring: one token per character, so a response's length is its score
    under a reward model that sums its attention mask."""

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(m["content"] for m in messages)

    def __call__(self, texts, **kwargs):
        import torch

        width = max(len(t) for t in texts)
        ids = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in texts])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}
