"""The device check issue #19 asks for, prepared to run in one call on a lent GPU machine (under 10 minutes):

1. the hybrid model's training step in bf16 autocast (fp32 master weights, fused AdamW: what the trainers do on a
   GPU) at Baichuan-M1-14B's head layout scaled down: global layers with fewer, wider heads than the sliding
   ones (14B: 20 x 256 against 40 x 128; here 8 x 256 against 16 x 128), as a fraction of the bf16 matmul
   ceiling measured in the same run (6 x params FLOPs per token);
2. the FlexAttention path of the sliding layers at varying sequence lengths: it is compiled with static shapes,
   so every new length pays a compile (the first call against the next ones); lengths that are not a multiple
   of 128 take the window-chunked SDPA path instead;
3. the step of 1 again with the decoder layers compiled (model.compile=true: compile_layers), the compile's
   cost and the step time; a failure is reported in the table rather than stopping the script;
4. HF generate on the same model (greedy, every sample to the same length), tokens/s.

vLLM's CUDA build is not installed on the lent machines, so vLLM is not measured here.

    python bench/gpu_check.py --out $OUT/gpu_check.md      # on the GPU machine; paste the table into docs/BENCHMARKS.md
    python bench/gpu_check.py --device cpu --quick         # the same code on tiny sizes, as a smoke run
Prints markdown (and writes it to --out); never asserts timings.
"""

import argparse
import time

import torch
from ceiling import ceiling_gflops  # bench/ceiling.py

from m1_align.model import BaichuanM1ForCausalLM, preset_config
from m1_align.training import compile_layers, eager_generation

# M1-14B's layout scaled down: hidden 5120 -> 2048, 40 -> 16 layers, window 8192 -> 1024, head dims kept
FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, vocab_size=32000, num_attention_heads=8,
            num_key_value_heads=1, num_swa_attention_heads=16, num_swa_key_value_heads=4, sliding_window=1024)
QUICK = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=512, num_attention_heads=2,
             num_key_value_heads=1, num_swa_attention_heads=4, num_swa_key_value_heads=2, sliding_window=64)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def training_step(model, optimizer, ids, device):
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run of this script)")
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    sizes = QUICK if args.quick else FULL
    batch, length, steps = (2, 256, 3) if args.quick else (4, 4096, 6)
    lengths = [256, 384, 512, 256, 48] if args.quick else [2048, 2176, 3072, 4096, 2048, 2100]
    lines = [f"Device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; torch {torch.__version__}"]

    ceiling = ceiling_gflops("bfloat16", 1024 if args.quick else 8192, device=args.device) / 1000  # TFLOP/s
    model = BaichuanM1ForCausalLM(preset_config("baichuan-m1-14b", **sizes)).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, sizes["vocab_size"], (batch, length), device=device)
    training_step(model, optimizer, ids, device)  # warm-up: compiles, allocator, optimizer state
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = sorted(timed(lambda: training_step(model, optimizer, ids, device), device) for _ in range(steps))[steps // 2]
    tokens_per_s = batch * length / seconds
    fraction = 6 * params * tokens_per_s / 1e12 / ceiling
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    lines += ["", f"1. Training step, bf16 autocast, fused AdamW; {params / 1e6:.1f}M parameters, global layers "
              f"{sizes['num_attention_heads']} x {sizes['hidden_size'] // sizes['num_attention_heads']}, sliding "
              f"{sizes['num_swa_attention_heads']} x {sizes['hidden_size'] // sizes['num_swa_attention_heads']} (heads x dim), "
              f"window {sizes['sliding_window']}; bf16 matmul ceiling {ceiling:.2f} TFLOP/s measured in this run", "",
              "| batch x length | step s (median) | tokens/s | of the bf16 ceiling (6 x params, embedding included, attention not) | peak memory GiB |",
              "|---|---|---|---|---|",
              f"| {batch} x {length} | {seconds:.3f} | {tokens_per_s:,.0f} | {fraction:.0%} | {peak:.1f} |"]

    lines += ["", "2. Forward+backward at varying lengths (batch 1): the first call at a new length against the next "
              "one; a gap is a compile (FlexAttention on the sliding layers, static shapes)", "",
              "| length | sliding layers' attention | first call s | second call s |", "|---|---|---|---|"]
    for n in lengths:
        x = torch.randint(0, sizes["vocab_size"], (1, n), device=device)
        first, second = (timed(lambda x=x: training_step(model, optimizer, x, device), device) for _ in range(2))
        path = ("FlexAttention" if device.type == "cuda" and n % 128 == 0 else "window-chunked SDPA") \
            if n > sizes["sliding_window"] else "causal SDPA"
        lines.append(f"| {n} | {path} | {first:.2f} | {second:.2f} |")

    try:
        compile_layers(model)
        compile_s = timed(lambda: training_step(model, optimizer, ids, device), device)
        compiled_s = sorted(timed(lambda: training_step(model, optimizer, ids, device), device) for _ in range(steps))[steps // 2]
        row = (f"| {batch} x {length} | {compile_s:.1f} | {compiled_s:.3f} ({compiled_s / seconds:.2f}x eager) | "
               f"{6 * params * batch * length / compiled_s / 1e12 / ceiling:.0%} |")
    except Exception as e:  # noqa: BLE001 - a device run reports what failed and goes on
        row = f"| {batch} x {length} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} | | |"
    lines += ["", "3. The step of 1 with the decoder layers compiled (model.compile=true)", "",
              "| batch x length | first call s (compiles) | step s (median) | of the bf16 ceiling |", "|---|---|---|---|", row]

    model.eval()
    prompts, new = (4, 16) if args.quick else (32, 256)
    x = torch.randint(0, sizes["vocab_size"], (prompts, 512 if not args.quick else 32), device=device)
    model.to(torch.bfloat16)

    def generate():
        with torch.no_grad(), eager_generation():
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=0)

    generate()  # warm-up
    seconds = timed(generate, device)
    lines += ["", f"4. HF generate, bf16 weights, greedy, {prompts} prompts of {x.shape[1]} tokens x {new} new tokens: "
              f"{seconds:.2f} s, {prompts * new / seconds:,.0f} tokens/s. vLLM: not measured (its CUDA build is not "
              "installed on the lent machines)."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
