from __future__ import annotations

import pytest

from fedpit import config as config_mod
from fedpit.errors import ConfigError


def test_defaults_follow_the_method_doc():
    cfg = config_mod.load(None)
    assert cfg.lora.rank == 16 and cfg.lora.alpha == 32 and cfg.lora.dropout == 0.05
    assert cfg.train.batch_size == 8 and cfg.train.epochs == 1 and cfg.train.schedule == "cosine"
    assert cfg.synth.num_instruction_demos == 8 and cfg.synth.rouge_threshold == 0.7 and cfg.synth.max_redraws == 3
    assert cfg.synth.num_candidates == 32 and cfg.synth.decoding == "greedy"
    assert cfg.data.partition.alpha == 1.0
    assert cfg.method.name == "fedpit"


def test_toml_and_overrides_round_trip(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('seed = 3\n[federation]\nrounds = 4\n[method]\nname = "fedpit"\nbeta = 0.25\n')
    cfg = config_mod.load(file, ["federation.rounds=7", "lora.target_modules=['q_proj']", "name=demo run"])
    assert cfg.seed == 3 and cfg.federation.rounds == 7 and cfg.lora.target_modules == ["q_proj"]
    assert cfg.name == "demo run" and cfg.method.options == {"beta": 0.25}
    dumped = tmp_path / "dump.toml"
    dumped.write_text(config_mod.dumps(cfg))
    assert config_mod.load(dumped) == cfg


def test_int_is_accepted_for_float():
    assert config_mod.load(None, ["train.learning_rate=1"]).train.learning_rate == 1.0


@pytest.mark.parametrize("override, message", [
    ("federation.roundz=3", "unknown config key 'federation.roundz'; did you mean 'rounds'"),
    ("federation.rounds='three'", "'federation.rounds' must be int"),
    ("federation.rounds=0", "'federation.rounds' must be > 0"),
    ("train.batch_size=2.5", "'train.batch_size' must be int"),
    ("model.dtype='int3'", "choose one of: bf16"),
    ("lora.dropout=1.5", "within \\[0, 1\\]"),
    ("eval.sets=['imagenet']", "unknown set 'imagenet'"),
    ("data.source='file'", "data.file is empty"),
    ("federation", "must look like key=value"),
    ("federation.rounds.x=1", "'federation.rounds' must be int"),
])
def test_bad_config_gives_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        config_mod.load(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config_mod.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_mod.load(bad)


def test_shipped_configs_are_valid():
    from pathlib import Path

    from fedpit.methods import build_method

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("**/*.toml"))
    assert files
    for file in files:
        build_method(config_mod.load(file))


def test_per_method_tables(tmp_path):
    from fedpit.methods import build_method

    file = tmp_path / "c.toml"
    file.write_text('[method]\nname = "fedavg"\n[method.fedpit]\nbeta = 0.2\nkeep = 3\n')
    cfg = config_mod.load(file)
    assert build_method(cfg).name == "fedavg"
    fedpit = build_method(config_mod.load(file, ["method.name='fedpit'"]))
    assert fedpit.options.beta == 0.2 and fedpit.options.keep == 3
    # a flat key applies to the chosen method and wins over its table
    assert build_method(config_mod.load(file, ["method.name='fedpit'", "method.beta=0.9"])).options.beta == 0.9
    dumped = tmp_path / "dump.toml"
    dumped.write_text(config_mod.dumps(cfg))
    assert config_mod.load(dumped) == cfg
    file.write_text('[method]\nname = "fedpit"\n[method.fedmagic]\nx = 1\n')
    with pytest.raises(ConfigError, match="unknown method 'fedmagic'"):
        build_method(config_mod.load(file))
