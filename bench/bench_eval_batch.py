"""Held-out evaluation speed against its generation batch size (`eval.batch_size`), side by side.

    .venv/bin/python bench/bench_eval_batch.py --model runs/quickstart/sft/model --batch-sizes 8 32 96

Greedy answers (HF generate, as `m1-align eval`) to the first --prompts held-out verifiable questions of
the built data, once per batch size, in one process. Prints JSON and a table with each batch size's
speed-up over the first one. A small model on CPU is bound by per-step overhead, so larger batches win.
"""

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a model folder with its tokenizer")
    parser.add_argument("--data", default="data_cache/medical-v2-seed0-max1500-eval100", help="a built data folder")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 96])
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import m1_align.model  # noqa: F401  registers baichuan_m1
    from m1_align.data.build import read_split_rows
    from m1_align.data.chat import prompt_ids
    from m1_align.rollout.hf_engine import greedy_generate

    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = read_split_rows(args.data, "eval")[: args.prompts]
    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in rows]
    seconds = {}
    for batch_size in args.batch_sizes:
        started = time.perf_counter()
        greedy_generate(model, tokenizer, prompts, args.new_tokens, batch_size)
        seconds[batch_size] = time.perf_counter() - started
    first = seconds[args.batch_sizes[0]]
    print(json.dumps({"seconds": seconds, "prompts": len(prompts), "load_average": os.getloadavg()}, indent=2))
    print("\n| batch size | seconds | speed-up |\n|---|---|---|")
    for batch_size, s in seconds.items():
        print(f"| {batch_size} | {s:.1f} | {first / s:.2f}x |")


if __name__ == "__main__":
    main()
