"""From a config to a federation: held-out evaluation sets, the few-shot training selection, and
its split over clients.

Evaluation examples are drawn first and everything that repeats one of them (same question or
same answer text, as MedQuAD has across NIH sites) is removed from the training pool, so held-out
sets never overlap training data.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedpit.config import Config
from fedpit.data.fewshot import select_fewshot
from fedpit.data.partition import partition_examples
from fedpit.data.sources import (
    load_instruction_file,
    load_medinstruct_test,
    load_medquad,
    load_pubmedqa,
    resolve_data_dir,
)
from fedpit.errors import DataError
from fedpit.seeding import derive_seed
from fedpit.types import Example


@dataclass
class Federation:
    clients: dict[str, list[Example]]
    eval_sets: dict[str, list[Example]]
    holdout: list[Example] = field(default_factory=list)
    """Unused examples of the training distribution: the non-members of membership inference."""
    final_sets: dict[str, list[Example]] = field(default_factory=dict)
    """Whole held-out sets for the final model (`eval.final_sets`); `eval_sets` are their per-round prefixes."""
    public: list[Example] = field(default_factory=list)
    """Public demonstrations for self-generation (`synth.demonstrations = "public"`): nobody's private data."""

    def summary(self) -> dict[str, Any]:
        return {
            "clients": len(self.clients),
            "sizes": {c: len(e) for c, e in self.clients.items()},
            "train_examples": sum(len(e) for e in self.clients.values()),
            "eval_sets": {name: len(e) for name, e in self.eval_sets.items()},
            "final_sets": {name: len(e) for name, e in self.final_sets.items()},
            "holdout": len(self.holdout),
            **({"public": len(self.public)} if self.public else {}),
        }

    def fingerprint(self) -> str:
        """SHA-256 of every example's id and text, per client and per evaluation set: a resumed run
        must see exactly the data it started with."""
        digest = hashlib.sha256()
        groups = [*(("client", c, e) for c, e in sorted(self.clients.items())),
                  *(("eval", n, e) for n, e in sorted(self.eval_sets.items())),
                  *(("final", n, e) for n, e in sorted(self.final_sets.items())), ("holdout", "", self.holdout),
                  *([("public", "", self.public)] if self.public else [])]
        for kind, name, examples in groups:
            digest.update(f"{kind}:{name}\n".encode())
            for ex in examples:
                digest.update("\x1f".join((ex.id, ex.instruction, ex.input, ex.output)).encode() + b"\x1e")
        return digest.hexdigest()


def text_key(text: str) -> str:
    return " ".join(text.lower().split())


def truncate_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """Cut to a token budget (answers in MedQuAD run to hundreds of words)."""
    if not text:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).strip()


def _fit(tokenizer, example: Example, config: Config) -> Example:
    return replace(
        example,
        input=truncate_tokens(tokenizer, example.input, config.data.max_input_tokens),
        output=truncate_tokens(tokenizer, example.output, config.data.max_response_tokens),
    )


def _data_dir(config: Config) -> Path | None:
    needs_dir = config.data.source != "file" or bool(config.eval.sets) or bool(config.eval.final_sets)
    return resolve_data_dir(config.data.dir) if needs_dir else None


def load_pool(config: Config, data_dir: Path | None) -> list[Example]:
    source = config.data.source
    if source == "medquad":
        return load_medquad(data_dir)
    if source == "pubmedqa":
        return load_pubmedqa(data_dir, split="train")  # the official test ids stay out of training
    path = Path(config.data.file).expanduser()
    if not path.is_absolute() and not path.exists() and data_dir is not None:
        path = data_dir / path
    return load_instruction_file(path, config.data.instruction_field, config.data.input_field,
                                 config.data.output_field)


def _heldout_sets(config: Config, data_dir: Path | None, pool: list[Example]) -> dict[str, list[Example]]:
    """Every held-out set in a random order drawn with `eval.seed` (not `seed`): runs with different
    seeds are then evaluated on the same examples, which is what makes their differences pairable.
    Per-round and final evaluation take prefixes of these lists, so each is a random subset and the
    per-round examples are also in the final set."""
    rng = random.Random(derive_seed(config.eval.seed, "eval-split"))
    sets: dict[str, list[Example]] = {}
    for name in dict.fromkeys([*config.eval.final_sets, *config.eval.sets]):
        if name == "medquad":  # MedQuAD has no test split: a held-out set is carved out of it
            candidates = pool if config.data.source == "medquad" else load_medquad(data_dir)
            size = min(config.eval.medquad_size, len(candidates))
        elif name == "medinstruct":
            candidates = load_medinstruct_test(data_dir)
            size = len(candidates)
        else:
            candidates = load_pubmedqa(data_dir, split="test")
            size = len(candidates)
        sets[name] = [candidates[i] for i in rng.sample(range(len(candidates)), size)]
    return sets


def _prefix(examples: list[Example], count: int) -> list[Example]:
    return examples[:count] if count > 0 else list(examples)


