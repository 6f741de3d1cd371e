"""Does this CPU compute bf16? One SmolLM2-sized linear layer (512 tokens, 576 -> 1536) in fp32 and in
bf16, interleaved, median of 7; what `model.dtype = "auto"` would pick here.

    python benchmarks/dtype_check.py
"""

from __future__ import annotations

import statistics
import time

import torch

from fedpit.model import cpu_has_fast_bf16, resolve_dtype


def seconds(dtype: torch.dtype) -> float:
    x, w = torch.randn(512, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    start = time.perf_counter()
    for _ in range(10):
        torch.nn.functional.linear(x, w)
    return (time.perf_counter() - start) / 10


def main() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        seconds(dtype)  # warm-up
    runs = {torch.float32: [], torch.bfloat16: []}
    for _ in range(7):
        for dtype in runs:
            runs[dtype].append(seconds(dtype))
    fp32, bf16 = (statistics.median(runs[d]) * 1e3 for d in (torch.float32, torch.bfloat16))
    auto = resolve_dtype("auto", torch.device("cpu"))
    print(f"hardware bf16 (AVX512-BF16 or AMX): {cpu_has_fast_bf16()}; model.dtype = 'auto' picks {auto}")
    print(f"linear 512x576x1536: fp32 {fp32:.1f} ms, bf16 {bf16:.1f} ms, bf16 / fp32 time {bf16 / fp32:.2f}x")


if __name__ == "__main__":
    main()
