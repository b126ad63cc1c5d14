"""The GPU device check (training step against the bf16 ceiling, FlexAttention, generation), prepared to run in one call on a lent GPU machine (under 10 minutes):

0. the sliding layers' FlexAttention against the window-chunked SDPA path (outputs and gradients, bf16), since
   the CPU tests never reach FlexAttention;
1. the hybrid model's training step in bf16 autocast (fp32 master weights, fused AdamW: what the trainers do on a
   GPU) at Baichuan-M1-14B's head layout scaled down: global layers with fewer, wider heads than the sliding
   ones (14B: 20 x 256 against 40 x 128; here 8 x 256 against 16 x 128), as a fraction of the bf16 matmul
   ceiling measured in the same run (6 x params FLOPs per token);
2. the FlexAttention path of the sliding layers at varying sequence lengths: the first length compiles a static
   kernel and the second a dynamic one, which should serve every later length without a compile (the first
   call against the next one); lengths that are not a multiple of 128 take the window-chunked SDPA path instead;
3. the step of 1 again with the decoder layers compiled (model.compile=true: compile_layers), the compile's
   cost and the step time; a failure is reported in the table rather than stopping the script;
4. HF generate on the same model (greedy, every sample to the same length), tokens/s;
5. a forward over long prompts (longer than the window, a multiple of 128) as generation's prefill runs it, under
   eager_generation (compile forced off, so the sliding layers take the window-chunked path rather than eager
   FlexAttention) against the compiled layers with FlexAttention: time and the largest logit difference.

vLLM's CUDA build is not installed on the lent machines, so vLLM is not measured here.

    python bench/gpu_check.py --out $OUT/gpu_check.md      # on the GPU machine; paste the table into docs/BENCHMARKS.md
    python bench/gpu_check.py --device cpu --quick         # the same code on tiny sizes, as a smoke run
Prints markdown (and rewrites --out after every part, so a run cut short keeps what it measured); a part that
fails is reported in its place and the script goes on. Never asserts timings.
"""

import argparse
import contextlib
import time

import torch
from ceiling import ceiling_gflops  # bench/ceiling.py

from m1_align.model import BaichuanM1ForCausalLM, preset_config
from m1_align.model.modeling import flex_sliding_attention, window_chunked_attention
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


def attention_flops_per_token(config, length: int) -> float:
    """fwd+bwd FLOPs of the attention matmuls (QK^T and PV) per token, averaged over a causal row of `length`:
    global layers see (length + 1) / 2 keys on average, sliding layers at most the window. Backward = 2 x forward."""
    total = 0.0
    for layer in range(config.num_hidden_layers):
        heads, _, head_dim = config.head_layout(layer)
        keys = sum(min(t, config.sliding_window) if layer in config.sliding_window_layers else t
                   for t in range(1, length + 1)) / length
        total += 3 * 2 * 2 * heads * head_dim * keys
    return total


