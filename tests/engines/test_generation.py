from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from peft.tuners.lora import LoraLayer

from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines import continuous
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
        # one prompt at a time: no padding, which transformers' repetition penalty would count as text
        reference = generate(handle, prompts, DecodingOptions(max_new_tokens=10, stop_strings=stops,
                                                              repetition_penalty=penalty, backend="hf"), batch_size=1)
        if penalty == 1.0:  # without a penalty, padding changes nothing: batched `generate` agrees too
            assert reference == generate(handle, prompts, DecodingOptions(
                max_new_tokens=10, stop_strings=stops, backend="hf"), batch_size=4)
        handle.merge_for_inference = True
        assert ours == reference


def test_continuous_batching_gives_each_prompt_what_it_gets_alone(sensitive_model_dir, monkeypatch):
    """More prompts than rows: waiting prompts join the batch as rows finish (the spy sees them join
    a batch still decoding), and every prompt's greedy output is still what it gets decoded alone in
    fp32, with stop strings, a token budget, EOS and a repetition penalty."""
    handle = load_model(ModelConfig(name=str(sensitive_model_dir), dtype="fp32", threads=1),
                        LoraConfig(rank=4, alpha=8))
    handle.set_adapter(_trained_looking_adapter(handle, seed=3))
    prompts = [" ".join(["word"] * n) + f" {n}" for n in (1, 9, 3, 14, 2, 6, 11, 4, 1, 7)]
    joins: list[tuple[int, int]] = []
    real_join = continuous._join

    def spy(rows, cache, groups, max_new_tokens):
        joins.append((len(rows), sum(len(group) for group, _ in groups)))
        real_join(rows, cache, groups, max_new_tokens)

    monkeypatch.setattr(continuous, "_join", spy)
    free = generate(handle, prompts, DecodingOptions(max_new_tokens=12), batch_size=1)
    stops = tuple({text[:3] for text in free[1::2] if len(text) >= 3})  # half of the rows end after a token or two
    for options in (DecodingOptions(max_new_tokens=12, stop_strings=stops),
                    DecodingOptions(max_new_tokens=12, stop_strings=stops, repetition_penalty=1.3)):
        joins.clear()
        together = generate(handle, prompts, options, batch_size=4)
        assert joins and all(active > 0 for active, _ in joins), "prompts should join a batch still decoding"
        alone = [generate(handle, [p], options, batch_size=1)[0] for p in prompts]
        assert together == alone
        joins.clear()
        assert generate(handle, prompts, replace(options, continuous_batching=False), batch_size=4) == together
        assert not joins, "static batches should not take prompts mid-decode"
        assert len(set(together)) > 3, "outputs should differ between prompts for the test to mean anything"


@pytest.mark.parametrize("lengths,cost,sizes", [
    ([300, 298, 296, 100, 98], 64, [3, 2]),  # 1,228 tokens in two forwards against 1,564 in one
    ([300, 298, 296, 100, 98], 10**6, [5]),  # a forward dearer than any padding: one group
    ([300, 300, 200, 200, 200], 0, [2, 3]),  # free forwards: one group per length
    ([120] * 6, 0, [6]),
    ([], 64, []),
])
def test_prefill_groups_minimise_padded_tokens_plus_a_cost_per_forward(lengths, cost, sizes):
    assert continuous.prefill_groups(lengths, cost) == sizes


def test_prompts_prefilled_in_groups_get_what_they_get_alone(sensitive_model_dir, monkeypatch):
    """Every prompt length its own prefill group (no cost per forward): the groups join one batch, and each
    prompt's greedy fp32 output is still what it gets decoded alone, with a budget and a repetition penalty."""
    handle = load_model(ModelConfig(name=str(sensitive_model_dir), dtype="fp32", threads=1),
                        LoraConfig(rank=4, alpha=8))
    handle.set_adapter(_trained_looking_adapter(handle, seed=4))
    prompts = [" ".join(["word"] * n) + f" {n}" for n in (12, 1, 7, 3, 12, 5)]
    options = DecodingOptions(max_new_tokens=10, repetition_penalty=1.3)
    alone = [generate(handle, [p], options, batch_size=1)[0] for p in prompts]
    groups = []
    real_group = continuous._prefill_group

    def spy(model, group, *args, **kwargs):
        groups.append(len(group))
        return real_group(model, group, *args, **kwargs)

    monkeypatch.setattr(continuous, "_prefill_group", spy)
    monkeypatch.setattr(continuous, "PREFILL_GROUP_COST", 0)
    assert generate(handle, prompts, options, batch_size=6) == alone
    assert len(groups) == 5 and sum(groups) == 6, groups  # the two 12-word prompts share a group
    assert len(set(alone)) > 3, "outputs should differ between prompts for the test to mean anything"


