"""Baichuan-M1 hybrid-attention decoder as a native vLLM (V1) model, the twin of modeling.py.

vLLM hands the model the scheduled tokens of all requests flattened into one batch, so every per-request
state lives in caches that vLLM allocates and indexes: the paged KV cache of each `Attention` layer (full
or sliding-window, each kind with its own head counts and head_dim) and, for the K/V convolution, a
per-request "short conv" state that vLLM's hybrid KV-cache manager keeps next to it, the same mechanism
LFM2's short convolutions use. Shapes: N flattened tokens, Hq/Hkv this rank's query/KV heads, D head_dim.

The conv state of a layer is the previous token's raw (pre-conv, pre-RoPE) k and v of one request,
(2*Hkv*D, 1) per request slot. The prefill path reads it when a request continues (a later chunk of a
chunked prefill, a prefix-cache hit) and starts from zeros otherwise, then stores the chunk's last raw
token; the decode path reads and overwrites it. Checkpoint names are those of the
released Baichuan-M1-14B and of modeling.py, so the same safetensors load into both.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from vllm.config import CacheConfig, VllmConfig, get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba import short_conv as _short_conv_op  # noqa: F401  registers vllm::short_conv
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
    is_conv_state_dim_first,
)
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.utils import set_weight_attrs
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum


def layer_heads(config: PretrainedConfig, layer_idx: int) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of one layer, before tensor-parallel sharding."""
    if layer_idx in config.sliding_window_layers:
        heads, kv_heads = config.num_swa_attention_heads, config.num_swa_key_value_heads
    else:
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    return heads, kv_heads, config.hidden_size // heads


def local_kv_heads(total_kv_heads: int) -> tuple[int, int]:
    """(first KV head, number of KV heads) of this tensor-parallel rank, as QKVParallelLinear shards them
    (KV heads are replicated when there are fewer of them than ranks)."""
    tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    if tp_size >= total_kv_heads:
        return tp_rank // (tp_size // total_kv_heads), 1
    count = total_kv_heads // tp_size
    return tp_rank * count, count


