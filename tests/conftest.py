"""Shared fixtures: the real data folder, a tiny randomly initialised Llama model (seconds per
step) that uses SmolLM2's tokenizer, and small configs that run a whole federation quickly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDPIT_DATA_DIR", str(REPO.parent / "shared" / "data"))


PROCESS_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """`model.threads` sets torch's thread pool for the whole process. Without this, the first test (or
    module fixture) that loaded a model with `model.threads=1` left every later test, the SmolLM2 ones
    included, on one core. Restored to the process's own count, not the count at setup: a module-scoped
    fixture sets it before any function-scoped one runs."""
    yield
    if torch.get_num_threads() != PROCESS_THREADS:
        torch.set_num_threads(PROCESS_THREADS)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["FEDPIT_DATA_DIR"])
    assert path.is_dir(), f"real data not found at {path}; set FEDPIT_DATA_DIR"
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from fedpit.model import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sensitive_model_dir(tmp_path_factory, smollm2_path) -> Path:
    """A tiny model initialised at 15x the usual scale: its greedy text changes every token and turns
    on small differences in the logits (the default tiny model repeats one token whatever it is given),
    so a row that attends to a wrong position or gets a wrong position id changes its output."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sensitive-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def kernels(tmp_path_factory):
    """The C kernels of native/, built into a fresh cache (needs the C compiler fedpit itself can do without:
    it then keeps torch's operations, tests/native/test_build.py)."""
    from fedpit.native.build import build
    from fedpit.native.kernels import DecodeKernels

    return DecodeKernels(build(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def record_prefixes(monkeypatch):
    """`record_prefixes(module)` wraps the `prefix_cache` that `module` (an engine) calls and returns the list
    of the lengths it is asked to compute: where a shared beginning was computed once, and how long it was."""

    def record(module) -> list[int]:
        lengths: list[int] = []
        real = module.prefix_cache

        def spy(model, tokens, device):
            lengths.append(len(tokens))
            return real(model, tokens, device)

        monkeypatch.setattr(module, "prefix_cache", spy)
        return lengths

    return record


def _write_instruction_file(path: Path, count: int, prefix: str = "") -> Path:
    """Distinct medical-style pairs so ROUGE filters and partitions behave as on real data."""
    organs = ["heart", "lung", "liver", "kidney", "skin", "brain", "bone", "eye", "ear", "blood", "thyroid", "colon"]
    verbs = ["symptoms", "causes", "treatments", "tests", "risks", "outlook"]
    records = []
    for i in range(count):
        organ, verb = organs[i % len(organs)], verbs[(i // len(organs)) % len(verbs)]
        records.append({
            "instruction": f"{prefix}What are the {verb} of disease {i} of the {organ}?",
            "input": "",
            "output": f"Disease {i} of the {organ} has {verb} number {i * 7 % 13} and patient code {1000 + i}.",
            "qtype": verb,
        })
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def write_instruction_file():
    """The synthetic instruction-file writer, as a fixture: test modules in sub-folders cannot import
    the root conftest by name (each folder's conftest shadows it)."""
    return _write_instruction_file


@pytest.fixture
def tiny_overrides(tmp_path, tiny_model_dir) -> list[str]:
    """A whole FedPIT federation on the tiny model in seconds: 3 clients, 2 rounds, tiny budgets."""
    data = _write_instruction_file(tmp_path / "train.jsonl", 36)
    return [
        f"model.name='{tiny_model_dir}'", "model.dtype='fp32'", "model.max_length=96",
        f"model.cache_dir='{tmp_path / 'cache'}'",
        "lora.rank=4", "lora.alpha=8", "lora.target_modules=['q_proj','v_proj']",
        "data.source='file'", f"data.file='{data}'", "data.max_response_tokens=32",
        "data.fewshot.enabled=false", "data.fewshot.total=36",
        "data.partition.kind='iid'", "data.partition.num_clients=3", "data.partition.by='qtype'",
        "data.partition.min_examples=4",
        "federation.rounds=2", "train.batch_size=4", "train.learning_rate=0.01",
        "synth.num_candidates=4", "synth.max_instructions=8", "synth.batch_size=8",
        "synth.num_instruction_demos=4", "synth.num_response_demos=2",
        "synth.max_new_tokens_instruction=12", "synth.max_new_tokens_response=16",
        "synth.min_instruction_words=1", "synth.min_response_words=1",
        "synth.decoding='sample'", "synth.temperature=1.0", "synth.top_p=1.0",
        "method.fedpit.keep=2", "eval.sets=[]", "eval.final_sets=[]",
    ]


@pytest.fixture
def tiny_judge_server(tiny_model_dir):
    """A real OpenAI-compatible server on loopback (fedpit serve's engine) whose tiny random model
    writes random text: every verdict it gives is unparsable, which is what protocol tests need."""
    from fedpit.config import LoraConfig, ModelConfig
    from fedpit.model import load_model
    from fedpit.serving import ServedModel, make_server

    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"),
                        LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    state = handle.fresh_adapter(seed=0)
    torch.manual_seed(1)
    handle.set_adapter({k: v + torch.randn_like(v) for k, v in state.items()})
    served = ServedModel(handle=handle, template="chat", max_tokens_limit=8)
    with make_server(served, model_name="judge").running() as server:
        yield server
