"""This machine's matmul rate, measured in the same run as what is compared with it (machines differ:
one CPU's bf16 matmul is twice its fp32, the next one's half)."""

import time

import torch


def ceiling_gflops(dtype: str = "float32", size: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of back-to-back size^3 matmuls in `dtype` on torch's current threads."""
    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
    torch.mm(a, b)
    done, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        torch.mm(a, b)
        done += 1
    return 2 * size**3 * done / (time.perf_counter() - begin) / 1e9
