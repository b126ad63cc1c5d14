"""`m1-align upcycle`: a pretrained Llama checkpoint -> a Baichuan-M1 hybrid (`baichuan_m1`) checkpoint.

    m1-align upcycle models/smollm2-135m-instruct models/smollm2-135m-hybrid                 # window 128, odd layers
    m1-align upcycle models/smollm2-135m-instruct models/hybrid-exact head=plain window=8192  # function-preserving

What maps onto what (Llama -> hybrid): the embeddings, every layer's o_proj, MLP and both RMSNorms, and the
final norm are copied; q_proj, k_proj and v_proj are stacked row-wise into the fused `W_pack` = [q; k; v] (the
same head order, the same rotate-half RoPE convention and theta); global and sliding-window layers both take
the source's head layout (query and KV heads, head_dim = hidden / heads), so GQA is unchanged; the K/V short
convolution starts at the identity, taps (previous, current) = (0, 1) in every KV head, so k'_t = k_t and
v'_t = v_t; the output head is a copy of the source's (untied: a tied source's embedding matrix is copied
into `lm_head`, and from then on the two train separately). Tokenizer, chat template and generation config
are copied as they are.

Function-preserving at initialisation, for any input of at most `window` tokens (tests/test_upcycle.py
checks it to fp32 rounding, also through cached generation):
- the decoder: embeddings, attention (the conv at identity), MLPs, norms and RoPE compute what the source
  computes, so the final hidden states are the source's;
- with `head=plain`, the logits too: the hybrid then equals the source model.
Not function-preserving:
- sliding-window layers: a token at position t >= window no longer sees the keys before t - window + 1,
  so from the window's length on every later layer's input differs from the source's (by how much depends
  on how much attention reaches that far back; distillation recovers it);
- `head=norm` (the default, Baichuan's NormHead): logit_v = h . w_v / |w_v| where the source computes
  h . w_v. Every vocabulary row is rescaled by 1/|w_v| (SmolLM2-135M's rows have norms from 1.8 to 7.5,
  mean 3.2), which both flattens the distribution and re-ranks tokens whose rows are longer or shorter than
  others. The upcycle multiplies the final RMSNorm's weight by the mean row norm, so the typical logit
  keeps its scale and only each token's deviation from the mean norm remains. On SmolLM2-135M-Instruct's
  own greedy answer to a medical question (192 tokens) the NormHead alone costs 2.65 nats/token of
  KL(source || hybrid) without the rescale and 1.66 with it, and the top-1 token agrees with the source's
  at 44% of positions either way: this, not the window, is most of the gap distillation has to close
  (upcycle.json records the KL left on its probe);
- bf16: the hybrid's RMSNorm multiplies by its weight before rounding to bf16, Llama's after, so bf16
  outputs differ from the source's by rounding (fp32 ones do not).

The converted folder holds safetensors weights and upcycle.json (the options, the parameter count and a
probe: on a chat-formatted medical text the final hidden states within the window must match the source's
to `rtol` of their largest entry, or nothing is written; the per-token KL(source || hybrid) over the whole probe is recorded).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from m1_align.runs import OutputExistsError, atomic_replace_dir, atomic_write_text

from .configuration import BaichuanM1Config
from .gguf_import import PROBE_MESSAGES
from .modeling import BaichuanM1ForCausalLM


class UpcycleError(ValueError):
    """A source or option the upcycle cannot use, with what to do about it (one line)."""


class UpcycleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: int = Field(128, ge=1, description=(
        "Sliding window W of the sliding-window layers, in keys (the current token included). Sequences longer "
        "than W change the computation, so choose it below the recipe's prompt + answer lengths."))
    sliding_layers: str = Field("odd", description=(
        "Which layers attend within the window: 'odd' (1, 3, 5, ...: every other layer, the first global, as "
        "Baichuan-M1), 'even', 'all', or comma-separated layer indices such as 1,5,9."))
    head: Literal["norm", "plain"] = Field("norm", description=(
        "Output head: 'norm' is Baichuan's NormHead (rows L2-normalised; changes the logits), 'plain' keeps the "
        "source's linear head (the hybrid then equals the source on inputs within the window)."))


def options_help() -> str:
    return "\n".join(f"  {name}={field.default}: {field.description}"
                     for name, field in UpcycleOptions.model_fields.items())


def parse_options(pairs: list[str]) -> UpcycleOptions:
    """key=value strings -> options; a bad key or value is one line naming it."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in UpcycleOptions.model_fields:
            raise UpcycleError(f"upcycle option {pair!r} is not key=value with a key among "
                               f"{', '.join(UpcycleOptions.model_fields)}")
        values[key] = value
    try:
        return UpcycleOptions(**values)
    except ValidationError as err:
        first = err.errors()[0]
        raise UpcycleError(f"upcycle option {first['loc'][0]}={first['input']}: {first['msg']}") from None


