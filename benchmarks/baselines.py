"""What the benchmarks measure fedpit against, shared by `bench.py` (CPU) and `gpu_check.py` (GPU).

Only torch, transformers, peft and fedpit's model/engine layers are imported, so `gpu_check.py` runs
on a machine that has none of fedpit's data or Flower dependencies.
"""

from __future__ import annotations

import time

import torch

from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines.encoding import EncodedPair, collate
from fedpit.model import quantization_kwargs, resolve_dtype, resolve_model_path
from fedpit.types import AdapterState


def timed(fn):
    """(seconds, result) of `fn()`, waiting for queued GPU work on both sides."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def count_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def plain_peft_model(model_config: ModelConfig, lora_config: LoraConfig, device: torch.device) -> torch.nn.Module:
    """The same base and LoRA settings through `get_peft_model` with peft's defaults (adapter weights
    upcast to fp32), as a plain training script would have them."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(model_config.dtype, device)
    quantized = quantization_kwargs(model_config.quantization, device, dtype)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_config.name, model_config.cache_dir),
                                                dtype=dtype, **quantized)
    lora = PeftLoraConfig(r=lora_config.rank, lora_alpha=lora_config.alpha, lora_dropout=lora_config.dropout,
                          target_modules=list(lora_config.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    return model if quantized else model.to(device)


def plain_training_loop(model: torch.nn.Module, start: AdapterState, encoded: list[EncodedPair], pad_id: int,
                        batch_size: int = 8, learning_rate: float = 1e-4) -> None:
    """The textbook loop: batches in order, right padding, `model(**batch).loss`, AdamW; from `start`."""
    device = next(model.parameters()).device
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(start[name.replace(".default.", ".")])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    model.train()
    for first in range(0, len(encoded), batch_size):
        model(**collate(encoded[first : first + batch_size], pad_id, device)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def opacus_per_sample_gradients(model: torch.nn.Module, params: list[torch.nn.Parameter],
                                batches: list[list[EncodedPair]], pad_id: int) -> None:
    """DP-SGD's expensive part the Opacus way: per-sample gradients of every LoRA weight from its hooks
    (`GradSampleHooks`, one padded backward per batch), their norms and the clipped sum."""
    from opacus.grad_sample import GradSampleHooks

    from fedpit.engines.encoding import target_token_losses

    device = next(model.parameters()).device
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=False)
    model.train()
    try:
        for pairs in batches:
            if not pairs:
                continue
            token_loss, is_target = target_token_losses(model, collate(pairs, pad_id, device, left=True))
            (token_loss.sum(1) / is_target.sum(1).clamp(min=1)).sum().backward()
            samples = [p.grad_sample.float().flatten(1) for p in params]
            norms = torch.sqrt(sum((s * s).sum(1) for s in samples))
            factor = (1.0 / (norms + 1e-12)).clamp(max=1.0)
            _ = [(s * factor[:, None]).sum(0) for s in samples]
            for p in params:
                p.grad_sample, p.grad = None, None
    finally:
        hooks.remove_hooks()
        model.eval()
