from __future__ import annotations

import torch

from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines.encoding import IGNORE_INDEX, encode_pair
from fedpit.engines.training import TrainOptions, learning_rate_for_round, train_adapter
from fedpit.model import load_model
from fedpit.prompts import AlpacaFormat
from fedpit.types import Example


def test_prompt_tokens_are_masked_out_of_the_loss(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), LoraConfig(rank=4, alpha=8))
    pair = encode_pair(handle.tokenizer, "### Instruction:\nHi\n\n### Response:\n", "Hello there", 64)
    labels = pair.labels
    assert labels[: pair.num_context] == [IGNORE_INDEX] * pair.num_context
    assert labels[pair.num_context :] == pair.input_ids[pair.num_context :]
    assert labels[-1] == handle.tokenizer.eos_token_id
    long = encode_pair(handle.tokenizer, "word " * 100, "answer " * 10, 32)
    assert len(long.input_ids) == 32 and long.labels[-1] == handle.tokenizer.eos_token_id


def test_training_lowers_loss_and_only_touches_lora(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), LoraConfig(rank=4, alpha=8))
    frozen = {n: p.detach().clone() for n, p in handle.model.named_parameters() if not p.requires_grad}
    examples = [Example(id=str(i), instruction=f"Say code {i}", output=f"The code is {i}{i}{i}.") for i in range(8)]
    options = TrainOptions(batch_size=4, learning_rate=0.02, epochs=6, max_length=64)
    result = train_adapter(handle, AlpacaFormat(), examples, options, seed=0)
    assert result.steps == 12
    assert sum(result.losses[-2:]) / 2 < sum(result.losses[:2]) / 2
    assert all(torch.equal(p, frozen[n]) for n, p in handle.model.named_parameters() if not p.requires_grad)


def test_cosine_schedule_by_round():
    assert learning_rate_for_round(1.0, 0.0, "cosine", 1, 4) == 1.0
    assert abs(learning_rate_for_round(1.0, 0.0, "cosine", 3, 4) - 0.5) < 1e-12
    rates = [learning_rate_for_round(1.0, 0.1, "cosine", r, 4) for r in range(1, 5)]
    assert rates == sorted(rates, reverse=True) and rates[-1] > 0.1  # the last round still learns
    assert learning_rate_for_round(1.0, 0.0, "constant", 4, 5) == 1.0


def test_length_grouped_batches_cover_every_example_once_and_pad_less():
    import random

    import torch

    from fedpit.engines.training import length_grouped_batches

    lengths = [random.Random(i).randint(10, 300) for i in range(50)]
    batches = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert all(len(b) <= 8 for b in batches)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    shuffled = torch.randperm(50, generator=torch.Generator().manual_seed(0)).tolist()
    plain = sum(max(lengths[i] for i in shuffled[f:f + 8]) * len(shuffled[f:f + 8]) for f in range(0, 50, 8))
    assert padded < 0.8 * plain
    assert batches == length_grouped_batches(lengths, 8, torch.Generator().manual_seed(0)), "seeded"


def test_target_only_logits_give_the_loss_transformers_computes(tiny_model_dir):
    """Training's loss (left padding, logits for target positions only) equals `model(**batch).loss`
    on the right-padded batch, where every position gets logits, and so do its gradients."""
    from fedpit.engines.encoding import collate, target_token_losses

    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), LoraConfig(rank=4, alpha=8, dropout=0.0))
    fmt = AlpacaFormat()
    pairs = [encode_pair(handle.tokenizer, fmt.render(f"Question {i} " * (i + 1)), "answer words " * (3 * i + 1), 96)
             for i in range(4)]
    pad = handle.tokenizer.pad_token_id
    handle.model.train()
    reference = handle.model(**collate(pairs, pad, handle.device)).loss
    reference.backward()
    reference_grads = {k: p.grad.clone() for k, p in handle.lora_params.items()}
    handle.model.zero_grad()
    token_loss, is_target = target_token_losses(handle.model, collate(pairs, pad, handle.device, left=True))
    ours = token_loss.sum() / is_target.sum()
    ours.backward()
    assert is_target.shape[1] < max(len(p.input_ids) for p in pairs) - 1, "prompt positions should get no logits"
    assert int(is_target.sum()) == sum(len(p.input_ids) - p.num_context for p in pairs)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for key, grad in reference_grads.items():
        torch.testing.assert_close(handle.lora_params[key].grad, grad, rtol=1e-4, atol=1e-6)


def test_bf16_layers_train_fp32_masters_and_state_dicts_stay_fp32(tiny_model_dir, tmp_path):
    """With a bf16 base the LoRA layers compute in bf16, but what a run stores, uploads and saves is the
    fp32 master copy: set/get round-trips exactly, training updates the masters and rounds them into
    the layers, and the saved PEFT adapter is fp32."""
    from safetensors.torch import load_file

    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="bf16"), LoraConfig(rank=4, alpha=8))
    assert all(p.dtype == torch.bfloat16 for p in handle.lora_params.values())
    generator = torch.Generator().manual_seed(0)
    state = {k: v + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in handle.fresh_adapter(0).items()}
    handle.set_adapter(state)
    assert all(torch.equal(handle.get_adapter()[k], state[k]) for k in state), "fp32 values must survive set/get"

    fmt = AlpacaFormat()
    examples = [Example(id=str(i), instruction=f"Name organ {i}", output=f"Organ {i} is the liver.") for i in range(8)]
    result = train_adapter(handle, fmt, examples, TrainOptions(batch_size=4, learning_rate=1e-5, epochs=2), seed=0)
    trained = handle.get_adapter()
    assert result.steps == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert all(t.dtype == torch.float32 for t in trained.values())
    moved = [k for k in state if not torch.equal(trained[k], state[k])]
    assert moved, "training should move the masters"
    # the layers hold the masters rounded to bf16
    assert all(torch.equal(handle.lora_params[k].float().cpu(), trained[k].to(torch.bfloat16).float()) for k in trained)
    assert not any(t.requires_grad for t in trained.values())

    # merged inference takes B·A from the fp32 masters, not from the bf16 copies in the layers
    layer = handle.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    expected = (layer.base_layer.weight.float() + (trained[f"{key}.lora_B.weight"] @ trained[f"{key}.lora_A.weight"])
                * layer.scaling["default"]).to(torch.bfloat16)
    with handle.inference():
        assert torch.equal(handle.model.get_submodule(key).weight, expected)

    handle.save_adapter(trained, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    assert all(p.dtype == torch.bfloat16 for p in handle.lora_params.values()), "saving must not change the layers"