def training_step(model, optimizer, ids, device):
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def flex_against_chunked(device, quick: bool) -> list[str]:
    """Part 0: the same sliding-window attention two ways, forward and backward, in bf16."""
    batch, heads, kv_heads, length, dim, window = (1, 4, 2, 256, 32, 64) if quick else (2, 16, 4, 4096, 128, 1024)
    q = torch.randn(batch, heads, length, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, length, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    grad = torch.randn(batch, heads, length, dim, device=device, dtype=torch.bfloat16)
    results = {}
    for name, attention in [("flex", flex_sliding_attention if device.type == "cuda" else window_chunked_attention),
                            ("chunked", window_chunked_attention)]:
        out = attention(q, k, v, window)
        results[name] = (out.detach().float(), *(g.float() for g in torch.autograd.grad(out, (q, k, v), grad)))
    diffs = [(a - b).abs().max().item() for a, b in zip(results["flex"], results["chunked"], strict=True)]
    scale = results["chunked"][0].abs().max().item()
    return ["", f"0. FlexAttention against the window-chunked SDPA path, bf16, q {batch} x {heads} x {length} x {dim}, "
            f"k/v {kv_heads} heads, window {window} (FlexAttention only runs on CUDA; on a CPU both are the chunked path)",
            "", "| max abs difference | output | dq | dk | dv | output's max abs |", "|---|---|---|---|---|---|",
            "| flex - chunked | " + " | ".join(f"{d:.2e}" for d in diffs) + f" | {scale:.2f} |"]


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

    def report(part_lines):
        lines.extend(part_lines)
        print("\n".join(part_lines), flush=True)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")

    def part(number, title, run):
        try:
            report(run())
        except Exception as e:  # noqa: BLE001 - a device run reports what failed and goes on
            message = str(e).splitlines()[0][:300] if str(e) else ""
            report(["", f"{number}. {title}: failed: {type(e).__name__}: {message}"])

    report([])
    part(0, "FlexAttention against the window-chunked SDPA path", lambda: flex_against_chunked(device, args.quick))
    ceiling = ceiling_gflops("bfloat16", 1024 if args.quick else 8192, device=args.device) / 1000  # TFLOP/s
    model = BaichuanM1ForCausalLM(preset_config("baichuan-m1-14b", **sizes)).to(device)
    params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * params + attention_flops_per_token(model.config, length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, sizes["vocab_size"], (batch, length), device=device)
    eager = {}

    def step_time():
        return sorted(timed(lambda: training_step(model, optimizer, ids, device), device) for _ in range(steps))[steps // 2]

    def eager_step():
        training_step(model, optimizer, ids, device)  # warm-up: compiles, allocator, optimizer state
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        eager["s"] = seconds = step_time()
        tokens_per_s = batch * length / seconds
        fraction = 6 * params * tokens_per_s / 1e12 / ceiling
        with_attention = flops_per_token * tokens_per_s / 1e12 / ceiling
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        return ["", f"1. Training step, bf16 autocast, fused AdamW; {params / 1e6:.1f}M parameters, global layers "
                f"{sizes['num_attention_heads']} x {sizes['hidden_size'] // sizes['num_attention_heads']}, sliding "
                f"{sizes['num_swa_attention_heads']} x {sizes['hidden_size'] // sizes['num_swa_attention_heads']} "
                f"(heads x dim), window {sizes['sliding_window']}; bf16 matmul ceiling {ceiling:.2f} TFLOP/s measured "
                "in this run", "",
                "| batch x length | step s (median) | tokens/s | of the bf16 ceiling: 6 x params (embedding included) "
                "| and with the attention matmuls | peak memory GiB |", "|---|---|---|---|---|---|",
                f"| {batch} x {length} | {seconds:.3f} | {tokens_per_s:,.0f} | {fraction:.0%} | {with_attention:.0%} "
                f"| {peak:.1f} |"]

    def varying_lengths():
        rows = ["", "2. Forward+backward at varying lengths (batch 1): the first call at a new length against the next "
                "one; a gap is a compile (FlexAttention on the sliding layers: static, then dynamic shapes)", "",
                "| length | sliding layers' attention | first call s | second call s |", "|---|---|---|---|"]
        for n in lengths:
            x = torch.randint(0, sizes["vocab_size"], (1, n), device=device)
            first, second = (timed(lambda x=x: training_step(model, optimizer, x, device), device) for _ in range(2))
            path = ("FlexAttention" if device.type == "cuda" and n % 128 == 0 else "window-chunked SDPA") \
                if n > sizes["sliding_window"] else "causal SDPA"
            rows.append(f"| {n} | {path} | {first:.2f} | {second:.2f} |")
        return rows

    def compiled_step():
        compile_layers(model)
        compile_s = timed(lambda: training_step(model, optimizer, ids, device), device)
        seconds = step_time()
        versus = f" ({seconds / eager['s']:.2f}x eager)" if "s" in eager else ""
        return ["", "3. The step of 1 with the decoder layers compiled (model.compile=true)", "",
                "| batch x length | first call s (compiles) | step s (median) | of the bf16 ceiling: 6 x params "
                "| and with the attention matmuls |", "|---|---|---|---|---|",
                f"| {batch} x {length} | {compile_s:.1f} | {seconds:.3f}{versus} | "
                f"{6 * params * batch * length / seconds / 1e12 / ceiling:.0%} | "
                f"{flops_per_token * batch * length / seconds / 1e12 / ceiling:.0%} |"]

    def hf_generate():
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
        return ["", f"4. HF generate, bf16 weights, greedy, {prompts} prompts of {x.shape[1]} tokens x {new} new tokens: "
                f"{seconds:.2f} s, {prompts * new / seconds:,.0f} tokens/s. vLLM: not measured (its CUDA build is not "
                "installed on the lent machines)."]

    def long_prefill():
        x = torch.randint(0, sizes["vocab_size"], (batch, length), device=device)  # bf16 weights since part 4
        rows = ["", f"5. Prefill-style forward (no grad, bf16 weights) of {batch} prompts x {length} tokens: compile "
                "forced off as in generation, against the compiled layers", "",
                "| | sliding layers' attention | first call s | second call s |", "|---|---|---|---|"]
        logits = {}
        for name, context in [("eager_generation()", eager_generation), ("compiled layers", contextlib.nullcontext)]:
            def forward(name=name, context=context):
                with torch.no_grad(), context():
                    logits[name] = model(input_ids=x).logits[:, -256:].float()
            first, second = timed(forward, device), timed(forward, device)
            path = "window-chunked SDPA" if name.startswith("eager") or device.type != "cuda" else "FlexAttention"
            rows.append(f"| {name} | {path} | {first:.2f} | {second:.2f} |")
        diff = (logits["eager_generation()"] - logits["compiled layers"]).abs().max().item()
        scale = logits["compiled layers"].abs().max().item()
        return rows + ["", f"Largest logit difference over the last 256 positions: {diff:.3f} (largest logit {scale:.1f})."]

    part(1, "Training step", eager_step)
    part(2, "Forward+backward at varying lengths", varying_lengths)
    part(3, "The step of 1 with the decoder layers compiled", compiled_step)
    part(4, "HF generate", hf_generate)
    part(5, "Prefill-style forward of long prompts", long_prefill)


if __name__ == "__main__":
    main()
