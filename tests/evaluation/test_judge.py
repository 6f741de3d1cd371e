"""The LLM judge's protocol against a real OpenAI-compatible server (`fedpit serve`'s engine on
loopback): both orders asked, replies cached, unparsable replies kept as invalid, and bad
endpoints, keys and variables refused before any request. A small model's verdicts mean nothing;
these tests check the protocol, not the judgement."""

from __future__ import annotations

import json
import socket

import pytest

from fedpit import config as config_mod
from fedpit.cli import main
from fedpit.config import JudgeConfig, LoraConfig, ModelConfig
from fedpit.errors import FedpitError
from fedpit.evaluation.judge import VerdictCache, combine, parse_choice
from fedpit.judging import judge_run, load_verdicts
from fedpit.model import load_model
from fedpit.runs import RunDir
from fedpit.serving import ServedModel, make_server

KEY = "judge-test-key"
ANSWERS = [
    {"id": f"ex-{i}", "instruction": f"What are the symptoms of condition {i}?", "input": "",
     "reference": f"Condition {i} causes fever and cough.", "answer": f"It causes pain number {i}.",
     "nll": 2.0 + i / 10, "rougeL": 0.1}
    for i in range(3)
]


@pytest.mark.parametrize("reply, choice", [
    ("Both are fine, but A is more precise. [[A]]", "A"), ("[[B]]", "B"), ("Equal quality: [[C]]", "C"),
    ("first [[A]] then on reflection [[B]]", "B"), (" b. ", "B"), ("[[tie]]", "C"), ("", "invalid"),
    ("Assistant A is better.", "invalid"), ("[[D]]", "invalid"),
])
def test_verdict_is_read_from_the_last_bracketed_letter(reply, choice):
    assert parse_choice(reply) == choice


def test_both_orders_must_agree_for_a_win_or_a_loss():
    # candidate first: "A" means the candidate; candidate second: "B" means the candidate
    assert combine("A", "B") == "win" and combine("B", "A") == "lose"
    assert combine("A", "A") == "tie"  # position bias: the judge always picks the first answer
    assert combine("C", "B") == "tie" and combine("C", "C") == "tie"
    assert combine("invalid", "B") == "invalid" and combine("A", "invalid") == "invalid"


def test_cache_survives_a_torn_line(tmp_path):
    cache = VerdictCache(tmp_path / "cache.jsonl")
    cache.add("k1", "m", "[[A]]")
    with open(tmp_path / "cache.jsonl", "a") as handle:
        handle.write('{"key": "k2", "mod')
    assert VerdictCache(tmp_path / "cache.jsonl").replies == {"k1": "[[A]]"}


@pytest.fixture
def server(tiny_judge_server):
    tiny_judge_server.api_key = KEY
    return tiny_judge_server


def _run_dir(tmp_path, name="run"):
    run = RunDir.create(tmp_path / name, config_mod.load(None, []))
    run.save_answers("final", "medinstruct", ANSWERS)
    return run


def _judge(server, **changes):
    return JudgeConfig(endpoint=server.url, model="judge", api_key_env="FEDPIT_TEST_JUDGE_KEY", max_tokens=8,
                       max_concurrency=2, **changes)


def test_both_orders_are_asked_once_and_invalid_replies_are_kept(tmp_path, server, monkeypatch):
    monkeypatch.setenv("FEDPIT_TEST_JUDGE_KEY", KEY)
    run = _run_dir(tmp_path)
    (result,) = judge_run(run.path, _judge(server))
    assert server.counts()["chat_completions"] == 2 * len(ANSWERS)  # both orders of every example
    assert result.requests == 2 * len(ANSWERS) and result.counts()["invalid"] == len(ANSWERS)
    records = [json.loads(line) for line in (run.path / "judge/final/medinstruct--vs-reference.jsonl").open()]
    assert [r["id"] for r in records] == [a["id"] for a in ANSWERS]
    for record in records:  # the raw replies stay beside each verdict
        assert [o["order"] for o in record["orders"]] == ["candidate-first", "candidate-second"]
        assert all(o["choice"] == parse_choice(o["reply"]) == "invalid" for o in record["orders"])
    summary = json.loads((run.path / "judge/summary.json").read_text())
    assert summary["final/medinstruct/vs-reference"]["invalid"] == len(ANSWERS)

    # a rerun (or a resumed comparison) asks for nothing: every reply comes from the cache
    (again,) = judge_run(run.path, _judge(server))
    assert server.counts()["chat_completions"] == 2 * len(ANSWERS) and again.requests == 0
    assert again.verdicts == result.verdicts
    assert "judge-test-key" not in (run.path / "judge/cache.jsonl").read_text()


