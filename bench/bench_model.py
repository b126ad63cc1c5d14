"""Benchmark of the Baichuan-M1 hybrid model. Prints JSON, then a markdown table; never asserts timings.

1. Decode KV-cache bytes per token of Baichuan-M1-14B at 1K-32K context against a full-attention GQA
   model of the same width (40 layers, 8 KV heads of 128), read from the real cache objects of models
   scaled down 16x in width, 10x in depth and 32x in window and context, then scaled back up; also as
   "equivalent KV heads" (the paper's Figure 7).
2. Forward+backward tokens/s of the hybrid against transformers' LlamaForCausalLM of the same size and
   sequence length, measured alternately.
3. The hybrid at 4x and 8x its window against itself with a window >= the sequence (every layer global).

    python bench/bench_model.py                                  # CPU, small sizes
    python bench/bench_model.py --device cuda --dtype bf16 --size medium
"""

import argparse
import json
import os
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from m1_align.model import BaichuanM1ForCausalLM, preset_config

SIZES = {
    # layers, hidden, intermediate, vocab; global (q, kv) heads; sliding (q, kv) heads; window of (2); batch
    "small": dict(layers=4, hidden=256, inter=704, vocab=8192, full=(4, 2), swa=(8, 4), window=512, batch=1),
    "medium": dict(
        layers=8, hidden=1024, inter=2816, vocab=32000, full=(8, 2), swa=(16, 4), window=512, batch=4
    ),
    "large": dict(
        layers=16, hidden=2048, inter=5632, vocab=32000, full=(8, 1), swa=(16, 4), window=1024, batch=4
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- 1. KV-cache bytes ------------------------------------------------------------------------------------

FULL_SIZE = dict(layers=40, hidden=5120, window=8192)
SCALE = dict(layers=10, hidden=16, tokens=32)  # 14B / scaled-down model
BASELINE_KV_HEADS, BASELINE_HEAD_DIM = 8, 128  # a 14B full-attention GQA model (e.g. 40 x 128-dim heads)


def cache_elements(cache) -> tuple[int, int]:
    """Elements a cache object holds: (K/V of every layer, the conv state where there is one)."""
    kv = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    conv = sum(t.numel() for state in getattr(cache, "conv_states", []) for t in state)
    return kv, conv


@torch.no_grad()
def kv_cache_per_token(contexts=(1024, 8192, 16384, 32768), bytes_per_element=2):
    small = preset_config(
        "baichuan-m1-14b",
        num_hidden_layers=FULL_SIZE["layers"] // SCALE["layers"],
        hidden_size=FULL_SIZE["hidden"] // SCALE["hidden"],
        intermediate_size=64,
        vocab_size=64,
        sliding_window=FULL_SIZE["window"] // SCALE["tokens"],
    )  # same head counts, so head_dim shrinks 16x: 256 -> 16 (global), 128 -> 8 (sliding)
    hybrid = BaichuanM1ForCausalLM(small).eval()
    llama = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=small.num_hidden_layers,
            hidden_size=small.hidden_size,
            intermediate_size=64,
            vocab_size=64,
            num_attention_heads=FULL_SIZE["hidden"] // BASELINE_HEAD_DIM,
            num_key_value_heads=BASELINE_KV_HEADS,
        )
    ).eval()
    rows = []
    for context in contexts:
        ids = torch.randint(0, 64, (1, context // SCALE["tokens"]))
        # elements of the small model -> bytes of the 14B one
        width = SCALE["layers"] * SCALE["hidden"] * bytes_per_element
        kv, conv = cache_elements(hybrid(ids, use_cache=True).past_key_values)
        # K/V grow with the (scaled) context; the conv state is one token per layer whatever the context
        hybrid_bytes = width * (kv / ids.shape[1] + conv / context)
        kv, _ = cache_elements(llama(ids, use_cache=True, past_key_values=DynamicCache()).past_key_values)
        llama_bytes = width * kv / ids.shape[1]
        one_head = FULL_SIZE["layers"] * 2 * BASELINE_HEAD_DIM * bytes_per_element  # K+V of one 128-dim head
        rows.append(
            dict(
                context=context,
                hybrid_kib_per_token=round(hybrid_bytes / 1024, 1),
                gqa8_kib_per_token=round(llama_bytes / 1024, 1),
                ratio=round(hybrid_bytes / llama_bytes, 3),
                equivalent_kv_heads=round(hybrid_bytes / one_head, 2),
            )
        )
    return rows


# --- 2./3. training throughput --------------------------------------------------------------------------


def train_step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def tokens_per_second(models: dict, ids, device, repeats):
    """Median forward+backward tokens/s per model; the models take turns so that load noise hits all."""
    for model in models.values():
        train_step(model, ids)  # warm-up
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            sync(device)
            start = time.perf_counter()
            train_step(model, ids)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: round(ids.numel() / statistics.median(t), 1) for name, t in times.items()}


def hybrid_config(size, **overrides):
    s = SIZES[size]
    return preset_config(
        "quickstart",
        num_hidden_layers=s["layers"],
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        vocab_size=s["vocab"],
        num_attention_heads=s["full"][0],
        num_key_value_heads=s["full"][1],
        num_swa_attention_heads=s["swa"][0],
        num_swa_key_value_heads=s["swa"][1],
        max_position_embeddings=32768,
        **overrides,
    )


def vs_llama(size, seq, device, dtype, repeats):
    s = SIZES[size]
    hybrid = BaichuanM1ForCausalLM(hybrid_config(size, sliding_window=s["window"]))
    llama = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=s["layers"],
            hidden_size=s["hidden"],
            intermediate_size=s["inter"],
            vocab_size=s["vocab"],
            num_attention_heads=s["full"][0],
            num_key_value_heads=s["full"][1],
            max_position_embeddings=32768,
            attn_implementation="sdpa",
        )
    )
    models = {"hybrid": hybrid.to(device, dtype).train(), "llama": llama.to(device, dtype).train()}
    ids = torch.randint(0, s["vocab"], (s["batch"], seq), device=device)
    tps = tokens_per_second(models, ids, device, repeats)
    return dict(
        seq=seq,
        batch=s["batch"],
        window=s["window"],
        hybrid_params_m=round(sum(p.numel() for p in hybrid.parameters()) / 1e6, 2),
        llama_params_m=round(sum(p.numel() for p in llama.parameters()) / 1e6, 2),
        hybrid_tok_s=tps["hybrid"],
        llama_tok_s=tps["llama"],
        ratio=round(tps["hybrid"] / tps["llama"], 3),
    )


