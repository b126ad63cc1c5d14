"""This machine's matmul rate, measured in the same run as what is compared with it (machines differ:
one CPU's bf16 matmul is twice its fp32, the next one's half)."""

import time

import torch


def ceiling_gflops(dtype: str = "float32", size: int = 2048, seconds: float = 1.0, windows: int = 3,
                   device: str = "cpu") -> float:
    """GFLOP/s of back-to-back size^3 matmuls in `dtype` on torch's current threads (or a GPU): the best of
    `windows` windows of `seconds` each. A ceiling is the rate the machine can reach; on shared cores one window
    can land on a neighbour's burst (single 2 s windows measured 390 and 424 GFLOP/s here, half an hour apart)."""
    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype), device=device) for _ in range(2))
    torch.mm(a, b)
    rates = []
    for _ in range(windows):
        sync()
        done, begin = 0, time.perf_counter()
        while time.perf_counter() - begin < seconds:
            torch.mm(a, b)
            done += 1
        sync()  # a GPU queues the launches: count them once they ran
        rates.append(2 * size**3 * done / (time.perf_counter() - begin) / 1e9)
    return max(rates)
