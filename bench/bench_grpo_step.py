"""A GRPO step against a PPO step on the same prompts and token budget, and against TRL's GRPOTrainer.

    .venv/bin/python bench/bench_grpo_step.py --model runs/quickstart/tdpo --steps 4

Each trainer runs in its own subprocess, one after the other, on the same model, the same 512 built
verifiable prompts (one file: a fixed sample over all tasks; rule rewards), the same number of samples per
prompt and new tokens, one optimiser pass per batch. All three sample with HF generate by default;
`--engine vllm` gives ours its vLLM engine (fp32, as the trainer). TRL keeps HF generate either way: its vLLM
mode needs a server or CUDA colocation. Ours read their per-step time split from metrics.jsonl; TRL's step
time comes from its trainer state. Peak memory is each process's maximum resident set size. The
first step is dropped (warm-up). `--dtype bfloat16` runs all of them with bf16 autocast over fp32 weights
(ours: model.dtype=auto where this CPU's bf16 matmul is faster, and its vLLM engine samples in bf16; TRL:
bf16=True); the default is fp32 for all. Prints JSON and a table.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PARTS = ("time/generate", "time/score", "time/train", "time/sync")
PEAK = "import resource, runpy, sys; sys.argv = sys.argv[1:]; {body}; " \
       "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)"


def ours(command: str, estimator: str, args, out: Path, prompts_file: Path) -> tuple[list[dict], float]:
    overrides = [
        f"output_dir={out}", f"model.path={args.model}", f"rollout.engine={args.engine}", f"train.max_steps={args.steps}",
        "train.eval_limit=1", "reward.mode=rule", f"ppo.prompts_per_step={args.prompts}",
        f"ppo.samples_per_prompt={args.samples}", f"ppo.minibatch_size={args.prompts * args.samples}", "ppo.ppo_epochs=1",
        f"ppo.advantage_estimator={estimator}", *(["ppo.kl_loss_coef=0"] if estimator == "grpo" else []),  # TRL's beta=0
        f"rollout.max_new_tokens={args.new_tokens}", "train.save_steps=1000",
        f"data.cache_dir={args.data_cache}", "ppo.missing_eos_penalty=0",
        f"model.dtype={'auto' if args.dtype == 'bfloat16' else 'float32'}",  # the dtype TRL runs in
        f"data.train_file={prompts_file}",  # the prompts TRL gets
    ]
    body = "from m1_align.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", PEAK.format(body=body), "m1-align", command, *overrides],
                          env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    if args.dtype == "bfloat16" and "-> bf16 autocast" not in done.stdout + done.stderr:
        raise SystemExit(f"{command}: model.dtype=auto chose fp32 in the trainer's process (its bf16 probe); rerun on a "
                         "quieter machine or compare in float32")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/generate" in r][1:], peak_gib(done.stderr)


TRL_SCRIPT = r'''
import json, sys, time
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from m1_align.data.rules import score
model_dir, out, steps, prompts, samples, new_tokens, prompts_file, dtype = sys.argv[1:9]
rows = [json.loads(line) for line in open(prompts_file)]
data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"], "rule": r["rule"]} for r in rows])
def rule_reward(completions, answer, rule, **kw):
    return [score(ru, c[-1]["content"], a).score for c, a, ru in zip(completions, answer, rule)]
times = []
class Timer(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.time()
    def on_step_end(self, *a, **k): times.append(time.time() - self.t)
tok = AutoTokenizer.from_pretrained(model_dir)
cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=int(prompts) * int(samples), num_generations=int(samples),
                 max_completion_length=int(new_tokens), max_steps=int(steps), learning_rate=5e-5, beta=0.0,
                 use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, use_vllm=False,
                 steps_per_generation=1, num_iterations=1, bf16=dtype == "bfloat16")
trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=rule_reward, args=cfg,
                      train_dataset=data, processing_class=tok, callbacks=[Timer()])
trainer.train()
print("STEP_TIMES", json.dumps(times[1:]))
print("LENGTHS", json.dumps([h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h][1:]))
'''


def trl(args, out: Path, prompts_file: Path) -> tuple[list[float], list[float], float]:
    model_dir = Path(args.model) / "model" if (Path(args.model) / "model" / "config.json").is_file() else Path(args.model)
    body = f"exec(compile({TRL_SCRIPT!r}, 'trl_grpo', 'exec'))"
    done = subprocess.run([sys.executable, "-c", PEAK.format(body=body), "trl", str(model_dir), str(out), str(args.steps),
                           str(args.prompts), str(args.samples), str(args.new_tokens), str(prompts_file), args.dtype],
                          capture_output=True, text=True)
    if done.returncode:  # said so in the table, with TRL's own last words
        print("TRL GRPOTrainer did not run here:\n" + done.stderr[-1500:], file=sys.stderr)
        return [], [], float("nan")
    found = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines()
             if line.startswith(("STEP_TIMES", "LENGTHS"))}
    return found["STEP_TIMES"], found["LENGTHS"], peak_gib(done.stderr)


def write_prompts(cache: str, path: Path, count: int = 512) -> Path:
    """One prompt file for every trainer: a fixed sample of the built verifiable prompts over all tasks (the
    split is ordered by task, and prompt lengths differ several-fold between tasks)."""
    from m1_align.config import DataConfig
    from m1_align.data.build import build_from_config, read_split_rows

    rows = read_split_rows(build_from_config(DataConfig(cache_dir=cache, max_per_task=1500, eval_per_task=100)), "rl")
    rows = random.Random(0).sample(rows, count)
    path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "answer", "rule", "task")}) + "\n" for r in rows))
    return path


def peak_gib(stderr: str) -> float:
    line = next(line for line in stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return int(line.split()[1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a policy folder or finished stage output")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--data-cache", default="data_cache")
    parser.add_argument("--skip-ppo", action="store_true", help="only GRPO against TRL's GRPOTrainer")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                        help="ours' rollout engine (TRL samples with HF generate here either way: its vLLM mode needs CUDA)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: bf16 autocast for every trainer (only where this CPU's bf16 matmul is faster)")
    args = parser.parse_args()
    if args.dtype == "bfloat16":
        from m1_align.training import compute_dtype

        if compute_dtype("auto") != torch.bfloat16:
            parser.error("--dtype bfloat16: bf16 matmuls are not faster than fp32 on this machine, so model.dtype=auto "
                         "would run fp32; compare in float32")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = write_prompts(args.data_cache, Path(tmp) / "prompts.jsonl")
        for name, command, estimator in (("ppo (gae + critic)", "ppo", "gae"), ("grpo", "grpo", "grpo"))[args.skip_ppo:]:
            steps, peak = ours(command, estimator, args, Path(tmp) / command, prompts_file)
            mean = {part: sum(s[part] for s in steps) / len(steps) for part in PARTS}
            results[name] = {**mean, "step": sum(mean.values()), "peak_rss_gib": peak, "steps_timed": len(steps),
                             "response_length": sum(s["response_length"] for s in steps) / len(steps)}
        times, lengths, peak = trl(args, Path(tmp) / "trl", prompts_file)
        results["trl GRPOTrainer"] = {"step": sum(times) / len(times) if times else float("nan"), "peak_rss_gib": peak,
                                      "steps_timed": len(times),
                                      "response_length": sum(lengths) / len(lengths) if lengths else float("nan")}
    results["load_average"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    print("\n| trainer | step s | generate s | score s | train s | sync s | peak RSS GiB | mean response tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if name == "load_average":
            continue
        parts = " | ".join(f"{r[p]:.2f}" if p in r else "-" for p in PARTS)
        print(f"| {name} | {r['step']:.2f} | {parts} | {r['peak_rss_gib']:.2f} | {r['response_length']:.1f} |")
    grpo, peer = results["grpo"]["step"], results["trl GRPOTrainer"]["step"]
    if not args.skip_ppo:
        print(f"\ngrpo / ppo step: {grpo / results['ppo (gae + critic)']['step']:.2f}x")
    print(f"grpo / TRL GRPOTrainer step: {grpo / peer:.2f}x")


if __name__ == "__main__":
    main()
