"""Typed experiment configuration: TOML file -> `--set key=value` overrides -> validation -> dump.

Every number from the method doc is a default here, never a constant in code. Unknown keys and
wrong types are errors (with a "did you mean" hint), because a silently ignored typo in a
research config produces a wrong experiment that looks right.

Method options live in `[method]` beside `name`; they are checked against the chosen method's
own options dataclass by `fedpit.methods`, which keeps this module free of method imports.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedpit.errors import ConfigError

LLAMA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    dtype: str = "auto"
    max_length: int = 512
    threads: int = 0
    trust_remote_code: bool = False
    cache_dir: str = ""
    merge_for_inference: bool = True
    pack_for_inference: bool = True
    fast_decode_step: bool = True
    native_decode: bool = True
    quantization: str = "none"


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGET_MODULES))


@dataclass(frozen=True)
class PromptConfig:
    template: str = "alpaca"


@dataclass(frozen=True)
class FewShotConfig:
    enabled: bool = True
    total: int = 500
    num_clusters: int = 100
    pool_size: int = 4000
    embedder: str = "minilm"


@dataclass(frozen=True)
class PartitionConfig:
    kind: str = "dirichlet"
    num_clients: int = 10
    by: str = "cluster"
    alpha: float = 1.0
    min_examples: int = 8


@dataclass(frozen=True)
class DataConfig:
    dir: str = ""
    source: str = "medquad"
    file: str = ""
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    max_input_tokens: int = 256
    max_response_tokens: int = 256
    holdout_size: int = 100
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 10
    clients_per_round: int = 0
    min_replies: int = 0
    reply_timeout: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8
    learning_rate: float = 3e-4
    min_learning_rate: float = 0.0
    schedule: str = "cosine"
    epochs: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int = 0


@dataclass(frozen=True)
class SynthConfig:
    num_candidates: int = 32
    max_instructions: int = 128
    batch_size: int = 32
    num_instruction_demos: int = 8
    num_response_demos: int = 3
    max_redraws: int = 3
    rouge_threshold: float = 0.7
    min_instruction_words: int = 3
    min_response_words: int = 5
    max_new_tokens_instruction: int = 48
    max_new_tokens_response: int = 128
    decoding: str = "greedy"
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    max_repetition: float = 0.5
    demonstrations: str = "private"
    public_size: int = 200
    public_file: str = ""


@dataclass(frozen=True)
class MethodSection:
    """`[method]`: `name`, options for the chosen method as plain keys, and per-method tables
    (`[method.fedpit]`, `[method.fedprox]`) so one file can configure every method a comparison runs."""

    name: str = "fedpit"
    options: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)

    def options_for(self, method: str) -> dict[str, Any]:
        merged = dict(self.tables.get(method, {}))
        if method == self.name:
            merged.update(self.options)
        return merged


@dataclass(frozen=True)
class JudgeConfig:
    """`[eval.judge]`: a pairwise LLM judge behind an OpenAI-compatible endpoint (off while `endpoint`
    is empty). The key is read from the environment variable named by `api_key_env`, never stored."""

    endpoint: str = ""
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 4
    timeout: float = 60.0
    max_retries: int = 3
    max_tokens: int = 256
    template: str = "pairwise"


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1
    at_start: bool = True
    sets: list[str] = field(default_factory=lambda: ["medquad", "medinstruct"])
    num_examples: int = 50
    final_sets: list[str] = field(default_factory=lambda: ["medquad", "medinstruct", "pubmedqa"])
    final_num_examples: int = 0
    medquad_size: int = 300
    seed: int = 0
    max_new_tokens: int = 128
    batch_size: int = 16
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass(frozen=True)
class GaussianDPConfig:
    """What both kinds of DP share: a Gaussian mechanism whose noise is given (noise_multiplier) or
    calibrated to a target epsilon, its delta, and the Opacus accountant that composes it."""

    enabled: bool = False
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    accountant: str = "rdp"


@dataclass(frozen=True)
class DPConfig(GaussianDPConfig):
    """`[privacy.dp]`: record-level DP-SGD in every local training on private examples (Abadi et al.
    2016): per-example clipping to `max_grad_norm`, Gaussian noise of std noise_multiplier * max_grad_norm,
    Poisson sampling of batches; epsilon per client accumulated over rounds by an Opacus accountant."""

    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class ClientDPConfig(GaussianDPConfig):
    """`[privacy.client_dp]`: client-level DP (DP-FedAvg, McMahan et al. 2018) on the server: each
    client's update W_a,k - W_g clipped to `clip_norm`, the uniform mean of the clipped updates plus
    Gaussian noise of std noise_multiplier * clip_norm / (sampled clients)."""

    delta: float = 1e-3
    clip_norm: float = 0.1


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = False
    every: int = 1
    attacks: list[str] = field(default_factory=lambda: ["memorization", "membership", "canary"])
    targets: list[str] = field(default_factory=lambda: ["global", "uploads"])
    num_members: int = 100
    num_nonmembers: int = 100
    prefix_tokens: int = 32
    max_new_tokens: int = 64
    canary_clients: int = 1
    canaries_per_client: int = 1
    canary_repeats: int = 10
    canary_digits: int = 6
    canary_candidates: int = 1000
    save_uploads: bool = True
    dp: DPConfig = field(default_factory=DPConfig)
    client_dp: ClientDPConfig = field(default_factory=ClientDPConfig)


@dataclass(frozen=True)
class FlowerConfig:
    transport: str = "fp32"
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    wait_for_nodes: float = 120.0
    secure_aggregation: bool = False
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.67
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304


@dataclass(frozen=True)
class OutputConfig:
    save_synthetic: bool = True
    checkpoint_every: int = 1


@dataclass(frozen=True)
class Config:
    seed: int = 0
    name: str = "fedpit"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    method: MethodSection = field(default_factory=MethodSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("bf16", "fp32", "fp16", "auto"),
    "model.quantization": ("none", "8bit", "4bit"),
    "prompt.template": ("alpaca", "chat"),
    "data.source": ("medquad", "pubmedqa", "file"),
    "data.fewshot.embedder": ("minilm", "tfidf"),
    "data.partition.kind": ("iid", "dirichlet", "natural"),
    "train.schedule": ("cosine", "constant"),
    "synth.decoding": ("greedy", "sample"),
    "synth.demonstrations": ("private", "public"),
    "flower.transport": ("fp32", "bf16"),
    "privacy.dp.accountant": ("rdp", "prv"),
    "privacy.client_dp.accountant": ("rdp", "prv"),
}
EVAL_SETS = ("medquad", "medinstruct", "pubmedqa")
ATTACKS = ("memorization", "membership", "canary")
ATTACK_TARGETS = ("global", "uploads", "private")


# ---------------------------------------------------------------- building typed values


def build_dataclass(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build `cls` from a plain mapping, rejecting unknown keys and checking each value's type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        full = f"{where}.{key}" if where else key
        hint = difflib.get_close_matches(key, list(fields), n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"unknown config key '{full}'{suggestion}")
    kwargs = {}
    for name, value in data.items():
        full = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, full)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a table, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {hint!r} at {where}")
    raise ConfigError(f"config key '{where}' must be {hint.__name__}, got {value!r} ({type(value).__name__})")


# ---------------------------------------------------------------- loading, overrides, dumping


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value`; the value is read as a TOML value, or as a plain string if it is not one."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. federation.rounds=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a table")
            node = child
        node[path[-1]] = value
    return data


def _split_method(data: dict[str, Any]) -> dict[str, Any]:
    """`[method]` keeps its name and passes every other key on as the method's options."""
    method = data.get("method")
    if method is None:
        return data
    if not isinstance(method, dict):
        raise ConfigError("config key 'method' must be a table with at least 'name'")
    method = dict(method)
    name = method.pop("name", MethodSection.name)
    options = method.pop("options", {})
    tables = method.pop("tables", {})
    for key, value in method.items():
        (tables if isinstance(value, dict) else options)[key] = value
    return {**data, "method": {"name": name, "options": options, "tables": tables}}


