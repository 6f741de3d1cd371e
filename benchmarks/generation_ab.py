"""One generation lever on and off, on `make bench`'s self-generation workload, alternated: what it is worth.

    python benchmarks/generation_ab.py [--rows 16] [--repeats 7] [--workload prompts|round|paper_synth]
        --lever packing|prefill_attention|continuous|rows|decode_step|native|prefill_groups|c_linear|
              shared_prefix|prefill_softmax|prefill_layers|layers_call|ask_by_rate

Each repeat answers the bench's 32 response prompts (`synth.batch_size` rows at a time, at most 128 new tokens, the
bench's stop strings and repetition penalty) once with the lever and once without, the order
alternated, in one process. `packing` is `model.pack_for_inference` (packed.py); `prefill_attention`
is the blocked bf16 prefill attention (attention.py), without which prefills take SDPA; `continuous` is
continuous batching (engines/continuous.py), without which prompts are decoded in static batches; `rows` decodes
`--rows` rows at a time against `synth.batch_size`'s default; `decode_step` is `model.fast_decode_step`
(decode_step.py), without which every decode step is the model's forward; `native` is `model.native_decode`
(native/kernels.py), without which that step's attention is SDPA and its element-wise work torch's;
`prefill_groups` prefills prompts in groups of similar length (engines/continuous.py), without which each batch
of prompts is one padded forward; `c_linear` is the C linear layer of that step (decode_linear.c, on CPUs with
AVX512-BF16), without which its products are oneDNN's; `shared_prefix` computes a beginning that every prompt of
a prefill shares once (engines/continuous.py), without which each prompt is prefilled whole; `prefill_softmax` is
the C softmax of blocked bf16 prefills (attention.native_attention), without which it is torch's; `prefill_layers` is
the C norms and activation of prefills (native_layers.py), without which they are transformers'; `layers_call` runs
all layers of a decode step in one C call (decode_layers.c), without which the step calls the kernels layer by layer
from Python. Prints what training_ab.py prints, for new tokens/s, and the seconds per call: a lever that changes
bf16 numbers (prefill_attention, native, c_linear, shared_prefix, prefill_softmax, prefill_layers) may change the
text, and with it how many tokens there are to count.
`--workload round` times the generation phase of the bench's FedPIT client round instead (`self_generate` on its
first client from a fresh adapter: 16 instruction prompts, then 8 responses) and prints only its seconds;
`--workload paper_synth` the same phase with `[synth]` at the paper's defaults (32 candidates, instruction calls of
32, 3 response demonstrations; the bench's repetition penalty). `ask_by_rate` sizes instruction calls after the
first by the pass rate so far (`instructions_to_ask` in synth.py), without which every call asks a full batch; it
changes nothing where the first call suffices (the bench's round), so it is measured on `paper_synth`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import count_tokens  # noqa: E402
from bench import BASE, REPO, response_prompts  # noqa: E402
from training_ab import report  # noqa: E402

from fedpit import attention, decode_step, synth  # noqa: E402
from fedpit import config as config_mod  # noqa: E402
from fedpit import model as model_module  # noqa: E402
from fedpit.config import SynthConfig  # noqa: E402
from fedpit.engines import continuous  # noqa: E402
from fedpit.engines.generation import DecodingOptions, generate  # noqa: E402
from fedpit.methods import ClientContext  # noqa: E402
from fedpit.model import cache_root  # noqa: E402
from fedpit.native import kernels as native  # noqa: E402
from fedpit.runtimes.local import prepare  # noqa: E402
from fedpit.types import ClientState  # noqa: E402

LEVERS = ("packing", "prefill_attention", "continuous", "rows", "decode_step", "native", "prefill_groups", "c_linear",
          "shared_prefix", "prefill_softmax", "prefill_layers", "layers_call", "ask_by_rate")
BLOCKED = attention.uses_blocked_attention
NATIVE_ATTENTION = attention.native_attention
CLAIMABLE = decode_step._claimable
SWAP_LAYERS = model_module.swap_native_layers
ASK_BY_RATE = synth.instructions_to_ask


def ASK_FULL_BATCHES(missing, generated, accepted, config):  # noqa: N802 (stands in for a module constant)
    return min(config.batch_size, config.max_instructions - generated)


def TORCH_SOFTMAX(_kernels, *block):  # noqa: N802 (stands in for a module constant)
    return attention.matmul_attention(*block)
GROUP_COST = continuous.PREFILL_GROUP_COST
SHARED_MIN = continuous.SHARED_PREFIX_MIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lever", choices=LEVERS, required=True)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, default=16, help="rows at a time with the `rows` lever on")
    parser.add_argument("--workload", choices=("prompts", "round", "paper_synth"), default="prompts",
                        help="the bench's 32 response prompts, the generation phase of its FedPIT client round, or "
                             "that phase with [synth] at the paper's defaults")
    args = parser.parse_args()
    torch.manual_seed(0)
    exp = prepare(config_mod.load(REPO / "configs" / "demo.toml", BASE))
    handle = exp.handle
    prompts = response_prompts(exp, SynthConfig().num_candidates)
    options = DecodingOptions(max_new_tokens=128, stop_strings=tuple(exp.fmt.stop_strings), repetition_penalty=1.2)

    rows = SynthConfig().batch_size
    kernels = native.load(cache_root(handle.model_config.cache_dir if handle.model_config else ""))  # the handle's
    if args.lever == "c_linear" and (kernels is None or not kernels.linear_available):
        parser.error("the C linear layer is not built here (no C compiler, or a CPU without AVX512-BF16)")

    def switch(on: bool) -> None:
        nonlocal options, rows
        if args.lever == "rows":
            rows = args.rows if on else SynthConfig().batch_size
        elif args.lever == "packing":
            handle.pack_for_inference = on
        elif args.lever == "decode_step":
            handle.fast_decode_step = on
        elif args.lever == "native":
            handle.native_decode = on
        elif args.lever == "prefill_groups":
            continuous.PREFILL_GROUP_COST = GROUP_COST if on else 10**9  # off: one group, whatever the lengths
        elif args.lever == "shared_prefix":
            continuous.SHARED_PREFIX_MIN = SHARED_MIN if on else 10**9  # off: nothing is ever long enough to share
        elif args.lever == "prefill_softmax":  # off: every block takes torch's softmax, kernels or not
            attention.native_attention = NATIVE_ATTENTION if on else TORCH_SOFTMAX
        elif args.lever == "prefill_layers":  # off: inference blocks swap nothing in
            model_module.swap_native_layers = SWAP_LAYERS if on else (lambda *a: [])
        elif args.lever == "layers_call":  # off: no cache is ever claimable, so every step loops in Python
            decode_step._claimable = CLAIMABLE if on else (lambda *a: False)
        elif args.lever == "ask_by_rate":
            synth.instructions_to_ask = ASK_BY_RATE if on else ASK_FULL_BATCHES
        elif args.lever == "c_linear":
            kernels.linear_available = on  # read when each inference block builds its decode step
        elif args.lever == "continuous":
            options = replace(options, continuous_batching=on)
        else:
            attention.uses_blocked_attention = BLOCKED if on else (lambda *a: False)

    client = sorted(exp.federation.clients)[0]
    round_config = config_mod.replace(exp.config, **{"method.name": "fedpit"})
    if args.workload == "paper_synth":
        paper = {f"synth.{f.name}": getattr(SynthConfig(), f.name) for f in fields(SynthConfig)
                 if f.name != "repetition_penalty"}
        round_config = config_mod.replace(round_config, **paper)

    def call() -> dict:
        began = time.perf_counter()
        if args.workload in ("round", "paper_synth"):
            context = ClientContext(client=client, round=1, examples=exp.federation.clients[client],
                                    state=ClientState(), handle=handle, fmt=exp.fmt, config=round_config,
                                    learning_rate=1e-4, seed=0)
            outcome = context.self_generate(handle.fresh_adapter(0))
            seconds = time.perf_counter() - began
            print(f"  {outcome.generated_instructions} instructions, {len(outcome.samples)} samples: {seconds:.2f} s",
                  flush=True)
            return {"seconds": seconds}
        outputs = generate(handle, prompts, options, batch_size=rows)
        seconds = time.perf_counter() - began
        return {"tokens_per_s": count_tokens(handle.tokenizer, outputs) / seconds, "seconds": seconds}

    for on in (True, False):  # warm-up: kernel selection
        switch(on)
        call()
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for repeat in range(args.repeats):
        for on in (True, False) if repeat % 2 == 0 else (False, True):
            switch(on)
            runs[on].append(call())
    if args.workload == "prompts":
        report(args.lever, runs)
    report(args.lever, runs, key="seconds", lower_is_better=True)


if __name__ == "__main__":
    main()
