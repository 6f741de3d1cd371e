"""GPU paths: CUDA with a bf16 / fp32 base and a bitsandbytes 8-bit / 4-bit base, each loaded through
`fedpit.model.load_model` and run through the three engines (generation, training, IFS scoring), each
timed against what a plain transformers / peft script would do, in the same run. Without a GPU it runs
the bf16 / fp32 rows on the CPU and reports the 8/4-bit rows with the error fedpit gives there.

    python benchmarks/gpu_check.py [--model PATH] [--random-init] [--override JSON] [--variants LIST]
                                   [--single N] [--out FILE]

`--random-init` builds the model's architecture from its config with random weights, for machines the
weights cannot reach: speeds then stand for the architecture (every row runs to the token budget, as
random weights never write a stop string), outputs are noise. `--override '{"num_hidden_layers": 24}'`
changes that config first, so a larger architecture of the same family is measured without its weights.
The 8/4-bit rows need a CUDA GPU and `bitsandbytes`. Each variant's result is written to `--out` as
soon as it is measured, so a run stopped by a time limit keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from baselines import count_tokens, plain_peft_model, plain_training_loop, timed

from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines.encoding import collate, encode_pair
from fedpit.engines.generation import DecodingOptions, generate
from fedpit.engines.scoring import ifs_scores
from fedpit.engines.training import TrainOptions, train_adapter
from fedpit.errors import ModelError
from fedpit.model import load_model, resolve_model_path
from fedpit.prompts import AlpacaFormat
from fedpit.types import Example

ORGANS = ["heart", "lung", "liver", "kidney", "skin", "brain", "bone", "eye", "thyroid", "colon", "blood", "ear"]
VARIANTS = ("bf16/none", "fp32/none", "bf16/8bit", "bf16/4bit")
CUDA = torch.cuda.is_available()


def synthetic_examples(count: int) -> list[Example]:
    """Medical-style pairs with ~100-token answers (no data folder needed on the GPU machine)."""
    examples = []
    for i in range(count):
        organ = ORGANS[i % len(ORGANS)]
        answer = " ".join(f"Condition {i} of the {organ} can cause symptom {k}, which a doctor checks with test {k}."
                          for k in range(6))
        examples.append(Example(id=f"x{i}", instruction=f"What are the symptoms of condition {i} of the {organ}?",
                                output=answer))
    return examples


def gpu_mib(measure) -> float | None:
    return measure() / 2**20 if CUDA else None


def plain_ifs(model: torch.nn.Module, tokenizer, fmt: AlpacaFormat, examples: list[Example], max_length: int,
              device: torch.device) -> list[float]:
    """IFS the textbook way: for each pair, `model(**batch).loss` with the prompt and without it."""
    scores = []
    model.eval()
    with torch.no_grad():
        for e in examples:
            pairs = (encode_pair(tokenizer, fmt.render(e.instruction), e.output, max_length),
                     encode_pair(tokenizer, None, e.output, max_length))
            conditional, alone = (float(model(**collate([p], tokenizer.pad_token_id, device)).loss) for p in pairs)
            scores.append(conditional / alone if alone > 0 else float("inf"))
    return scores


def check_generation(handle, fmt: AlpacaFormat, prompts: list[str], single: int) -> dict:
    options = DecodingOptions(max_new_tokens=128, stop_strings=tuple(fmt.stop_strings), repetition_penalty=1.2)
    plain = DecodingOptions(max_new_tokens=128, stop_strings=tuple(fmt.stop_strings), repetition_penalty=1.2,
                            backend="hf")
    generate(handle, prompts[:4], options, batch_size=4)  # warm-up
    ours_s, ours = timed(lambda: generate(handle, prompts, options, batch_size=32))
    merge = handle.merge_for_inference
    handle.merge_for_inference = False  # the baselines run the PEFT model as a plain script has it
    try:
        batched_s, batched = timed(lambda: generate(handle, prompts, plain, batch_size=32))
        few = prompts[:single]  # one at a time is slow: measured on a subset, compared as tokens per second
        alone_s, alone = timed(lambda: generate(handle, few, plain, batch_size=1))
    finally:
        handle.merge_for_inference = merge
    rate = {name: count_tokens(handle.tokenizer, texts) / seconds
            for name, seconds, texts in (("fedpit", ours_s, ours), ("hf_generate_batched", batched_s, batched),
                                         ("hf_generate_one_at_a_time", alone_s, alone))}
    return {"prompts": len(prompts), "new_tokens_per_s": rate,
            "speedup_vs_one_at_a_time": rate["fedpit"] / rate["hf_generate_one_at_a_time"],
            "speedup_vs_batched_generate": rate["fedpit"] / rate["hf_generate_batched"],
            # greedy in both; identical text where the numerics agree (random weights make near-ties common)
            "same_text_as_one_at_a_time": f"{sum(a == b for a, b in zip(ours, alone))}/{len(alone)}"}


def check_training(handle, fmt: AlpacaFormat, examples: list[Example]) -> dict:
    options = TrainOptions(batch_size=8, learning_rate=1e-4, max_length=384)
    start = handle.get_adapter()
    encoded = [encode_pair(handle.tokenizer, fmt.render(e.instruction), e.output, 384) for e in examples]
    tokens = sum(len(p.input_ids) for p in encoded)
    plain_model = plain_peft_model(handle.model_config, handle.lora_config, handle.device)
    losses: list[float] = []

    def ours():
        handle.set_adapter(start)
        losses[:] = train_adapter(handle, fmt, examples, options, seed=0).losses

    def plain():
        plain_training_loop(plain_model, start, encoded, handle.tokenizer.pad_token_id)

    ours(), plain()  # warm-up
    rates: dict[str, list[float]] = {"fedpit": [], "plain_peft_loop": []}
    for repeat in range(3):  # interleaved, order alternated
        pairs = (("fedpit", ours), ("plain_peft_loop", plain))
        for name, fn in pairs[:: 1 if repeat % 2 == 0 else -1]:
            rates[name].append(tokens / timed(fn)[0])
    median = {k: statistics.median(v) for k, v in rates.items()}
    return {"tokens_per_s": median, "spread": {k: [min(v), max(v)] for k, v in rates.items()},
            "ratio": median["fedpit"] / median["plain_peft_loop"],
            "losses_finite": bool(torch.isfinite(torch.tensor(losses)).all())}


def check_scoring(handle, fmt: AlpacaFormat, examples: list[Example]) -> dict:
    ifs_scores(handle, fmt, examples[:4], 384)  # warm-up
    ours_s, ours = timed(lambda: ifs_scores(handle, fmt, examples, 384))
    merge = handle.merge_for_inference
    handle.merge_for_inference = False
    try:
        with handle.inference():
            plain_s, plain = timed(lambda: plain_ifs(handle.model, handle.tokenizer, fmt, examples, 384, handle.device))
    finally:
        handle.merge_for_inference = merge
    gaps = [abs(a - b) / abs(b) for a, b in zip(ours, plain) if b]
    return {"candidates": len(examples), "seconds": {"fedpit": ours_s, "plain_one_at_a_time": plain_s},
            "speedup": plain_s / ours_s, "finite": bool(torch.isfinite(torch.tensor(ours)).all()),
            "max_relative_gap_to_plain": max(gaps) if gaps else None}


def check_variant(path: str, variant: str, prompts: list[str], examples: list[Example], single: int) -> dict:
    dtype, quantization = variant.split("/")
    handle = load_model(ModelConfig(name=path, dtype=dtype, quantization=quantization), LoraConfig(), seed=0)
    fmt = AlpacaFormat()
    result: dict = {"device": str(handle.device), "gpu_memory_mib_after_load": gpu_mib(torch.cuda.memory_allocated)}
    generator = torch.Generator().manual_seed(0)  # a trained-looking adapter (B != 0), so LoRA matters
    handle.set_adapter({k: v + 0.02 * torch.randn(v.shape, generator=generator)
                        for k, v in handle.fresh_adapter(0).items()})
    result["generation"] = check_generation(handle, fmt, prompts, single)
    result["scoring"] = check_scoring(handle, fmt, examples)
    result["training"] = check_training(handle, fmt, examples)
    result["gpu_peak_memory_mib"] = gpu_mib(torch.cuda.max_memory_allocated)
    return result


def random_init_copy(path: str, folder: Path, override: dict) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    for key, value in override.items():
        if not hasattr(config, key):
            raise SystemExit(f"--override: the model config has no '{key}'")
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device("cuda" if CUDA else "cpu"):  # initialising a large architecture on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(path).save_pretrained(folder)
    del model
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--override", default="{}", help="JSON of model-config changes (with --random-init)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--single", type=int, default=8, help="prompts for the one-at-a-time generate baseline")
    parser.add_argument("--out", default="benchmarks/gpu_results.json")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    override = json.loads(args.override)
    if override and not args.random_init:
        parser.error("--override changes the architecture, so it needs --random-init")
    path = resolve_model_path(args.model) if not Path(args.model).is_dir() else args.model
    workdir = Path(tempfile.mkdtemp(prefix="fedpit-gpu-"))
    if args.random_init:
        path = random_init_copy(path, workdir / "model", override)
    fmt = AlpacaFormat()
    examples = synthetic_examples(32)
    prompts = [fmt.render_with_demos([examples[(i + k) % 32] for k in range(2)], examples[(i + 5) % 32].instruction)
               for i in range(32)]
    results = {"gpu": torch.cuda.get_device_name(0) if CUDA else None, "torch": torch.__version__,
               "model": args.model, "random_init": args.random_init, "override": override, "variants": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if CUDA:  # an idle GPU runs at a fraction of its clock: the first variant would be timed while it ramps up
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(200):
            a @ a
        torch.cuda.synchronize()
    for name in variants:
        try:
            results["variants"][name] = check_variant(path, name, prompts, examples, args.single)
        except ModelError as exc:  # e.g. 8/4-bit without CUDA or bitsandbytes: fedpit's own message
            results["variants"][name] = {"unavailable": str(exc)}
        except Exception as exc:  # a failing path is a finding, reported with the others
            results["variants"][name] = {"failed": f"{type(exc).__name__}: {exc}"[:800]}
        if CUDA:  # the variant's model is garbage now; give its memory back before the next one
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(name, json.dumps(results["variants"][name]), flush=True)
        out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
