"""Loaders: counts on the real data (from its README) and one-line DataErrors for broken files."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from fedpit.data import (
    load_instruction_file,
    load_medinstruct_seeds,
    load_medinstruct_test,
    load_medquad,
    load_pubmedqa,
    normalise_whitespace,
    resolve_data_dir,
)
from fedpit.errors import DataError
from fedpit.types import Example

# From /work/shared/data/README.md: answered pairs per source; they add up to 16,407 and the
# five empty GARD answers are already excluded from them (16,412 QAPair elements upstream).
MEDQUAD_PER_SOURCE = {
    "CancerGov_QA": 729,
    "GARD_QA": 5389,
    "GHR_QA": 5430,
    "MPlus_Health_Topics_QA": 981,
    "NIDDK_QA": 1192,
    "NINDS_QA": 1088,
    "SeniorHealth_QA": 769,
    "NHLBI_QA_XML": 559,
    "CDC_QA": 270,
}
EMPTY_GARD_FILES = ("0002079", "0002080", "0002253", "0002747", "0006509")


def raises_naming(fragment: str, match: str = ""):
    """A DataError whose one-line message names `fragment` (a file or folder) and matches `match`."""
    return pytest.raises(DataError, match=re.escape(fragment) + (f".*{match}" if match else ""))


def one_line(info: pytest.ExceptionInfo[DataError]) -> None:
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- real data


def test_medquad_counts_match_readme(medquad: list[Example]) -> None:
    assert sum(MEDQUAD_PER_SOURCE.values()) == 16_407
    assert len(medquad) == 16_407
    assert Counter(e.meta["source"] for e in medquad) == MEDQUAD_PER_SOURCE
    assert len({e.meta["qtype"] for e in medquad}) == 16
    assert Counter(e.meta["qtype"] for e in medquad)["information"] == 4535


def test_medquad_skips_the_empty_gard_answers(medquad: list[Example]) -> None:
    ids = {e.id for e in medquad}
    assert ids.isdisjoint(f"medquad-GARD_QA-{stem}-1" for stem in EMPTY_GARD_FILES)
    # ...while the other pairs of those files are kept (only pid 1 is empty upstream).
    assert f"medquad-GARD_QA-{EMPTY_GARD_FILES[1]}-2" in ids
    assert all(e.instruction and e.output for e in medquad)


def test_medquad_ids_unique_and_fields(medquad: list[Example]) -> None:
    # Upstream qids repeat, so ids must not be the bare qid.
    assert len({e.id for e in medquad}) == len(medquad)
    first = medquad[0]
    assert first.id == "medquad-CancerGov_QA-0000001_1-1"
    assert first.meta["qid"] == "0000001_1-1"
    assert first.meta["qtype"] == "information"
    assert first.meta["focus"] == "Adult Acute Lymphoblastic Leukemia"
    assert first.meta["document"] == "0000001_1"
    assert first.instruction == "What is (are) Adult Acute Lymphoblastic Leukemia ?"
    assert first.input == ""
    assert medquad[-1].meta["source"] == "CDC_QA"


def test_medquad_whitespace_is_normalised(medquad: list[Example]) -> None:
    for example in medquad:
        for text in (example.instruction, example.output):
            assert "  " not in text and "\t" not in text and "\n\n" not in text, example.id
            assert text == text.strip(), example.id
    # Paragraph structure survives as single newlines.
    assert "\n" in medquad[0].output


def test_pubmedqa_splits(data_dir: Path) -> None:
    everything = load_pubmedqa(data_dir)
    test = load_pubmedqa(data_dir, "test")
    train = load_pubmedqa(data_dir, "train")
    assert (len(everything), len(test), len(train)) == (1000, 500, 500)
    assert {e.id for e in test} | {e.id for e in train} == {e.id for e in everything}
    assert all(e.meta["is_test"] for e in test) and not any(e.meta["is_test"] for e in train)
    truth = json.loads((data_dir / "pubmedqa" / "test_ground_truth.json").read_text())
    assert {e.meta["pmid"]: e.meta["decision"] for e in test} == truth
    example = everything[0]
    assert example.id == f"pubmedqa-{example.meta['pmid']}"
    assert example.instruction.endswith("?") and example.input and example.output
    assert {e.meta["decision"] for e in everything} == {"yes", "no", "maybe"}


def test_pubmedqa_unknown_split(data_dir: Path) -> None:
    with pytest.raises(DataError, match="unknown PubMedQA split 'dev'"):
        load_pubmedqa(data_dir, "dev")


def test_medinstruct_test(data_dir: Path) -> None:
    gpt4 = load_medinstruct_test(data_dir)
    claude = load_medinstruct_test(data_dir, reference="claude-2")
    assert len(gpt4) == len(claude) == 216
    assert len({e.id for e in gpt4}) == 216
    assert gpt4[0].id == "medinstruct-0"
    assert gpt4[0].instruction == claude[0].instruction and gpt4[0].output != claude[0].output
    assert {e.meta["difficulty"] for e in gpt4} <= {"1", "2", "3", "4", "5"}


def test_medinstruct_unknown_reference_lists_fields(data_dir: Path) -> None:
    with pytest.raises(DataError, match=r"available: .*claude-2.*gpt-4-answer") as info:
        load_medinstruct_test(data_dir, reference="gpt-5-answer")
    assert "MedInstruct-test.jsonl" in str(info.value)


def test_medinstruct_seeds(data_dir: Path) -> None:
    seeds = load_medinstruct_seeds(data_dir)
    assert len(seeds) == 167
    raw = json.loads((data_dir / "medinstruct" / "med_seed.json").read_text())
    assert sum(e.input == "" for e in seeds) == sum(r["input"] == "<noinput>" for r in raw) == 55
    assert not any("<noinput>" in e.input for e in seeds)
    assert all(e.output == "" for e in seeds)
    assert seeds[0].meta["topic"] == "Neurology" and seeds[0].meta["view"] == "Student"
    assert seeds[0].meta["type"] == "Open Q&A"


# ---------------------------------------------------------------- data folder


def test_resolve_data_dir_prefers_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "env"
    other.mkdir()
    monkeypatch.setenv("FEDPIT_DATA_DIR", str(other))
    assert resolve_data_dir(str(tmp_path)) == tmp_path.resolve()
    assert resolve_data_dir("") == other.resolve()
    assert resolve_data_dir(None) == other.resolve()


def test_resolve_data_dir_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDPIT_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"--set data\.dir=PATH.*export FEDPIT_DATA_DIR=PATH") as info:
        resolve_data_dir(None)
    one_line(info)


def test_resolve_data_dir_missing_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere"
    with raises_naming(str(missing), "does not exist"):
        resolve_data_dir(str(missing))
    monkeypatch.setenv("FEDPIT_DATA_DIR", str(missing))
    with raises_naming(str(missing), "FEDPIT_DATA_DIR"):
        resolve_data_dir(None)


# ---------------------------------------------------------------- broken MedQuAD


def write_medquad_file(root: Path, name: str, answer: str = "An answer.") -> Path:
    folder = root / "medquad" / "1_Test_QA"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Document id="{path.stem}" source="Test"><Focus>Thing</Focus><QAPairs>'
        f'<QAPair pid="1"><Question qid="{path.stem}-1" qtype="information">What is  a\n thing ?</Question>'
        f"<Answer>{answer}</Answer></QAPair></QAPairs></Document>\n",
        encoding="utf-8",
    )
    return path


def test_medquad_tiny_folder(tmp_path: Path) -> None:
    write_medquad_file(tmp_path, "0001.xml", answer="  First   line.\n\n\n\t Second\tline.  ")
    write_medquad_file(tmp_path, "0002.xml", answer="   ")
    (example,) = load_medquad(tmp_path)
    assert example.id == "medquad-Test_QA-0001-1"
    assert example.instruction == "What is a\nthing ?"
    assert example.output == "First line.\nSecond line."
    assert example.meta == {
        "source": "Test_QA",
        "qtype": "information",
        "focus": "Thing",
        "document": "0001",
        "qid": "0001-1",
    }


def test_medquad_malformed_xml_names_file(tmp_path: Path) -> None:
    write_medquad_file(tmp_path, "0001.xml")
    bad = write_medquad_file(tmp_path, "0002.xml")
    bad.write_text(bad.read_text().replace("</QAPairs>", ""), encoding="utf-8")
    with raises_naming(str(bad), "malformed XML") as info:
        load_medquad(tmp_path)
    one_line(info)


def test_medquad_refuses_entity_expansion(tmp_path: Path) -> None:
    bomb = write_medquad_file(tmp_path, "0001.xml")
    text = bomb.read_text().replace(
        "<Document", '<!DOCTYPE Document [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>\n<Document'
    )
    bomb.write_text(text.replace("An answer.", "&b;"), encoding="utf-8")
    with raises_naming(str(bomb), "unsafe XML refused"):
        load_medquad(tmp_path)


def test_medquad_non_utf8_names_file(tmp_path: Path) -> None:
    bad = write_medquad_file(tmp_path, "0001.xml")
    bad.write_bytes(bad.read_bytes().replace(b"An answer.", "Caf\u00e9 na\u00efve.".encode("latin-1")))
    with raises_naming(str(bad)):
        load_medquad(tmp_path)


def test_medquad_missing_folder(tmp_path: Path) -> None:
    with raises_naming(str(tmp_path / "medquad"), "not found") as info:
        load_medquad(tmp_path)
    one_line(info)


def test_medquad_without_answers_is_an_error(tmp_path: Path) -> None:
    write_medquad_file(tmp_path, "0001.xml", answer="")
    with raises_naming(str(tmp_path / "medquad"), "no usable examples"):
        load_medquad(tmp_path)
    (tmp_path / "medquad" / "1_Test_QA" / "0001.xml").unlink()
    with raises_naming(str(tmp_path / "medquad"), "no XML files"):
        load_medquad(tmp_path)


# ---------------------------------------------------------------- broken PubMedQA / MedInstruct


def test_pubmedqa_non_utf8_and_empty(tmp_path: Path) -> None:
    folder = tmp_path / "pubmedqa"
    folder.mkdir()
    items, test = folder / "ori_pqal.json", folder / "test_ground_truth.json"
    test.write_text("{}", encoding="utf-8")
    items.write_bytes('{"1": {"QUESTION": "Caf\u00e9?"}}'.encode("latin-1"))
    with raises_naming(str(items), "UTF-8"):
        load_pubmedqa(tmp_path)
    items.write_text("{}", encoding="utf-8")
    with raises_naming(str(items), "no usable examples"):
        load_pubmedqa(tmp_path)
    items.write_text('{"1": {"QUESTION": "Q?", "CONTEXTS": ["c"]}}', encoding="utf-8")
    with raises_naming(str(items), "LONG_ANSWER"):
        load_pubmedqa(tmp_path)


def test_medinstruct_missing_field_names_line(tmp_path: Path) -> None:
    folder = tmp_path / "medinstruct"
    folder.mkdir()
    path = folder / "MedInstruct-test.jsonl"
    path.write_text(
        '{"id": 0, "instruction": "Do A.", "gpt-4-answer": "A."}\n{"id": 1, "gpt-4-answer": "B."}\n',
        encoding="utf-8",
    )
    with raises_naming(str(path), "line 2 has no 'instruction' field"):
        load_medinstruct_test(tmp_path)


# ---------------------------------------------------------------- users' instruction files


def test_instruction_file_json_list(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    records = [
        {"instruction": "Define fever.", "input": "", "output": "A raised temperature.", "site": "A"},
        {"instruction": "Define cough.", "output": "A reflex.", "site": "B"},
    ]
    path.write_text(json.dumps(records), encoding="utf-8")
    examples = load_instruction_file(path)
    assert [e.id for e in examples] == ["mine-0", "mine-1"]
    assert examples[1].input == ""
    assert examples[0].meta == {"site": "A", "file": "mine.json"}


def test_instruction_file_jsonl_custom_fields(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "Q1", "ctx": "C1", "a": "A1"}\n\n{"q": "Q2", "a": "A2"}\n', encoding="utf-8")
    examples = load_instruction_file(path, instruction_field="q", input_field="ctx", output_field="a")
    assert [(e.id, e.instruction, e.input, e.output) for e in examples] == [
        ("qa-0", "Q1", "C1", "A1"),
        ("qa-1", "Q2", "", "A2"),
    ]


def test_instruction_file_missing(tmp_path: Path) -> None:
    with raises_naming(str(tmp_path / "absent.json"), "not found"):
        load_instruction_file(tmp_path / "absent.json")


def test_instruction_file_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with raises_naming(str(path), "empty") as info:
        load_instruction_file(path)
    one_line(info)
    path.write_text("[]", encoding="utf-8")
    with raises_naming(str(path), "no usable examples"):
        load_instruction_file(path)


def test_instruction_file_invalid_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n', encoding="utf-8"
    )
    with raises_naming(str(path), "line 2 is not valid JSON") as info:
        load_instruction_file(path)
    one_line(info)


def test_instruction_file_invalid_json_list(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",, }\n]', encoding="utf-8"
    )
    with raises_naming(str(path), "line 3"):
        load_instruction_file(path)


def test_instruction_file_missing_field_lists_present_fields(tmp_path: Path) -> None:
    path = tmp_path / "partial.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}]))
    with raises_naming(str(path), r"record 2 has no 'output' field \(fields present: answer, instruction\)"):
        load_instruction_file(path)


def test_instruction_file_non_string_and_non_object(tmp_path: Path) -> None:
    path = tmp_path / "typed.jsonl"
    path.write_text('{"instruction": "a", "output": 3}\n', encoding="utf-8")
    with raises_naming(str(path), "line 1 field 'output' is a int, expected a string"):
        load_instruction_file(path)
    path.write_text('["instruction", "output"]\n', encoding="utf-8")
    with raises_naming(str(path), "expected an object"):
        load_instruction_file(path)


def test_instruction_file_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"instruction": "Caf\u00e9", "output": "b"}\n'.encode("latin-1"))
    with raises_naming(str(path), "not valid UTF-8") as info:
        load_instruction_file(path)
    one_line(info)


def test_instruction_file_accepts_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"instruction": "Caf\u00e9", "output": "b"}\n'.encode())
    assert load_instruction_file(path)[0].instruction == "Caf\u00e9"


def test_normalise_whitespace() -> None:
    assert normalise_whitespace("  a   b\t\tc \r\n\r\n\n  d\u00a0\u00a0e  ") == "a b c\nd e"
    assert normalise_whitespace(" \n\t ") == ""