def window_vs_global(size, window, device, dtype, repeats):
    rows = []
    for multiple in (4, 8):
        seq = multiple * window
        torch.manual_seed(0)
        hybrid = BaichuanM1ForCausalLM(hybrid_config(size, sliding_window=window))
        all_global = BaichuanM1ForCausalLM(hybrid_config(size, sliding_window=seq))  # the window covers all
        all_global.load_state_dict(hybrid.state_dict())
        models = {
            "hybrid": hybrid.to(device, dtype).train(),
            "all_global": all_global.to(device, dtype).train(),
        }
        ids = torch.randint(0, SIZES[size]["vocab"], (SIZES[size]["batch"], seq), device=device)
        tps = tokens_per_second(models, ids, device, repeats)
        rows.append(
            dict(
                seq=seq,
                window=window,
                hybrid_tok_s=tps["hybrid"],
                all_global_tok_s=tps["all_global"],
                speedup=round(tps["hybrid"] / tps["all_global"], 3),
            )
        )
    return rows


def markdown(result) -> str:
    lines = [
        f"KV cache of Baichuan-M1-14B at bf16, decode (from scaled-down cache objects); "
        f"baseline: 40 layers x {BASELINE_KV_HEADS} KV heads x {BASELINE_HEAD_DIM}",
        "",
        "| context | hybrid KiB/token | GQA-8 KiB/token | hybrid / GQA-8 | equivalent KV heads |",
        "|---|---|---|---|---|",
    ]
    for r in result["kv_cache"]:
        lines.append(
            f"| {r['context']} | {r['hybrid_kib_per_token']} | {r['gqa8_kib_per_token']} | {r['ratio']} "
            f"| {r['equivalent_kv_heads']} |"
        )
    v = result["vs_llama"]
    lines += [
        "",
        f"Forward+backward, {result['device']} {result['dtype']}, size {result['size']}, batch {v['batch']}, "
        f"window {v['window']}",
        "",
        "| model | params (M) | seq | tokens/s |",
        "|---|---|---|---|",
        f"| hybrid | {v['hybrid_params_m']} | {v['seq']} | {v['hybrid_tok_s']} |",
        f"| LlamaForCausalLM | {v['llama_params_m']} | {v['seq']} | {v['llama_tok_s']} |",
        f"| ratio hybrid / llama | | | {v['ratio']}x |",
        "",
        "| seq | window | hybrid tokens/s | all layers global tokens/s | speedup |",
        "|---|---|---|---|---|",
    ]
    for r in result["window_vs_global"]:
        lines.append(
            f"| {r['seq']} | {r['window']} | {r['hybrid_tok_s']} | {r['all_global_tok_s']} | {r['speedup']}x |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length of the hybrid-vs-llama run")
    parser.add_argument("--window", type=int, default=256, help="window of the 4x/8x-window runs")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    result = dict(
        device=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
        threads=torch.get_num_threads(),
        dtype=args.dtype,
        size=args.size,
        kv_cache=kv_cache_per_token(),
        vs_llama=vs_llama(args.size, args.seq, device, dtype, args.repeats),
        window_vs_global=window_vs_global(args.size, args.window, device, dtype, args.repeats),
    )
    print(json.dumps(result, indent=2))
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
