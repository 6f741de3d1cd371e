"""Where one phase of the bench's FedPIT client round spends its time: seconds per run, then a cProfile of one run.

    python benchmarks/round_profile.py --phase generation|ifs|synthetic [--runs 3] [--sort tottime] [--top 35]

Prepares the bench's experiment (bench.py's BASE settings on configs/demo.toml) and its first client's round as
bench.py's round section does (a fresh adapter, seed 0), runs the round once to have its synthetic candidates, W_l
and the IFS selection, then times `--runs` runs of the phase alone: self-generation with the global adapter, IFS
scoring of the candidates with W_l, or training W_s on the selected samples. The profile is of one more run; its own
overhead makes the profiled run slower, so the seconds above it are the figures to quote, the profile the split
among functions. Between them it prints the machine's two bounds (compute_bound.py): the bf16 matmul rate on the
blocks' shapes, which bounds a prefill, scoring and training, and the memory read rate, which bounds a decode step
(it reads every weight and every row's keys and values once). With the profile it lists the forwards over more than
one token (prefills, scoring, training) and their tokens, which the matmul rate divides. Absolute times move between
runs of this machine by 10% or more: a lever is measured with the A/B scripts (generation_ab.py, kernels_ab.py), a
profile says where to look.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BASE, REPO, positive_int  # noqa: E402
from compute_bound import block_parameters, linear_shapes, matmul_flops_per_s, read_bytes_per_s  # noqa: E402

from fedpit import config as config_mod  # noqa: E402
from fedpit.methods import ClientContext, build_method  # noqa: E402
from fedpit.methods.selection import select_by_ifs  # noqa: E402
from fedpit.runtimes.local import prepare  # noqa: E402
from fedpit.types import ClientState  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=("generation", "ifs", "synthetic"), required=True)
    parser.add_argument("--runs", type=positive_int, default=3)
    parser.add_argument("--sort", default="tottime", help="a pstats sort key: tottime, cumtime, ncalls")
    parser.add_argument("--top", type=int, default=35, help="functions the profile lists")
    args = parser.parse_args()
    torch.manual_seed(0)
    exp = prepare(config_mod.load(REPO / "configs" / "demo.toml", BASE))
    client = sorted(exp.federation.clients)[0]
    config = config_mod.replace(exp.config, **{"method.name": "fedpit"})

    def context() -> ClientContext:
        return ClientContext(client=client, round=1, examples=exp.federation.clients[client], state=ClientState(),
                             handle=exp.handle, fmt=exp.fmt, config=config, learning_rate=1e-4, seed=0)

    global_adapter = exp.handle.fresh_adapter(0)
    first = context()
    synth = first.self_generate(global_adapter)
    private, _ = first.train(global_adapter, first.examples, "private")
    selected = select_by_ifs(first, private, synth, build_method(config).options.keep)
    phases = {
        "generation": lambda ctx: ctx.self_generate(global_adapter),
        "ifs": lambda ctx: ctx.ifs(private, [s.as_example(i) for i, s in enumerate(synth.samples)]),
        "synthetic": lambda ctx: ctx.train(global_adapter, selected, "synthetic"),
    }
    phase = phases[args.phase]

    def run() -> float:
        ctx = context()
        began = time.perf_counter()
        phase(ctx)
        return time.perf_counter() - began

    print(f"{args.phase}: " + ", ".join(f"{run():.3f}" for _ in range(args.runs)) + " s")
    dtype = exp.handle.model.dtype
    rate = matmul_flops_per_s(linear_shapes(exp.handle.model), 1024, dtype)
    print(f"this machine: {rate / 1e9:.0f} GFLOP/s in {dtype} products of the blocks' shapes (1,024 rows), "
          f"{read_bytes_per_s() / 1e9:.1f} GB/s read from memory; the blocks' linear layers hold "
          f"{block_parameters(exp.handle.model) / 1e6:.1f} M parameters")
    shapes: list[tuple[int, ...]] = []

    def record(_module, positional, keywords) -> None:  # the work a product bound is divided into
        ids = keywords.get("input_ids", positional[0] if positional else None)
        if ids is not None and ids.shape[-1] > 1:
            shapes.append(tuple(ids.shape))

    hook = exp.handle.model.register_forward_pre_hook(record, with_kwargs=True)
    profile = cProfile.Profile()
    profile.enable()
    run()
    profile.disable()
    hook.remove()
    print(f"forwards over more than one token in the profiled run, (rows, tokens): {shapes}; "
          f"{sum(rows * tokens for rows, tokens in shapes):,} tokens, padding included")
    pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
