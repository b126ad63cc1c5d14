"""Named model sizes. `preset_config("quickstart", vocab_size=len(tokenizer))` returns a config."""

from .configuration import BaichuanM1Config

PRESETS: dict[str, dict] = {
    # The released checkpoint (paper section 3; reference/baichuan-m1-and-tdpo.md section 1).
    "baichuan-m1-14b": dict(
        vocab_size=133120,
        hidden_size=5120,
        intermediate_size=17408,
        num_hidden_layers=40,
        num_attention_heads=20,  # head_dim 256
        num_key_value_heads=2,
        num_swa_attention_heads=40,  # head_dim 128
        num_swa_key_value_heads=8,
        sliding_window=8192,
        rope_theta=1e6,
        max_position_embeddings=32768,
    ),
    # Unit tests: the two layer kinds get different head counts and head dims (64 and 32).
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_swa_attention_heads=4,
        num_swa_key_value_heads=2,
        sliding_window=8,
        rope_theta=10000.0,
        max_position_embeddings=2048,
    ),
    # CPU pre-training in minutes. Small on purpose: after 100 s on 2 CPU cores this size reaches a
    # held-out corpus loss of 3.10 where hidden 256 x 6 layers reaches 4.10 (bench/bench_base_size.py;
    # the larger model sees a third of the tokens). Head dims 64 and 32: vLLM's CPU attention rejects 16.
    "quickstart": dict(
        vocab_size=8192,  # replaced by the tokenizer's size
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_swa_attention_heads=4,
        num_swa_key_value_heads=2,
        sliding_window=64,
        rope_theta=10000.0,
        max_position_embeddings=2048,
    ),
}


def preset_config(name: str, **overrides) -> BaichuanM1Config:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return BaichuanM1Config(**{**PRESETS[name], **overrides})