def from_dict(data: dict[str, Any]) -> Config:
    config = build_dataclass(Config, _split_method(data))
    validate(config)
    return config


def loads(text: str) -> Config:
    """A config from TOML text (e.g. the resolved config a Flower server sends its clients)."""
    try:
        return from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config text is not valid TOML: {exc}") from None


def load(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; pass a TOML file such as configs/demo.toml")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file '{path}' is not valid TOML: {exc}") from None
    return from_dict(apply_overrides(data, list(overrides or [])))


def to_dict(config: Config) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    method = data.pop("method")
    data["method"] = {"name": method["name"], **method["options"], **method["tables"]}
    return data


def dumps(config: Config) -> str:
    return tomli_w.dumps(to_dict(config))


def replace(config: Config, **changes: Any) -> Config:
    """Copy `config` with dotted-key changes, e.g. replace(cfg, **{"method.beta": 1.0})."""
    return from_dict(apply_overrides(to_dict(config), [f"{k}={_toml_value(v)}" for k, v in changes.items()]))


def _toml_value(value: Any) -> str:
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


# ---------------------------------------------------------------- validation


def _get(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(config: Config) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}", config.name):
        raise ConfigError(f"config key 'name' is {config.name!r}; use letters, digits, spaces, '.', '_' or '-' "
                          f"(it names the run directory, so it may not contain a path)")
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is '{value}'; choose one of: {', '.join(allowed)}")
    positive = [
        "model.max_length", "lora.rank", "lora.alpha", "data.max_input_tokens", "data.max_response_tokens",
        "data.fewshot.total", "data.fewshot.num_clusters", "data.partition.num_clients",
        "data.partition.min_examples", "federation.rounds", "train.batch_size", "train.epochs",
        "synth.num_candidates", "synth.max_instructions", "synth.batch_size", "synth.num_instruction_demos",
        "synth.num_response_demos", "synth.max_new_tokens_instruction", "synth.max_new_tokens_response",
        "synth.public_size",
        "eval.num_examples", "eval.medquad_size", "eval.max_new_tokens", "eval.batch_size",
        "eval.judge.max_concurrency", "eval.judge.timeout", "eval.judge.max_tokens",
    ]
    for key in positive:
        if _get(config, key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {_get(config, key)}")
    non_negative = ["federation.clients_per_round", "federation.min_replies", "federation.reply_timeout",
                    "flower.client_cpus", "flower.client_gpus", "flower.wait_for_nodes",
                    "model.threads", "synth.max_redraws", "eval.every",
                    "output.checkpoint_every", "train.weight_decay", "train.max_grad_norm",
                    "train.min_learning_rate", "eval.final_num_examples", "eval.judge.max_retries",
                    "train.max_steps"]
    for key in non_negative:
        if _get(config, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {_get(config, key)}")
    for key in ("lora.dropout", "synth.rouge_threshold", "synth.top_p", "synth.max_repetition"):
        if not 0.0 <= _get(config, key) <= 1.0:
            raise ConfigError(f"config key '{key}' must be within [0, 1], got {_get(config, key)}")
    if config.train.learning_rate <= 0:
        raise ConfigError(f"config key 'train.learning_rate' must be > 0, got {config.train.learning_rate}")
    if config.synth.repetition_penalty <= 0:
        raise ConfigError(f"config key 'synth.repetition_penalty' must be > 0, got {config.synth.repetition_penalty}")
    if config.synth.temperature <= 0:
        raise ConfigError(f"config key 'synth.temperature' must be > 0, got {config.synth.temperature}")
    if config.data.partition.alpha <= 0:
        raise ConfigError(f"config key 'data.partition.alpha' must be > 0, got {config.data.partition.alpha}")
    if config.data.source == "file" and not config.data.file:
        raise ConfigError("data.source is 'file' but data.file is empty; set data.file=PATH to a JSON/JSONL file")
    if not config.lora.target_modules:
        raise ConfigError("config key 'lora.target_modules' must name at least one module, e.g. ['q_proj', 'v_proj']")
    for key in ("eval.sets", "eval.final_sets"):
        for name in _get(config, key):
            if name not in EVAL_SETS:
                raise ConfigError(f"{key} contains unknown set '{name}'; choose from: {', '.join(EVAL_SETS)}")
    judge = config.eval.judge
    if judge.endpoint and not judge.model:
        raise ConfigError("eval.judge.endpoint is set but eval.judge.model is empty; name the judge model the "
                          "endpoint serves, e.g. --set eval.judge.model='gpt-4o'")
    if judge.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", judge.api_key_env):
        raise ConfigError("eval.judge.api_key_env is not a variable name; it is the *name* of the environment "
                          "variable that holds the key (e.g. OPENAI_API_KEY), never the key itself; '' for none")
    for key, allowed in (("privacy.attacks", ATTACKS), ("privacy.targets", ATTACK_TARGETS)):
        for name in _get(config, key):
            if name not in allowed:
                raise ConfigError(f"{key} contains unknown '{name}'; choose from: {', '.join(allowed)}")
    privacy = config.privacy
    for key in ("num_members", "num_nonmembers", "prefix_tokens", "max_new_tokens", "canary_repeats",
                "canary_candidates", "canaries_per_client"):
        if getattr(privacy, key) <= 0:
            raise ConfigError(f"config key 'privacy.{key}' must be > 0, got {getattr(privacy, key)}")
    if not 2 <= privacy.canary_digits <= 12:
        raise ConfigError(f"config key 'privacy.canary_digits' must be within [2, 12], got {privacy.canary_digits}")
    if privacy.canary_clients < 0 or privacy.every < 0:
        raise ConfigError("config keys 'privacy.canary_clients' and 'privacy.every' must be >= 0")
    _validate_dp(privacy.dp, "privacy.dp", "max_grad_norm")
    _validate_dp(privacy.client_dp, "privacy.client_dp", "clip_norm")
    _validate_secagg(config.flower)
    partition = config.data.partition
    if config.federation.clients_per_round > partition.num_clients and partition.kind != "natural":
        raise ConfigError(
            f"federation.clients_per_round={config.federation.clients_per_round} exceeds "
            f"data.partition.num_clients={config.data.partition.num_clients}; lower it or use 0 for all clients"
        )


SECAGG_MODULUS = 2**32
"""SecAgg+'s mask modulus (Flower's default and its maximum): sums of quantised uploads must stay below it."""


def _validate_secagg(flower: FlowerConfig) -> None:
    """SecAgg+'s settings. A share count above 1 is a number of clients, at most 1 a fraction of those
    sampled; the threshold likewise, and as a fraction it must exceed one half: with a half or less, a
    server that tells some neighbours a client dropped and others that it did not collects enough shares
    of both its secrets to unmask its upload."""
    shares, threshold = flower.secagg_shares, flower.secagg_threshold
    if shares <= 0 or (shares > 1 and (shares != int(shares) or shares < 3)):
        raise ConfigError(f"config key 'flower.secagg_shares' is {shares:g}; give a fraction of the sampled clients "
                          f"in (0, 1] (1 = every client shares with every other) or a whole number of clients >= 3")
    if threshold <= 0.5 or (threshold > 1 and threshold != int(threshold)):
        raise ConfigError(f"config key 'flower.secagg_threshold' is {threshold:g}; give a fraction of the shares in "
                          f"(0.5, 1] or a whole number of shares >= 2 (a fraction of a half or less lets the server "
                          f"unmask a client)")
    if shares > 1 and threshold > 1 and threshold >= shares:
        raise ConfigError(f"flower.secagg_threshold={threshold:g} must be below flower.secagg_shares={shares:g}")
    if flower.secagg_clipping_range <= 0:
        raise ConfigError("config key 'flower.secagg_clipping_range' must be > 0 (uploads are clipped to "
                          "[-range, range] before quantisation)")
    quant = flower.secagg_quantization_range
    if not 2 <= quant < SECAGG_MODULUS // 2:
        raise ConfigError(f"config key 'flower.secagg_quantization_range' is {quant}; it must be within "
                          f"[2, {SECAGG_MODULUS // 2}) so that the masked sum of several clients fits the "
                          f"2**32 modulus (the default 4194304 = 2**22 leaves room for 1024 clients a round)")


def _validate_dp(dp: GaussianDPConfig, where: str, clip_key: str) -> None:
    """Exactly one of noise_multiplier and target_epsilon, a positive clip bound, 0 < delta < 1.
    Checked whether or not `enabled`, so a table that is switched on later is already sound."""
    clip = getattr(dp, clip_key)
    if clip <= 0:
        raise ConfigError(f"config key '{where}.{clip_key}' must be > 0 (the clipping bound), got {clip}")
    if not 0.0 < dp.delta < 1.0:
        raise ConfigError(f"config key '{where}.delta' must be within (0, 1), got {dp.delta}")
    if dp.noise_multiplier < 0 or dp.target_epsilon < 0:
        raise ConfigError(f"config keys '{where}.noise_multiplier' and '{where}.target_epsilon' must be >= 0")
    if not dp.enabled:
        return
    if (dp.noise_multiplier > 0) == (dp.target_epsilon > 0):
        raise ConfigError(f"{where} is enabled: set exactly one of {where}.noise_multiplier (the noise, sigma) or "
                          f"{where}.target_epsilon (the noise is then calibrated to reach it), got "
                          f"noise_multiplier={dp.noise_multiplier}, target_epsilon={dp.target_epsilon}")
