"""Loaders that turn the upstream data sets (and users' own files) into `Example` lists.

They read the upstream formats in place (see the data README) so that nobody has to run or
commit a conversion step, and they fail with a `DataError` that names the file, because a
research run that silently trains on half a data set looks fine and is wrong.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as StdET
from pathlib import Path
from typing import Any

from fedpit.data.files import Record, read_json, read_records, require_str
from fedpit.errors import DataError
from fedpit.types import Example

try:  # defusedxml refuses entity expansion and external entities; the stdlib parser does not.
    import defusedxml.ElementTree as SafeET
    from defusedxml import DefusedXmlException
except ImportError:  # pragma: no cover - defusedxml is a dependency, this is belt and braces
    SafeET = StdET

    class DefusedXmlException(ValueError):  # type: ignore[no-redef]
        """Never raised: stands in so the except clause below stays valid."""


DATA_DIR_ENV = "FEDPIT_DATA_DIR"
HOW_TO_SET_DATA_DIR = f"pass --set data.dir=PATH or export {DATA_DIR_ENV}=PATH"

_SPACES = re.compile(r"[^\S\n]+")
_SOURCE_PREFIX = re.compile(r"^(\d+)_")


def resolve_data_dir(configured: str | None) -> Path:
    """The config wins over the environment so that a saved config reproduces its run anywhere."""
    if configured and configured.strip():
        path, origin = Path(configured.strip()).expanduser(), "data.dir"
    elif os.environ.get(DATA_DIR_ENV, "").strip():
        path, origin = Path(os.environ[DATA_DIR_ENV].strip()).expanduser(), DATA_DIR_ENV
    else:
        raise DataError(
            f"no data folder: data.dir is empty and {DATA_DIR_ENV} is not set; {HOW_TO_SET_DATA_DIR}"
        )
    if not path.is_dir():
        raise DataError(
            f"data folder {path} (from {origin}) does not exist or is not a folder; {HOW_TO_SET_DATA_DIR}"
        )
    return path.resolve()


def normalise_whitespace(text: str) -> str:
    """MedQuAD answers keep the indentation and blank lines of the scraped web pages; those cost tokens
    and teach the model to emit runs of spaces. Line breaks carry list/paragraph structure, so each
    run of breaks becomes one newline and every other run of white space one space.
    """
    lines = (
        _SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    )
    return "\n".join(line for line in lines if line)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found; check the data folder ({HOW_TO_SET_DATA_DIR})")
    return path


def _nonempty(examples: list[Example], where: Path) -> list[Example]:
    """A file that exists but yields nothing is almost always the wrong file: stop before training on it."""
    if not examples:
        raise DataError(f"{where}: no usable examples found; check that it is the right file and not empty")
    return examples


# ---------------------------------------------------------------- MedQuAD


def _source_sort_key(folder: Path) -> tuple[int, str]:
    match = _SOURCE_PREFIX.match(folder.name)
    return (int(match.group(1)) if match else 1 << 30, folder.name)


def _parse_medquad_file(path: Path, source: str) -> list[Example]:
    try:
        root = SafeET.parse(path).getroot()
    except StdET.ParseError as exc:
        raise DataError(f"{path}: malformed XML ({exc}); fix or remove the file") from None
    except DefusedXmlException as exc:
        raise DataError(f"{path}: unsafe XML refused ({type(exc).__name__}); remove the file") from None
    focus_node = root.find("Focus")
    focus = normalise_whitespace(focus_node.text or "") if focus_node is not None else ""
    examples: list[Example] = []
    for position, pair in enumerate(root.iter("QAPair"), start=1):
        question, answer = pair.find("Question"), pair.find("Answer")
        instruction = normalise_whitespace(question.text or "") if question is not None else ""
        output = normalise_whitespace(answer.text or "") if answer is not None else ""
        if not instruction or not output:
            continue  # upstream removed some answers (copyright) and left a few GARD ones empty
        qid = question.get("qid", "") if question is not None else ""
        # Upstream qids repeat (across sources and across files of one source), so the id is
        # built from the folder, file and pair number, which are unique; the qid stays in meta.
        pid = pair.get("pid") or str(position)
        examples.append(
            Example(
                id=f"medquad-{source}-{path.stem}-{pid}",
                instruction=instruction,
                output=output,
                meta={
                    "source": source,
                    "qtype": question.get("qtype", "") if question is not None else "",
                    "focus": focus,
                    "document": root.get("id", path.stem),
                    "qid": qid,
                },
            )
        )
    return examples


def load_medquad(data_dir: Path) -> list[Example]:
    """Every answered MedQuAD pair, in folder-number then file-name order so runs are reproducible."""
    root = _require_dir(Path(data_dir) / "medquad", "MedQuAD ('medquad/')")
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=_source_sort_key)
    examples: list[Example] = []
    num_files = 0
    for folder in folders:
        source = _SOURCE_PREFIX.sub("", folder.name)
        for path in sorted(folder.glob("*.xml")):
            num_files += 1
            examples.extend(_parse_medquad_file(path, source))
    if num_files == 0:
        raise DataError(f"{root}: no XML files in its <N>_<Source>/ subfolders; is it the MedQuAD release?")
    return _nonempty(examples, root)


# ---------------------------------------------------------------- PubMedQA

PUBMEDQA_SPLITS = ("all", "train", "test")


def _pubmedqa_field(path: Path, pmid: str, item: dict[str, Any], key: str) -> Any:
    if key not in item:
        raise DataError(f"{path}: entry {pmid} has no '{key}' field; is it the PubMedQA-L ori_pqal.json?")
    return item[key]


def load_pubmedqa(data_dir: Path, split: str = "all") -> list[Example]:
    """PubMedQA-L as instruction = question, input = abstract, output = long answer.

    The official 500 test ids are kept apart (`split`) so that nobody trains on the test set by
    accident; `meta['decision']` keeps the yes/no/maybe label for accuracy.
    """
    if split not in PUBMEDQA_SPLITS:
        raise DataError(f"unknown PubMedQA split '{split}'; choose one of {', '.join(PUBMEDQA_SPLITS)}")
    folder = _require_dir(Path(data_dir) / "pubmedqa", "PubMedQA ('pubmedqa/')")
    items_path, test_path = folder / "ori_pqal.json", folder / "test_ground_truth.json"
    items, test = read_json(items_path), read_json(test_path)
    if not isinstance(items, dict):
        raise DataError(f"{items_path}: expected a JSON object keyed by PubMed id")
    if not isinstance(test, dict):
        raise DataError(f"{test_path}: expected a JSON object {{pmid: decision}}")
    test_ids = {str(pmid) for pmid in test}
    examples: list[Example] = []
    for pmid, item in items.items():
        pmid = str(pmid)
        is_test = pmid in test_ids
        if (split == "test" and not is_test) or (split == "train" and is_test):
            continue
        if not isinstance(item, dict):
            raise DataError(f"{items_path}: entry {pmid} is not an object")
        contexts = _pubmedqa_field(items_path, pmid, item, "CONTEXTS")
        examples.append(
            Example(
                id=f"pubmedqa-{pmid}",
                instruction=str(_pubmedqa_field(items_path, pmid, item, "QUESTION")).strip(),
                input="\n".join(contexts) if isinstance(contexts, list) else str(contexts),
                output=str(_pubmedqa_field(items_path, pmid, item, "LONG_ANSWER")).strip(),
                meta={
                    "source": "PubMedQA",
                    "decision": str(_pubmedqa_field(items_path, pmid, item, "final_decision")),
                    "pmid": pmid,
                    "is_test": is_test,
                },
            )
        )
    return _nonempty(examples, items_path)


# ---------------------------------------------------------------- MedInstruct

_MEDINSTRUCT_NON_REFERENCE = {"id", "instruction", "difficulty"}


def load_medinstruct_test(data_dir: Path, reference: str = "gpt-4-answer") -> list[Example]:
    """MedInstruct-test with one model's answer as the reference; which one is a choice of the study."""
    path = (
        _require_dir(Path(data_dir) / "medinstruct", "MedInstruct ('medinstruct/')")
        / "MedInstruct-test.jsonl"
    )
    records = read_records(path)
    available = sorted({key for r in records for key in r.fields} - _MEDINSTRUCT_NON_REFERENCE)
    if reference not in available:
        raise DataError(
            f"{path}: no reference answer field '{reference}'; available: {', '.join(available) or 'none'}"
        )
    examples = [
        Example(
            id=f"medinstruct-{record.fields.get('id', record.index)}",
            instruction=require_str(path, record, "instruction").strip(),
            output=require_str(path, record, reference).strip(),
            meta={
                "source": "MedInstruct",
                "difficulty": str(record.fields.get("difficulty", "")),
                "reference": reference,
            },
        )
        for record in records
    ]
    return _nonempty(examples, path)


