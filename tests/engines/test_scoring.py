"""IFS and reference NLL against values computed by hand from the model's logits."""

from __future__ import annotations

import torch

from fedpit.config import LoraConfig, ModelConfig
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
