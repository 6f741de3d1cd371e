"""The docs promise only what exists. In README.md and every docs/*.md page: every `fedpit ...` command
shown in a ```bash block parses (its --help works), every `make` target shown there is in the Makefile,
every config key named in backticks is a real key, and every relative link points at an existing file."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from fedpit.cli import build_parser
from fedpit.config import Config
from fedpit.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = {f.name for f in dataclasses.fields(Config)}


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _block_lines(text: str) -> list[str]:
    """The lines of every ```bash block, continuation lines joined, comments cut."""
    lines = []
    for block in _bash_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(line.split("#", 1)[0].strip())
    return lines


def _commands(text: str) -> list[list[str]]:
    """`fedpit` invocations from a page's code blocks, up to the first option."""
    found = []
    for line in _block_lines(text):
        if not line.startswith("fedpit "):
            continue
        first, *alternatives = line.split(" | ")  # "fedpit flower superlink | supernode": two commands
        words = _leading_words(first)
        found.append(words)
        found += [[*words[:-1], *_leading_words(alt)[:1]] for alt in alternatives]
    return found


def _make_targets(text: str) -> list[str]:
    """`make TARGET` invocations from a page's code blocks."""
    return [line.split()[1] for line in _block_lines(text) if line.startswith("make ") and len(line.split()) > 1]


def _leading_words(text: str) -> list[str]:
    words = []
    for word in shlex.split(text):
        if word.startswith(("-", "[")) or word.isupper() or "/" in word or "." in word:
            break
        words.append(word)
    return words[1:] if words and words[0] == "fedpit" else words


def _keys(text: str) -> set[str]:
    return {token for token in re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)`", text) if token.split(".")[0] in SECTIONS}


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


def _links(text: str) -> list[str]:
    """Targets of the page's markdown links (`[text](target)`), code blocks and inline code left out."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = re.sub(r"`[^`\n]*`", "code", prose)
    return re.findall(r"\[[^\]\n]*\]\(([^)\s]+)\)", prose)


def test_docs_pages_exist():
    assert len(PAGES) > 5, "README.md and the docs/ pages"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_page_shows_commands_that_exist(page: Path):
    text = _text(page)
    commands, targets = _commands(text), _make_targets(text)
    if _bash_blocks(text):  # a page with a bash block shows commands: if none parse, parsing broke
        assert commands or targets, f"{page.name}: bash blocks but no `fedpit` or `make` command found"
    parser = build_parser()
    for words in commands:
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([*words, "--help"])
        assert exited.value.code == 0, (page.name, words)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    missing = [t for t in targets if not re.search(rf"^{re.escape(t)}:", makefile, flags=re.M)]
    assert missing == [], page.name


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_page_names_real_config_keys(page: Path):
    missing = sorted(k for k in _keys(_text(page)) if not _key_exists(k))
    assert missing == [], page.name


def test_docs_show_many_commands_and_keys():
    """Over all pages together, so that a parser that finds nothing cannot pass."""
    assert len([c for page in PAGES for c in _commands(_text(page))]) > 10
    assert len(set().union(*(_keys(_text(page)) for page in PAGES))) > 15


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_page_links_point_at_files(page: Path):
    relative = [link for link in _links(_text(page)) if not re.match(r"[a-z][a-z0-9+.-]*:|#", link)]
    broken = [link for link in relative if not (page.parent / link.split("#", 1)[0]).exists()]
    assert broken == [], page.name


def test_readme_links_every_docs_page_and_each_links_back():
    linked = {(ROOT / link.split("#", 1)[0]).resolve() for link in _links(_text(README))}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"README.md does not link {page.name}"
        title, _, back = _text(page).split("\n", 3)[:3]
        assert title.startswith("# ") and "(../README.md)" in back, page.name
