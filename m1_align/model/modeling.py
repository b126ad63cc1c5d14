"""Baichuan-M1 hybrid-attention decoder (arXiv 2502.12671) for transformers.

Read top to bottom: generation cache, building blocks (RMSNorm, RoPE, the K/V conv, attention kernels),
attention layer, decoder layer, then the models. Shapes: B batch, T new tokens, P tokens already cached,
H query heads, Hkv KV heads, D head_dim (it differs between global and sliding-window layers), C hidden.

- Layers in `config.sliding_window_layers` attend to the last W = `sliding_window` keys (the current token
  included); the other layers attend to every key. Each kind has its own query/KV head counts (GQA).
- Every layer mixes each K and V with the previous token's, before RoPE:
  k'_t = w[h,0] * k_{t-1} + w[h,1] * k_t, with k_{-1} = 0 at each sequence or packed-sample start.
- The output head is Baichuan's NormHead (rows L2-normalised) unless `config.norm_head` is False (a plain
  linear head, for checkpoints upcycled from a Llama: m1_align/model/upcycle.py).
- Parameter and config names match the released Baichuan-M1-14B checkpoint.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration import BaichuanM1Config

# ---------------------------------------------------------------------------------------------------------
# Generation cache
# ---------------------------------------------------------------------------------------------------------


class BaichuanM1Cache(DynamicCache):
    """KV cache plus the conv state of every layer.

    The KV part is transformers' DynamicCache built from `config.layer_types`: full layers keep every key,
    sliding layers keep the last W-1 (with the current token that makes W). The conv state is the previous
    token's raw (pre-conv, pre-RoPE) key and value, (B, Hkv, 1, D) per layer, one row per batch row, so it
    follows the batch through beam reordering and row selection.
    """

    def __init__(self, config: BaichuanM1Config):
        super().__init__(config=config)
        self.conv_states: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * config.num_hidden_layers

    def swap_conv_state(self, layer_idx: int, raw_k: torch.Tensor, raw_v: torch.Tensor):
        """Keep the last raw k/v of this chunk; return the one kept from the previous chunk (None at the start)."""
        previous = self.conv_states[layer_idx]
        # clone: a slice would keep the whole chunk's raw k/v alive
        self.conv_states[layer_idx] = (raw_k[:, :, -1:].clone(), raw_v[:, :, -1:].clone())
        return previous

    def _map_conv_states(self, fn):
        self.conv_states = [None if s is None else (fn(s[0]), fn(s[1])) for s in self.conv_states]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._map_conv_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._map_conv_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._map_conv_states(lambda t: t[indices])

    def reset(self):
        super().reset()
        self.conv_states = [None] * len(self.conv_states)

    @property
    def is_croppable(self) -> bool:
        return False  # the raw k/v of a dropped token is gone, so the conv state cannot be rolled back

    def crop(self, tokens_to_remove: int):
        if tokens_to_remove != 0:
            raise NotImplementedError(
                "BaichuanM1Cache cannot drop tokens: the K/V conv state cannot be rolled back"
            )
        super().crop(0)


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------


class BaichuanM1RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics: bf16 sums of squares over thousands of channels are too coarse
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


class BaichuanM1MLP(nn.Module):
    def __init__(self, config: BaichuanM1Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class NormHead(nn.Linear):
    """Output layer with L2-normalised vocabulary rows: logits = x @ normalize(W, dim=-1).T."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=-1))


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """NeoX-style RoPE tables over the full head_dim. position_ids (B or 1, T) -> cos, sin (B or 1, 1, T, D)."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    freqs = position_ids[..., None].float() / theta**exponents  # (B, T, D/2)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def kv_conv(x: torch.Tensor, weight: torch.Tensor, previous: torch.Tensor | None, restart: torch.Tensor):
    """Causal 2-tap conv over time, one filter per KV head shared across head_dim.

    x: raw k or v (B, Hkv, T, D); weight: (1, 1, Hkv, 1, 2), tap 0 for the previous token, tap 1 for the
    current one; previous: the raw token before x (B, Hkv, 1, D), None at a sequence start; restart:
    (B or 1, 1, T, 1), True where the previous token belongs to another sample or is padding.
    """
    if previous is None:
        previous = torch.zeros_like(x[:, :, :1])
    shifted = torch.cat([previous, x[:, :, :-1]], dim=2).masked_fill(restart, 0.0)  # k_{t-1}: (B, Hkv, T, D)
    taps = weight.to(x.dtype).view(-1, 2)[:, :, None, None]  # (Hkv, 2, 1, 1)
    return taps[:, 0] * shifted + taps[:, 1] * x


def window_chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal sliding-window attention in O(T*W) instead of O(T^2).

    Queries go in W-sized blocks; block i attends to key blocks i-1 and i under a small (W, 2W) mask, which
    covers exactly the W keys ending at each query. q: (B, H, T, D), k/v: (B, Hkv, T, D) -> (B, H, T, D).
    """
    batch, heads, length, head_dim = q.shape
    blocks = -(-length // window)
    pad = blocks * window - length
    if pad:  # padded keys come after every real query, so causality already hides them
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))

    def split(t):  # (B, h, blocks*W, D) -> (B, h, blocks, W, D)
        return t.view(batch, t.shape[1], blocks, window, head_dim)

    def with_previous_block(t):  # (B, Hkv, blocks, W, D) -> (B, Hkv, blocks, 2W, D); block -1 is zeros
        return torch.cat([F.pad(t, (0, 0, 0, 0, 1, 0))[:, :, :-1], t], dim=3)

    def fold(t):  # (B, h, blocks, L, D) -> (B*blocks, h, L, D)
        return t.transpose(1, 2).reshape(batch * blocks, t.shape[1], t.shape[3], head_dim)

    qb = fold(split(q))
    kb, vb = (fold(with_previous_block(split(t))) for t in (k, v))
    # query a of a block sees key slot c (c < W: previous block) iff a < c <= a + W
    a = torch.arange(window, device=q.device)[:, None]
    c = torch.arange(2 * window, device=q.device)[None, :]
    mask = ((c > a) & (c <= a + window)).expand(blocks, window, 2 * window).clone()
    mask[0, :, :window] = False  # the first block has no previous block
    mask = mask.repeat(batch, 1, 1)[:, None]  # (B*blocks, 1, W, 2W)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True)
    out = out.view(batch, blocks, heads, window, head_dim).transpose(1, 2)
    return out.reshape(batch, heads, blocks * window, head_dim)[:, :, :length]


