"""Reading text, JSON and JSONL files so that every failure is a one-line `DataError`.

Data files come from users and from upstream releases; a `UnicodeDecodeError` or
`JSONDecodeError` traceback tells them nothing about which file to fix or how. Every reader
here names the file and, where it can, the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpit.errors import DataError


@dataclass(frozen=True)
class Record:
    """One JSON object from a file, with where it came from so errors can point at it."""

    index: int
    where: str
    fields: dict[str, Any]


def read_text(path: Path) -> str:
    """UTF-8 (a BOM is tolerated because Windows editors add one); anything else is the user's to fix."""
    if not path.exists():
        raise DataError(f"{path}: file not found; check the path (and data.dir / FEDPIT_DATA_DIR)")
    if not path.is_file():
        raise DataError(f"{path}: is not a file; point to a file, not a folder")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not valid UTF-8 (bad byte at offset {exc.start}); re-save the file as UTF-8"
        ) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None


def read_json(path: Path) -> Any:
    """One JSON document; the error names the line and column because these files are edited by hand."""
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty; it should hold JSON data")
    return _loads(path, text)


def _loads(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); fix the file"
        ) from None


def read_records(path: Path) -> list[Record]:
    """A JSON list of objects or JSON Lines: both are common for instruction data, so accept either.

    The format is decided from the content, not the suffix: a file whose first character is `[`
    is one JSON list, anything else is one object per line.
    """
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty; it should hold a JSON list of objects or JSON Lines")
    if text.lstrip().startswith("["):
        items = _loads(path, text)
        records = [Record(i, f"record {i + 1}", item) for i, item in enumerate(items)]
    else:
        records = _parse_jsonl(path, text)
    for record in records:
        if not isinstance(record.fields, dict):
            kind = type(record.fields).__name__
            raise DataError(f"{path}: {record.where} is a JSON {kind}, expected an object; fix that entry")
    return records


def _parse_jsonl(path: Path, text: str) -> list[Record]:
    records: list[Record] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}); "
                "each line must be one JSON object"
            ) from None
        records.append(Record(len(records), f"line {lineno}", value))
    return records


def require_str(path: Path, record: Record, field: str, *, default: str | None = None) -> str:
    """Instruction data must be text; a number or list in a text field is a data bug worth surfacing."""
    if field not in record.fields:
        if default is not None:
            return default
        present = ", ".join(sorted(record.fields)) or "none"
        raise DataError(f"{path}: {record.where} has no '{field}' field (fields present: {present})")
    value = record.fields[field]
    if not isinstance(value, str):
        raise DataError(
            f"{path}: {record.where} field '{field}' is a {type(value).__name__}, expected a string"
        )
    return value
