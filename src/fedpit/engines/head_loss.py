"""Target-token cross-entropy computed from the LM head's input, a few rows at a time.

The largest tensors of a training step are the LM head's logits over the vocabulary (49k for
SmolLM2), their fp32 copy for the softmax, its output and the gradients of each: about 0.7 GB for
a batch of 8 SmolLM2 examples, all allocated anew every step. The C allocator does not reliably
reuse blocks that large (`fedpit.memory`); when a step page-faults them in again it pays for it (in
one torch profile, a third of a second per copy of the logits).

Here no [tokens, vocabulary] tensor is ever whole. The gradient of a token's cross-entropy with
respect to its logits is softmax − one-hot, whatever is done with the loss afterwards (a caller
only weighs each token's loss), so the forward pass, chunk by chunk, computes the loss and, when a
gradient will be wanted, the gradient with respect to the head's input ([tokens, hidden]: small);
the backward pass only weighs it. These are the matmuls autograd would run (the head's forward and
its input gradient), with nothing recomputed, and the head runs on target tokens only, not on every
position after the batch's first target.

It applies where the model's logits are its LM head applied to the decoder's output, as they are
(checked once per model on a probe) and the head is a frozen bias-free `nn.Linear`: a model that
scales or caps its logits, or a LoRA on the head, keeps transformers' path (`encoding.py`).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from fedpit.packed import PackedLinear

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in fp32): ~340 SmolLM2 tokens, where the matmuls run at full rate
_PROBE_IDS = [[1, 2, 3, 4, 5]]
_probed: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


class HeadCrossEntropy(torch.autograd.Function):
    """losses[i] = cross-entropy of softmax(head(hidden[i])) at targets[i], head(x) = x @ weightᵀ; the weight gets
    no gradient. The logits come from `head` itself: inside an inference block that is the `PackedLinear` whose
    weight oneDNN reordered once for the block, where `F.linear` on the weight would reorder the whole vocabulary's
    weight on every chunk (the same numbers: packed.py)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                head: nn.Module) -> torch.Tensor:
        losses = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        wants_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if wants_grad else None
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, len(targets), rows):
            part = slice(start, start + rows)
            target = targets[part, None]
            logits = head(hidden[part])  # in the model's dtype, as the model does
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            losses[part] = -log_probs.gather(1, target).squeeze(1)
            if wants_grad:
                probs = log_probs.exp_()
                probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                grad_hidden[part] = probs.to(hidden.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None
        return (grad_hidden.float() * grad_losses[:, None]).to(grad_hidden.dtype), None, None, None


def head_path(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, head) when the model's logits are `head(decoder(...).last_hidden_state)`, a frozen bias-free
    linear head, exactly; None otherwise (then the caller asks the model for logits)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    # inside `ModelHandle.inference()` a bf16 CPU head is a PackedLinear, computing exactly what its weight does
    if type(head) not in (nn.Linear, PackedLinear) or head.bias is not None or head.weight.requires_grad:
        return None
    decoder = base.get_decoder()
    if decoder is base:
        return None
    if base not in _probed:
        _probed[base] = _logits_are_the_heads(base, decoder, head)
    return (decoder, head) if _probed[base] else None


def _logits_are_the_heads(base: nn.Module, decoder: nn.Module, head: nn.Linear) -> bool:
    """Run a few tokens both ways in eval mode (no dropout, no random draw) and compare."""
    modes = {module: module.training for module in base.modules()}
    ids = torch.tensor(_PROBE_IDS, device=head.weight.device) % head.weight.shape[0]
    try:
        base.eval()
        with torch.no_grad():
            want = base(input_ids=ids, use_cache=False).logits.float()
            got = head(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
    finally:
        for module, training in modes.items():
            module.training = training
    return want.shape == got.shape and torch.allclose(want, got, rtol=1e-3, atol=1e-3)