def test_a_shared_beginning_is_prefilled_once_and_each_prompt_gets_what_it_gets_alone(sensitive_model_dir,
                                                                                     monkeypatch, record_prefixes):
    """Prompts after a common template (as self-generation's are), more of them than rows and in several
    prefill groups: each prefill computes the template once, and every prompt's greedy fp32 output is still
    what it gets decoded alone, with a budget and a repetition penalty, as it is with sharing turned off."""
    handle = load_model(ModelConfig(name=str(sensitive_model_dir), dtype="fp32", threads=1),
                        LoraConfig(rank=4, alpha=8))
    handle.set_adapter(_trained_looking_adapter(handle, seed=5))
    template = "Come up with a series of tasks about the common course of"
    prompts = [f"{template} {' '.join(['word'] * n)} {n}:" for n in (9, 1, 4, 12, 2, 7, 3)]
    options = DecodingOptions(max_new_tokens=10, repetition_penalty=1.3)
    alone = [generate(handle, [p], options, batch_size=1)[0] for p in prompts]
    prefixes = record_prefixes(continuous)
    monkeypatch.setattr(continuous, "PREFILL_GROUP_COST", 0)  # a group per length
    assert generate(handle, prompts, options, batch_size=4) == alone
    common = len(handle.tokenizer(template)["input_ids"])  # at least the template; more where a call's prompts
    assert prefixes and all(common - 1 <= n for n in prefixes), (prefixes, common)  # share their first words too
    prefixes.clear()
    monkeypatch.setattr(continuous, "SHARED_PREFIX_MIN", 10**9)
    assert generate(handle, prompts, options, batch_size=4) == alone
    assert prefixes == [], "with the threshold out of reach nothing should be shared"
    assert len(set(alone)) > 3, "outputs should differ between prompts for the test to mean anything"


def test_generation_reports_progress_in_prompts(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32", threads=1), LoraConfig(rank=4, alpha=8))
    for backend in ("fedpit", "hf"):
        seen: list[tuple[int, int]] = []
        generate(handle, ["a", "b c", "d e f", "g"], DecodingOptions(max_new_tokens=4, backend=backend), batch_size=2,
                 on_batch=lambda done, total, seen=seen: seen.append((done, total)))
        assert seen[-1] == (4, 4) and all(total == 4 for _, total in seen)
        assert [done for done, _ in seen] == sorted(done for done, _ in seen)


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


def test_preallocated_layer_absorbs_rows_right_aligned_with_zero_padding():
    mine, theirs, more = PreallocatedLayer(capacity=8), PreallocatedLayer(capacity=8), PreallocatedLayer(capacity=2)
    old, new, newer = torch.randn(2, 3, 5, 4), torch.randn(1, 3, 3, 4), torch.randn(2, 3, 2, 4)
    for layer, keys in ((mine, old), (theirs, new), (more, newer)):
        layer.update(keys, -keys)
    mine.absorb([theirs, more], drop=1, width=6, capacity=9)  # 4 positions kept of mine, 3 and 2 of theirs, in 6
    assert mine.get_seq_length() == 6 and mine.keys.shape == (5, 3, 6, 4) and mine._keys.shape[2] == 9
    assert torch.equal(mine.keys[:2, :, 2:], old[:, :, 1:]) and torch.equal(mine.values[:2, :, 2:], -old[:, :, 1:])
    assert torch.equal(mine.keys[2:3, :, 3:], new) and torch.equal(mine.values[2:3, :, 3:], -new)
    assert torch.equal(mine.keys[3:, :, 4:], newer) and torch.equal(mine.values[3:, :, 4:], -newer)
    assert not mine.keys[:2, :, :2].any() and not mine.keys[2:3, :, :3].any() and not mine.values[3:, :, :4].any()
    keys, _ = mine.update(torch.ones(5, 3, 1, 4), torch.ones(5, 3, 1, 4))  # decoding goes on after the join
    assert keys.shape == (5, 3, 7, 4) and torch.equal(keys[:, :, 6], torch.ones(5, 3, 4))


def test_preallocated_layer_repeats_one_row_and_its_copies_go_on_alone():
    source, copy = PreallocatedLayer(capacity=4), PreallocatedLayer(capacity=7)
    context = torch.randn(1, 3, 4, 2)
    source.update(context, -context)
    copy.repeat(source, rows=5)
    assert copy.get_seq_length() == 4 and copy.keys.shape == (5, 3, 4, 2) and copy._keys.shape[2] == 7
    rows = context.expand(5, -1, -1, -1)
    assert torch.equal(copy.keys, rows) and torch.equal(copy.values, -rows)
    step = torch.randn(5, 3, 2, 2)
    keys, _ = copy.update(step, step)  # each row continues the context with its own tokens
    assert torch.equal(keys[:, :, 4:], step) and torch.equal(source.keys, context) and source.get_seq_length() == 4
