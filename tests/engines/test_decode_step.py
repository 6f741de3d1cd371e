"""The one-token decode step outside transformers' forward (decode_step.py): bitwise the model's logits and
cache for left-padded batches on Llama, Mistral and Qwen2 layouts; with the C decode kernels, close to them;
used by the decode loop only inside `ModelHandle.inference()` with packed weights; rebuilt with each block's
merged weights; and left out for every model, dtype or machine it does not mirror exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fedpit.config import LoraConfig, ModelConfig
from fedpit.decode_step import DecodeStep, unsupported_reason
from fedpit.engines.generation import DecodingOptions, generate
from fedpit.engines.kvcache import preallocated_cache
from fedpit.model import cache_root, load_model
from fedpit.native.kernels import DecodeKernels
from fedpit.native.kernels import load as load_kernels
from fedpit.packed import pack_linears, packed_linear, packing_available, unpack

BF16 = torch.bfloat16
SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
LAYOUTS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SIZES, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SIZES)),  # q, k and v with biases
}


def _packed_model(layout: str):
    torch.manual_seed(0)
    model = LAYOUTS[layout]().to(BF16).eval().requires_grad_(False)
    model.set_attn_implementation("sdpa")
    if layout == "qwen2":
        with torch.no_grad():  # biases start at zero: make them count
            for layer in model.model.layers:
                for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    projection.bias.normal_(0, 0.5)
    return model, pack_linears(model)


def _prefilled(model, ids, mask):
    cache = preallocated_cache(model.config, ids.shape[1] + 8)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True).logits[:, -1]
    return cache, logits, positions[:, -1] + 1


def _batch(rows: int, width: int, padded: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (rows, width), generator=generator)
    mask = torch.ones(rows, width, dtype=torch.long)
    if padded:
        for row in range(1, rows, 2):
            mask[row, : 2 + row] = 0
    return ids, mask


def _steps(model, step, ids, mask, count: int = 4):
    """`count` greedy steps through the model's forward and through `step`, each from its own prefill."""
    theirs, (cache, logits, position) = [], _prefilled(model, ids, mask)
    ours, (our_cache, our_logits, our_position) = [], _prefilled(model, ids, mask)
    their_mask = our_mask = mask
    for _ in range(count):
        token = logits.argmax(-1)
        their_mask = torch.cat([their_mask, their_mask.new_ones(len(token), 1)], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=their_mask, position_ids=position[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]
        theirs.append(logits)
        our_mask = torch.cat([our_mask, our_mask.new_ones(len(token), 1)], dim=1)
        our_logits = step(token, our_mask, our_position, our_cache)
        ours.append(our_logits)
        position, our_position = position + 1, our_position + 1
    return theirs, ours, cache, our_cache


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_step_is_bitwise_the_forward_on_padded_batches(layout):
    model, swapped = _packed_model(layout)
    step = DecodeStep.build(model)
    if not packing_available():  # no oneDNN bf16 here: nothing is packed, and the step is never built
        assert swapped == [] and step is None
        return
    assert isinstance(step, DecodeStep), f"refused: {unsupported_reason(model)}"
    with torch.inference_mode():
        theirs, ours, cache, our_cache = _steps(model, step, *_batch(5, 11, padded=True))
    for their_logits, our_logits in zip(theirs, ours, strict=True):
        assert torch.equal(our_logits, their_logits)
    for layer, our_layer in zip(cache.layers, our_cache.layers, strict=True):  # the same keys and values written
        assert torch.equal(layer.keys, our_layer.keys) and torch.equal(layer.values, our_layer.values)
    # equal logits would prove nothing if the step only called the forward: it must not enter it
    entered = []
    hooks = [m.register_forward_pre_hook(lambda *_: entered.append(1)) for m in (model.model, *model.model.layers)]
    with torch.inference_mode():
        length = our_cache.get_seq_length()
        step(torch.tensor([5, 6, 7, 8, 9]), torch.ones(5, length + 1, dtype=torch.long), torch.full((5,), length),
             our_cache)
    for hook in hooks:
        hook.remove()
    assert entered == []
    unpack(swapped)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_with_the_c_kernels_it_stays_close_to_the_forward(layout, tmp_path, monkeypatch):
    """The kernels round differently from torch's operations and SDPA (native/kernels.py), so the step's logits
    are the forward's up to bf16 rounding, and every layer's attention, norms, rotary embedding and activation
    go through them."""
    kernels = load_kernels(tmp_path)
    assert kernels is not None, "the tests need a C compiler (gcc); fedpit without one keeps torch's operations"
    model, swapped = _packed_model(layout)
    step = DecodeStep.build(model, kernels)
    if step is None:  # no oneDNN bf16 here: nothing is packed, and the step is never built
        assert not packing_available()
        return
    assert step.native is kernels
    assert (step.product == kernels.linear) is kernels.linear_available  # AVX512-BF16: the C products too
    calls = {name: [] for name in ("attention", "add_rms_norm", "rotary", "silu_mul", "linear", "decode_layers")}
    for name, record in calls.items():
        real = getattr(DecodeKernels, name)
        monkeypatch.setattr(DecodeKernels, name,
                            lambda self, *args, real=real, record=record: record.append(1) or real(self, *args))
    step = DecodeStep.build(model, kernels)  # its product bound to the recording method
    with torch.inference_mode():
        theirs, ours, _, _ = _steps(model, step, *_batch(5, 11, padded=True))
    layers = model.config.num_hidden_layers
    if step.fused:  # four steps: each one call for all layers (in C, the calls below), the last norm, the LM head
        want = {"attention": 0, "rotary": 0, "silu_mul": 0, "add_rms_norm": 4, "linear": 4, "decode_layers": 4}
    else:
        products = 4 * (4 * layers + 1) if kernels.linear_available else 0  # q/k/v, o, gate/up, down; the LM head
        want = {"attention": 4 * layers, "rotary": 4 * layers, "silu_mul": 4 * layers, "decode_layers": 0,
                "add_rms_norm": 4 * (2 * layers + 1), "linear": products}
    assert step.fused is kernels.linear_available  # C products: every layer of a step in one call
    assert {name: len(record) for name, record in calls.items()} == want
    for their_logits, our_logits in zip(theirs, ours, strict=True):
        torch.testing.assert_close(our_logits.float(), their_logits.float(), atol=0.05, rtol=0.02)
    unpack(swapped)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_all_layers_in_one_c_call_are_bitwise_the_per_layer_loop(layout, tmp_path):
    """decode_layers.c runs the layers as `_native_step` does, and writes each layer's keys and values itself:
    the same logits and caches, bit for bit, over more steps than the caches had room for (they grow)."""
    kernels = load_kernels(tmp_path)
    assert kernels is not None, "the tests need a C compiler (gcc)"
    model, swapped = _packed_model(layout)
    fused, looped = DecodeStep.build(model, kernels), DecodeStep.build(model, kernels)
    if fused is None:
        assert not packing_available()
        return
    assert fused.fused is kernels.linear_available  # without C products (no AVX512-BF16) the loop stays in Python
    looped.fused = False
    with torch.inference_mode():
        _, ours, _, our_cache = _steps(model, fused, *_batch(5, 11, padded=True), count=12)
        _, theirs, _, their_cache = _steps(model, looped, *_batch(5, 11, padded=True), count=12)
    assert our_cache.get_seq_length() == 11 + 12 > 11 + 8  # past the room `_prefilled` made
    for our_logits, their_logits in zip(ours, theirs, strict=True):
        assert torch.equal(our_logits, their_logits)
    for layer, their_layer in zip(our_cache.layers, their_cache.layers, strict=True):
        assert torch.equal(layer.keys, their_layer.keys) and torch.equal(layer.values, their_layer.values)
    unpack(swapped)


def test_with_the_c_kernels_but_no_c_products_it_keeps_onednns(tmp_path, monkeypatch):
    """On a CPU without AVX512-BF16 the kernels build without their linear layer: the step then multiplies with
    oneDNN's packed weights (the model's own for o, down and the head) and stays close to the forward."""
    kernels = load_kernels(tmp_path)
    assert kernels is not None, "the tests need a C compiler (gcc)"
    model, swapped = _packed_model("qwen2")
    monkeypatch.setattr(kernels, "linear_available", False)
    step = DecodeStep.build(model, kernels)
    if step is None:
        assert not packing_available()
        return
    assert step.native is kernels and step.product is packed_linear
    assert step.layers[0].o is model.model.layers[0].self_attn.o_proj.packed and step.head is model.lm_head.packed
    with torch.inference_mode():
        theirs, ours, _, _ = _steps(model, step, *_batch(5, 11, padded=True))
    for their_logits, our_logits in zip(theirs, ours, strict=True):
        torch.testing.assert_close(our_logits.float(), their_logits.float(), atol=0.05, rtol=0.02)
    unpack(swapped)


def test_an_activation_the_kernels_lack_keeps_torchs_operations(tmp_path):
    """A Llama layout with GELU gating: the C kernels compute SiLU only, so the step keeps torch's operations
    (and with them bitwise the forward's logits) rather than computing another model."""
    kernels = load_kernels(tmp_path)
    assert kernels is not None, "the tests need a C compiler (gcc)"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES, hidden_act="gelu")).to(BF16).eval().requires_grad_(False)
    model.set_attn_implementation("sdpa")
    swapped = pack_linears(model)
    step = DecodeStep.build(model, kernels)
    if step is None:
        assert not packing_available()
        return
    assert step.native is None
    with torch.inference_mode():
        theirs, ours, _, _ = _steps(model, step, *_batch(3, 9, padded=True), count=2)
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))
    unpack(swapped)