class KVConv(MambaBase, nn.Module):
    """The causal 2-tap convolution on K and V, one filter per KV head shared over head_dim.

    k'_t = w[h,0] * k_{t-1} + w[h,1] * k_t (the same for v), k_{-1} = 0 at a request's first token.
    It runs inside vLLM's `short_conv` custom op, which the compiler keeps out of its graphs (the op looks
    the layer up by `prefix` and calls forward_native on CPU, forward_cuda elsewhere).
    """

    def __init__(self, total_kv_heads: int, head_dim: int, prefix: str):
        nn.Module.__init__(self)
        first, count = local_kv_heads(total_kv_heads)
        self.kv_heads, self.head_dim = count, head_dim
        self.conv_dim = 2 * count * head_dim  # channels of [k | v]
        # checkpoint layout (1, 1, Hkv, 1, 2): tap 0 multiplies the previous token, tap 1 the current one
        self.conv_k = nn.Parameter(torch.empty(1, 1, count, 1, 2), requires_grad=False)
        self.conv_v = nn.Parameter(torch.empty(1, 1, count, 1, 2), requires_grad=False)

        def load_local_heads(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
            # argument names matter: vLLM's layer-wise reload rebinds `param` by name
            param.data.copy_(loaded_weight.narrow(2, first, count))

        for param in (self.conv_k, self.conv_v):
            set_weight_attrs(param, {"weight_loader": load_local_heads})

        vllm_config = get_current_vllm_config()
        self.model_config, self.cache_config = vllm_config.model_config, vllm_config.cache_config
        self.num_spec = vllm_config.num_speculative_tokens
        static_context = vllm_config.compilation_config.static_forward_context
        if prefix in static_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        static_context[prefix] = self
        self.kv_cache = (torch.tensor([]),)  # bound to the state pages by vLLM
        self.prefix = prefix

    # --- state description for vLLM's cache manager ---

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.SHORT_CONV

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return MambaStateDtypeCalculator.short_conv_state_dtype(
            self.model_config.dtype, self.cache_config.mamba_cache_dtype
        )

    def get_state_shape(self) -> tuple[tuple[int, int]]:
        # conv_dim is already this rank's share, hence tp_world_size=1
        return MambaStateShapeCalculator.short_conv_state_shape(
            tp_world_size=1, intermediate_size=self.conv_dim, conv_kernel=2, num_spec=self.num_spec
        )

    # --- compute ---

    def forward(self, kv: torch.Tensor) -> torch.Tensor:
        """kv: raw [k | v] (N, 2*Hkv*D) -> convolved (N, 2*Hkv*D)."""
        output = torch.zeros_like(kv)
        torch.ops.vllm.short_conv(kv, output, self.prefix)
        return output

    def forward_native(self, hidden_states: torch.Tensor, output: torch.Tensor):
        """Writes the convolved hidden_states (N, C=2*Hkv*D) into output.

        Plain vectorised torch (vLLM's CPU prefill conv loops over requests with one F.conv1d each, which
        cost 26 ms per request and layer here). vLLM orders the batch as decode tokens (one per request)
        first, then the prefill chunks; N may include padding after them.
        """
        # per-channel taps (C, 2) = [previous, current], in the channel order of [k | v]
        taps = torch.cat([self.conv_k.view(self.kv_heads, 2), self.conv_v.view(self.kv_heads, 2)])
        taps = taps.repeat_interleave(self.head_dim, dim=0).to(hidden_states.dtype)
        md = get_forward_context().attn_metadata
        md = None if md is None else md.get(self.prefix)
        if md is None:  # profiling run: no state yet, the value does not matter
            output.copy_(hidden_states * taps[:, 1])
            return
        state = self.kv_cache[0] if is_conv_state_dim_first() else self.kv_cache[0].transpose(-1, -2)
        state = state[:, :, 0]  # (slots, C): the previous raw token of each request's slot
        n_decode, n_prefill = md.num_decode_tokens, md.num_prefill_tokens
        x_decode, x_prefill = hidden_states[: n_decode + n_prefill].split([n_decode, n_prefill])

        if n_decode:
            slots = md.state_indices_tensor_d.flatten()[:n_decode]
            previous = state[slots]
            state[slots] = x_decode.to(state.dtype)
            output[:n_decode] = taps[:, 0] * previous.to(x_decode.dtype) + taps[:, 1] * x_decode
        if md.num_prefills:
            slots = md.state_indices_tensor_p.flatten()
            starts, ends = md.query_start_loc_p[:-1].long(), md.query_start_loc_p[1:].long()
            previous = torch.roll(x_prefill, 1, dims=0)  # previous[t] = x[t-1] inside each chunk
            # a chunk's first token continues the request's state (a later chunk, a prefix-cache hit) or
            # starts from zeros; torch.where, not a product: a fresh slot may hold NaN garbage
            carried = torch.where(md.has_initial_states_p[:, None], state[slots].to(x_prefill.dtype), 0.0)
            previous[starts] = carried
            state[slots] = x_prefill[ends - 1].to(state.dtype)
            output[n_decode : n_decode + n_prefill] = taps[:, 0] * previous + taps[:, 1] * x_prefill

    # The same torch code serves GPUs; not run there (no GPU build of vLLM was available to test it).
    forward_cuda = forward_native


class BaichuanM1Attention(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        layer_idx: int,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        total_heads, total_kv_heads, head_dim = layer_heads(config, layer_idx)
        tp_size = get_tensor_model_parallel_world_size()
        self.head_dim = head_dim
        self.q_size = total_heads // tp_size * head_dim
        self.kv_size = max(1, total_kv_heads // tp_size) * head_dim
        self.W_pack = QKVParallelLinear(  # checkpoint: one fused [q; k; v] matrix
            config.hidden_size,
            head_dim,
            total_heads,
            total_kv_heads,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.W_pack",
        )
        self.o_proj = RowParallelLinear(
            total_heads * head_dim,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.kv_conv = KVConv(total_kv_heads, head_dim, prefix=f"{prefix}.kv_conv")
        self.rotary_emb = get_rope(  # NeoX rotate-half over the full head_dim
            head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        )
        sliding = layer_idx in config.sliding_window_layers
        self.attn = Attention(
            total_heads // tp_size,
            head_dim,
            head_dim**-0.5,
            num_kv_heads=max(1, total_kv_heads // tp_size),
            cache_config=cache_config,
            quant_config=quant_config,
            # W keys, the current one included (flash-attn window (W-1, 0), as the HF code)
            per_layer_sliding_window=config.sliding_window if sliding else None,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.W_pack(hidden_states)  # (N, Hq*D + 2*Hkv*D)
        q, kv = qkv.split([self.q_size, 2 * self.kv_size], dim=-1)
        k, v = self.kv_conv(kv).split([self.kv_size, self.kv_size], dim=-1)  # conv before RoPE
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class BaichuanM1MLP(nn.Module):
    def __init__(self, config: PretrainedConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(  # checkpoint: gate_proj, up_proj
            config.hidden_size,
            [config.intermediate_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


class BaichuanM1DecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, layer_idx: int, prefix: str):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.self_attn = BaichuanM1Attention(
            config, layer_idx, vllm_config.cache_config, vllm_config.quant_config, f"{prefix}.self_attn"
        )
        self.mlp = BaichuanM1MLP(config, vllm_config.quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual):
        # the residual stream is carried separately so RMSNorm can fuse the add
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class BaichuanM1Model(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens"
        )
        self.layers = nn.ModuleList(
            BaichuanM1DecoderLayer(vllm_config, i, prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, inputs_embeds=None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states  # (N, C)


class BaichuanM1ForCausalLM(nn.Module, HasInnerState, IsHybrid):
    # checkpoint name -> (vLLM parameter, shard of the fused parameter)
    stacked_params = {
        ".mlp.gate_proj.": (".mlp.gate_up_proj.", 0),
        ".mlp.up_proj.": (".mlp.gate_up_proj.", 1),
    }
    renamed_params = {
        ".self_attn.conv_k": ".self_attn.kv_conv.conv_k",
        ".self_attn.conv_v": ".self_attn.kv_conv.conv_v",
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if vllm_config.speculative_config is not None:
            # a rejected draft token would have to roll back the K/V conv state, which KVConv does not do
            raise ValueError("Baichuan-M1 in vLLM does not support speculative decoding (its K/V conv state cannot "
                             "roll back rejected draft tokens); remove speculative_config")
        if not vllm_config.model_config.is_hybrid:
            # vLLM allocates the conv state only for hybrid configs, i.e. when layer_types mixes kinds
            raise ValueError(
                "Baichuan-M1 in vLLM needs at least one sliding-window layer (config.sliding_window_layers)"
            )
        self.config = config
        self.model = BaichuanM1Model(vllm_config=vllm_config, prefix="model")
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config, prefix="lm_head"
        )
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, weight in weights:
            shard = None
            for old, (new, shard_id) in self.stacked_params.items():
                if old in name:
                    name, shard = name.replace(old, new), shard_id
                    break
            for old, new in self.renamed_params.items():
                name = name.replace(old, new)
            if name == "lm_head.weight" and self.config.norm_head:
                # NormHead: the rows are L2-normalised once here, not per step
                weight = F.normalize(weight.float(), dim=-1).to(weight.dtype)
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, weight)
            else:
                loader(param, weight, shard)
            loaded.add(name)
        return loaded

    # --- the conv state, described to vLLM's hybrid cache manager ---

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return MambaStateDtypeCalculator.short_conv_state_dtype(
            vllm_config.model_config.dtype, vllm_config.cache_config.mamba_cache_dtype
        )

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, int]]:
        """The largest per-layer state; vLLM sizes its pages by it (the two layer kinds differ)."""
        config = vllm_config.model_config.hf_config
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        dims = []
        for i in range(config.num_hidden_layers):
            _, kv_heads, head_dim = layer_heads(config, i)
            dims.append(2 * max(1, kv_heads // tp_size) * head_dim)
        return MambaStateShapeCalculator.short_conv_state_shape(
            tp_world_size=1, intermediate_size=max(dims), conv_kernel=2
        )

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.short_conv_state_copy_func()
