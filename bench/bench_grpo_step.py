"""Step time of our GRPO against TRL's GRPOTrainer on the same model, prompts and settings, runs interleaved.

    .venv/bin/python bench/bench_grpo_step.py --model models/smollm2-135m-instruct --steps 6 --runs 5

Sides (`--sides`, each run in its own process): `ours:vllm` and `ours:hf` (our grpo stage with rollout.engine
vllm or hf), `trl:hf` (GRPOTrainer with HF generate), `trl:vllm` (GRPOTrainer with use_vllm=True,
vllm_mode="colocate", tried as it is; a side that fails is reported with its last words), `ppo:hf` and
`ppo:vllm` (our PPO with a critic, same prompts and tokens). The runs go in rounds, each round one run of every
side, the order rotated every round (A B C, B C A, ...), so that a change in the shared machine's load falls on
every side alike. Each run's timed steps are those after the first (warm-up); a run's step time is the mean of
them; over the runs the bench reports min / median / max, and each comparison's ratio per round (ours / TRL in
the same round) with its min / median / max. The load average before and after every run and the CPU model are
recorded.

What is held equal, and checked where it can be:
- prompts: one file of a fixed sample of the built verifiable prompts. Ours orders them by its seeded shuffle
  (OnlineLoop.prompt_batch); TRL is given exactly that sequence with shuffle_dataset=False (its RepeatSampler
  then walks the rows in order, prompts_per_step per step). Both sides log the prompts of every step and the
  bench refuses to report when any step's prompts differ; the TRL process also checks that TRL's chat-templated
  prompt ids are ours' `prompt_ids`.
- settings (SETTINGS below): learning rate with a constant schedule and no warm-up, AdamW betas, eps, weight
  decay, gradient clip, group size, prompts per step, completion length, temperature 1 / top-p 1, loss
  aggregation over the batch's tokens (ours token_mean = TRL loss_type "dapo"), group-std-scaled advantages,
  no KL (TRL beta 0 = ours kl_loss_coef 0, no reference model), clip 0.2, one optimiser step per batch,
  no missing-EOS penalty (TRL has none), gradient checkpointing off on both (GRPOConfig turns it on by default),
  the dtype (fp32 weights; --dtype bfloat16: bf16 autocast on both, ours via model.dtype=auto, TRL bf16=True).
- not equalised, by design: each side's own implementation (ours packs samples padding-free, TRL runs torch's
  fused AdamW, its default; ours' CLI sets glibc to keep freed memory, `--trl-keep-freed-memory` does the same
  for TRL) and the sampled tokens (each side draws its own samples, so the mean response lengths are printed).

Time split. Ours: its metrics (generate = sampling + rule reward, score = batch + advantages, train, sync) and
the wall time of each loop step. TRL, measured by wrapping its own methods in a subclass: generate =
`_generate` (tokenise, sample, decode; with vLLM also its weight sync), score = the rest of
`_generate_and_score_completions` (rewards, advantages), train = the rest of the step (forward, backward,
optimiser), step = on_step_begin to on_step_end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "learning_rate": 1e-6, "adam_betas": (0.9, 0.95), "adam_epsilon": 1e-8, "weight_decay": 0.0, "max_grad_norm": 1.0,
    "temperature": 1.0, "top_p": 1.0, "clip": 0.2, "seed": 42,
}
SIDES = ("ours:vllm", "ours:hf", "ppo:vllm", "ppo:hf", "trl:hf", "trl:vllm")
PARTS = ("generate", "score", "train", "sync")


# -- the child processes -------------------------------------------------------------------------------
def _logger(path: str):
    def log(record: dict) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return log


def child_ours(p: dict) -> None:
    """Our grpo (or ppo) stage through its CLI, with the prompts of every step and each step's wall time logged."""
    import torch

    from m1_align.cli import main
    from m1_align.rl import loop, ppo

    log = _logger(p["log"])
    prompt_batch, step = loop.OnlineLoop.prompt_batch, ppo.PPOLoop.step

    def logged_prompt_batch(self, k, per_step):
        rows = prompt_batch(self, k, per_step)
        log({"event": "prompts", "step": k, "prompts": [r["prompt"] for r in rows]})
        return rows

    def timed_step(self, k):
        t0 = time.perf_counter()
        metrics = step(self, k)
        log({"event": "step", "step": k, "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
             **{part: metrics[f"time/{part}"] for part in PARTS}, "response_length": metrics["response_length"]})
        return metrics

    loop.OnlineLoop.prompt_batch, ppo.PPOLoop.step = logged_prompt_batch, timed_step
    if main(p["argv"]):
        raise SystemExit(f"{p['argv'][0]} failed")