def sliding_layer_indices(spec: str, num_layers: int) -> list[int]:
    named = {"odd": range(1, num_layers, 2), "even": range(0, num_layers, 2), "all": range(num_layers)}
    if spec in named:
        layers = list(named[spec])
    else:
        try:
            layers = sorted({int(i) for i in spec.split(",")})
        except ValueError:
            raise UpcycleError(f"upcycle option sliding_layers={spec}: give odd, even, all or layer indices "
                               "such as 1,3,5") from None
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise UpcycleError(f"upcycle option sliding_layers={spec}: layers {bad} are out of range for the "
                               f"source's {num_layers} layers (0..{num_layers - 1})")
    if not layers:
        # vLLM serves the hybrid only with both layer kinds (the conv state rides on its hybrid cache manager)
        raise UpcycleError(f"upcycle option sliding_layers={spec} selects no layer of {num_layers}; the hybrid "
                           "needs at least one sliding-window layer")
    return layers


def _rope_theta(config, source: str) -> float:
    params = getattr(config, "rope_parameters", None) or {
        "rope_type": (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default"),
        "rope_theta": getattr(config, "rope_theta", 10000.0),
    }
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise UpcycleError(f"{source}: RoPE type {kind!r} (scaled RoPE) is not implemented by the hybrid, which "
                           "has plain RoPE; upcycle a checkpoint without rope scaling")
    return float(params["rope_theta"])


def check_source(config, source: str) -> None:
    """Refuse what the hybrid cannot represent exactly; each message names the source and the field."""
    if config.model_type != "llama":
        raise UpcycleError(f"{source}: model_type {config.model_type!r} is not a Llama (LlamaForCausalLM); "
                           "upcycle converts Llama checkpoints only (SmolLM2, Llama 2/3 without rope scaling, ...)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for field, ok in (
        ("attention_bias", not getattr(config, "attention_bias", False)),
        ("mlp_bias", not getattr(config, "mlp_bias", False)),
        ("hidden_act", config.hidden_act == "silu"),
        ("head_dim", head_dim * config.num_attention_heads == config.hidden_size),
    ):
        if not ok:
            raise UpcycleError(f"{source}: {field}={getattr(config, field, head_dim)!r} has no place in the hybrid "
                               "(it has no biases, a SiLU MLP and head_dim = hidden_size / heads)")
    _rope_theta(config, source)


# what the hybrid takes from the source as it is: the shape, the vocabulary and the special tokens
COPIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "rms_norm_eps", "hidden_act", "max_position_embeddings", "initializer_range",
          "pad_token_id", "bos_token_id", "eos_token_id")


def hybrid_config(source_config, options: UpcycleOptions, source: str = "source") -> BaichuanM1Config:
    c = source_config
    return BaichuanM1Config(
        **{name: getattr(c, name) for name in COPIED},
        # the sliding layers keep the source's head layout, so their weights are the source's too
        num_swa_attention_heads=c.num_attention_heads, num_swa_key_value_heads=c.num_key_value_heads,
        sliding_window=options.window,
        sliding_window_layers=sliding_layer_indices(options.sliding_layers, c.num_hidden_layers),
        rope_theta=_rope_theta(c, source), tie_word_embeddings=False, norm_head=options.head == "norm",
    )


def head_rescale(head_weight: torch.Tensor) -> float:
    """What the final RMSNorm is multiplied by under NormHead: the mean L2 norm of the head's rows, so that
    h . w_v / |w_v| * mean|w| keeps the source's typical logit scale."""
    return float(head_weight.detach().float().norm(dim=-1).mean())


def hybrid_state_dict(source_model, config: BaichuanM1Config) -> dict[str, torch.Tensor]:
    """The hybrid's weights from a loaded LlamaForCausalLM, every tensor a fresh copy."""
    src = {name: tensor.detach() for name, tensor in source_model.state_dict().items()}
    head = source_model.get_output_embeddings().weight.detach()
    state = {
        "model.embed_tokens.weight": src["model.embed_tokens.weight"].clone(),
        "model.norm.weight": src["model.norm.weight"].clone(),
        "lm_head.weight": head.clone(),
    }
    if config.norm_head:
        state["model.norm.weight"] = state["model.norm.weight"] * head_rescale(head)
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        attn = layer + "self_attn."
        state[attn + "W_pack.weight"] = torch.cat(
            [src[attn + "q_proj.weight"], src[attn + "k_proj.weight"], src[attn + "v_proj.weight"]])
        state[attn + "o_proj.weight"] = src[attn + "o_proj.weight"].clone()
        kv_heads = config.head_layout(i)[1]
        identity = torch.tensor([0.0, 1.0], dtype=head.dtype).expand(1, 1, kv_heads, 1, 2)
        state[attn + "conv_k"] = identity.clone()
        state[attn + "conv_v"] = identity.clone()
        for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight", "post_attention_layernorm.weight"):
            state[layer + name] = src[layer + name].clone()
    return state