def test_unpadded_batches_differ_only_by_rounding():
    """With no padding at all transformers passes no mask and SDPA takes its grouped-query path (several times
    slower on a CPU); the step keeps the masked packed path, which rounds differently in bf16."""
    model, swapped = _packed_model("llama")
    step = DecodeStep.build(model)
    if step is None:
        assert not packing_available()
        return
    with torch.inference_mode():
        theirs, ours, _, _ = _steps(model, step, *_batch(4, 9, padded=False))
    for their_logits, our_logits in zip(theirs, ours, strict=True):
        torch.testing.assert_close(our_logits.float(), their_logits.float(), atol=0.05, rtol=0.02)
    unpack(swapped)


REFUSALS = {"unpacked": "not packed", "fp32": "not packed", "eager": "attention 'eager'",
            "sliding": "sliding-window", "architecture": "architecture", "head_norms": "decoder layer layout"}


@pytest.mark.parametrize("change", sorted(REFUSALS))
def test_models_it_does_not_mirror_keep_the_forward(change):
    model, swapped = _packed_model("mistral" if change == "sliding" else "llama")
    if change == "unpacked":
        unpack(swapped)
    elif change == "fp32":
        unpack(swapped)
        model = model.float()
        swapped = pack_linears(model)
        assert swapped == []
    elif change == "eager":
        model.set_attn_implementation("eager")
    elif change == "sliding":
        model.config.sliding_window = 64
    elif change == "architecture":
        model.config.model_type = "gpt_neox"
    else:
        model.model.layers[0].self_attn.q_norm = torch.nn.Identity()  # Qwen3/OLMo-style per-head norms
    assert DecodeStep.build(model) is None
    # refused for this change, not for another: without oneDNN bf16 every model but another architecture
    # is refused first for the missing packed weights
    expected = REFUSALS[change] if packing_available() or change == "architecture" else "no packed weights"
    assert expected in unsupported_reason(model)


