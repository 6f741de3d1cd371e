"""bf16 linear layers on oneDNN-packed weights (packed.py): bitwise what `F.linear` gives, swapped in only
inside `ModelHandle.inference()` on bf16 CPU models, put back on leaving it (also after an error), and
left out wherever the probe finds the private operators missing or wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from fedpit import packed
from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines.generation import DecodingOptions, generate
from fedpit.engines.head_loss import head_path
from fedpit.model import load_model
from fedpit.packed import PackedLinear, pack_linears, packing_available, unpack

BF16 = torch.bfloat16


def left_alone_here(*linears: torch.nn.Linear) -> bool:
    """oneDNN computes bf16 only on CPUs with AVX512BW or AMX. Where the probe says no (and
    test_probe_matches_what_onednn_supports checks that it says so exactly there), fedpit's contract is
    that nothing is packed: assert that, and tell the caller there is no packed product to test."""
    if packing_available():
        return False
    assert pack_linears(torch.nn.Sequential(*linears)) == []
    return True


@pytest.fixture
def fresh_probe(monkeypatch):
    monkeypatch.setattr(packed, "_available", None)


def test_probe_matches_what_onednn_supports(fresh_probe):
    assert packing_available() == torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize("shape", [(1, 40), (7, 40), (3, 1, 40), (2, 33, 40)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_is_bitwise_plain_linear(shape, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 24, bias=bias).to(BF16).requires_grad_(False)
    if left_alone_here(linear):
        return
    layer = PackedLinear(linear)
    x = torch.randn(shape).to(BF16)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, linear.weight, linear.bias))
        assert torch.equal(layer(x.transpose(0, -1).contiguous().transpose(0, -1)), layer(x))  # strided input
    assert layer.weight is linear.weight and layer.bias is linear.bias  # still readable (tied embeddings)


def test_packed_linear_takes_gradients_and_other_dtypes_through_plain_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8, bias=False).to(BF16).requires_grad_(False)
    if left_alone_here(linear):
        return
    layer = PackedLinear(linear)
    x = torch.randn(4, 16).to(BF16).requires_grad_(True)
    layer(x).float().sum().backward()
    expected = torch.ones(4, 8).to(BF16) @ linear.weight
    torch.testing.assert_close(x.grad, expected)
    x32 = torch.randn(4, 16)
    assert torch.equal(layer(x32.to(BF16)), F.linear(x32.to(BF16), linear.weight))
    with pytest.raises(RuntimeError):  # an fp32 input is F.linear's to refuse, as it would be unpacked
        layer(x32)


@pytest.mark.parametrize("fault", ["raises", "disagrees"])
def test_probe_refuses_operators_that_fail_or_disagree(monkeypatch, fresh_probe, fault):
    real = packed.packed_linear

    def broken(x, weight, bias):
        if fault == "raises":
            raise RuntimeError("no such kernel")
        out = real(x, weight, bias)
        return out + out.abs().max() * 2**-6  # off by an ulp or so
    monkeypatch.setattr(packed, "packed_linear", broken)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8).to(BF16).requires_grad_(False))
    assert not packing_available()
    assert pack_linears(model) == [] and type(model[0]) is torch.nn.Linear


def test_only_frozen_bf16_linear_layers_are_packed(monkeypatch):
    monkeypatch.setattr(packed, "_available", True)
    monkeypatch.setattr(packed, "pack_weight", lambda weight: weight)  # which layers, not how: any machine
    model = torch.nn.ModuleDict({
        "frozen": torch.nn.Linear(8, 8).to(BF16).requires_grad_(False),
        "trained": torch.nn.Linear(8, 8).to(BF16),
        "fp32": torch.nn.Linear(8, 8).requires_grad_(False),
        "nested": torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False).to(BF16).requires_grad_(False)),
    })
    originals = {name: model.get_submodule(name) for name in ("frozen", "trained", "fp32", "nested.0")}
    swapped = pack_linears(model)
    assert [type(model.get_submodule(n)).__name__ for n in originals] == \
        ["PackedLinear", "Linear", "Linear", "PackedLinear"]
    unpack(swapped)
    assert all(model.get_submodule(n) is layer for n, layer in originals.items())


def _trained_looking(handle):
    generator = torch.Generator().manual_seed(1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in handle.fresh_adapter(0).items()}


def _logits(handle, ids):
    with handle.inference():
        return handle.model(input_ids=ids).logits


def test_inference_packs_bf16_layers_with_the_same_logits_and_puts_them_back(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="bf16"), LoraConfig(rank=4, alpha=8))
    handle.set_adapter(_trained_looking(handle))
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    lora_layers = sum(isinstance(m, LoraLayer) for m in handle.model.modules())
    with handle.inference():
        packed_layers = [m for m in handle.model.modules() if isinstance(m, PackedLinear)]
        with handle.inference():  # re-entrant: nothing is packed twice
            assert sum(isinstance(m, PackedLinear) for m in handle.model.modules()) == len(packed_layers)
        path = head_path(handle.model)
        assert path is not None  # scoring keeps the chunked LM-head loss, on the packed head
        assert isinstance(path[1], PackedLinear) == packing_available()
    # every merged projection and the LM head; none where this CPU has no oneDNN bf16
    assert len(packed_layers) == (lora_layers + 1 if packing_available() else 0)
    assert not any(isinstance(m, PackedLinear) for m in handle.model.modules())
    assert sum(isinstance(m, LoraLayer) for m in handle.model.modules()) == lora_layers
    for merged in (True, False):  # unmerged, the LoRA layers' frozen base layers are packed
        handle.merge_for_inference = merged
        with handle.inference():
            assert sum(isinstance(m, PackedLinear) for m in handle.model.modules()) == len(packed_layers)
        with_packing = _logits(handle, ids)
        handle.pack_for_inference = False
        without = _logits(handle, ids)
        assert torch.equal(with_packing, without)
        handle.pack_for_inference = True
    handle.merge_for_inference = True
    prompts = ["one", "two words here", "a longer prompt than the others, with commas"]
    options = DecodingOptions(max_new_tokens=12, repetition_penalty=1.2)
    generated = generate(handle, prompts, options, batch_size=2)
    handle.pack_for_inference = False
    assert generate(handle, prompts, options, batch_size=2) == generated


def test_an_error_inside_inference_still_unpacks(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="bf16"), LoraConfig(rank=4, alpha=8))
    with pytest.raises(ValueError, match="inside"), handle.inference():
        assert any(isinstance(m, PackedLinear) for m in handle.model.modules()) == packing_available()
        raise ValueError("inside")
    assert not any(isinstance(m, PackedLinear) for m in handle.model.modules())
    with handle.inference():  # and the next block packs again
        assert any(isinstance(m, PackedLinear) for m in handle.model.modules()) == packing_available()


def test_fp32_models_are_not_packed(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), LoraConfig(rank=4, alpha=8))
    with handle.inference():
        assert not any(isinstance(m, PackedLinear) for m in handle.model.modules())