def load_medinstruct_seeds(data_dir: Path) -> list[Example]:
    """The 167 clinician-written seed tasks: extra instruction demonstrations, with no reference answer."""
    path = _require_dir(Path(data_dir) / "medinstruct", "MedInstruct ('medinstruct/')") / "med_seed.json"
    examples: list[Example] = []
    for record in read_records(path):
        raw_input = require_str(path, record, "input", default="").strip()
        examples.append(
            Example(
                id=f"medinstruct-seed-{record.index}",
                instruction=require_str(path, record, "instruction").strip(),
                input="" if raw_input == "<noinput>" else raw_input,
                output="",
                meta={
                    "source": "MedInstruct-seed",
                    **{
                        key: str(record.fields.get(key, ""))
                        for key in ("topic", "view", "type", "difficulty")
                    },
                },
            )
        )
    return _nonempty(examples, path)


# ---------------------------------------------------------------- users' own files


def _extra_meta(record: Record, used: set[str]) -> dict[str, Any]:
    """Other scalar fields become meta so that a user's file can be partitioned by its own columns."""
    return {
        key: value
        for key, value in record.fields.items()
        if key not in used and (value is None or isinstance(value, (str, int, float, bool)))
    }


def load_instruction_file(
    path: Path,
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
) -> list[Example]:
    """A user's Alpaca-style file (JSON list or JSONL); field names are configurable because every data
    set spells them differently. A missing input means "no input"; a missing instruction or output
    is an error, since silently dropping records changes the experiment.
    """
    path = Path(path)
    examples: list[Example] = []
    used = {instruction_field, input_field, output_field}
    for record in read_records(path):
        instruction = require_str(path, record, instruction_field).strip()
        if not instruction:
            raise DataError(
                f"{path}: {record.where} has an empty '{instruction_field}'; fill it in or remove it"
            )
        examples.append(
            Example(
                id=f"{path.stem}-{record.index}",
                instruction=instruction,
                input=require_str(path, record, input_field, default="").strip(),
                output=require_str(path, record, output_field).strip(),
                meta={**_extra_meta(record, used), "file": path.name},
            )
        )
    return _nonempty(examples, path)
