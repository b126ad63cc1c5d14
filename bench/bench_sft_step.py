"""The SFT stage's training step as a fraction of this machine's matmul ceiling, full-parameter and LoRA, fp32
and bf16 autocast, side by side.

    .venv/bin/python bench/bench_sft_step.py --model runs/dev42/sft/model --steps 5 --batch-size 4 --max-length 256

Each variant builds the stage's own trainer (`m1_align.sft.trainer.build_trainer`: TRL's SFTTrainer with our
data, assistant-only masks and padding-free packing) in its own subprocess, one after the other, on the same
model, data, batch and length, and trains `--steps` steps; the first is a warm-up and is not timed (with
`model.compile` it also pays the compile). Tokens per
step are the packed rows' real tokens (no padding). FLOPs per token: 6 x params for full-parameter training
(forward 2, backward 4); 4 x params for LoRA (the frozen weights need the input gradients, 2 x params, but no
weight gradients; the adapters' own FLOPs are under 1%). Fractions are of the faster dtype's ceiling, and of
the variant's own dtype's, both measured in this run (machines differ in which dtype is faster).
`--baseline-tree DIR` (an older checkout) runs each variant with that tree's m1_align too, side by side. Prints
JSON and a table; never asserts timings.
"""

import argparse
import json
import os
import sys

from ceiling import ceiling_gflops  # bench/ceiling.py
from side_by_side import baseline_tree, failed, from_tree, markdown_table, run_result

SCRIPT = r'''
import json, sys, tempfile, time
from pathlib import Path
from transformers import TrainerCallback
try:  # what `m1-align` does at start (older trees, run by --baseline-tree, lack it)
    from m1_align.training import keep_freed_memory
    keep_freed_memory()
except ImportError:
    pass
lora, dtype, model, steps, batch, length, cache, compiled = sys.argv[1:9]
times, tokens = [], []
class Timer(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t)
from m1_align.config import load_config
from m1_align.runs import MetricsLogger
from m1_align.sft.trainer import build_trainer
cfg = load_config("sft", None, [f"output_dir={tempfile.mkdtemp()}", f"model.path={model}", f"model.dtype={dtype}",
                  f"data.cache_dir={cache}", "data.max_per_task=1500", "data.eval_per_task=100", f"train.max_steps={steps}",
                  f"train.batch_size={batch}", f"train.max_length={length}", "train.learning_rate=1e-5",
                  "train.save_steps=10000", "train.logging_steps=1", "train.eval_limit=1", f"model.lora.enabled={lora}"]
                  + (["model.compile=true"] if compiled == "true" else []))
trainer, _ = build_trainer(cfg, Path(cfg.output_dir), MetricsLogger(Path(cfg.output_dir), run_name="bench"))
trainer.eval_dataset = None
trainer.add_callback(Timer())
step = trainer.training_step
pad_id = trainer.processing_class.pad_token_id
def counted(model, inputs, *a, **k):  # real tokens: padding has an attention mask of 0, or (rows without one) is a
    mask = inputs.get("attention_mask")  # pad token at position 0
    if mask is None:
        mask = ~((inputs["input_ids"] == pad_id) & (inputs["position_ids"] == 0))
    tokens.append(int(mask.sum()))
    return step(model, inputs, *a, **k)
trainer.training_step = counted
trainer.train()
params = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n)  # the base model's (tied head once)
import shutil; shutil.rmtree(cfg.output_dir, ignore_errors=True)  # the trainer's last checkpoint: 1.6 GB per variant
import resource; peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB
print("RESULT", json.dumps({"step_s": times[1:], "tokens": tokens[1:], "parameters": params, "peak_rss_gib": peak}))
'''

VARIANTS = {  # label: (lora, dtype, FLOPs per token per parameter, model.compile)
    "full fp32": ("false", "float32", 6, "false"),
    "full auto": ("false", "auto", 6, "false"),  # model.dtype=auto: bf16 autocast where this CPU's bf16 matmul is faster
    "LoRA fp32": ("true", "float32", 4, "false"),
    "LoRA auto": ("true", "auto", 4, "false"),
    "full auto compiled": ("false", "auto", 6, "true"),  # model.compile=true: the decoder layers compiled
    "LoRA auto compiled": ("true", "auto", 4, "true"),
}
DEFAULT = ["full fp32", "full auto", "LoRA fp32", "LoRA auto"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--data-cache", default="data_cache")
    parser.add_argument("--variants", default=",".join(DEFAULT), help=f"a comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--baseline-tree", help="also run each variant with m1_align imported from this older checkout")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is a warm-up and not timed)")
    labels = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(labels) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")

    runs = [(label, label, SCRIPT) for label in labels]
    tree = baseline_tree(parser, args.baseline_tree)
    if tree:
        runs = [run for label in labels for run in ((f"{label} ({args.baseline_tree})", label, from_tree(SCRIPT, tree)),
                                                    (label, label, SCRIPT))]
    ceilings = {dtype: ceiling_gflops(dtype) for dtype in ("float32", "bfloat16")}
    results = {}
    for label, variant, script in runs:
        lora, dtype, flops_per_param, compiled = VARIANTS[variant]
        r, log = run_result([sys.executable, "-c", script, lora, dtype, args.model, str(args.steps), str(args.batch_size),
                             str(args.max_length), args.data_cache, compiled])
        if r is None:
            failed(label, log)
            results[label] = None
            continue
        seconds, tokens = sum(r["step_s"]), sum(r["tokens"])
        gflops = flops_per_param * r["parameters"] * tokens / seconds / 1e9
        picked = "bfloat16" if dtype == "auto" and "-> bf16 autocast" in log else "float32"
        own = ceilings[picked]
        results[label] = {"compute_dtype": picked, "step_s": seconds / len(r["step_s"]), "tokens_per_step": tokens / len(r["tokens"]),
                          "tokens_per_s": tokens / seconds, "gflops": gflops, "of_own_ceiling": gflops / own,
                          "of_faster_ceiling": gflops / max(ceilings.values()),
                          "peak_rss_gib": r["peak_rss_gib"]}
    results["load_average"] = os.getloadavg()
    print(json.dumps({"config": vars(args), "matmul_ceiling_gflops": ceilings, "results": results}, indent=2))
    print("\n" + markdown_table(
        ["SFT step", "computes in", "step s", "tokens/step", "tokens/s", "GFLOP/s", "of its dtype's ceiling", "of the faster ceiling",
         "peak RSS GiB"],
        [(label, None if results[label] is None else [
            results[label]["compute_dtype"], f"{results[label]['step_s']:.2f}", f"{results[label]['tokens_per_step']:.0f}",
            f"{results[label]['tokens_per_s']:.0f}", f"{results[label]['gflops']:.0f}", f"{results[label]['of_own_ceiling']:.0%}",
            f"{results[label]['of_faster_ceiling']:.0%}", f"{results[label]['peak_rss_gib']:.2f}"]) for label, _, _ in runs]))
    print(f"matmul ceilings (GFLOP/s): {ceilings}")


if __name__ == "__main__":
    main()
