"""Rollout throughput: the vLLM engine against HF generate, same model, prompts and sampling settings.

    .venv/bin/python bench/bench_rollout.py --preset quickstart --prompts 32 --samples 4 --new-tokens 64

A randomly initialised hybrid model of the given preset is saved to a temporary folder; each engine then
runs in its own subprocess (in-process vLLM pins torch's threads, which would slow an HF run after it).
Every completion runs to --new-tokens (no stop ids), so both engines do the same work. Each engine gets one
untimed warm-up call, then the timed call. Prints one JSON object (with the machine's load average, since
the reference machine is shared) and a markdown table. On a busy machine, OMP_NUM_THREADS=1 avoids
OpenMP threads waiting on each other.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def build_model(folder: str, preset: str, vocab_size: int) -> None:
    from m1_align.model import BaichuanM1ForCausalLM, preset_config

    torch.manual_seed(0)
    BaichuanM1ForCausalLM(preset_config(preset, vocab_size=vocab_size)).save_pretrained(folder)


def prompts_for(args) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.prompts,), generator=generator)
    return [torch.randint(0, args.vocab_size, (int(n),), generator=generator).tolist() for n in lengths]


def run_engine(args) -> dict:
    from m1_align.rl.rollout import SamplingSettings, make_engine

    started = time.perf_counter()
    if args.engine == "vllm":
        engine = make_engine(
            "vllm", model_dir=args.model_dir, dtype=args.dtype, enforce_eager=args.enforce_eager, seed=0
        )
    else:
        from transformers import AutoModelForCausalLM

        import m1_align.model  # noqa: F401  registers baichuan_m1 with the Auto classes

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
        engine = make_engine("hf", model=model, batch_size=args.prompts)
    startup = time.perf_counter() - started
    prompts = prompts_for(args)
    params = SamplingSettings(n=args.samples, max_new_tokens=args.new_tokens, stop_token_ids=(), seed=0)
    engine.generate(prompts[:2], SamplingSettings(n=1, max_new_tokens=4, stop_token_ids=()))  # warm-up
    started = time.perf_counter()
    out = engine.generate(prompts, params)
    seconds = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for samples in out for c in samples)
    engine.close()
    return {
        "engine": args.engine,
        "startup_s": startup,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "threads": torch.get_num_threads(),
    }


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
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--engine", choices=["vllm", "hf"], help=argparse.SUPPRESS)  # subprocess mode
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.engine:
        print("RESULT " + json.dumps(run_engine(args)), flush=True)
        return

    load_before = os.getloadavg()[0]  # the reference machine is shared: record how busy it was
    with tempfile.TemporaryDirectory() as folder:
        build_model(folder, args.preset, args.vocab_size)
        results = {}
        for engine in ("hf", "vllm"):
            command = [sys.executable, __file__, *sys.argv[1:], "--engine", engine, "--model-dir", folder]
            run = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode or not lines:
                sys.exit(f"{engine} run failed:\n{run.stderr[-4000:]}")
            results[engine] = json.loads(lines[-1][len("RESULT ") :])
    summary = {
        "config": {k: v for k, v in vars(args).items() if k not in ("engine", "model_dir")},
        "torch": torch.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
        "results": results,
        "vllm_over_hf": results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"],
    }
    print(json.dumps(summary, indent=2))
    print("\n| engine | startup s | generate s | tokens | tokens/s |\n|---|---|---|---|---|")
    for name, r in results.items():
        label = (
            "HF generate" if name == "hf" else "vLLM" + (" (eager)" if args.enforce_eager else " (compiled)")
        )
        print(
            f"| {label} | {r['startup_s']:.1f} | {r['seconds']:.1f} | {r['tokens']} | {r['tokens_per_s']:.0f} |"
        )
    print(f"\nvLLM / HF throughput: {summary['vllm_over_hf']:.2f}x")


if __name__ == "__main__":
    main()
