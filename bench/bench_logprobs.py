"""Policy log-probs on a real model: the full-logits computation against causal_lm_logprobs (the output head
only on the scored positions, in checkpointed chunks), in fp32 and under bf16 autocast (fp32 weights, what
model.dtype=auto picks where bf16 matmuls are faster), forward + backward, with this machine's fp32 and bf16
matmul ceilings measured in the same run; and the bf16 one again with the decoder layers compiled
(model.compile=true).

    .venv/bin/python bench/bench_logprobs.py --model models/smollm2-135m-instruct

Each variant runs in its own subprocess (peak memory is that process's maximum resident set size, minus
its size after loading the model). The batch is an RL minibatch: B rows of a prompt and a response (random
tokens). Throughput is counted as 6 x parameters x tokens per second (forward + backward) against the
ceiling. Prints JSON and a table.
"""

import argparse
import json
import resource
import sys
import time

from ceiling import ceiling_gflops  # bench/ceiling.py
from side_by_side import run_result

VARIANTS = ("full", "chunked", "chunked-bf16-autocast", "chunked-bf16-autocast-compiled")



def variant(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from m1_align.logprobs import causal_lm_logprobs
    from m1_align.training import compile_layers, keep_freed_memory

    keep_freed_memory()  # as `m1-align` does at start
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    if args.variant.endswith("compiled"):  # model.compile=true; the untimed first call compiles
        compile_layers(model)
    ids = torch.randint(100, model.config.vocab_size, (args.batch, args.prompt + args.response))
    mask = torch.ones_like(ids)
    start = args.prompt
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def full():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, start - 1 : -1]
        rows = [(r.float() / 0.7).gather(-1, y[:, None]).squeeze(-1) - (r.float() / 0.7).logsumexp(-1)
                for r, y in zip(logits, ids[:, start:], strict=True)]
        return torch.stack(rows)

    def chunked():
        return causal_lm_logprobs(model, ids, mask, start, 0.7)[0]

    compute = full if args.variant == "full" else chunked
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled="autocast" in args.variant)
    times = []
    for _ in range(args.repeats + 1):
        model.zero_grad(set_to_none=True)
        begin = time.perf_counter()
        with autocast:
            loss = compute().sum()
        loss.backward()
        times.append(time.perf_counter() - begin)
    seconds = sorted(times[1:])[len(times[1:]) // 2]  # median after a warm-up
    tokens = ids.numel()
    return {"variant": args.variant, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "gflops": 6 * params * tokens / seconds / 1e9, "peak_rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(variant(args)))
        return
    ceilings = {dtype: ceiling_gflops(dtype) for dtype in ("float32", "bfloat16")}
    results = []
    for name in VARIANTS:
        result, log = run_result([sys.executable, __file__, *sys.argv[1:], "--variant", name])
        if result is None:
            sys.exit(log[-3000:])
        results.append(result)
    full, chunked, bf16, compiled = results
    best = max(ceilings.values())
    summary = {"matmul_ceiling_gflops": ceilings, "results": results,
               "chunked_vs_full_time": chunked["seconds"] / full["seconds"],
               "chunked_vs_full_peak_mem": chunked["peak_rss_mb"] / full["peak_rss_mb"],
               "bf16_autocast_vs_fp32_time": bf16["seconds"] / chunked["seconds"],
               "compiled_vs_not_time": compiled["seconds"] / bf16["seconds"]}
    print(json.dumps(summary, indent=1))
    print(f"\nmatmul ceilings (2048^3): fp32 {ceilings['float32']:.0f}, bf16 {ceilings['bfloat16']:.0f} GFLOP/s; "
          f"batch {args.batch} x ({args.prompt} prompt + {args.response} response) tokens")
    print("| variant | fwd+bwd s | tokens/s | GFLOP/s (6 x params x tokens/s) | % of the faster dtype's ceiling | peak memory over the loaded model |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {r['gflops']:.0f} | {100 * r['gflops'] / best:.0f}% | {r['peak_rss_mb']:.0f} MB |")
    print(f"chunked / full: time {summary['chunked_vs_full_time']:.2f}x, peak memory {summary['chunked_vs_full_peak_mem']:.2f}x; "
          f"bf16 autocast / fp32 (chunked): time {summary['bf16_autocast_vs_fp32_time']:.2f}x; "
          f"compiled layers / not (bf16): time {summary['compiled_vs_not_time']:.2f}x")


if __name__ == "__main__":
    main()
