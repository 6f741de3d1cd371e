from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines.generation import DecodingOptions, cut_at_stop, generate
from fedpit.engines.kvcache import PreallocatedLayer
from fedpit.model import load_model


def _trained_looking_adapter(handle, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fresh adapter has B = 0 (base model exactly); perturb it so LoRA changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in handle.fresh_adapter(0).items()}


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
    """The row-dropping decode loop (adapter merged, preallocated cache) gives exactly what plain
    `model.generate` on the unmerged PEFT model gives (greedy, fp32), with stop strings and a
    repetition penalty, for prompts of different lengths, with an adapter that changes the outputs."""
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32", threads=1), LoraConfig(rank=4, alpha=8))
    prompts = ["one", "two words here", "a considerably longer prompt than the others, with commas", "x y"]
    options = DecodingOptions(max_new_tokens=10)
    base_outputs = generate(handle, prompts, options, batch_size=4)
    handle.set_adapter(_trained_looking_adapter(handle))
    assert generate(handle, prompts, options, batch_size=4) != base_outputs, "the adapter should matter"
    for stops, penalty in (((), 1.0), (("a", "e"), 1.0), ((), 1.3)):
        ours = generate(handle, prompts, DecodingOptions(max_new_tokens=10, stop_strings=stops,
                                                         repetition_penalty=penalty), batch_size=4)
        handle.merge_for_inference = False
        reference = generate(handle, prompts, DecodingOptions(max_new_tokens=10, stop_strings=stops,
                                                              repetition_penalty=penalty, backend="hf"), batch_size=4)
        handle.merge_for_inference = True
        assert ours == reference


def test_merged_inference_matches_lora_and_restores_the_model_exactly(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), LoraConfig(rank=4, alpha=8))
    handle.set_adapter(_trained_looking_adapter(handle, seed=1))
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    handle.model.eval()  # LoRA dropout off, as in every inference path
    with torch.inference_mode():
        unmerged = handle.model(input_ids=ids).logits
    with handle.inference():
        assert not any(isinstance(m, LoraLayer) for m in handle.model.modules()), "LoRA layers should be swapped out"
        merged = handle.model(input_ids=ids).logits
        with handle.inference():  # re-entrant
            again = handle.model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert torch.equal(merged, again)
    after = handle.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sum(isinstance(m, LoraLayer) for m in handle.model.modules()) > 0


def test_preallocated_cache_layer_writes_in_place_grows_and_selects_rows():
    layer = PreallocatedLayer(capacity=3)
    chunks = [torch.randn(4, 2, n, 8) for n in (2, 1, 3)]  # 6 positions: one growth past capacity 3
    for chunk in chunks:
        keys, values = layer.update(chunk, -chunk)
    expected = torch.cat(chunks, dim=2)
    assert layer.get_seq_length() == 6
    assert torch.equal(keys, expected) and torch.equal(values, -expected)
    layer.batch_select_indices(torch.tensor([3, 1]))
    assert torch.equal(layer.keys, expected[[3, 1]]) and torch.equal(layer.values, -expected[[3, 1]])
    keys, _ = layer.update(torch.ones(2, 2, 1, 8), torch.ones(2, 2, 1, 8))
    assert keys.shape == (2, 2, 7, 8) and torch.equal(keys[:, :, :6], expected[[3, 1]])