@functools.cache
def _compiled_flex_attention():
    """torch's default dynamic=None: the first length gets a static kernel, the second a dynamic one that then
    serves every length (2 compiles of about 5 s each on an H200 where static shapes paid one per length)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=32)
@torch.compiler.disable  # built once per length, eagerly, also when called from a compiled layer
def _sliding_block_mask(length: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return create_block_mask(sliding_causal, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


# A graph break of its own inside a compiled layer (model.compile): traced with the layer's dynamic shapes, the
# block mask fails in inductor (CantSplit, H200, torch 2.11), so the layer's graph stops here and FlexAttention
# runs under its own compile. recursive=False keeps that compile.
@torch.compiler.disable(recursive=False)
def flex_sliding_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """CUDA: block-sparse sliding-window attention (FlexAttention skips the blocks outside the window,
    so the cost is O(T*W) and it stays a fused kernel). q: (B, H, T, D), k/v: (B, Hkv, T, D)."""
    block_mask = _sliding_block_mask(q.shape[2], window, str(q.device))
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def compile_is_forced_off() -> bool:
    """Inside `torch.compiler.set_stance("force_eager")` (generation, m1_align.training.eager_generation) every
    torch.compile runs eagerly, FlexAttention's too, and eager FlexAttention materialises the full score matrix.
    Reads torch's private stance (no public getter); a torch without it counts as not forced."""
    stance = getattr(getattr(torch._dynamo, "eval_frame", None), "_stance", None)
    return getattr(stance, "stance", "default") == "force_eager"


class PackedSegments(list):
    """(start, end) of every sample in one packed row; attention runs per sample instead of under a
    dense block-diagonal (T, T) mask, so a packed row costs sum(L_i^2), not T^2."""


