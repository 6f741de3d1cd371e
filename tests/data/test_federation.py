"""Building a federation from a config on real data: held-out sets never overlap training."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fedpit import config as config_mod
from fedpit.data.federation import build_federation, text_key
from fedpit.errors import DataError

SMALL = ["data.fewshot.total=60", "data.fewshot.num_clusters=6", "data.fewshot.pool_size=600",
         "data.fewshot.embedder='tfidf'", "data.partition.num_clients=3", "data.partition.min_examples=2",
         "eval.num_examples=40", "data.max_response_tokens=64"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


def test_held_out_sets_never_overlap_training(tokenizer, data_dir):
    cfg = config_mod.load(None, [*SMALL, f"data.dir='{data_dir}'", "eval.sets=['medquad','medinstruct']"])
    federation = build_federation(cfg, tokenizer)
    train = [e for examples in federation.clients.values() for e in examples]
    assert len(train) == 60 and len(federation.eval_sets["medquad"]) == 40
    train_ids = {e.id for e in train}
    train_keys = {text_key(e.instruction) for e in train} | {text_key(e.output) for e in train}
    for examples in federation.eval_sets.values():
        for example in examples:
            assert example.id not in train_ids
            assert text_key(example.instruction) not in train_keys
    # answers are truncated to the token budget, as training sees them
    assert all(len(tokenizer(e.output, add_special_tokens=False)["input_ids"]) <= 66 for e in train)


def test_federation_is_deterministic_and_seeded(tokenizer, data_dir):
    overrides = [*SMALL, f"data.dir='{data_dir}'", "eval.sets=[]"]
    first = build_federation(config_mod.load(None, overrides), tokenizer)
    again = build_federation(config_mod.load(None, overrides), tokenizer)
    other = build_federation(config_mod.load(None, [*overrides, "seed=7"]), tokenizer)
    ids = lambda f: {c: [e.id for e in ex] for c, ex in f.clients.items()}  # noqa: E731
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)


def test_natural_split_by_source_gives_one_client_per_institution(tokenizer, data_dir):
    cfg = config_mod.load(None, [*SMALL, f"data.dir='{data_dir}'", "eval.sets=[]", "data.fewshot.total=200",
                                 "data.fewshot.pool_size=3000", "data.partition.kind='natural'",
                                 "data.partition.by='source'", "data.partition.min_examples=1"])
    federation = build_federation(cfg, tokenizer)
    sources = {e.meta["source"] for examples in federation.clients.values() for e in examples}
    assert len(federation.clients) == len(sources) >= 5
    for examples in federation.clients.values():
        assert len({e.meta["source"] for e in examples}) == 1


def test_client_below_minimum_is_a_clear_error(tokenizer, data_dir):
    cfg = config_mod.load(None, [*SMALL, f"data.dir='{data_dir}'", "eval.sets=[]", "data.partition.kind='natural'",
                                 "data.partition.by='source'", "data.partition.min_examples=30"])
    with pytest.raises(DataError, match="fewer than .*30"):
        build_federation(cfg, tokenizer)


def test_missing_data_folder_names_where_it_looked(tokenizer, tmp_path):
    cfg = config_mod.load(None, [*SMALL, f"data.dir='{tmp_path / 'nowhere'}'"])
    with pytest.raises(DataError, match="nowhere"):
        build_federation(cfg, tokenizer)


def test_public_pool_is_nobodys_data(tokenizer, data_dir, tmp_path, write_instruction_file):
    """Public demonstrations come from pairs no client holds and no evaluation or membership set uses;
    a public file replaces them; a deployed client with only its own file must name one."""
    from fedpit.data.federation import public_pool

    overrides = [*SMALL, f"data.dir='{data_dir}'", "eval.sets=['medquad']", "data.holdout_size=30",
                 "synth.demonstrations='public'", "synth.public_size=50"]
    federation = build_federation(config_mod.load(None, overrides), tokenizer)
    assert len(federation.public) == 50
    public_ids = {e.id for e in federation.public}
    others = [*(e for c in federation.clients.values() for e in c), *federation.holdout,
              *(e for s in federation.eval_sets.values() for e in s)]
    assert not public_ids & {e.id for e in others}
    assert not {text_key(e.instruction) for e in federation.public} & {text_key(e.instruction) for e in others}
    assert "public" in federation.summary()
    plain = build_federation(config_mod.load(None, [*SMALL, f"data.dir='{data_dir}'", "eval.sets=['medquad']",
                                                    "data.holdout_size=30"]), tokenizer)
    assert plain.public == [] and plain.clients == federation.clients, "the pool takes nothing from the clients"

    file = write_instruction_file(tmp_path / "public.jsonl", 5, prefix="Public: ")
    config = config_mod.load(None, [*overrides, f"synth.public_file='{file}'"])
    from_file = public_pool(config, tokenizer, None, None)
    assert len(from_file) == 5 and all(e.id.startswith("public/") and e.instruction.startswith("Public: ")
                                       for e in from_file)
    with pytest.raises(DataError, match="needs a public pool it can read"):
        public_pool(config_mod.load(None, overrides), tokenizer, None, None)
    with pytest.raises(DataError, match="fewer than synth.num_response_demos"):
        public_pool(config_mod.load(None, [*overrides, "synth.public_size=2"]), tokenizer, None, federation.public)