def _trained_looking(handle, seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in handle.fresh_adapter(0).items()}


def test_handle_builds_it_per_inference_block_with_that_blocks_weights(tiny_model_dir):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="bf16"), LoraConfig(rank=4, alpha=8))
    handle.native_decode = False  # torch's operations and SDPA: bitwise the forward
    with pytest.raises(RuntimeError, match="outside ModelHandle.inference"):
        handle.decode_step()
    ids, mask = _batch(3, 10, padded=True)
    for seed in (1, 2):  # a new adapter: the next block's step has its merged weights, not the last block's
        handle.set_adapter(_trained_looking(handle, seed))
        with handle.inference():
            step = handle.decode_step()
            assert handle.decode_step() is step  # built once per block
            if not packing_available():
                assert step is None
                return
            base = handle.model.get_base_model()
            theirs, ours, _, _ = _steps(base, step, ids, mask, count=2)
            assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))
    handle.native_decode = True  # the default: the C kernels wherever they build
    with handle.inference():
        assert handle.decode_step().native is load_kernels(cache_root()) is not None
    handle.fast_decode_step = False
    with handle.inference():
        assert handle.decode_step() is None


def test_generation_uses_it_and_writes_the_same_text(tiny_model_dir, monkeypatch):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="bf16"), LoraConfig(rank=4, alpha=8))
    handle.native_decode = False  # torch's operations and SDPA: the same text as the forward
    handle.set_adapter(_trained_looking(handle, 1))
    calls = []
    real_call = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, *args: calls.append(1) or real_call(self, *args))
    prompts = ["one", "two words here", "a longer prompt than the others, with commas", "short again"]
    options = DecodingOptions(max_new_tokens=10, repetition_penalty=1.2)
    fast = generate(handle, prompts, options, batch_size=4)
    assert bool(calls) == packing_available()
    handle.fast_decode_step = False
    calls.clear()
    assert generate(handle, prompts, options, batch_size=4) == fast and not calls


def test_generation_calls_the_c_kernels_by_default(tiny_model_dir, monkeypatch):
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="bf16"), LoraConfig(rank=4, alpha=8))
    handle.set_adapter(_trained_looking(handle, 1))
    calls = []
    for name in ("attention", "decode_layers"):  # the step's layers one call at a time, or all in one
        real = getattr(DecodeKernels, name)
        monkeypatch.setattr(DecodeKernels, name, lambda self, *args, real=real: calls.append(1) or real(self, *args))
    prompts = ["one", "two words here", "a longer prompt than the others, with commas", "short again"]
    texts = generate(handle, prompts, DecodingOptions(max_new_tokens=10, repetition_penalty=1.2), batch_size=4)
    assert len(texts) == len(prompts) and all(isinstance(text, str) for text in texts)
    assert load_kernels(cache_root()) is not None, "the tests need a C compiler (gcc)"
    assert bool(calls) == packing_available()


def test_a_model_the_step_refuses_never_builds_the_c_kernels(tiny_model_dir, monkeypatch):
    """fp32 (or a GPU, or another architecture) keeps the forward: no compiler is asked for, no warning given."""
    import fedpit.native.kernels as native

    loads = []
    monkeypatch.setattr(native, "load", lambda cache: loads.append(cache))
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), LoraConfig(rank=4, alpha=8))
    with handle.inference():
        assert handle.decode_step() is None
    assert loads == []
