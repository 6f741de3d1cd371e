from __future__ import annotations

from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines.generation import DecodingOptions, cut_at_stop, generate
from fedpit.model import load_model


def test_batched_greedy_generation_equals_one_at_a_time(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), LoraConfig(rank=4, alpha=8))
    prompts = ["Short prompt", "A much longer prompt with many more words in it than the first", "Mid length one"]
    options = DecodingOptions(max_new_tokens=8)
    batched = generate(handle, prompts, options, batch_size=3)
    single = [generate(handle, [p], options, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert len(batched) == 3 and all(isinstance(t, str) for t in batched)


def test_sampling_is_reproducible_with_a_seed(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), LoraConfig(rank=4, alpha=8))
    options = DecodingOptions(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0)
    first = generate(handle, ["Tell me"] * 4, options, seed=5)
    assert first == generate(handle, ["Tell me"] * 4, options, seed=5)


def test_cut_at_stop_takes_earliest_stop():
    assert cut_at_stop("answer\n### Instruction: next", ("### Instruction:", "\n")) == "answer"
    assert cut_at_stop("no stop here", ("###",)) == "no stop here"


def test_decode_loop_matches_transformers_generate(tiny_model_dir):
    """The row-dropping decode loop gives exactly what `model.generate` gives (greedy, fp32),
    with stop strings and a repetition penalty, for prompts of different lengths."""
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32", threads=1), LoraConfig(rank=4, alpha=8))
    prompts = ["one", "two words here", "a considerably longer prompt than the others, with commas", "x y"]
    for stops, penalty in (((), 1.0), (("a", "e"), 1.0), ((), 1.3)):
        ours = generate(handle, prompts, DecodingOptions(max_new_tokens=10, stop_strings=stops,
                                                         repetition_penalty=penalty), batch_size=4)
        reference = generate(handle, prompts, DecodingOptions(max_new_tokens=10, stop_strings=stops,
                                                              repetition_penalty=penalty, backend="hf"), batch_size=4)
        assert ours == reference