def test_head_to_head_pairs_examples_by_id(tmp_path, server, monkeypatch):
    monkeypatch.setenv("FEDPIT_TEST_JUDGE_KEY", KEY)
    run_a, run_b = _run_dir(tmp_path, "a"), RunDir.create(tmp_path / "b", config_mod.load(None, []))
    run_b.save_answers("final", "medinstruct", [dict(a, answer="Something else.") for a in reversed(ANSWERS[1:])])
    (result,) = judge_run(run_a.path, _judge(server), against=run_b.path)
    assert result.against == "b" and sorted(result.verdicts) == ["ex-1", "ex-2"]
    assert server.counts()["chat_completions"] == 4
    assert sorted(load_verdicts(run_a.path, "final", "medinstruct", "b")) == ["ex-1", "ex-2"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("case, message", [
    ("unreachable", "cannot reach the judge endpoint"),
    ("wrong key", "refused the key in FEDPIT_TEST_JUDGE_KEY"),
    ("unset variable", "FEDPIT_TEST_JUDGE_KEY (eval.judge.api_key_env), which is not set"),
    ("wrong model", "not 'gpt-imaginary'"),
])
def test_bad_endpoint_key_or_variable_is_one_error_line_and_no_request(tmp_path, server, monkeypatch, capsys,
                                                                       case, message):
    run = _run_dir(tmp_path)
    endpoint, model = server.url, "judge"
    monkeypatch.setenv("FEDPIT_TEST_JUDGE_KEY", KEY)
    if case == "unreachable":
        endpoint = f"http://127.0.0.1:{_free_port()}/v1"
    elif case == "wrong key":
        monkeypatch.setenv("FEDPIT_TEST_JUDGE_KEY", "not-the-key")
    elif case == "unset variable":
        monkeypatch.delenv("FEDPIT_TEST_JUDGE_KEY")
    else:
        model = "gpt-imaginary"
    code = main(["judge", str(run.path), "--endpoint", endpoint, "--model", model,
                 "--api-key-env", "FEDPIT_TEST_JUDGE_KEY", "--quiet"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert "not-the-key" not in err and KEY not in err
    assert server.counts()["chat_completions"] == 0  # nothing was spent
    assert not (run.path / "judge" / "cache.jsonl").exists()


def test_judge_without_answers_or_endpoint_says_what_to_do(tmp_path, capsys):
    run = RunDir.create(tmp_path / "empty", config_mod.load(None, []))
    assert main(["judge", str(run.path), "--endpoint", "http://127.0.0.1:9/v1", "--model", "m"]) == 2
    assert "kept no evaluation answers" in capsys.readouterr().err
    assert main(["judge", str(run.path)]) == 2
    assert "give --endpoint URL and --model NAME" in capsys.readouterr().err
    assert main(["judge", str(run.path), "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--api-key-env",
                 "sk-live-123"]) == 2  # a key where the variable's name belongs
    err = capsys.readouterr().err
    assert "never the key itself" in err and "sk-live-123" not in err  # nor is it echoed
    with pytest.raises(FedpitError, match="no answers for set"):
        run.save_answers("final", "medquad", ANSWERS)
        judge_run(run.path, JudgeConfig(endpoint="http://127.0.0.1:9/v1", model="m"), sets=["pubmedqa"])


@pytest.mark.smollm2
def test_a_real_model_judges_through_the_server(tmp_path, monkeypatch):
    """SmolLM2 behind the server, asked for one letter, gives parseable verdicts; it picks the first
    answer whatever it is, and the two orders turn that position bias into ties."""
    handle = load_model(ModelConfig(dtype="fp32"), LoraConfig())
    template = tmp_path / "one-letter.txt"
    template.write_text("You are a judge. Reply with a single letter: A or B.\n---\nQuestion: {instruction}\n"
                        "Answer A: {answer_a}\nAnswer B: {answer_b}\nWhich answer is better, A or B? Reply with one "
                        "letter.")
    with make_server(ServedModel(handle=handle, template="chat"), model_name="judge").running() as server:
        run = _run_dir(tmp_path)
        config = JudgeConfig(endpoint=server.url, model="judge", api_key_env="", max_tokens=4,
                             template=str(template))
        (result,) = judge_run(run.path, config)
    assert server.counts()["chat_completions"] == 2 * len(ANSWERS)
    assert result.counts()["invalid"] == 0, result.verdicts
    records = [json.loads(line) for line in (run.path / "judge/final/medinstruct--vs-reference.jsonl").open()]
    for record in records:
        first, second = (o["choice"] for o in record["orders"])
        assert record["verdict"] == combine(first, second)
