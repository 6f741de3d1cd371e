"""A bf16 model's norms and MLP activations on the C kernels inside an inference block (native_layers.py):
each swapped module computes what transformers' does (within a bf16 rounding step), the whole forward stays
close to torch's, the decode step still finds what it reads, and the block ends with the model's own modules."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from fedpit.config import LoraConfig, ModelConfig
from fedpit.model import load_model
from fedpit.native_layers import NativeGatedMLP, NativeRMSNorm, swap_native_layers

BF16 = torch.bfloat16


def _close_in_bf16(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Within one bf16 step everywhere (an fp32 bit of a mean or an exponential can tip a rounding), equal in
    nearly all elements."""
    ours, theirs = ours.float(), theirs.float()
    assert bool(((ours - theirs).abs() <= theirs.abs().clamp(min=1e-30) * 2.0**-7).all())
    assert float((ours == theirs).float().mean()) >= 0.97


def test_the_native_norm_and_mlp_compute_transformers_layers(kernels):
    generator = torch.Generator().manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, hidden_act="silu", rms_norm_eps=1e-5)
    norm, mlp = LlamaRMSNorm(64, eps=1e-5).to(BF16), LlamaMLP(config).to(BF16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=generator) + 1)
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    x = (torch.randn(3, 50, 64, generator=generator) * 3).to(BF16)
    with torch.no_grad():
        _close_in_bf16(NativeRMSNorm(norm, kernels)(x), norm(x))
        _close_in_bf16(NativeGatedMLP(mlp, kernels)(x), mlp(x))
        # not bf16: the original module's own computation, exactly
        assert torch.equal(NativeRMSNorm(norm.float(), kernels)(x.float()), norm.float()(x.float()))
        assert torch.equal(NativeGatedMLP(mlp.float(), kernels)(x.float()), mlp.float()(x.float()))


def test_an_inference_block_swaps_them_in_and_back(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="bf16"), LoraConfig(rank=4, alpha=8), seed=0)
    inner = handle.model.get_base_model().model
    originals = [inner.norm] + [m for layer in inner.layers for m in (layer.input_layernorm, layer.mlp)]
    ids = torch.randint(5, 1000, (2, 90), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    logits = {}
    for native in (False, True):
        handle.native_decode = native
        with handle.inference():
            layer = inner.layers[0]
            assert isinstance(layer.mlp, NativeGatedMLP) == native and isinstance(inner.norm, NativeRMSNorm) == native
            logits[native] = handle.model(input_ids=ids, attention_mask=mask).logits.float()
            if native:  # the decode step reads the swapped modules' attributes
                assert handle.decode_step() is not None
    assert [inner.norm] + [m for layer in inner.layers for m in (layer.input_layernorm, layer.mlp)] == originals
    real = mask.bool()
    torch.testing.assert_close(logits[True][real], logits[False][real], atol=0.05, rtol=0.05)


def test_other_architectures_are_left_alone(kernels):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.config = LlamaConfig(hidden_act="gelu")
    assert swap_native_layers(model, kernels) == []