def _probe_ids(tokenizer) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=True, return_dict=True)["input_ids"])
    return tokenizer("\n".join(m["content"] for m in PROBE_MESSAGES))["input_ids"]


@torch.no_grad()
def probe(source_model, hybrid, ids: list[int], window: int, scale: float) -> dict:
    """Final hidden states within the window (must equal the source's, times the NormHead rescale; the
    difference relative to their largest entry, as their scale grows with depth and width) and the per-token
    KL(source || hybrid) over the whole probe."""
    x = torch.tensor([ids])
    h_src = source_model.model(input_ids=x).last_hidden_state[0].float()
    h_hyb = hybrid.model(input_ids=x).last_hidden_state[0].float()
    inside = min(window, len(ids))
    expected = scale * h_src[:inside]
    lp_src = source_model.lm_head(h_src).log_softmax(-1)
    lp_hyb = hybrid.lm_head(h_hyb).log_softmax(-1)
    kl = (lp_src.exp() * (lp_src - lp_hyb)).sum(-1)
    return {
        "probe_tokens": len(ids),
        "hidden_max_rel_diff_within_window": float((h_hyb[:inside] - expected).abs().max() / expected.abs().max()),
        "kl_to_source_mean": float(kl.mean()),
        "kl_to_source_mean_within_window": float(kl[:inside].mean()),
    }


def upcycle(source: str | Path, output_dir: str | Path, options: UpcycleOptions | None = None,
            overwrite: bool = False, rtol: float = 1e-4) -> dict:
    """Write the hybrid folder and return its report (also saved there as upcycle.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    options = options or UpcycleOptions()
    source, output_dir = str(source), Path(output_dir)
    if not (Path(source) / "config.json").is_file():
        raise UpcycleError(f"{source}: no config.json there; give a Hugging Face model folder (for SmolLM2: "
                           "m1-align import-gguf smollm2 models/smollm2-135m-instruct)")
    if output_dir.resolve() == Path(source).resolve():
        raise UpcycleError(f"{output_dir}: the output folder is the source; choose another one")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{output_dir} is not empty; pass --overwrite to replace it")
    start = time.time()
    source_config = AutoConfig.from_pretrained(source)
    check_source(source_config, source)
    config = hybrid_config(source_config, options, source)
    saved_dtype = getattr(source_config, "dtype", None) or torch.float32
    saved_dtype = getattr(torch, saved_dtype) if isinstance(saved_dtype, str) else saved_dtype

    source_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    state = hybrid_state_dict(source_model, config)
    with torch.device("meta"):
        hybrid = BaichuanM1ForCausalLM(config)
    hybrid.load_state_dict({k: v.to(saved_dtype) for k, v in state.items()}, strict=True, assign=True)
    if (Path(source) / "generation_config.json").is_file():
        hybrid.generation_config = GenerationConfig.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)

    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hybrid.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        del hybrid, state
        saved = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        scale = head_rescale(source_model.get_output_embeddings().weight) if config.norm_head else 1.0
        checks = probe(source_model, saved, _probe_ids(tokenizer), options.window, scale)
        if not checks["hidden_max_rel_diff_within_window"] <= rtol:
            raise UpcycleError(f"{source}: the upcycled model's hidden states within the window differ from the "
                               f"source's by {checks['hidden_max_rel_diff_within_window']:.2e} of their largest "
                               f"entry (tolerance {rtol}); nothing was written")
        report = {
            "source": source,
            "options": options.model_dump(),
            "sliding_window_layers": config.sliding_window_layers,
            "norm_head_rescale": scale if config.norm_head else None,
            "parameters": sum(p.numel() for p in saved.parameters()),
            "dtype": str(saved_dtype).removeprefix("torch."),
            **checks,
            "seconds": round(time.time() - start, 1),
        }
        atomic_write_text(tmp / "upcycle.json", json.dumps(report, indent=2) + "\n")
        atomic_replace_dir(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
