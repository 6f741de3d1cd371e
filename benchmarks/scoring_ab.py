"""Scoring with a context every pair shares computed once, against each pair computed whole, alternated.

    python benchmarks/scoring_ab.py [--repeats 5]

Three workloads on the embedded SmolLM2 (bf16 where the CPU has it) and the bench's MedQuAD data:
- canary exposure: one canary against 1,000 candidate secrets (`privacy.canary_candidates`), every candidate
  after the same question and answer prefix;
- reference NLL: 100 held-out pairs after the prompt template (membership inference, evaluation);
- IFS: the bench's first client's examples, scored as candidates would be (both passes).
Each repeat runs each workload once with sharing and once without (`scoring.SHARED_CONTEXT_MIN` out of
reach), the order alternated; prints seconds with the pair ratios' interval, and how far the values moved
(bf16 rounds the shared and the whole computation differently).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BASE, REPO  # noqa: E402
from training_ab import report  # noqa: E402

from fedpit import config as config_mod  # noqa: E402
from fedpit.engines import scoring  # noqa: E402
from fedpit.privacy.canaries import exposure, make_canaries  # noqa: E402
from fedpit.runtimes.local import prepare  # noqa: E402

SHARED = scoring.SHARED_CONTEXT_MIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    exp = prepare(config_mod.load(REPO / "configs" / "demo.toml", BASE))
    handle, fmt = exp.handle, exp.fmt
    canary = make_canaries(["client"], 1, 6, seed=0)[0]
    held_out = exp.federation.holdout[:100]
    client = exp.federation.clients[sorted(exp.federation.clients)[0]]
    workloads = {
        "canary exposure (1,000 candidates)": lambda: [exposure(handle, fmt, canary, 1000, seed=0)["secret_loss"]],
        f"reference NLL ({len(held_out)} held-out pairs)":
            lambda: scoring.reference_nll(handle, fmt, held_out, exp.config.model.max_length, 32),
        f"IFS ({len(client)} pairs)": lambda: scoring.ifs_scores(handle, fmt, client, exp.config.model.max_length, 32),
    }
    for name, work in workloads.items():
        runs: dict[bool, list[dict]] = {True: [], False: []}
        values: dict[bool, list[float]] = {}
        for repeat in range(args.repeats + 1):  # the first pair warms up
            for on in (True, False) if repeat % 2 == 0 else (False, True):
                scoring.SHARED_CONTEXT_MIN = SHARED if on else 10**9
                began = time.perf_counter()
                values[on] = work()
                if repeat:
                    runs[on].append({"seconds": time.perf_counter() - began})
        scoring.SHARED_CONTEXT_MIN = SHARED
        report(name, runs, key="seconds", lower_is_better=True)
        moved = max(abs(a - b) / abs(b) for a, b in zip(values[True], values[False]))
        print(f"  largest relative change of a value: {moved:.2e}")


if __name__ == "__main__":
    main()