def build_federation(config: Config, tokenizer) -> Federation:
    data_dir = _data_dir(config)
    pool = load_pool(config, data_dir)
    heldout = _heldout_sets(config, data_dir, pool)
    held_out = {text_key(e.instruction) for s in heldout.values() for e in s}
    held_out |= {text_key(e.output) for s in heldout.values() for e in s}
    train_pool = [e for e in pool if text_key(e.instruction) not in held_out and text_key(e.output) not in held_out]

    fewshot = config.data.fewshot
    partition = config.data.partition
    if fewshot.enabled:
        selected = select_fewshot(train_pool, total=fewshot.total, num_clusters=fewshot.num_clusters,
                                  seed=config.seed, embedder=fewshot.embedder, pool_size=fewshot.pool_size)
    else:
        if partition.by == "cluster" and partition.kind == "dirichlet":
            raise DataError("data.partition.by='cluster' needs data.fewshot.enabled=true; "
                            "or split by a data field, e.g. --set data.partition.by=qtype")
        if fewshot.total > len(train_pool):
            raise DataError(f"data.fewshot.total={fewshot.total} but only {len(train_pool)} training examples "
                            f"are available; lower data.fewshot.total")
        picks = random.Random(derive_seed(config.seed, "pool")).sample(range(len(train_pool)), fewshot.total)
        selected = [train_pool[i] for i in sorted(picks)]
    used = {e.id for e in selected}
    unused = [e for e in train_pool if e.id not in used]
    picks = random.Random(derive_seed(config.seed, "holdout")).sample(
        range(len(unused)), min(config.data.holdout_size, len(unused)))
    holdout = [_fit(tokenizer, unused[i], config) for i in sorted(picks)]
    public = public_pool(config, tokenizer, data_dir, [e for i, e in enumerate(unused) if i not in set(picks)]) \
        if config.synth.demonstrations == "public" else []
    selected = [_fit(tokenizer, e, config) for e in selected]
    heldout = {name: [_fit(tokenizer, e, config) for e in examples] for name, examples in heldout.items()}
    eval_sets = {name: _prefix(heldout[name], config.eval.num_examples) for name in config.eval.sets}
    final_sets = {name: _prefix(heldout[name], config.eval.final_num_examples) for name in config.eval.final_sets}
    clients = partition_examples(selected, kind=partition.kind, num_clients=partition.num_clients,
                                 by=partition.by, alpha=partition.alpha, seed=config.seed,
                                 min_size=partition.min_examples)
    for client, examples in clients.items():
        if len(examples) < partition.min_examples:
            raise DataError(
                f"client '{client}' has {len(examples)} examples, fewer than data.partition.min_examples="
                f"{partition.min_examples}; use fewer clients, more data (data.fewshot.total) or a lower minimum"
            )
    return Federation(clients=clients, eval_sets=eval_sets, holdout=holdout, final_sets=final_sets, public=public)


def public_pool(config: Config, tokenizer, data_dir: Path | None, unused: list[Example] | None) -> list[Example]:
    """Demonstrations that are nobody's private data: `synth.public_file`, or else `synth.public_size`
    pairs of the source that no client holds and no evaluation or membership set uses (`unused`).
    Self-generation from these reads no private text, so DP-SGD then covers the synthetic path too."""
    synth = config.synth
    if synth.public_file:
        path = Path(synth.public_file).expanduser()
        if not path.is_absolute() and not path.exists() and data_dir is not None:
            path = data_dir / path
        examples = load_instruction_file(path, config.data.instruction_field, config.data.input_field,
                                         config.data.output_field)
        examples = [replace(e, id=f"public/{e.id}") for e in examples]
    elif unused is None:
        raise DataError("synth.demonstrations='public' on a client with its own data file needs a public pool it "
                        "can read: set synth.public_file=PATH to a JSON/JSONL file of public instruction/response "
                        "pairs")
    else:
        rng = random.Random(derive_seed(config.seed, "public"))
        examples = [unused[i] for i in sorted(rng.sample(range(len(unused)), min(synth.public_size, len(unused))))]
    if len(examples) < synth.num_response_demos + 1:
        raise DataError(f"the public demonstration pool has {len(examples)} examples, fewer than "
                        f"synth.num_response_demos={synth.num_response_demos} plus one; raise synth.public_size, "
                        f"leave more of the data source unused (a lower data.fewshot.total), or give "
                        f"synth.public_file")
    return [_fit(tokenizer, e, config) for e in examples]


def check_demonstrations(federation: Federation, config: Config) -> None:
    """Self-generation shows each client's own examples as demonstrations: it needs enough of them
    (public demonstrations are checked when the pool is drawn)."""
    if config.synth.demonstrations == "public":
        return
    need = config.synth.num_response_demos + 1
    for client, examples in federation.clients.items():
        if len(examples) < need:
            raise DataError(
                f"client '{client}' has {len(examples)} examples, fewer than synth.num_response_demos="
                f"{config.synth.num_response_demos} demonstrations plus one; lower synth.num_response_demos, "
                f"use fewer clients (data.partition.num_clients) or more data (data.fewshot.total)"
            )


def load_client_file(config: Config, tokenizer, path: str | Path, client: str) -> list[Example]:
    """One institution's own examples (a deployed client pointed at its local JSON/JSONL file), cut to
    the same token budgets as a simulated client's."""
    examples = load_instruction_file(Path(path).expanduser(), config.data.instruction_field,
                                     config.data.input_field, config.data.output_field)
    if len(examples) < config.data.partition.min_examples:
        raise DataError(f"client '{client}': {path} has {len(examples)} examples, fewer than "
                        f"data.partition.min_examples={config.data.partition.min_examples}; add examples or lower it")
    return [_fit(tokenizer, replace(e, id=f"{client}/{e.id}"), config) for e in examples]
