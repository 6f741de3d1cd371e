"""`make bench`: speed and memory of fedpit's engines, each against a baseline measured in the same
run (interleaved, repeated; median and spread), on the embedded SmolLM2 and real MedQuAD data.

    python benchmarks/bench.py [--quick] [--out benchmarks/results.json]

Sections: generation (our decode loop vs one-prompt-at-a-time and batched `model.generate`),
training (our loop vs a plain PyTorch + peft loop), round cost (FedPIT client round / FedAvg client
round), memory (peak RSS of a 10-client run / a 2-client run), upload bytes as they travel (Flower codec,
fp32 vs bf16 transport), parts (three pieces of a round against what they replaced: the LM head in
a prefill, an adapter merge, the copy filter's ROUGE-L), and dp (a DP-SGD epoch against plain training,
and its per-example gradients against Opacus's hooks), flower (Flower's simulation engine with 10 and
100 clients, 10 per round, and SecAgg+ against the same run without it; see flower_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from baselines import count_tokens, opacus_per_sample_gradients, plain_peft_model, plain_training_loop, timed
from compute_bound import fraction_of_bound
from flower_bench import bench_flower
from flower_bench import table_rows as flower_rows
from scipy.stats import bootstrap

from fedpit import config as config_mod
from fedpit.config import SynthConfig
from fedpit.engines.encoding import encode_pair, last_positions
from fedpit.engines.generation import DecodingOptions, generate
from fedpit.engines.training import PrivateSGD, TrainOptions, poisson_batches, train_adapter
from fedpit.methods import ClientContext, build_method
from fedpit.model import load_model
from fedpit.runtimes.local import prepare
from fedpit.types import ClientState

REPO = Path(__file__).resolve().parents[1]
BASE = ["data.fewshot.total=48", "data.fewshot.num_clusters=8", "data.fewshot.pool_size=800",
        "data.partition.kind='iid'", "data.partition.num_clients=2", "data.partition.min_examples=4",
        "eval.sets=['medquad']", "eval.num_examples=16", "model.max_length=384", "data.max_response_tokens=96"]


def median_spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def pair_ratios(ours: list[float], theirs: list[float]) -> dict:
    """Ours / theirs in each repeat (both measured back to back in it, so machine drift cancels), with how
    many repeats ours won and a 95% bootstrap interval of the median ratio (scipy; needs 3 repeats). An
    interval that includes 1 says the two are not told apart by this run. With few repeats the interval is
    close to the range of the ratios, so one slow repeat sets its bound: the ratios themselves are kept."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    summary = {**median_spread(ratios), "above_1": sum(r > 1 for r in ratios), "ratios": ratios}
    if len(ratios) >= 3 and max(ratios) > min(ratios):
        interval = bootstrap((ratios,), statistics.median, confidence_level=0.95, method="percentile",
                             random_state=0).confidence_interval
        summary["ci95"] = [float(interval.low), float(interval.high)]
    return summary


def response_prompts(exp, count: int) -> list[str]:
    """Self-generation response prompts: two private demonstrations, then a private instruction."""
    examples = [e for c in exp.federation.clients.values() for e in c]
    return [exp.fmt.render_with_demos([examples[(i + k) % len(examples)] for k in range(2)],
                                      examples[(i + 5) % len(examples)].instruction) for i in range(count)]


