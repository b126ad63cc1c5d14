"""A TDPO step against a DPO step (ours) and TRL's DPOTrainer: step time and peak memory, side by side.

    .venv/bin/python bench/bench_tdpo_step.py --model models/smollm2-135m-instruct --steps 4 --batch-size 8

Each trainer runs in its own subprocess, one after the other, on the same model, the same built preference
pairs (the recipe's data), batch size, maximum length, learning rate and dtype, full-parameter with a separate
reference model (TRL's default: a copy of the policy). Variants:
  - ours, loss=tdpo2 (needs the reference's whole next-token distribution: live reference logits);
  - ours, loss=dpo (the same trainer and batches with the DPO loss; the sequential KL is still computed, for
    the logged seqkl metrics, so this is not a cheaper DPO: TRL's is the DPO baseline);
  - TRL's DPOTrainer with its own sigmoid loss;
  - with --baseline-tree DIR (an older checkout, e.g. `git worktree add --detach DIR <commit>`): ours, loss=tdpo2,
    importing m1_align from DIR, so a change to the trainer is measured against its predecessor in one run.
Step time: mean of the steps after the first (warm-up), from a step-begin/step-end callback; as a fraction of
the faster dtype's matmul ceiling (measured in the same run) at 8 x params FLOPs per token (policy forward and
backward, reference forward). Memory: the
process's peak resident set during training (VmHWM, reset just before) minus its resident set just before
(both models loaded, no optimiser state yet), so what is compared is what training adds. Prints JSON and a table.
"""

import argparse
import json
import os
import sys

from ceiling import ceiling_gflops  # bench/ceiling.py
from side_by_side import baseline_tree, failed, from_tree, markdown_table, run_result

SCRIPT = r'''
import json, sys, tempfile, time
from transformers import TrainerCallback
variant, model, steps, batch, length, dtype, cache = sys.argv[1:8]
times = []
class Timer(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t)
def status_kb(field):  # VmRSS: resident now; VmHWM: the peak since the last reset
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
from m1_align.config import load_config
cfg = load_config("tdpo", None, [f"output_dir={tempfile.mkdtemp()}", f"model.path={model}", f"model.dtype={dtype}",
                  f"data.cache_dir={cache}", "data.max_per_task=1500", "data.eval_per_task=100", f"train.max_steps={steps}",
                  f"train.batch_size={batch}", f"train.max_length={length}", "train.learning_rate=5e-6",
                  "train.save_steps=10000", "train.logging_steps=1", "train.eval_limit=1", "model.lora.enabled=false",
                  f"tdpo.loss={'dpo' if variant == 'ours-dpo' else 'tdpo2'}"])
if variant.startswith("ours"):
    from m1_align.preference.trainer import build_trainer
    from m1_align.runs import MetricsLogger
    from pathlib import Path
    trainer = build_trainer(cfg, Path(cfg.output_dir), MetricsLogger(Path(cfg.output_dir), run_name="bench"))[0]
else:
    from trl import DPOConfig, DPOTrainer
    from m1_align.stage_data import preference_datasets
    from m1_align.training import load_model, load_tokenizer, resolve_model_dir, training_arguments
    model_dir = resolve_model_dir(model)
    train, _ = preference_datasets(cfg)
    from pathlib import Path
    args = DPOConfig(**training_arguments(cfg, Path(cfg.output_dir)), beta=cfg.tdpo.beta, max_length=int(length),
                     precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=load_model(cfg.model, model_dir=model_dir), args=args, train_dataset=train,
                         processing_class=load_tokenizer(cfg.model, model_dir))
trainer.eval_dataset = None
trainer.add_callback(Timer())
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, so the peak below is that of training alone
before = status_kb("VmRSS")
trainer.train()
peak = status_kb("VmHWM")
params = sum(p.numel() for p in trainer.model.parameters())
tokens = getattr(trainer, "_total_train_tokens", 0) / max(trainer.state.global_step, 1)  # chosen + rejected, per step
import shutil; shutil.rmtree(cfg.output_dir, ignore_errors=True)  # the trainer's last checkpoint, GBs per variant
print("RESULT", json.dumps({"step_s": times[1:], "rss_before_kb": before, "peak_rss_kb": peak, "tokens_per_step": tokens,
                            "parameters": params}))
'''

VARIANTS = ("ours-tdpo2", "ours-dpo", "trl-dpo")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or auto (bf16 autocast where it pays)")
    parser.add_argument("--data-cache", default="data_cache")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"a comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--baseline-tree", help="also run ours-tdpo2 with m1_align imported from this older checkout")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is a warm-up and not timed)")

    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    runs = [(v, v, SCRIPT) for v in variants]
    tree = baseline_tree(parser, args.baseline_tree)
    if tree:
        runs.insert(0, (f"ours-tdpo2 ({args.baseline_tree})", "ours-tdpo2", from_tree(SCRIPT, tree)))
    ceilings = {dtype: ceiling_gflops(dtype) for dtype in ("float32", "bfloat16")}
    results = {}
    for label, variant, script in runs:
        r, log = run_result([sys.executable, "-c", script, variant, args.model, str(args.steps), str(args.batch_size),
                             str(args.max_length), args.dtype, args.data_cache])
        if r is None:
            failed(label, log)
            results[label] = None
            continue
        results[label] = {"step_s": sum(r["step_s"]) / len(r["step_s"]), "steps_timed": len(r["step_s"]),
                            "step_peak_gib": (r["peak_rss_kb"] - r["rss_before_kb"]) / 2**20,
                            "peak_rss_gib": r["peak_rss_kb"] / 2**20, "tokens_per_step": r["tokens_per_step"]}
        gflops = 8 * r["parameters"] * r["tokens_per_step"] / results[label]["step_s"] / 1e9
        results[label]["fraction_of_ceiling"] = gflops / max(ceilings.values())
    results["load_average"] = os.getloadavg()
    print(json.dumps({"config": vars(args), "matmul_ceiling_gflops": ceilings, "results": results}, indent=2))
    print("\n" + markdown_table(
        ["trainer", "step s", "tokens/step", "of the faster ceiling", "memory a step adds, GiB", "peak RSS GiB"],
        [(label, None if results[label] is None else [
            f"{results[label]['step_s']:.2f}", f"{results[label]['tokens_per_step']:.0f}",
            f"{results[label]['fraction_of_ceiling']:.0%}", f"{results[label]['step_peak_gib']:.2f}",
            f"{results[label]['peak_rss_gib']:.2f}"]) for label, _, _ in runs]))
    print(f"matmul ceilings (GFLOP/s): {ceilings}")
    tdpo, dpo, trl = (results.get(v) for v in VARIANTS)
    if tdpo and args.baseline_tree and results[runs[0][0]]:
        before = results[runs[0][0]]
        print(f"\nTDPO now / {args.baseline_tree}: step {tdpo['step_s'] / before['step_s']:.2f}x, "
              f"memory {tdpo['step_peak_gib'] / before['step_peak_gib']:.2f}x")
    if tdpo and dpo:
        print(f"\nTDPO / our DPO: step {tdpo['step_s'] / dpo['step_s']:.2f}x, memory {tdpo['step_peak_gib'] / dpo['step_peak_gib']:.2f}x")
    if tdpo and trl:
        print(f"TDPO / TRL DPOTrainer: step {tdpo['step_s'] / trl['step_s']:.2f}x, memory {tdpo['step_peak_gib'] / trl['step_peak_gib']:.2f}x")


if __name__ == "__main__":
    main()
