"""IFS and reference NLL against values computed by hand from the model's logits."""

from __future__ import annotations

import pytest
import torch

from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines import encoding, scoring
from fedpit.engines.encoding import EncodedPair
from fedpit.engines.scoring import ifs_scores, option_logprobs, reference_nll
from fedpit.model import load_model
from fedpit.prompts import AlpacaFormat
from fedpit.types import Example


def _mean_nll(model, context_ids, target_ids):
    ids = torch.tensor([context_ids + target_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    n = len(context_ids)
    return -sum(logprobs[n + i - 1, tok].item() for i, tok in enumerate(target_ids)) / len(target_ids)


def test_ifs_matches_hand_computed_value(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), LoraConfig(rank=4, alpha=8))
    tok = handle.tokenizer
    fmt = AlpacaFormat()
    example = Example(id="x", instruction="What causes anaemia?", output="Low iron and blood loss.")
    prompt_ids = tok(fmt.render(example.instruction), add_special_tokens=True)["input_ids"]
    target_ids = tok(example.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    conditional = _mean_nll(handle.model, prompt_ids, target_ids)
    alone = _mean_nll(handle.model, [tok.bos_token_id], target_ids)
    assert abs(reference_nll(handle, fmt, [example], 256)[0] - conditional) < 1e-4
    assert abs(ifs_scores(handle, fmt, [example], 256)[0] - conditional / alone) < 1e-4


def test_batched_scores_equal_single_scores(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), LoraConfig(rank=4, alpha=8))
    fmt = AlpacaFormat()
    examples = [Example(id=str(i), instruction="Question " * (i + 1), output="Answer " * (3 * i + 1)) for i in range(5)]
    batched = reference_nll(handle, fmt, examples, 256, batch_size=5)
    single = [reference_nll(handle, fmt, [e], 256, batch_size=1)[0] for e in examples]
    assert max(abs(a - b) for a, b in zip(batched, single)) < 1e-4


def test_option_logprobs_add_every_spelling_and_ignore_padding(tiny_model_dir):
    """log P(first response token spells the option), against the unpadded model's last-position
    distribution; a batch of prompts of different lengths gives each prompt's own values."""
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), LoraConfig(rank=4, alpha=8))
    tok = handle.tokenizer
    prompts = [AlpacaFormat().render("Is aspirin an anticoagulant? " * n) for n in (1, 4, 9)]
    batched = option_logprobs(handle, prompts, ("yes", "no", "maybe"), 256, batch_size=3)
    for prompt, values in zip(prompts, batched):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(handle.model(input_ids=ids).logits[0, -1].float(), dim=-1)
        for option, value in zip(("yes", "no", "maybe"), values):
            firsts = {tok(v, add_special_tokens=False)["input_ids"][0]
                      for v in (option, option.capitalize(), f" {option}", f" {option.capitalize()}")}
            expected = torch.logsumexp(logprobs[sorted(firsts)], dim=0).item()
            assert abs(value - expected) < 1e-4


def _pairs_after_a_common_context(tok, count: int) -> list[EncodedPair]:
    """Pairs whose contexts share a long beginning and then differ in length and words, as prompts built from
    one template do, with targets of different lengths: left padding differs in every batch."""
    common = tok(AlpacaFormat().render("Describe the usual course of"), add_special_tokens=True)["input_ids"]
    pairs = []
    for i in range(count):
        own = tok(" disease" * (i % 3 + 1) + f" number {i}", add_special_tokens=False)["input_ids"]
        target = tok(" It lasts" + " a week" * (i + 1) + ".", add_special_tokens=False)["input_ids"]
        pairs.append(EncodedPair(input_ids=common + own + target + [tok.eos_token_id], num_context=len(common + own)))
    return pairs


@pytest.mark.parametrize("through_the_head", [True, False])
def test_a_shared_context_is_computed_once_and_every_loss_stays_the_models(sensitive_model_dir, monkeypatch,
                                                                           record_prefixes, through_the_head):
    """Seven pairs after a common template: the common part is run once (one row) and copied into each batch
    of three, and every pair's loss is still the unbatched model's (fp32), as it is with sharing turned off. The
    model is one whose losses turn on positions and on which tokens are attended (conftest.py). Both ways to
    the loss: the head on the decoder's output, and the model's own logits (models whose logits are not that)."""
    if not through_the_head:
        monkeypatch.setattr(encoding, "head_path", lambda model: None)
    handle = load_model(ModelConfig(name=str(sensitive_model_dir), dtype="fp32"), LoraConfig(rank=4, alpha=8))
    tok = handle.tokenizer
    pairs = _pairs_after_a_common_context(tok, 7)
    contexts = record_prefixes(scoring)
    shared = scoring.target_losses(handle, pairs, batch_size=3)
    common = len(tok(AlpacaFormat().render("Describe the usual course of"), add_special_tokens=True)["input_ids"])
    assert contexts == [scoring._shared_context(pairs)] and common <= contexts[0] <= common + 1
    by_hand = [_mean_nll(handle.model, p.input_ids[: p.num_context], p.input_ids[p.num_context :]) for p in pairs]
    assert max(abs(a - b) / b for a, b in zip(shared, by_hand)) < 1e-5
    monkeypatch.setattr(scoring, "SHARED_CONTEXT_MIN", 10**9)
    contexts.clear()
    assert max(abs(a - b) / b for a, b in zip(shared, scoring.target_losses(handle, pairs, batch_size=3))) < 1e-5
    assert contexts == [], "with the threshold out of reach nothing should be shared"


@pytest.mark.parametrize("pairs, shared", [
    ([([1, 2, 3, 4, 5, 6], 4), ([1, 2, 3, 9, 7], 4)], 3),  # up to the first difference
    ([([1, 2, 3, 4, 5], 4), ([1, 2, 3, 4, 6], 4)], 3),  # whole contexts alike: each keeps its last context token
    ([([1, 2, 3, 4, 5], 4), ([1, 2, 7], 2)], 1),  # the shortest context bounds it
    ([([1, 2, 3, 4, 5], 4)], 0),  # one pair: nothing to share
    ([([8, 2, 3, 4, 5], 4), ([1, 2, 3, 4, 5], 4)], 0),
])
def test_shared_context_is_common_context_only(pairs, shared):
    assert scoring._shared_context([EncodedPair(input_ids=ids, num_context=n) for ids, n in pairs]) == shared


def test_a_model_with_sliding_window_layers_scores_without_sharing(tmp_path, smollm2_path, monkeypatch):
    """Its cache keeps only a window of positions and cannot be copied row by row: the pairs are scored whole,
    and the losses are the model's own."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    handle = load_model(ModelConfig(name=str(tmp_path), dtype="fp32"), LoraConfig(rank=4, alpha=8))
    copies: list[int] = []
    monkeypatch.setattr(scoring, "repeat_rows", lambda *args: copies.append(1))
    pairs = _pairs_after_a_common_context(handle.tokenizer, 4)
    losses = scoring.target_losses(handle, pairs, batch_size=4)
    assert copies == []
    by_hand = [_mean_nll(handle.model, p.input_ids[: p.num_context], p.input_ids[p.num_context :]) for p in pairs]
    assert max(abs(a - b) / b for a, b in zip(losses, by_hand)) < 1e-5
