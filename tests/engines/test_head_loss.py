"""The chunked head loss (`head_loss.py`) gives the losses and gradients of the plain path (the model's
logits, then cross-entropy), in fp32 and bf16, batched and per example as DP-SGD takes them, and it
steps aside for a model whose logits are not its head's output as they are."""

from __future__ import annotations

import pytest
import torch

from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines import encoding, head_loss
from fedpit.engines.encoding import collate, encode_pair, target_token_losses
from fedpit.model import load_model
from fedpit.prompts import AlpacaFormat


def _batch(handle, count=4):
    fmt = AlpacaFormat()
    pairs = [encode_pair(handle.tokenizer, fmt.render(f"Question {i} " * (2 * i + 1)), "answer words " * (i + 1), 96)
             for i in range(count)]
    return collate(pairs, handle.tokenizer.pad_token_id, handle.device, left=True)


def _losses_and_grads(handle, batch, monkeypatch=None, plain=False):
    if plain:
        monkeypatch.setattr(encoding, "head_path", lambda model: None)
    handle.model.zero_grad(set_to_none=True)
    token_loss, is_target = target_token_losses(handle.model, batch)
    (token_loss.sum() / is_target.sum()).backward()
    grads = {k: p.grad.float().clone() for k, p in handle.lora_params.items()}
    if plain:
        monkeypatch.undo()
    return token_loss.detach(), is_target, grads


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def handle(request, tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype=request.param),
                        LoraConfig(rank=4, alpha=8, dropout=0.0), seed=0)
    torch.manual_seed(1)  # B non-zero, so every LoRA tensor gets a gradient
    handle.set_adapter({k: v + 0.1 * torch.randn_like(v) for k, v in handle.fresh_adapter(0).items()})
    handle.model.train()
    return handle


@pytest.mark.parametrize("chunk", [head_loss.CHUNK_ELEMENTS, 3 * 49152 + 5])  # one chunk; many, uneven
def test_losses_and_gradients_match_the_plain_path(handle, monkeypatch, chunk):
    assert head_loss.head_path(handle.model) is not None, "a Llama-style model should take the chunked path"
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", chunk)
    batch = _batch(handle)
    ours, ours_mask, ours_grads = _losses_and_grads(handle, batch)
    want, want_mask, want_grads = _losses_and_grads(handle, batch, monkeypatch, plain=True)
    exact = handle.model.dtype == torch.float32
    tol = {"rtol": 1e-5, "atol": 1e-6} if exact else {"rtol": 0.02, "atol": 0.02}
    assert torch.equal(ours_mask, want_mask) and int(ours_mask.sum()) > 10
    torch.testing.assert_close(ours, want, **tol)
    assert torch.all(ours[~ours_mask] == 0)
    for key, grad in want_grads.items():
        assert grad.abs().sum() > 0, key
        torch.testing.assert_close(ours_grads[key], grad, rtol=1e-4 if exact else 0.1,
                                   atol=1e-6 if exact else 0.1 * float(grad.abs().max()))


def test_per_example_gradients_and_inference_agree(handle, monkeypatch):
    """DP-SGD's `autograd.grad` of one example's loss, and scoring's loss without gradients."""
    batch = {k: v[:1] for k, v in _batch(handle).items()}
    params = list(handle.lora_params.values())

    def one_example():
        token_loss, is_target = target_token_losses(handle.model, batch)
        return torch.autograd.grad(token_loss.sum() / is_target.sum(), params)

    ours = one_example()
    with torch.no_grad():
        ours_scored, _ = target_token_losses(handle.model, batch)
    monkeypatch.setattr(encoding, "head_path", lambda model: None)
    want = one_example()
    with torch.no_grad():
        want_scored, _ = target_token_losses(handle.model, batch)
    tol = {"rtol": 1e-4, "atol": 1e-6} if handle.model.dtype == torch.float32 else {"rtol": 0.1, "atol": 0.05}
    for a, b in zip(ours, want):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    torch.testing.assert_close(ours_scored, want_scored, **tol)


def test_a_model_whose_logits_are_not_the_heads_output_keeps_the_plain_path(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), LoraConfig(rank=4, alpha=8), seed=0)
    base = handle.model.get_base_model()
    base.register_forward_hook(lambda module, args, out: out.__setitem__("logits", out.logits * 0.5) or out)
    assert head_loss.head_path(handle.model) is None
    on_the_head = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"),
                             LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "lm_head"]), seed=0)
    assert head_loss.head_path(on_the_head.model) is None  # a LoRA on the head: not a frozen nn.Linear


def test_the_probe_leaves_train_mode_and_the_random_stream_as_they_were(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), LoraConfig(rank=4, alpha=8), seed=0)
    handle.model.train()
    modes = [m.training for m in handle.model.modules()]
    torch.manual_seed(7)
    assert head_loss.head_path(handle.model) is not None
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))
    assert [m.training for m in handle.model.modules()] == modes
