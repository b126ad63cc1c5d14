"""Time per PPO step and its split (generation, scoring, training, weight sync): vLLM engine vs HF engine.

    .venv/bin/python bench/bench_ppo_step.py --model runs/quickstart/tdpo --steps 4

Runs `m1-align ppo` for a few steps with each engine, one after the other in its own subprocess, on the
same model, prompts and settings (rule rewards on the built verifiable prompts), then reads the per-step
timings from each run's metrics.jsonl. The first step is dropped (warm-up). Prints JSON and a table;
the target is weight sync under 5% of the step.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PARTS = ("time/generate", "time/score", "time/train", "time/sync")


def run(engine: str, args, out: Path) -> list[dict]:
    command = [
        sys.executable, "-m", "m1_align.cli", "ppo", f"output_dir={out}", f"model.path={args.model}",
        f"rollout.engine={engine}", f"train.max_steps={args.steps}", "train.eval_limit=1", "reward.mode=rule",
        f"ppo.prompts_per_step={args.prompts}", f"ppo.samples_per_prompt={args.samples}",
        f"rollout.max_new_tokens={args.new_tokens}", "train.save_steps=1000", f"data.cache_dir={args.data_cache}",
    ]
    subprocess.run(command, check=True, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/generate" in r][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a policy folder or finished stage output")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--data-cache", default="data_cache")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("vllm", "hf"):
            steps = run(engine, args, Path(tmp) / engine)
            mean = {part: sum(s[part] for s in steps) / len(steps) for part in PARTS}
            total = sum(mean.values())
            results[engine] = {**mean, "step": total, "sync_share": mean["time/sync"] / total, "steps_timed": len(steps)}
    results["load_average"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    print("\n| engine | step s | generate s | score s | train s | sync s | sync share |")
    print("|---|---|---|---|---|---|---|")
    for engine in ("vllm", "hf"):
        r = results[engine]
        print(f"| {engine} | {r['step']:.2f} | {r['time/generate']:.2f} | {r['time/score']:.2f} | {r['time/train']:.2f} "
              f"| {r['time/sync']:.3f} | {100 * r['sync_share']:.1f}% |")
    print(f"\nstep ratio hf / vllm: {results['hf']['step'] / results['vllm']['step']:.2f}x")


if __name__ == "__main__":
    main()