def child_trl(p: dict) -> None:
    """TRL's GRPOTrainer on the prompts in ours' order, its generate/score/train split measured by wrapping its
    own methods."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from m1_align.data.chat import prompt_ids
    from m1_align.data.rules import score

    log, s = _logger(p["log"]), p["settings"]
    if p["keep_freed_memory"]:
        from m1_align.training import keep_freed_memory

        keep_freed_memory()
    rows = [json.loads(line) for line in open(p["prompts_file"], encoding="utf-8")]
    tok = AutoTokenizer.from_pretrained(p["model"])

    def rule_reward(completions, answer, rule, **_):
        return [score(ru, c[-1]["content"], a).score for c, a, ru in zip(completions, answer, rule, strict=True)]

    clock = {"generate": 0.0, "generate_and_score": 0.0}

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            clock["generate"] += time.perf_counter() - t0
            groups = range(0, len(prompts), self.num_generations)
            log({"event": "prompts", "step": self.state.global_step, "prompts": [prompts[i] for i in groups],
                 "ids_match": all(list(out[0][i]) == prompt_ids(tok, prompts[i]) for i in groups)})
            return out

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            clock["generate_and_score"] += time.perf_counter() - t0
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.update(generate=0.0, generate_and_score=0.0)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            seconds = time.perf_counter() - self.t0
            lengths = trainer._metrics["train"]["completions/mean_length"]
            log({"event": "step", "step": state.global_step - 1, "seconds": seconds, "threads": torch.get_num_threads(),
                 "generate": clock["generate"], "score": clock["generate_and_score"] - clock["generate"],
                 "train": seconds - clock["generate_and_score"], "response_length": lengths[-1]})

    vllm = {"use_vllm": True, "vllm_mode": "colocate"} if p["engine"] == "vllm" else {"use_vllm": False}
    cfg = GRPOConfig(
        output_dir=p["out"], use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=s["seed"],
        per_device_train_batch_size=p["prompts"] * p["samples"], num_generations=p["samples"], steps_per_generation=1,
        num_iterations=1, max_steps=p["steps"], max_completion_length=p["new_tokens"], shuffle_dataset=False,
        learning_rate=s["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, adam_beta1=s["adam_betas"][0],
        adam_beta2=s["adam_betas"][1], adam_epsilon=s["adam_epsilon"], weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"], gradient_checkpointing=False, beta=0.0, epsilon=s["clip"], loss_type="dapo",
        scale_rewards="group", mask_truncated_completions=False, temperature=s["temperature"], top_p=s["top_p"],
        bf16=p["dtype"] == "bfloat16", **vllm,  # bf16: autocast over fp32 weights, as ours' model.dtype=auto
    )
    trainer = TimedGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(p["model"], dtype=torch.float32), reward_funcs=rule_reward, args=cfg,
        train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[StepTimer()])
    trainer.train()


# -- the parent ----------------------------------------------------------------------------------------
def write_prompts(cache: str, path: Path, count: int = 512) -> Path:
    """One prompt file for every side: a fixed sample of the built verifiable prompts over all tasks (the
    split is ordered by task, and prompt lengths differ several-fold between tasks)."""
    from m1_align.config import DataConfig
    from m1_align.data.build import build_from_config, read_split_rows

    rows = read_split_rows(build_from_config(DataConfig(cache_dir=cache, max_per_task=1500, eval_per_task=100)), "rl")
    rows = random.Random(0).sample(rows, count)
    path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "answer", "rule", "task")}) + "\n" for r in rows))
    return path


def ours_order(prompts_file: Path, steps: int, per_step: int) -> list[dict]:
    """The rows ours trains on, step by step: its own loader and its own seeded shuffle (OnlineLoop.prompt_batch)."""
    from types import SimpleNamespace

    from m1_align.config import GRPOConfig
    from m1_align.rl.loop import OnlineLoop
    from m1_align.stage_data import rl_rows

    cfg = GRPOConfig(seed=SETTINGS["seed"], data={"train_file": str(prompts_file)})
    view = SimpleNamespace(rows=rl_rows(cfg), cfg=cfg)
    return [row for k in range(steps) for row in OnlineLoop.prompt_batch(view, k, per_step)]


def ours_argv(side: str, args, out: Path, prompts_file: Path) -> list[str]:
    trainer, engine = side.split(":")
    s = SETTINGS
    return [
        "ppo" if trainer == "ppo" else "grpo", f"output_dir={out}", f"model.path={args.model}", f"seed={s['seed']}",
        f"rollout.engine={engine}", f"train.max_steps={args.steps}", "train.eval_limit=1", "train.save_steps=1000",
        "reward.mode=rule", f"data.train_file={prompts_file}", f"data.cache_dir={args.data_cache}",
        f"ppo.prompts_per_step={args.prompts}", f"ppo.samples_per_prompt={args.samples}",
        f"ppo.minibatch_size={args.prompts * args.samples}", "ppo.ppo_epochs=1", "ppo.missing_eos_penalty=0",
        f"ppo.advantage_estimator={'gae' if trainer == 'ppo' else 'grpo'}", "ppo.grpo_std_normalize=true",
        "ppo.kl_loss_coef=0", "ppo.kl_coef=0", "ppo.loss_agg_mode=token_mean", "ppo.mask_truncated=false",
        f"ppo.clip_range={s['clip']}", f"rollout.max_new_tokens={args.new_tokens}",
        f"rollout.temperature={s['temperature']}", f"rollout.top_p={s['top_p']}",
        f"train.learning_rate={s['learning_rate']}", "train.lr_scheduler=constant", "train.warmup_ratio=0",
        f"train.adam_betas=[{s['adam_betas'][0]},{s['adam_betas'][1]}]", f"train.weight_decay={s['weight_decay']}",
        f"train.max_grad_norm={s['max_grad_norm']}", "model.gradient_checkpointing=false",
        f"model.dtype={'auto' if args.dtype == 'bfloat16' else 'float32'}",
    ]


def run_side(side: str, args, work: Path, run: int, prompts_file: Path, trl_prompts: Path) -> dict:
    """One run of one side in its own process; its step records, peak memory and the load around it."""
    out, log = work / f"{side.replace(':', '-')}-{run}", work / f"{side.replace(':', '-')}-{run}.jsonl"
    trainer, engine = side.split(":")
    if trainer == "trl":
        params = {"log": str(log), "out": str(out), "model": str(args.model_dir), "prompts_file": str(trl_prompts),
                  "steps": args.steps, "prompts": args.prompts, "samples": args.samples, "new_tokens": args.new_tokens,
                  "dtype": args.dtype, "engine": engine, "settings": SETTINGS,
                  "keep_freed_memory": args.trl_keep_freed_memory}
    else:
        params = {"log": str(log), "argv": ours_argv(side, args, out, prompts_file)}
    load_before, t0 = os.getloadavg(), time.time()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "trl" if trainer == "trl" else "ours", json.dumps(params)],
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, capture_output=True, text=True, cwd=os.getcwd())
    result = {"side": side, "run": run, "load_before": load_before, "load_after": os.getloadavg(),
              "wall_s": time.time() - t0}
    if done.returncode:  # the frames in TRL's and ours' code say where it failed, the tail says why
        output = done.stderr or done.stdout
        frames = [line.strip() for line in output.splitlines() if "/trl/" in line or "/m1_align/" in line]
        return {**result, "error": "\n".join(dict.fromkeys(frames)) + "\n...\n" + output[-1500:]}
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    steps = [r for r in records if r["event"] == "step"]
    if args.dtype == "bfloat16" and trainer != "trl" and "-> bf16 autocast" not in done.stdout + done.stderr:
        return {**result, "error": "model.dtype=auto chose fp32 in the trainer's process (its bf16 probe); rerun on a "
                "quieter machine or compare in float32"}
    return {**result, "steps": steps[1:], "prompts": [r["prompts"] for r in records if r["event"] == "prompts"],
            "ids_match": all(r.get("ids_match", True) for r in records if r["event"] == "prompts"),
            "peak_rss_gib": next(int(line.split()[1]) for line in done.stderr.splitlines()
                                 if line.startswith("PEAK_RSS_KB")) / 2**20}


# the child entry: the peak resident set size goes to stderr whatever the side
CHILD = ("import importlib.util, json, resource, sys; "
         f"spec = importlib.util.spec_from_file_location('bench_grpo_step', {str(Path(__file__).resolve())!r}); "
         "bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench); "
         "getattr(bench, 'child_' + sys.argv[1])(json.loads(sys.argv[2])); "
         "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)} if values else {}


def summarise(runs: list[dict], sides: list[str]) -> dict:
    summary = {}
    for side in sides:
        done = [r for r in runs if r["side"] == side and "steps" in r and r["steps"]]
        failed = [r for r in runs if r["side"] == side and "error" in r]
        per_run = [statistics.mean(s["seconds"] for s in r["steps"]) for r in done]
        summary[side] = {
            "step_s": spread(per_run),
            **{f"{part}_s": spread([statistics.mean(s[part] for s in r["steps"]) for r in done])
               for part in PARTS if done and all(part in s for r in done for s in r["steps"])},
            "response_length": statistics.mean(s["response_length"] for r in done for s in r["steps"]) if done else None,
            "peak_rss_gib": spread([r["peak_rss_gib"] for r in done]),
            "threads": sorted({s["threads"] for r in done for s in r["steps"]}),
            "failed_runs": len(failed), **({"error": failed[0]["error"]} if failed else {}),
        }
    return summary


def paired_ratio(runs: list[dict], ours: str, peer: str) -> dict:
    """ours / peer step time within each round (the two ran minutes apart, under the same load)."""
    step = {(r["side"], r["run"]): statistics.mean(s["seconds"] for s in r["steps"]) for r in runs if r.get("steps")}
    return spread([step[ours, k] / step[peer, k] for (side, k) in step if side == ours and (peer, k) in step])


def check_prompts(runs: list[dict], steps: int) -> None:
    """Every run of every side saw the same prompts at every step; otherwise the comparison is refused."""
    seen = [(r["side"], r["run"], r["prompts"]) for r in runs if "prompts" in r]
    if not seen:
        return
    side0, run0, first = seen[0]
    for side, run, prompts in seen:
        if len(prompts) != steps:
            raise SystemExit(f"{side} run {run} logged {len(prompts)} prompt batches for {steps} steps")
        for k, (a, b) in enumerate(zip(first, prompts, strict=True)):
            if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
                raise SystemExit(f"step {k}: {side} run {run} saw other prompts than {side0} run {run0}; not comparable")
    if not all(r["ids_match"] for r in runs if "ids_match" in r):
        raise SystemExit("TRL's chat-templated prompt ids differ from ours' prompt_ids for the same messages")


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a policy folder or finished stage output")
    parser.add_argument("--steps", type=int, default=6, help="steps per run; the first is dropped (warm-up)")
    parser.add_argument("--runs", type=int, default=5, help="runs of every side, interleaved in rounds")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (the group)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--sides", default="ours:vllm,trl:hf,ours:hf,trl:vllm",
                        help=f"comma-separated, from {', '.join(SIDES)}")
    parser.add_argument("--data-cache", default="data_cache")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: bf16 autocast for every side (only where this CPU's bf16 matmul is faster)")
    parser.add_argument("--trl-keep-freed-memory", action="store_true",
                        help="give TRL's process the glibc setting ours' CLI makes (keep_freed_memory)")
    parser.add_argument("--out", help="also write the results (every run, every step, the prompts) to this JSON file")
    args = parser.parse_args()
    sides = args.sides.split(",")
    if unknown := [s for s in sides if s not in SIDES]:
        parser.error(f"--sides: unknown {unknown}; choose from {', '.join(SIDES)}")
    if args.steps < 2 or args.runs < 1:
        parser.error("--steps must be 2 or more (the first is warm-up) and --runs 1 or more")
    model = Path(args.model)
    args.model_dir = model / "model" if (model / "model" / "config.json").is_file() else model
    if args.dtype == "bfloat16":
        import torch

        from m1_align.training import compute_dtype

        if compute_dtype("auto") != torch.bfloat16:
            parser.error("--dtype bfloat16: bf16 matmuls are not faster than fp32 on this machine, so model.dtype=auto "
                         "would run fp32; compare in float32")

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts_file = write_prompts(args.data_cache, work / "prompts.jsonl")
        trl_prompts = work / "prompts_in_ours_order.jsonl"
        trl_prompts.write_text("".join(json.dumps(r) + "\n" for r in ours_order(prompts_file, args.steps, args.prompts)))
        for run in range(args.runs):
            for side in sides[run % len(sides):] + sides[: run % len(sides)]:
                if any(r["side"] == side and "error" in r for r in runs):
                    continue  # a side that failed once is reported with its error, not retried every round
                runs.append(run_side(side, args, work, run, prompts_file, trl_prompts))
                r = runs[-1]
                print(f"round {run} {side}: " + ("FAILED" if "error" in r else
                      f"{statistics.mean(s['seconds'] for s in r['steps']):.2f} s/step") +
                      f", load {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}", file=sys.stderr, flush=True)
    check_prompts(runs, args.steps)
    results = {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "settings": SETTINGS,
        "args": {k: str(v) for k, v in vars(args).items()}, "sides": summarise(runs, sides),
        "ratios": {f"{ours} / {peer}": paired_ratio(runs, ours, peer)
                   for ours in sides if not ours.startswith("trl") for peer in sides if peer.startswith("trl")},
        "loads": [(r["side"], r["run"], r["load_before"][0], r["load_after"][0]) for r in runs],
        "prompts_step_0": [p[-1]["content"][:80] for p in next((r["prompts"][0] for r in runs if r.get("prompts")), [])],
    }
    if args.out:
        Path(args.out).write_text(json.dumps({**results, "runs": runs}, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "loads"}, indent=1))
    print(f"\n{results['cpu']}, {args.runs} runs per side interleaved, {args.steps - 1} timed steps per run; "
          "min / median / max over runs")
    print("| side | step s | generate s | score s | train s | sync s | peak RSS GiB | mean response tokens |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda d: f"{d['min']:.2f} / {d['median']:.2f} / {d['max']:.2f}" if d else "-"  # noqa: E731
    for side, r in results["sides"].items():
        if not r["step_s"]:
            print(f"| {side} | did not run: {r.get('error', '').strip().splitlines()[-1:]} |")
            continue
        parts = " | ".join(fmt(r.get(f"{part}_s", {})) for part in PARTS)
        print(f"| {side} | {fmt(r['step_s'])} | {parts} | {r['peak_rss_gib']['median']:.2f} | {r['response_length']:.1f} |")
    for name, ratio in results["ratios"].items():
        if ratio:
            print(f"{name} step time, paired by round: {fmt(ratio)} (min / median / max)")


if __name__ == "__main__":
    main()