def attend(q, k, v, mask: torch.Tensor | PackedSegments | None, window: int | None) -> torch.Tensor:
    """SDPA with GQA. q: (B, H, T, D), k/v: (B, Hkv, Tk, D) -> (B, H, T, D).

    `mask` (B or 1, 1, T, Tk) is None when the keys are exactly what causal (and windowed) attention
    needs, i.e. a fresh unpadded sequence (Tk = T) or one decoded token that may see every cached key.
    """
    if isinstance(mask, PackedSegments):
        return torch.cat([attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, window) for a, b in mask], dim=2)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if q.shape[2] == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if window is not None and q.shape[2] > window:
        if q.is_cuda and q.shape[2] % 128 == 0 and not compile_is_forced_off():  # 128: FlexAttention's block
            return flex_sliding_attention(q, k, v, window)
        return window_chunked_attention(q, k, v, window)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def attention_layout(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    past: int,
    length: int,
    window: int,
):
    """Which keys each query sees, and where the conv restarts, for one forward of T = `length` tokens.

    Samples are separated by padding (zeros in the 2D `attention_mask`, which covers P + T positions) or,
    without a mask, by packing: position_ids restarting at 0 inside a row. Returns
    ({False: mask of full layers, True: mask of sliding layers}, conv_restart (B or 1, 1, T, 1)).
    """
    device = position_ids.device
    key_valid = None  # (B, P+T), False at padding
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != past + length:
            raise ValueError(
                f"attention_mask must be 2D (batch, {past + length}), got shape {tuple(attention_mask.shape)}"
            )
        if not bool(attention_mask.all()):
            key_valid = attention_mask.bool()
    segments = None  # (B, T), index of the packed sample each token belongs to
    if attention_mask is None and past == 0 and length > 1 and bool((position_ids[:, 1:] == 0).any()):
        segments = (position_ids == 0).cumsum(-1)

    restart = position_ids == 0
    if key_valid is not None:
        previous_valid = F.pad(key_valid, (1, 0), value=False)[:, past : past + length]
        restart = restart | ~previous_valid
    restart = restart[:, None, :, None]

    if key_valid is None and segments is None and (past == 0 or length == 1):
        return {False: None, True: None}, restart
    if key_valid is None and segments is not None and past == 0 and position_ids.shape[0] == 1:
        starts = (position_ids[0] == 0).nonzero().flatten().tolist()
        if starts[0] != 0:
            starts = [0, *starts]
        bounds = PackedSegments(zip(starts, [*starts[1:], length], strict=True))
        return {False: bounds, True: bounds}, restart
    q_pos = torch.arange(past, past + length, device=device)[:, None]
    masks = {}
    for sliding in (False, True):
        n_keys = (min(past, window - 1) if sliding else past) + length  # what the cache hands back
        k_pos = torch.arange(past + length - n_keys, past + length, device=device)[None, :]
        mask = k_pos <= q_pos
        if sliding:
            mask = mask & (q_pos - k_pos < window)
        mask = mask[None]  # (1, T, Tk)
        if key_valid is not None:
            mask = mask & key_valid[:, None, past + length - n_keys :]
        if segments is not None:
            mask = mask & (segments[:, :, None] == segments[:, None, :])
        mask = mask | (k_pos == q_pos)  # a query always sees itself, so padded rows stay finite
        masks[sliding] = mask[:, None]  # (B or 1, 1, T, Tk)
    return masks, restart


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------


class BaichuanM1Attention(nn.Module):
    def __init__(self, config: BaichuanM1Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_sliding = layer_idx in config.sliding_window_layers
        self.window = config.sliding_window if self.is_sliding else None
        self.num_heads, self.num_kv_heads, self.head_dim = config.head_layout(layer_idx)
        kv_size = self.num_kv_heads * self.head_dim
        self.W_pack = nn.Linear(config.hidden_size, config.hidden_size + 2 * kv_size, bias=False)  # [q; k; v]
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.conv_k = nn.Parameter(torch.empty(1, 1, self.num_kv_heads, 1, config.conv_window))
        self.conv_v = nn.Parameter(torch.empty(1, 1, self.num_kv_heads, 1, config.conv_window))

    def forward(self, hidden_states, position_embeddings, attention_mask, conv_restart, past_key_values=None):
        batch, length, _ = hidden_states.shape
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = self.W_pack(hidden_states).split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
        q = q.view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D), raw
        v = v.view(batch, length, -1, self.head_dim).transpose(1, 2)

        previous = (
            past_key_values.swap_conv_state(self.layer_idx, k, v) if past_key_values is not None else None
        )
        previous_k, previous_v = previous if previous is not None else (None, None)
        k = kv_conv(k, self.conv_k, previous_k, conv_restart)
        v = kv_conv(v, self.conv_v, previous_v, conv_restart)
        cos, sin = position_embeddings[self.head_dim]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_key_values is not None:
            # full layers get every key back, sliding layers the last W-1 plus these T: (B, Hkv, Tk, D)
            k, v = past_key_values.update(k, v, self.layer_idx)

        out = attend(q, k, v, attention_mask, self.window)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class BaichuanM1DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BaichuanM1Config, layer_idx: int):
        super().__init__()
        self.self_attn = BaichuanM1Attention(config, layer_idx)
        self.mlp = BaichuanM1MLP(config)
        self.input_layernorm = BaichuanM1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = BaichuanM1RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, hidden_states, position_embeddings, attention_mask, conv_restart, past_key_values=None, **kwargs
    ):
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings,
            attention_mask,
            conv_restart,
            past_key_values,
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


