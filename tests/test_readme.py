"""README promises only what exists: every `fedpit ...` command it shows parses (its --help works) and
every config key it names in backticks is a real key."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from fedpit.cli import build_parser
from fedpit.config import Config
from fedpit.methods import METHODS

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = {f.name for f in dataclasses.fields(Config)}


def _commands() -> list[list[str]]:
    """`fedpit` invocations from README's code blocks, continuation lines joined, up to the first option."""
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line.startswith("fedpit "):
                continue
            first, *alternatives = line.split(" | ")  # "fedpit flower superlink | supernode": two commands
            words = _leading_words(first)
            found.append(words)
            found += [[*words[:-1], *_leading_words(alt)[:1]] for alt in alternatives]
    return found


def _leading_words(text: str) -> list[str]:
    words = []
    for word in shlex.split(text):
        if word.startswith(("-", "[")) or word.isupper() or "/" in word or "." in word:
            break
        words.append(word)
    return words[1:] if words and words[0] == "fedpit" else words


def test_readme_shows_commands_that_exist():
    commands = _commands()
    assert len(commands) > 10
    parser = build_parser()
    for words in commands:
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([*words, "--help"])
        assert exited.value.code == 0, words


def _key_exists(key: str) -> bool:
    node: object = Config
    parts = key.split(".")
    if parts[0] == "method":  # method options live in each method's Options
        return len(parts) == 2 and (parts[1] == "name" or any(
            parts[1] in {f.name for f in dataclasses.fields(METHODS.get(m).Options)} for m in METHODS.names()))
    for part in parts:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return False
        node = fields[part].type if not isinstance(fields[part].type, str) else _resolve(node, part)
    return True


def _resolve(cls: type, name: str):
    import typing

    return typing.get_type_hints(cls)[name]


def test_readme_names_real_config_keys():
    text = README.read_text(encoding="utf-8")
    keys = set()
    for token in re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)`", text):
        if token.split(".")[0] in SECTIONS:
            keys.add(token)
    assert len(keys) > 15
    missing = sorted(k for k in keys if not _key_exists(k))
    assert missing == []
