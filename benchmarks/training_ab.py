"""One training lever on and off, on `make bench`'s training workload, alternated: what the lever is worth.

    python benchmarks/training_ab.py --lever attention|head_loss|dropout|memory [--repeats 7] [--dtype bf16]

Each repeat trains one epoch over the bench's 32 MedQuAD examples (batch 8) from the same adapter,
once with the lever and once without, the order alternated. `attention` and `head_loss` switch inside
one process (the model's attention implementation; the chunked head loss or the model's logits);
`dropout` swaps fedpit's LoRA dropout for peft's `nn.Dropout` of the same probability;
`memory` cannot be switched back once set, so each of its runs is a fresh process with
`FEDPIT_KEEP_FREED_MEMORY` 1 or 0. `--processes` runs any lever that way (a warm-up epoch, then a
timed one), which also gives each run's peak memory. Prints the medians
(min–max), the ratio of medians, how many pairs the lever won, and a 95% bootstrap interval of the
median pair ratio (scipy, through bench.pair_ratios): an interval that includes 1.0 is not significant.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BASE, REPO, pair_ratios  # noqa: E402  (the bench's workload and its pair statistics, shared)

from fedpit import config as config_mod  # noqa: E402
from fedpit.attention import ATTENTION  # noqa: E402
from fedpit.dropout import FastDropout  # noqa: E402
from fedpit.engines import encoding  # noqa: E402
from fedpit.engines.encoding import encode_pair  # noqa: E402
from fedpit.engines.training import TrainOptions, train_adapter  # noqa: E402
from fedpit.model import load_model  # noqa: E402
from fedpit.runtimes.local import prepare  # noqa: E402

LEVERS = ("attention", "head_loss", "dropout", "memory")


class Workload:
    """The bench's training section: the model, 32 examples, the starting adapter."""

    def __init__(self, dtype: str) -> None:
        torch.manual_seed(0)
        exp = prepare(config_mod.load(REPO / "configs" / "demo.toml", BASE))
        config = config_mod.replace(exp.config, **{"model.dtype": dtype})
        self.handle = load_model(config.model, config.lora, seed=0)
        self.fmt = exp.fmt
        self.examples = [e for c in exp.federation.clients.values() for e in c][:32]
        self.options = TrainOptions(batch_size=8, learning_rate=1e-4, epochs=1, max_length=config.model.max_length)
        self.tokens = sum(len(encode_pair(self.handle.tokenizer, self.fmt.render(e.instruction), e.output,
                                          self.options.max_length).input_ids) for e in self.examples)
        self.start = self.handle.fresh_adapter(0)

    def epoch(self) -> float:
        """Tokens/s of one epoch from the starting adapter."""
        self.handle.set_adapter(self.start)
        began = time.perf_counter()
        train_adapter(self.handle, self.fmt, self.examples, self.options, seed=0)
        return self.tokens / (time.perf_counter() - began)


def switch(work: Workload, lever: str, on: bool) -> None:
    if lever == "attention":
        work.handle.model.get_base_model().set_attn_implementation(ATTENTION if on else "sdpa")
    elif lever == "head_loss":
        encoding.head_path = HEAD_PATH if on else (lambda model: None)
    elif lever == "dropout":
        for module in work.handle.model.modules():
            dropouts = getattr(module, "lora_dropout", None)
            if isinstance(dropouts, torch.nn.ModuleDict):
                for name, dropout in list(dropouts.items()):
                    if getattr(dropout, "p", 0.0) > 0:  # peft puts an Identity where p is 0
                        dropouts[name] = FastDropout(dropout.p) if on else torch.nn.Dropout(dropout.p)


HEAD_PATH = encoding.head_path


def in_process(lever: str, repeats: int, dtype: str) -> dict[bool, list[dict]]:
    work = Workload(dtype)
    for on in (True, False):  # warm-up: kernel selection for every batch shape
        switch(work, lever, on)
        work.epoch()
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for repeat in range(repeats):
        for on in (True, False) if repeat % 2 == 0 else (False, True):
            switch(work, lever, on)
            runs[on].append({"tokens_per_s": work.epoch()})
    return runs


def in_processes(lever: str, repeats: int, dtype: str) -> dict[bool, list[dict]]:
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for repeat in range(repeats):
        for on in (True, False) if repeat % 2 == 0 else (False, True):
            keep = "1" if on or lever != "memory" else "0"
            command = [sys.executable, __file__, "--worker", "--lever", lever, "--dtype", dtype, "--on", str(int(on))]
            out = subprocess.run(command, env={**os.environ, "FEDPIT_KEEP_FREED_MEMORY": keep}, check=True,
                                 capture_output=True, text=True).stdout
            runs[on].append(json.loads(out.strip().splitlines()[-1]))
    return runs


def worker(lever: str, on: bool, dtype: str) -> None:
    """A fresh process: a warm-up epoch, then one timed; its peak memory over the loaded model."""
    work = Workload(dtype)
    switch(work, lever, on)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    work.epoch()
    rate = work.epoch()
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - loaded) / 1024
    print(json.dumps({"tokens_per_s": rate, "peak_growth_mib": growth}))


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def report(lever: str, runs: dict[bool, list[dict]], key: str = "tokens_per_s", lower_is_better: bool = False) -> None:
    """Medians of `key` with and without the lever, and the lever's speed-up per alternated pair (with /
    without for a rate, without / with for `lower_is_better` times) with a bootstrap 95% CI."""
    on, off = ([r[key] for r in runs[side]] for side in (True, False))
    pairs = pair_ratios(off, on) if lower_is_better else pair_ratios(on, off)
    print(f"lever {lever}: {key} with {spread(on)}, without {spread(off)}")
    medians = statistics.median(off) / statistics.median(on) if lower_is_better else \
        statistics.median(on) / statistics.median(off)
    if "ci95" in pairs:
        low, high = pairs["ci95"]
        interval = f"95% CI {low:.3f}–{high:.3f}{'' if low > 1 or high < 1 else ' (includes 1: not significant)'}"
    else:
        interval = "no interval (fewer than 3 pairs, or all alike)"
    print(f"  speed-up, ratio of medians {medians:.3f}; faster in {pairs['above_1']} of {pairs['n']} pairs; "
          f"median pair ratio {pairs['median']:.3f}, {interval}")
    print("  pair ratios in order: " + ", ".join(f"{r:.3f}" for r in pairs["ratios"]))
    if "peak_growth_mib" in runs[True][0]:
        growth = {side: [r["peak_growth_mib"] for r in runs[side]] for side in (True, False)}
        print(f"  peak memory over the loaded model, MiB: with {spread(growth[True])}, without {spread(growth[False])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lever", choices=LEVERS)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--processes", action="store_true",
                        help="a fresh process per run (always for memory): slower, and gives peak memory")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--on", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lever is None:
        parser.error(f"--lever is required: one of {', '.join(LEVERS)}")
    if args.worker:
        return worker(args.lever, bool(args.on), args.dtype)
    many = args.processes or args.lever == "memory"
    report(args.lever, (in_processes if many else in_process)(args.lever, args.repeats, args.dtype))

if __name__ == "__main__":
    main()
