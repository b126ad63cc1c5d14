"""MMLU-medical option log-likelihood: each option scored in full against the prompt computed once per
question (its KV cache repeated for the options), side by side in one process, same questions and batch.

    .venv/bin/python bench/bench_eval_loglik.py --model models/smollm2-135m-instruct --questions 60

Prints JSON and a table: seconds per question of each path, the ratio, and the largest difference of
their scores (they must agree to float noise).
"""

import argparse
import json
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--questions", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-cache", default="data_cache")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from m1_align.config import DataConfig
    from m1_align.data.build import build_from_config, read_split_rows
    from m1_align.evaluation import benchmarks

    data = build_from_config(DataConfig(cache_dir=args.data_cache, max_per_task=1500, eval_per_task=100))
    from m1_align.data.chat import prompt_ids
    from m1_align.data.sampling import take_balanced

    rows = take_balanced(read_split_rows(data, "mmlu_medical"), "subject", args.questions)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prefix = tok(benchmarks.LOGLIK_PREFIX, add_special_tokens=False)["input_ids"]

    def each_option_in_full():
        sequences = [(prompt_ids(tok, r["prompt"]) + prefix, tok(" " + o, add_special_tokens=False)["input_ids"])
                     for r in rows for o in r["options"]]
        flat = iter(benchmarks.continuation_logprobs(model, sequences, tok.pad_token_id, args.batch_size * 4))
        return [[next(flat) for _ in r["options"]] for r in rows]

    results, scores = {}, {}
    for name, fn in (("each option in full", each_option_in_full),
                     ("prompt once", lambda: benchmarks.option_logliks(model, tok, rows, args.batch_size))):
        start = time.time()
        scores[name] = fn()
        results[name] = {"seconds_per_question": (time.time() - start) / len(rows)}
    a, b = (torch.tensor(s) for s in scores.values())
    results["max_abs_score_diff"] = float((a - b).abs().max())
    results["speedup"] = results["each option in full"]["seconds_per_question"] / results["prompt once"]["seconds_per_question"]
    results["questions"], results["threads"], results["load_average"] = len(rows), torch.get_num_threads(), os.getloadavg()
    print(json.dumps(results, indent=2))
    print("\n| path | s / question |\n|---|---|")
    for name in ("each option in full", "prompt once"):
        print(f"| {name} | {results[name]['seconds_per_question']:.3f} |")
    print(f"\nprompt once is {results['speedup']:.2f}x faster; scores agree to {results['max_abs_score_diff']:.1e}")


if __name__ == "__main__":
    main()
