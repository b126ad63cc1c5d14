"""Configuration of the Baichuan-M1 hybrid-attention model.

Field names follow the config.json of the released Baichuan-M1-14B checkpoint, so that checkpoint loads
as is. Defaults are the 14B layout. `layer_types` and `interleaved_sliding_window` are derived for
vLLM, which reads them to give full and sliding layers different KV-cache specs.
"""

from transformers import PretrainedConfig


class BaichuanM1Config(PretrainedConfig):
    model_type = "baichuan_m1"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 133120
    hidden_size: int = 5120
    intermediate_size: int = 17408
    num_hidden_layers: int = 40
    # global (full-attention) layers
    num_attention_heads: int = 20
    num_key_value_heads: int = 2
    # sliding-window layers
    num_swa_attention_heads: int = 40
    num_swa_key_value_heads: int = 8
    sliding_window: int | None = None  # W keys, the current token included; default 8192
    sliding_window_layers: list[int] | None = None  # default: the odd layers
    interleaved_sliding_window: int | None = None  # = sliding_window (vLLM reads this name)
    layer_types: list[str] | None = None  # derived from sliding_window_layers
    conv_window: int = 2
    # True: Baichuan's NormHead (vocabulary rows L2-normalised in the forward). False: a plain linear head, for
    # a checkpoint converted from a model that has one (m1-align upcycle head=plain); the released one has True.
    norm_head: bool = True
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.sliding_window is None:
            self.sliding_window = self.interleaved_sliding_window or 8192
        self.interleaved_sliding_window = self.sliding_window
        if self.sliding_window_layers is None:
            if self.layer_types is not None:
                self.sliding_window_layers = [
                    i for i, kind in enumerate(self.layer_types) if kind == "sliding_attention"
                ]
            else:
                self.sliding_window_layers = list(range(1, self.num_hidden_layers, 2))
        self.sliding_window_layers = sorted(int(i) for i in self.sliding_window_layers)
        self.layer_types = [
            "sliding_attention" if i in self.sliding_window_layers else "full_attention"
            for i in range(self.num_hidden_layers)
        ]
        # A scalar head is what reward and value models need; classifiers pass num_labels explicitly.
        if self.id2label is None:
            kwargs.setdefault("num_labels", 1)
        super().__post_init__(**kwargs)
        self._validate()

    def _validate(self):
        for kind, heads, kv_heads in (
            ("global", self.num_attention_heads, self.num_key_value_heads),
            ("sliding-window", self.num_swa_attention_heads, self.num_swa_key_value_heads),
        ):
            if self.hidden_size % heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by the {heads} {kind} heads"
                )
            if heads % kv_heads:
                raise ValueError(f"{heads} {kind} query heads are not a multiple of {kv_heads} KV heads")
        if self.conv_window != 2:
            raise ValueError(f"only conv_window=2 is supported (as in Baichuan-M1), got {self.conv_window}")
        if self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        bad = [i for i in self.sliding_window_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"sliding_window_layers {bad} out of range for {self.num_hidden_layers} layers")

    def head_layout(self, layer_idx: int) -> tuple[int, int, int]:
        """(query heads, KV heads, head_dim) of one layer; head_dim differs between the two layer kinds."""
        if layer_idx in self.sliding_window_layers:
            heads, kv_heads = self.num_swa_attention_heads, self.num_swa_key_value_heads
        else:
            heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        return heads, kv_heads, self.hidden_size // heads


__all__ = ["BaichuanM1Config"]
