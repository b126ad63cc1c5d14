"""Rollout throughput: the vLLM engine against HF generate, same model, prompts and sampling settings.

    .venv/bin/python bench/bench_rollout.py --preset quickstart --prompts 32 --samples 4 --new-tokens 64
    .venv/bin/python bench/bench_rollout.py --model models/smollm2-135m-instruct \
        --prompts-file data_cache/medical-v2-seed0-max1500-eval100/rl.jsonl --prompts 32 --samples 4 --new-tokens 128

Without --model a randomly initialised hybrid model of the given preset is saved to a temporary folder and
every completion runs to --new-tokens (no stop ids, random prompts), so both engines do the same work. With
--model and --prompts-file (RL prompts, chat messages) the prompts go through the model's chat template and
sampling stops at its EOS: unequal lengths, as in training; both engines sample the same prompts at the same
settings, so the token counts differ only by chance. Each engine runs in its own subprocess (in-process vLLM
binds torch's threads), gets one untimed warm-up call, then the timed call. The matmul ceiling of the dtype is
measured in the same run, and throughput is also given as a fraction of it (2 x params FLOPs per token):
once over the sampled tokens alone, and once over the work any engine must do, each prompt's tokens once
(vLLM's prefix cache shares a prompt among its samples; HF generate pays it once per sample) plus the
sampled ones. With short EOS-terminated answers after ~100-token prompts the two differ by about 2x.
Prints one JSON object (with the machine's load average) and a markdown table.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from ceiling import ceiling_gflops  # bench/ceiling.py
from side_by_side import run_result


def build_model(folder: str, preset: str, vocab_size: int) -> None:
    from m1_align.model import BaichuanM1ForCausalLM, preset_config

    torch.manual_seed(0)
    BaichuanM1ForCausalLM(preset_config(preset, vocab_size=vocab_size)).save_pretrained(folder)


def prompts_for(args) -> list[list[int]]:
    if args.prompts_file:
        import random

        from transformers import AutoTokenizer

        from m1_align.data.chat import prompt_ids

        rows = [json.loads(line) for line in open(args.prompts_file, encoding="utf-8")]
        random.Random(1).shuffle(rows)  # a mix of the tasks, the same for both engines
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        return [prompt_ids(tokenizer, row["prompt"]) for row in rows[: args.prompts]]
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.prompts,), generator=generator)
    return [torch.randint(0, args.vocab_size, (int(n),), generator=generator).tolist() for n in lengths]


def run_engine(args) -> dict:
    from m1_align.rollout.engine import SamplingSettings
    from m1_align.rollout.factory import make_engine

    started = time.perf_counter()
    if args.engine == "vllm":
        engine = make_engine(
            "vllm", model_dir=args.model_dir, dtype=args.dtype, enforce_eager=args.enforce_eager, seed=0
        )
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import m1_align.model  # noqa: F401  registers baichuan_m1 with the Auto classes

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir) if args.prompts_file else None
        engine = make_engine("hf", model=model, tokenizer=tokenizer, batch_size=args.prompts)
    startup = time.perf_counter() - started
    prompts = prompts_for(args)
    stop = None if args.prompts_file else ()  # None: the model's EOS ids; (): run every sample to the limit
    params = SamplingSettings(n=args.samples, max_new_tokens=args.new_tokens, stop_token_ids=stop, seed=0)
    engine.generate(prompts[:2], SamplingSettings(n=1, max_new_tokens=4, stop_token_ids=()))  # warm-up
    started = time.perf_counter()
    out = engine.generate(prompts, params)
    seconds = time.perf_counter() - started
    lengths = [len(c.token_ids) for samples in out for c in samples]
    engine.close()
    return {
        "engine": args.engine,
        "startup_s": startup,
        "seconds": seconds,
        "tokens": sum(lengths),
        "prompt_tokens": sum(len(p) for p in prompts),
        "tokens_per_s": sum(lengths) / seconds,
        "length_min_mean_max": [min(lengths), sum(lengths) / len(lengths), max(lengths)],
        "stopped_at_eos": sum(c.finish_reason == "stop" for samples in out for c in samples) / len(lengths),
        "threads": torch.get_num_threads(),
    }


def parameter_count(model_dir: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    import m1_align.model  # noqa: F401

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())



def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--prompt-len", type=int, default=64, help="prompts have prompt_len/2..prompt_len tokens"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--model", help="a Hugging Face model folder instead of a random preset model")
    parser.add_argument("--prompts-file", help="RL prompts (JSONL with chat `prompt`s); sampling then stops at EOS")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--engine", choices=["vllm", "hf"], help=argparse.SUPPRESS)  # subprocess mode
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.engine:
        print("RESULT " + json.dumps(run_engine(args)), flush=True)
        return

    if args.prompts_file and not args.model:
        sys.exit("--prompts-file needs --model (its tokenizer and chat template)")
    load_before = os.getloadavg()[0]  # the reference machine is shared: record how busy it was
    ceiling = ceiling_gflops(args.dtype)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model or scratch
        if not args.model:
            build_model(folder, args.preset, args.vocab_size)
        params = parameter_count(folder)
        results = {}
        for engine in ("hf", "vllm"):
            command = [sys.executable, __file__, *sys.argv[1:], "--engine", engine, "--model-dir", folder]
            results[engine], log = run_result(command)
            if results[engine] is None:
                sys.exit(f"{engine} run failed:\n{log[-4000:]}")
    summary = {
        "config": {k: v for k, v in vars(args).items() if k not in ("engine", "model_dir")},
        "torch": torch.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
        "results": results,
        "vllm_over_hf": results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"],
        "parameters": params,
        f"matmul_ceiling_gflops_{args.dtype}": ceiling,
    }
    for r in results.values():
        r["fraction_of_ceiling"] = 2 * params * r["tokens_per_s"] / 1e9 / ceiling
        r["fraction_of_ceiling_with_prompts"] = 2 * params * (r["tokens"] + r["prompt_tokens"]) / r["seconds"] / 1e9 / ceiling
    print(json.dumps(summary, indent=2))
    print("\n| engine | startup s | generate s | tokens | length min/mean/max | tokens/s | of the ceiling | prompt tokens "
          "| of the ceiling, prompts once + sampled |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        label = (
            "HF generate" if name == "hf" else "vLLM" + (" (eager)" if args.enforce_eager else " (compiled)")
        )
        low, mean, high = r["length_min_mean_max"]
        print(f"| {label} | {r['startup_s']:.1f} | {r['seconds']:.1f} | {r['tokens']} | {low}/{mean:.0f}/{high} | "
              f"{r['tokens_per_s']:.0f} | {r['fraction_of_ceiling']:.0%} | {r['prompt_tokens']} | "
              f"{r['fraction_of_ceiling_with_prompts']:.0%} |")
    print(f"\nvLLM / HF throughput: {summary['vllm_over_hf']:.2f}x; {args.dtype} matmul ceiling {ceiling:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