def bench_parts(exp, repeats: int) -> dict:
    """Three pieces that each cost a FedPIT round time before, against what they replaced:
    - the LM head in a 13-row prefill, with `logits_to_keep` as transformers' int (a strided slice of the
      hidden states, so matmul copies the head once per row) against our index tensor;
    - one adapter merge (entering and leaving `ModelHandle.inference`), paid once per phase now;
    - the copy filter's ROUGE-L of 16 responses against every private example, with the rouge-score
      package against fedpit's rapidfuzz-based `max_rouge_l`."""
    from rouge_score import rouge_scorer

    from fedpit.textmetrics import max_rouge_l

    handle = exp.handle
    batch = handle.tokenizer.pad({"input_ids": [handle.tokenizer(p)["input_ids"] for p in response_prompts(exp, 13)]},
                                 return_tensors="pt").to(handle.device)
    width = batch["input_ids"].shape[1]

    def prefill(keep):
        return lambda: handle.model(**batch, logits_to_keep=keep)

    private = [f"{e.instruction}\n{e.output}" for e in exp.federation.clients[sorted(exp.federation.clients)[0]]]
    responses = [e.output for c in exp.federation.clients.values() for e in c][-16:]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def merge():
        with handle.inference():
            pass

    variants = {
        "prefill_logits_to_keep_int": prefill(1),
        "prefill_logits_to_keep_index": prefill(last_positions(width, 1, handle.device)),
        "adapter_merge": merge,
        "copy_filter_rouge_score": lambda: [max(scorer.score(p, r)["rougeL"].fmeasure for p in private)
                                            for r in responses],
        "copy_filter_fedpit": lambda: [max_rouge_l(r, private) for r in responses],
    }
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    with handle.inference():  # the prefills run merged, as in generation (an inner merge() is a no-op)
        for fn in (variants["prefill_logits_to_keep_int"], variants["prefill_logits_to_keep_index"]):
            fn()  # warm-up
        for _ in range(repeats):
            for name in ("prefill_logits_to_keep_int", "prefill_logits_to_keep_index"):
                seconds[name].append(timed(variants[name])[0])
    for _ in range(repeats):
        for name in ("adapter_merge", "copy_filter_rouge_score", "copy_filter_fedpit"):
            seconds[name].append(timed(variants[name])[0])
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "prefill_rows": int(batch["input_ids"].shape[0]), "prefill_width": width,
        "seconds": {k: median_spread(v) for k, v in seconds.items()},
        "prefill_speedup": median["prefill_logits_to_keep_int"] / median["prefill_logits_to_keep_index"],
        "copy_filter_speedup": median["copy_filter_rouge_score"] / median["copy_filter_fedpit"],
        "copy_filter_pairs": len(private) * len(responses),
    }


def bench_generation(exp, repeats: int, num_prompts: int) -> dict:
    """The self-generation response workload at the paper's defaults: `synth.num_candidates` (32)
    ~300-token prompts with demonstrations, at most 128 new tokens each, `synth.batch_size` (16) rows
    decoded at a time.

    Baseline: transformers' `generate` on the PEFT model (LoRA unmerged), one prompt at a time, what a
    plain implementation does. Between them: the same `generate` in static batches of 16, our decode
    loop in static batches (no prompt joins a batch mid-decode), without weights packed for oneDNN
    (packed.py; bf16 on a CPU) and without the merged adapter, so the table shows what each step is
    worth. The baselines run as a plain implementation would: unmerged, unpacked. The llama.cpp
    row decodes the same prompts in 16 slots, a slot taking the next prompt as its row ends."""
    handle, fmt = exp.handle, exp.fmt
    prompts = response_prompts(exp, num_prompts)
    prompt_tokens = statistics.mean(len(handle.tokenizer(p)["input_ids"]) for p in prompts)
    stops = tuple(fmt.stop_strings)

    def run(backend: str, batch_size: int, merged: bool, continuous: bool = True, packed: bool = True):
        options = DecodingOptions(max_new_tokens=128, stop_strings=stops, repetition_penalty=1.2, backend=backend,
                                  continuous_batching=continuous)

        def call():
            handle.merge_for_inference, handle.pack_for_inference = merged, packed
            try:
                return generate(handle, prompts, options, batch_size=batch_size)
            finally:
                handle.merge_for_inference = handle.pack_for_inference = True
        return call

    rows = SynthConfig().batch_size
    variants = {
        "fedpit": run("fedpit", rows, merged=True),
        "fedpit_static_batches": run("fedpit", rows, merged=True, continuous=False),
        "fedpit_unpacked": run("fedpit", rows, merged=True, packed=False),
        "fedpit_unmerged": run("fedpit", rows, merged=False),
        "generate_batched": run("hf", rows, merged=False, packed=False),  # what a plain implementation runs
        "generate_one_at_a_time": run("hf", 1, merged=False, packed=False),
    }
    llama, llama_missing = llama_cpp_variant(exp, prompts, stops, rows)
    if llama is not None:
        variants["llama_cpp"] = llama
    run("fedpit", 8, merged=True)()  # warm-up: first calls pay for kernel selection
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():  # interleaved so machine noise hits every variant alike
            seconds, outputs = timed(fn)
            rates[name].append(count_tokens(handle.tokenizer, outputs) / seconds)
    # prefill vs decode: one forward over the whole batch of prompts, against the full generation
    batch = handle.tokenizer.pad({"input_ids": [handle.tokenizer(p)["input_ids"] for p in prompts]},
                                 return_tensors="pt")
    with handle.inference():
        prefill, _ = timed(lambda: handle.model(
            **batch, logits_to_keep=last_positions(batch["input_ids"].shape[1], 1, handle.device)))
    total, _ = timed(variants["fedpit"])
    base = statistics.median(rates["generate_one_at_a_time"])
    result = {
        "prompt_tokens_mean": prompt_tokens, "prompts": num_prompts, "rows_at_a_time": rows,
        "tokens_per_s": {k: median_spread(v) for k, v in rates.items()},
        "speedup_vs_one_at_a_time": {k: statistics.median(v) / base for k, v in rates.items()},
        "prefill_seconds": prefill, "total_seconds": total, "prefill_share": prefill / total,
    }
    result["pairs_vs_one_at_a_time"] = pair_ratios(rates["fedpit"], rates["generate_one_at_a_time"])
    if llama is None:
        result["llama_cpp_missing"] = llama_missing
    else:
        result["speedup_vs_llama_cpp"] = statistics.median(rates["fedpit"]) / statistics.median(rates["llama_cpp"])
        result["pairs_vs_llama_cpp"] = pair_ratios(rates["fedpit"], rates["llama_cpp"])
    return result


