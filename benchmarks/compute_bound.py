"""How close training comes to what the machine's matrix multiplies allow: `training.<dtype>.fraction_of_bound`.

The bound is the tokens/s a step would reach if it did nothing but its matrix multiplies, each at the
throughput this machine's BLAS reaches on the model's own layer shapes:

    bound tokens/s = measured matmul FLOP/s / (6 · N)

N is the base model's parameters in its transformer blocks' linear layers (the token embedding is a
lookup, not a matmul, and the tied LM head runs on response tokens only, so neither is counted). 6·N
per token is the usual count for training a dense model: 2·N forward, 2·N for the input gradients,
2·N for the weight gradients. LoRA freezes the base, so the last 2·N is not done and the work a
LoRA step really does is close to 4·N per token; the 4·N fraction is recorded too
(`fraction_of_bound_4n`), and it is the stricter of the two.

The throughput is measured in the same run as the training figure it divides, on matrices shaped
like one training batch through each of the model's linear layers, forward (x·Wᵀ) and input gradient
(g·W), in the dtype the training ran in.

Run alone, it probes the memory read rate (`read_bytes_per_s`, the bound of a decode step) several times at
each thread count, which on a shared machine moves from minute to minute:

    python benchmarks/compute_bound.py [--probes 12] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import time

import torch


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear layer inside the transformer blocks, LoRA or plain."""
    shapes = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or weight is None or ".layers." not in f".{name}":
            continue
        if "lora_" in name:
            continue
        shapes.append((module.in_features, module.out_features))
    return shapes


def block_parameters(model: torch.nn.Module) -> int:
    return sum(i * o for i, o in linear_shapes(model))


def matmul_flops_per_s(shapes: list[tuple[int, int]], tokens: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of the forward and input-gradient matmuls of one batch of `tokens` rows through `shapes`
    (each distinct shape timed once per pass, weighted by how often it occurs); best of `repeats`."""
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    operands = {(i, o): (torch.randn(tokens, i, dtype=dtype), torch.randn(o, i, dtype=dtype),
                         torch.randn(tokens, o, dtype=dtype)) for i, o in counts}

    def one_pass() -> float:
        seconds = 0.0
        for shape, (x, w, g) in operands.items():
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            torch.matmul(g, w)
            seconds += (time.perf_counter() - start) * counts[shape]
        return seconds

    one_pass()  # warm-up: kernel selection and first-touch of the buffers
    best = min(one_pass() for _ in range(repeats))
    flops = sum(2 * 2 * tokens * i * o * n for (i, o), n in counts.items())
    return flops / best


def read_bytes_per_s(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s the machine streams from memory: a sum over a bf16 buffer several times the last-level cache;
    best of `repeats`. What bounds a decode step, which reads every weight (and every row's keys and values)
    once for a few rows of arithmetic."""
    buffer = torch.ones(megabytes * 2**20 // 2, dtype=torch.bfloat16)
    buffer.sum()  # warm-up: first touch
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 2 / best


def fraction_of_bound(model: torch.nn.Module, tokens_per_s: float, batch_tokens: int, dtype: torch.dtype) -> dict:
    shapes = linear_shapes(model)
    params = block_parameters(model)
    flops = matmul_flops_per_s(shapes, batch_tokens, dtype)
    bound_6n, bound_4n = flops / (6 * params), flops / (4 * params)
    return {
        "block_linear_parameters": params, "batch_tokens": batch_tokens,
        "matmul_gflops_per_s": flops / 1e9, "bound_tokens_per_s": bound_6n, "bound_tokens_per_s_4n": bound_4n,
        "fraction_of_bound": tokens_per_s / bound_6n, "fraction_of_bound_4n": tokens_per_s / bound_4n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="The memory read rate, probed several times at each thread count.")
    parser.add_argument("--probes", type=int, default=12, help="probes at each thread count (each the best of 5)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    args = parser.parse_args()
    if args.probes < 1:
        parser.error("--probes must be at least 1")
    try:
        counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads takes comma-separated integers, e.g. 1,2; got {args.threads!r}")
    for threads in counts:
        if threads < 1:
            parser.error(f"--threads: {threads} is not a thread count")
        torch.set_num_threads(threads)
        rates = [read_bytes_per_s() / 1e9 for _ in range(args.probes)]
        print(f"{threads} thread(s): " + ", ".join(f"{r:.1f}" for r in rates)
              + f" GB/s (min {min(rates):.1f}, max {max(rates):.1f})")


if __name__ == "__main__":
    main()