class BaichuanM1PreTrainedModel(PreTrainedModel):
    config: BaichuanM1Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanM1DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _can_record_outputs = {"hidden_states": BaichuanM1DecoderLayer}

    def _init_weights(self, module):
        super()._init_weights(module)  # Linear/NormHead/Embedding: N(0, initializer_range); RMSNorm: ones
        if isinstance(module, BaichuanM1Attention):
            for taps in (module.conv_k, module.conv_v):  # positive taps summing to 1, as in the release
                init.copy_(taps, torch.randn(taps.shape).softmax(-1))


class BaichuanM1Model(BaichuanM1PreTrainedModel):
    def __init__(self, config: BaichuanM1Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            BaichuanM1DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = BaichuanM1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head_dims = sorted({config.head_layout(i)[2] for i in range(config.num_hidden_layers)})
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: BaichuanM1Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        length = inputs_embeds.shape[1]
        if self.training and torch.is_grad_enabled() and past_key_values is None:
            use_cache = False  # a training forward has no use for a cache; building one costs memory
        if use_cache and past_key_values is None:
            past_key_values = BaichuanM1Cache(self.config)
        if past_key_values is not None and not isinstance(past_key_values, BaichuanM1Cache):
            raise TypeError(
                f"BaichuanM1 needs a BaichuanM1Cache (it holds the K/V conv state), got {type(past_key_values)}"
            )
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device)[None]

        masks, conv_restart = attention_layout(
            attention_mask, position_ids, past, length, self.config.sliding_window
        )
        rope = {
            d: rope_cos_sin(position_ids, d, self.config.rope_theta, inputs_embeds.dtype)
            for d in self.head_dims
        }
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings=rope,
                attention_mask=masks[layer.self_attn.is_sliding],
                conv_restart=conv_restart,
                past_key_values=past_key_values,
            )
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values
        )


class BaichuanM1ForCausalLM(BaichuanM1PreTrainedModel, GenerationMixin):
    def __init__(self, config: BaichuanM1Config):
        super().__init__(config)
        self.model = BaichuanM1Model(config)
        self.lm_head = (
            NormHead(config.hidden_size, config.vocab_size)
            if config.norm_head
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: BaichuanM1Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() would build a plain DynamicCache, which has no room for the per-row conv state
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if cache is None or isinstance(cache, BaichuanM1Cache):
            return
        if type(cache) is not DynamicCache or cache.get_seq_length() > 0:
            raise ValueError(
                f"BaichuanM1 generates with its own BaichuanM1Cache only, got {type(cache).__name__}"
            )
        model_kwargs["past_key_values"] = BaichuanM1Cache(self.config)


class BaichuanM1ForSequenceClassification(BaichuanM1PreTrainedModel):
    """Scalar (num_labels=1) or multi-label head `score` on the last real token, for reward and value models."""

    def __init__(self, config: BaichuanM1Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = BaichuanM1Model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: BaichuanM1Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)  # (B, T, num_labels)
        batch, length = logits.shape[:2]
        # the rightmost real token: from the attention mask, else from pad_token_id (as Llama), else the last
        positions = torch.arange(length, device=logits.device)
        if attention_mask is not None:
            last = (positions * attention_mask[:, -length:].to(logits.device).bool()).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            last = (positions * (input_ids != self.config.pad_token_id).to(logits.device)).argmax(-1)
        else:
            last = torch.full((batch,), length - 1, device=logits.device)
        pooled = logits[torch.arange(batch, device=logits.device), last]  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )


__all__ = [
    "BaichuanM1Cache",
    "BaichuanM1Model",
    "BaichuanM1ForCausalLM",
    "BaichuanM1ForSequenceClassification",
    "BaichuanM1PreTrainedModel",
]