def llama_cpp_variant(exp, prompts: list[str], stops: tuple[str, ...], slots: int):
    """The llama.cpp row (see llama_cpp_row.py), or None and why it cannot run here."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return None, f"llama-cpp-python is not installed ({exc}); `make bench` installs the bench extra"
    from llama_cpp_row import LlamaCppBatched, dense_gguf

    from fedpit.engines.stops import stop_enders
    from fedpit.model import EMBEDDED_MODELS, cache_root, embedded_gguf

    name = exp.config.model.name
    if name not in EMBEDDED_MODELS:
        return None, f"the llama.cpp row runs on the embedded model only, not {name!r}"
    dtype = {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(exp.handle.model.dtype)
    if dtype is None:
        return None, f"the llama.cpp row matches fedpit's dtype, and {exp.handle.model.dtype} is neither bf16 nor fp32"
    source = embedded_gguf(name)
    gguf_path = dense_gguf(source, cache_root(exp.config.model.cache_dir) / "models" / f"{source.stem}.{dtype}.gguf",
                           dtype)
    tokenizer = exp.handle.tokenizer
    longest = max(len(tokenizer(p)["input_ids"]) for p in prompts)
    engine = LlamaCppBatched(gguf_path, tokenizer, max_sequences=slots, max_tokens_per_sequence=longest + 136,
                             threads=torch.get_num_threads())
    enders = stop_enders(tokenizer, stops)
    return (lambda: engine.generate(prompts, 128, stops, 1.2, enders)), None


def bench_training(exp, repeats: int, dtype_name: str) -> dict:
    cfg = config_mod.replace(exp.config, **{"model.dtype": dtype_name})
    handle = load_model(cfg.model, cfg.lora, seed=0)
    examples = [e for c in exp.federation.clients.values() for e in c][:32]
    options = TrainOptions(batch_size=8, learning_rate=1e-4, epochs=1, max_length=cfg.model.max_length)
    encoded = [encode_pair(handle.tokenizer, exp.fmt.render(e.instruction), e.output, options.max_length)
               for e in examples]
    tokens = sum(len(p.input_ids) for p in encoded)
    start = handle.fresh_adapter(0)

    def ours():
        handle.set_adapter(start)
        train_adapter(handle, exp.fmt, examples, options, seed=0)

    plain_model = plain_peft_model(cfg.model, cfg.lora, handle.device)

    def plain():
        plain_training_loop(plain_model, start, encoded, handle.tokenizer.pad_token_id)

    variants = {"fedpit": ours, "plain_peft_loop": plain}
    for fn in variants.values():  # warm-up: the first step of each batch shape pays for kernel selection
        fn()
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for repeat in range(repeats):
        names = list(variants) if repeat % 2 == 0 else list(reversed(variants))  # alternate who goes first
        for name in names:
            rates[name].append(tokens / timed(variants[name])[0])
    ours_rate = statistics.median(rates["fedpit"])
    batches = -(-len(encoded) // options.batch_size)
    bound = fraction_of_bound(handle.model, ours_rate, tokens // batches, handle.model.dtype)
    return {"tokens_per_s": {k: median_spread(v) for k, v in rates.items()},
            "ratio": ours_rate / statistics.median(rates["plain_peft_loop"]), **bound}


def bench_dp(exp, repeats: int) -> dict:
    """A DP-SGD epoch (Poisson batches, per-example gradients, clipping, noise) against the same epoch of
    plain training, and its per-example gradients against Opacus's hooks on the same batches, in
    tokens/s of the examples each step processed (bf16, 32 examples, expected batch 8)."""
    handle = exp.handle
    examples = [e for c in exp.federation.clients.values() for e in c][:32]
    options = TrainOptions(batch_size=8, learning_rate=1e-4, epochs=1, max_length=exp.config.model.max_length)
    private = PrivateSGD(noise_multiplier=1.0, max_grad_norm=1.0, seed=7)
    encoded = [encode_pair(handle.tokenizer, exp.fmt.render(e.instruction), e.output, options.max_length)
               for e in examples]
    batches = poisson_batches(len(encoded), 8 / len(encoded), 4, torch.Generator().manual_seed(private.seed))
    dp_tokens = sum(len(encoded[i].input_ids) for rows in batches for i in rows)
    plain_tokens = sum(len(p.input_ids) for p in encoded)
    start = handle.fresh_adapter(0)

    def run(private_sgd):
        handle.set_adapter(start)
        train_adapter(handle, exp.fmt, examples, options, seed=0, private=private_sgd)

    def opacus():
        handle.set_adapter(start)
        opacus_per_sample_gradients(handle.model, list(handle.lora_params.values()),
                                    [[encoded[i] for i in rows] for rows in batches], handle.tokenizer.pad_token_id)

    variants = {"fedpit_dp_sgd": (lambda: run(private), dp_tokens), "plain": (lambda: run(None), plain_tokens),
                "opacus_per_sample_hooks": (opacus, dp_tokens)}
    for fn, _ in variants.values():
        fn()
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for repeat in range(repeats):
        for name in (list(variants) if repeat % 2 == 0 else list(reversed(variants))):
            fn, tokens = variants[name]
            rates[name].append(tokens / timed(fn)[0])
    medians = {k: statistics.median(v) for k, v in rates.items()}
    return {"tokens_per_s": {k: median_spread(v) for k, v in rates.items()},
            "dp_vs_plain": medians["fedpit_dp_sgd"] / medians["plain"],
            "dp_vs_opacus": medians["fedpit_dp_sgd"] / medians["opacus_per_sample_hooks"]}


def bench_round(exp, repeats: int) -> dict:
    """One client's round of FedPIT against one of FedAvg, on the same client data and global adapter.

    A warm-up round of each comes first (one-off costs of a process: kernel selection, the stop-token
    table of each stop set), then `repeats` pairs with alternating order; the ratio is of the medians,
    with the ratio of each pair as its spread. Evaluation is not part of a client round (the server
    evaluates the global model, the same for every method); the evaluation section measures it."""
    client = sorted(exp.federation.clients)[0]

    def one_round(name: str):
        cfg = config_mod.replace(exp.config, **{"method.name": name})
        method = build_method(cfg)
        ctx = ClientContext(client=client, round=1, examples=exp.federation.clients[client], state=ClientState(),
                            handle=exp.handle, fmt=exp.fmt, config=cfg, learning_rate=1e-4, seed=0)
        return timed(lambda: method.client_update(ctx, exp.handle.fresh_adapter(0)))

    names = ("fedavg", "fedpit")
    for name in names:
        one_round(name)
    runs: dict[str, list] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else tuple(reversed(names)):
            runs[name].append(one_round(name))
    seconds = {name: [s for s, _ in runs[name]] for name in names}

    def phase_medians(name: str) -> dict[str, float]:
        phases = [result.phase_seconds for _, result in runs[name]]
        return {k: statistics.median(p.get(k, 0.0) for p in phases) for k in phases[0]}

    from fedpit.runtimes.flower.codec import encode_reply, wire_bytes

    upload = runs["fedpit"][-1][1].upload
    fp32, bf16 = (wire_bytes(encode_reply(upload, {}, transport)) for transport in ("fp32", "bf16"))
    return {
        "fedpit_seconds": statistics.median(seconds["fedpit"]), "fedavg_seconds": statistics.median(seconds["fedavg"]),
        "seconds": {name: median_spread(v) for name, v in seconds.items()},
        "ratio": statistics.median(seconds["fedpit"]) / statistics.median(seconds["fedavg"]),
        "pair_ratios": pair_ratios(seconds["fedpit"], seconds["fedavg"]),
        "fedpit_phases": phase_medians("fedpit"), "fedavg_phases": phase_medians("fedavg"),
        "upload_bytes": {"fp32": fp32, "bf16": bf16},
    }


def bench_eval(exp) -> dict:
    from fedpit.evaluation import EvalOptions, evaluate_set

    examples = exp.federation.eval_sets["medquad"]
    seconds, result = timed(lambda: evaluate_set(exp.handle, exp.fmt, examples,
                                                 EvalOptions(max_new_tokens=64, batch_size=16)))
    return {"examples": len(examples), "seconds": seconds,
            "generated_tokens_per_s": count_tokens(exp.handle.tokenizer, result.answers) / seconds}


def peak_rss_of_run(clients: int) -> float:
    """Peak RSS (MiB) of a whole `fedpit run` in a fresh process with `clients` clients. Read from
    /proc/self/status (VmHWM, this process's own high-water mark): `getrusage` would report the
    parent's peak, which Linux carries across fork and exec into every child."""
    code = (
        "import sys; from fedpit.cli import main; "
        f"main(['run', 'configs/demo.toml', '--quiet', '--out', sys.argv[1], "
        f"'--set', 'data.partition.num_clients={clients}', '--set', 'data.partition.kind=\"iid\"', "
        "'--set', 'data.fewshot.total=60', '--set', 'data.partition.min_examples=4', "
        "'--set', 'federation.rounds=1', '--set', 'eval.every=0', '--set', 'method.name=\"fedavg\"']); "
        "print('RSS', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    )
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"fedpit-bench-mem-{clients}-{os.getpid()}"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=REPO,
                          check=True)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RSS"))
    return int(line.split()[1]) / 1024


SECTIONS = ("generation", "training", "round", "evaluation", "memory", "parts", "dp", "flower")


def positive_int(text: str) -> int:
    """An argparse type: a count of repeats, which must be at least 1 for a median to exist."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count of repeats: give 1 or more (3 for an interval)")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and prompts (a rough check)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to measure (of {', '.join(SECTIONS)}); the others keep "
                             f"their figures from an earlier run in --out, each section stamped with its date")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="repeats of every timed variant (default 3, or 1 with --quick)")
    parser.add_argument("--round-repeats", type=positive_int, default=None,
                        help="pairs the round section times (default: --repeats); its pairs are cheap, and the "
                             "machine's drift is what widens their interval")
    parser.add_argument("--training-dtypes", default="bf16,fp32",
                        help="dtypes the training section times (bf16 is emulated, and slow, on CPUs without it)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results.json"))
    args = parser.parse_args()
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    repeats, prompts = (1, 8) if args.quick else (3, SynthConfig().num_candidates)
    repeats = args.repeats or repeats
    torch.manual_seed(0)
    exp = prepare(config_mod.load(REPO / "configs" / "demo.toml", BASE))
    out = Path(args.out)
    earlier = json.loads(out.read_text()) if out.is_file() and set(only) != set(SECTIONS) else {}
    results = {**earlier, "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                      "python": platform.python_version(), "torch": torch.__version__},
               "quick": args.quick}

    def memory() -> dict:
        two, ten = peak_rss_of_run(2), peak_rss_of_run(10)
        return {"peak_rss_mib_2_clients": two, "peak_rss_mib_10_clients": ten, "ratio": ten / two}

    measures = {
        "generation": lambda: bench_generation(exp, repeats, prompts),
        "training": lambda: {dtype: bench_training(exp, repeats, dtype) for dtype in args.training_dtypes.split(",")},
        "round": lambda: bench_round(exp, args.round_repeats or repeats),
        "evaluation": lambda: bench_eval(exp),
        "memory": memory,
        "parts": lambda: bench_parts(exp, repeats),
        "dp": lambda: bench_dp(exp, repeats),
        "flower": lambda: bench_flower(repeats=args.repeats or (1 if args.quick else 2)),
    }
    for name in SECTIONS:  # each section is printed and saved as soon as it is measured
        if name not in only:
            continue
        print(f"{name} ...", flush=True)
        results[name] = {**measures[name](), "measured": time.strftime("%Y-%m-%d %H:%M")}
        print(json.dumps(results[name], default=str)[:1500], flush=True)
        out.write_text(json.dumps(results, indent=2, default=str))
    results["self_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps(results, indent=2, default=str))
    print_table(results)
    print(f"results: {args.out}")


def describe_pairs(pairs: dict | None) -> str:
    """A `pair_ratios` summary in words: median, range, wins and the interval where there is one."""
    if not pairs:
        return "not recorded"
    text = f"median {pairs['median']:.2f} ({pairs['min']:.2f}-{pairs['max']:.2f})"
    if "above_1" in pairs:
        text += f", above 1 in {pairs['above_1']} of {pairs['n']}"
    if "ci95" in pairs:
        low, high = pairs["ci95"]
        text += f", 95% CI {low:.2f}-{high:.2f}"
    return text


def print_table(r: dict) -> None:
    """The table of whatever sections `r` holds (a partial run prints only its own rows)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fedpit benchmarks (ratios are against a baseline measured in the same run)")
    for column in ("measure", "value", "baseline", "ratio", "target"):
        table.add_column(column)
    if "generation" in r:
        g = r["generation"]
        gen, base = g["tokens_per_s"], f"{g['tokens_per_s']['generate_one_at_a_time']['median']:.1f} one at a time"
        rows = g.get("rows_at_a_time", 32)
        for name, label, target in (("fedpit", "ours", ">= 15x"),
                                    ("fedpit_static_batches", f"ours, static batches of {rows}", ""),
                                    ("fedpit_unpacked", "ours, weights not packed", ""),
                                    ("fedpit_unmerged", "ours, LoRA unmerged", ""),
                                    ("generate_batched", f"generate, batches of {rows}", "reference")):
            if name not in gen:  # a results file from before this variant existed
                continue
            table.add_row(f"generation new tokens/s ({label})", f"{gen[name]['median']:.1f}", base,
                          f"{g['speedup_vs_one_at_a_time'][name]:.2f}x", target)
        if "pairs_vs_one_at_a_time" in g:
            table.add_row("generation: ours / one at a time", f"{g['speedup_vs_one_at_a_time']['fedpit']:.2f}x",
                          "per repeat: " + describe_pairs(g["pairs_vs_one_at_a_time"]), "", ">= 15x")
        if "llama_cpp" in gen:
            table.add_row(f"generation new tokens/s (llama.cpp, same weights and dtype, {rows} slots)",
                          f"{gen['llama_cpp']['median']:.1f}", base,
                          f"{g['speedup_vs_one_at_a_time']['llama_cpp']:.2f}x", "anchor")
            table.add_row("generation: ours / llama.cpp", f"{g['speedup_vs_llama_cpp']:.2f}x",
                          "per repeat: " + describe_pairs(g.get("pairs_vs_llama_cpp")), "", ">= 1.4x")
        else:
            table.add_row("generation llama.cpp row", "missing", g.get("llama_cpp_missing", ""), "", "")
        table.add_row("generation prefill share", f"{g['prefill_share']:.1%}", "", "", "")
    for dtype, res in r.get("training", {}).items():
        if dtype == "measured":
            continue
        table.add_row(f"training tokens/s ({dtype})", f"{res['tokens_per_s']['fedpit']['median']:.0f}",
                      f"{res['tokens_per_s']['plain_peft_loop']['median']:.0f} plain peft loop",
                      f"{res['ratio']:.2f}x", ">= 1.0x")
        if "fraction_of_bound" in res:
            table.add_row(f"training ({dtype}): fraction of the compute bound (6N; 4N)",
                          f"{res['fraction_of_bound']:.0%}; {res['fraction_of_bound_4n']:.0%}",
                          f"{res['bound_tokens_per_s']:.0f} tokens/s at {res['matmul_gflops_per_s']:.0f} GFLOP/s",
                          "", ">= 50% (6N)")
    if "round" in r:
        rd = r["round"]
        table.add_row("client round seconds FedPIT / FedAvg", f"{rd['fedpit_seconds']:.1f}",
                      f"{rd['fedavg_seconds']:.1f}", f"{rd['ratio']:.2f}x; per repeat: "
                      + describe_pairs(rd.get("pair_ratios")), "<= 2.0x")
        up = rd["upload_bytes"]
        table.add_row("upload bytes per client per round", f"{up['bf16'] / 1e6:.1f} MB bf16",
                      f"{up['fp32'] / 1e6:.1f} MB fp32", f"{up['bf16'] / up['fp32']:.2f}x", "")
    if "memory" in r:
        m = r["memory"]
        table.add_row("peak RSS MiB 10 clients / 2 clients", f"{m['peak_rss_mib_10_clients']:.0f}",
                      f"{m['peak_rss_mib_2_clients']:.0f}", f"{m['ratio']:.2f}x", "<= 1.15x")
    if "evaluation" in r:
        table.add_row("evaluation generated tokens/s", f"{r['evaluation']['generated_tokens_per_s']:.1f}", "", "", "")
    if "parts" in r:
        p, sec = r["parts"], r["parts"]["seconds"]
        table.add_row(f"prefill of {p['prefill_rows']} prompts, index logits_to_keep (s)",
                      f"{sec['prefill_logits_to_keep_index']['median']:.2f}",
                      f"{sec['prefill_logits_to_keep_int']['median']:.2f} int", f"{p['prefill_speedup']:.2f}x", "")
        table.add_row(f"copy filter, {p['copy_filter_pairs']} ROUGE-L pairs (s)",
                      f"{sec['copy_filter_fedpit']['median']:.3f}",
                      f"{sec['copy_filter_rouge_score']['median']:.3f} rouge-score",
                      f"{p['copy_filter_speedup']:.0f}x", "")
        table.add_row("one adapter merge (s)", f"{sec['adapter_merge']['median']:.2f}", "", "", "")
    if "dp" in r:
        d, rate = r["dp"], r["dp"]["tokens_per_s"]
        table.add_row("DP-SGD training tokens/s (bf16, per-example backward)", f"{rate['fedpit_dp_sgd']['median']:.0f}",
                      f"{rate['plain']['median']:.0f} plain training", f"{d['dp_vs_plain']:.2f}x", "")
        table.add_row("DP-SGD per-example gradients vs Opacus hooks", f"{rate['fedpit_dp_sgd']['median']:.0f}",
                      f"{rate['opacus_per_sample_hooks']['median']:.0f} Opacus GradSampleHooks",
                      f"{d['dp_vs_opacus']:.2f}x", "")
    for row in flower_rows(r["flower"]) if "flower" in r else []:
        table.add_row(*row)
    Console().print(table)
    if "round" in r:
        for name in ("fedpit", "fedavg"):
            phases = ", ".join(f"{k} {v:.1f}s" for k, v in r["round"][f"{name}_phases"].items())
            Console().print(f"{name} client round by phase (medians): {phases}")


if __name__ == "__main__":
    main()
