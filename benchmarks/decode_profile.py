"""Where a decode step's time goes, and how close it is to the machine's memory bandwidth.

    python benchmarks/decode_profile.py [--rows 16] [--context 350] [--dtype auto] [--step engine|forward]
                                        [--kernels native|torch] [--products c|onednn] [--layers call|loop]

One prefill of `rows` random prompts of `context` tokens on the embedded SmolLM2 (LoRA merged, as in
generation), then 20 timed decode steps and 10 profiled ones, each the step the decode loop runs (decode_step.py
where it applies, with its C kernels where they build, or with torch's operations and SDPA under `--kernels
torch`; its products in C where the CPU has AVX512-BF16, or oneDNN's under `--products onednn`; `--step forward`
for the model's own forward). With the C products a step runs all its layers in one C call (decode_layers.c),
which the profiler sees as one block; `--layers loop` takes the step's per-layer loop of the same calls instead
(bitwise the same, ~2 ms of Python more), so that the share of each kernel shows. It prints the step time, the
share of each kind of operation (the linear layers by shape, the LM head, attention, the rest), the bytes a step
must read from memory (every weight once, the batch sharing them, plus every row's keys and values in every
layer), and the rate this machine reads memory at (compute_bound.read_bytes_per_s). Bytes / step time is the
bandwidth the step achieves. When that is close to what the machine's memory delivers, a step is bandwidth-
bound: fewer bytes (smaller weights or cache) or more rows sharing one read of the weights would make it faster,
and faster arithmetic would not.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from compute_bound import read_bytes_per_s
from torch.profiler import ProfilerActivity, profile

from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines.encoding import last_positions
from fedpit.engines.kvcache import preallocated_cache
from fedpit.model import cache_root, load_model, resolve_model_path
from fedpit.native import kernels as native

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--context", type=int, default=350)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--step", choices=("engine", "forward"), default="engine",
                        help="the decode loop's step (decode_step.py where it applies) or the model's forward")
    parser.add_argument("--kernels", choices=("native", "torch"), default="native",
                        help="the engine step's attention and element-wise work: the C kernels (native/kernels.py) "
                             "or torch's operations and SDPA")
    parser.add_argument("--products", choices=("c", "onednn"), default="c",
                        help="the step's linear layers and LM head with the C kernels: the C product (decode_linear.c, "
                             "on CPUs with AVX512-BF16) or oneDNN's")
    parser.add_argument("--layers", choices=("call", "loop"), default="call",
                        help="with the C products: all layers in one C call (as the decode loop runs them) or the "
                             "step's per-layer loop, whose kernels the profile can tell apart")
    args = parser.parse_args()
    handle = load_model(ModelConfig(name=resolve_model_path("smollm2-135m-instruct"), dtype=args.dtype),
                        LoraConfig(rank=16, alpha=32, target_modules=TARGETS))
    handle.native_decode = args.kernels == "native"
    rows, context = args.rows, args.context
    with handle.inference():
        model = handle.model
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(100, 40000, (rows, context), generator=generator)
        mask = torch.ones(rows, context, dtype=torch.long)
        mask[1::2, :8] = 0  # left padding, as in the engine's batches: a mask-free batch takes another SDPA path
        cache = preallocated_cache(model.config, context + 64)
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                    logits_to_keep=last_positions(context, 1, ids.device))
        state = {"mask": mask, "position": torch.full((rows,), context), "token": out.logits[:, -1].argmax(-1)}

        if args.products == "onednn" and (kernels := native.load(cache_root(handle.model_config.cache_dir))):
            kernels.linear_available = False  # read when the step is built
        fast = handle.decode_step() if args.step == "engine" else None  # what the decode loop runs
        if fast is not None and args.layers == "loop":
            fast.fused = False

        def step() -> None:
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(rows, 1)], dim=1)
            if fast is not None:
                logits = fast(state["token"], state["mask"], state["position"], cache)
            else:
                logits = model(input_ids=state["token"][:, None], attention_mask=state["mask"],
                               position_ids=state["position"][:, None], past_key_values=cache,
                               use_cache=True).logits[:, -1]
            state["position"] = state["position"] + 1
            state["token"] = logits.argmax(-1)

        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(20):
            step()
        seconds = (time.perf_counter() - start) / 20
        if fast is not None and fast.native is not None:  # C calls, which the profiler cannot see: label them
            c_products = fast.product == fast.native.linear
            for name in ("attention", "add_rms_norm", "rotary", "silu_mul", "linear", "decode_layers"):
                setattr(fast.native, name, _labelled(getattr(fast.native, name), f"fedpit::{name}"))
            if c_products:  # the step holds the method it was built with
                fast.product = fast.native.linear
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(10):
                step()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())  # merged: what decoding reads
    vocab = model.config.vocab_size
    kinds: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        name, shapes = event.key, event.input_shapes
        if name == "aten::mm" and shapes and len(shapes[1]) == 2:
            kind = "LM head" if vocab in shapes[1] else f"linear {shapes[1][0]}->{shapes[1][1]}"
        elif name == "mkldnn::_linear_pointwise" and shapes and len(shapes[1]) == 2:  # packed weights (packed.py)
            kind = "LM head" if vocab in shapes[1] else f"linear {shapes[1][1]}->{shapes[1][0]}"
        elif "scaled_dot_product" in name:
            kind = "attention (SDPA)"
        elif name == "fedpit::attention":
            kind = "attention (C kernel)"
        elif name == "fedpit::linear":
            kind = "linear layers and LM head (C)"
        elif name == "fedpit::decode_layers":
            kind = "all layers, one C call"
        elif name.startswith("fedpit::"):
            kind = "norms, rotary, activation (C)"
        else:
            kind = "everything else"
        kinds[kind] += event.self_cpu_time_total
    total = sum(kinds.values())
    kv = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)
    print(f"{rows} rows, context {context}-{context + 33} tokens, {model.dtype}, {torch.get_num_threads()} threads")
    how = "the model's forward" if fast is None else "decode_step.py" + (", C kernels" if fast.native else "")
    print(f"decode step ({how}): {seconds * 1e3:.1f} ms ({rows / seconds:.0f} new tokens/s)")
    for kind, micros in sorted(kinds.items(), key=lambda item: -item[1]):
        print(f"  {kind:28s} {micros / total:6.1%}")
    print(f"bytes a step reads: weights {weights / 2**20:.0f} MiB + keys/values {kv / 2**20:.0f} MiB "
          f"-> {(weights + kv) / seconds / 1e9:.1f} GB/s achieved; this machine reads "
          f"{read_bytes_per_s() / 1e9:.1f} GB/s")


def _labelled(function, label: str):
    def labelled(*inputs):
        with torch.profiler.record_function(label):
            return function(*inputs)

    return labelled


if __name__ == "__main__":
    main()
