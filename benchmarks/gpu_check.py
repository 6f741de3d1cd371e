"""GPU paths: CUDA with a bf16 / fp32 base and a bitsandbytes 8-bit / 4-bit base, each loaded through
`fedpit.model.load_model` and run through the three engines (generation, training, scoring), with
speeds measured against plain transformers / peft baselines in the same run. Without a GPU it runs
the bf16 / fp32 rows on the CPU and reports the 8/4-bit rows with the error fedpit gives there.

    python benchmarks/gpu_check.py [--model PATH] [--random-init] [--out FILE]

`--random-init` builds the model's architecture from its config with random weights, for machines the
weights cannot reach: speeds then stand for the architecture (every row runs to the token budget, as
random weights never write a stop string), outputs are noise. The 8/4-bit rows need a CUDA GPU and
`bitsandbytes`.
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
from fedpit.engines.encoding import encode_pair
from fedpit.engines.generation import DecodingOptions, generate
from fedpit.engines.scoring import ifs_scores
from fedpit.engines.training import TrainOptions, train_adapter
from fedpit.errors import ModelError
from fedpit.model import load_model, resolve_model_path
from fedpit.prompts import AlpacaFormat
from fedpit.types import Example

ORGANS = ["heart", "lung", "liver", "kidney", "skin", "brain", "bone", "eye", "thyroid", "colon", "blood", "ear"]


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


CUDA = torch.cuda.is_available()


def gpu_mib(measure) -> float | None:
    return measure() / 2**20 if CUDA else None


def check_variant(path: str, dtype: str, quantization: str, prompts: list[str], examples: list[Example]) -> dict:
    handle = load_model(ModelConfig(name=path, dtype=dtype, quantization=quantization), LoraConfig(), seed=0)
    fmt = AlpacaFormat()
    result: dict = {"device": str(handle.device), "gpu_memory_mib_after_load": gpu_mib(torch.cuda.memory_allocated)}
    generator = torch.Generator().manual_seed(0)  # a trained-looking adapter (B != 0), so LoRA matters
    handle.set_adapter({k: v + 0.02 * torch.randn(v.shape, generator=generator)
                        for k, v in handle.fresh_adapter(0).items()})

    options = DecodingOptions(max_new_tokens=128, stop_strings=tuple(fmt.stop_strings), repetition_penalty=1.2)
    generate(handle, prompts[:4], options, batch_size=4)  # warm-up
    ours_s, ours = timed(lambda: generate(handle, prompts, options, batch_size=32))
    handle.merge_for_inference = False
    plain = DecodingOptions(max_new_tokens=128, stop_strings=tuple(fmt.stop_strings), repetition_penalty=1.2,
                            backend="hf")
    few = prompts[:8]  # one at a time is slow: measured on a subset, compared as tokens per second
    single_s, single = timed(lambda: generate(handle, few, plain, batch_size=1))
    handle.merge_for_inference = True
    ours_rate = count_tokens(handle.tokenizer, ours) / ours_s
    single_rate = count_tokens(handle.tokenizer, single) / single_s
    result["generation"] = {"prompts": len(prompts), "new_tokens_per_s": ours_rate,
                            "one_at_a_time_generate_tokens_per_s": single_rate,
                            "speedup": ours_rate / single_rate if single_rate else None}  # None: nothing generated

    train_options = TrainOptions(batch_size=8, learning_rate=1e-4, max_length=384)
    start = handle.get_adapter()
    encoded = [encode_pair(handle.tokenizer, fmt.render(e.instruction), e.output, 384) for e in examples]
    tokens = sum(len(p.input_ids) for p in encoded)

    def ours_train():
        handle.set_adapter(start)
        return train_adapter(handle, fmt, examples, train_options, seed=0)

    plain_model = plain_peft_model(handle.model_config, handle.lora_config, handle.device)

    def plain_train():
        plain_training_loop(plain_model, start, encoded, handle.tokenizer.pad_token_id)

    ours_train(), plain_train()  # warm-up
    rates = {"fedpit": [], "plain_peft_loop": []}
    for repeat in range(3):
        for name, fn in ((("fedpit", ours_train), ("plain_peft_loop", plain_train))[:: 1 if repeat % 2 == 0 else -1]):
            seconds, outcome = timed(fn)
            rates[name].append(tokens / seconds)
            if name == "fedpit":
                losses = outcome.losses
    result["training"] = {"tokens_per_s": {k: statistics.median(v) for k, v in rates.items()},
                          "ratio": statistics.median(rates["fedpit"]) / statistics.median(rates["plain_peft_loop"]),
                          "losses_finite": all(torch.isfinite(torch.tensor(losses)).tolist())}
    scores = ifs_scores(handle, fmt, examples[:16], 384)
    result["ifs_finite"] = all(torch.isfinite(torch.tensor(scores)).tolist())
    result["gpu_peak_memory_mib"] = gpu_mib(torch.cuda.max_memory_allocated)
    return result


def random_init_copy(path: str, folder: Path) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(path).save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--out", default="benchmarks/gpu_results.json")
    args = parser.parse_args()
    path = resolve_model_path(args.model) if not Path(args.model).is_dir() else args.model
    workdir = Path(tempfile.mkdtemp(prefix="fedpit-gpu-"))
    if args.random_init:
        path = random_init_copy(path, workdir / "model")
    fmt = AlpacaFormat()
    examples = synthetic_examples(32)
    prompts = [fmt.render_with_demos([examples[(i + k) % 32] for k in range(2)], examples[(i + 5) % 32].instruction)
               for i in range(32)]
    results = {"gpu": torch.cuda.get_device_name(0) if CUDA else None, "torch": torch.__version__,
               "random_init": args.random_init, "variants": {}}
    for dtype, quantization in (("bf16", "none"), ("fp32", "none"), ("bf16", "8bit"), ("bf16", "4bit")):
        name = f"{dtype}/{quantization}"
        try:
            results["variants"][name] = check_variant(path, dtype, quantization, prompts, examples)
        except ModelError as exc:  # e.g. 8/4-bit without CUDA or bitsandbytes: fedpit's own message
            results["variants"][name] = {"unavailable": str(exc)}
        except Exception as exc:  # a failing path is a finding, reported with the others
            results["variants"][name] = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
        if CUDA:  # the variant's model is garbage now; give its memory back before the next one
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(name, json.dumps(results["variants"][name]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
