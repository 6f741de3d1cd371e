"""`fedpit serve` answers the official OpenAI client the way OpenAI does, with the trained adapter loaded."""

from __future__ import annotations

import http.client
import json
import logging
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import openai
import pytest
import torch

from fedpit import config as config_mod
from fedpit.config import LoraConfig, ModelConfig
from fedpit.errors import FedpitError
from fedpit.model import load_model
from fedpit.serving import load_served_model, make_server

KEY = "test-key"
LORA = ["lora.rank=4", "lora.alpha=8", "lora.target_modules=['q_proj','v_proj']"]
ASK = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What causes anaemia?"}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A run-like folder: an adapter with B non-zero (the random tiny base alone greedily writes only
    newlines, which the engine strips to nothing) and the run's config."""
    handle = load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"),
                        LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    state = handle.fresh_adapter(seed=0)
    torch.manual_seed(1)
    state = {k: v + torch.randn_like(v) for k, v in state.items()}
    run = tmp_path_factory.mktemp("run")
    handle.save_adapter(state, run / "adapter")
    config = config_mod.load(None, [f"model.name='{tiny_model_dir}'", "model.dtype='fp32'", *LORA])
    (run / "config.toml").write_text(config_mod.dumps(config))
    return run, state


@pytest.fixture(scope="module")
def served(trained):
    return load_served_model(trained[0] / "adapter", dtype="fp32")


@pytest.fixture(scope="module")
def server(served):
    with make_server(served, api_key=KEY).running() as server:
        yield server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def _chat(client, **kwargs):
    return client.chat.completions.create(model="fedpit", messages=ASK, **kwargs)


def _http(server, path, body=None, key=KEY):
    """Raw HTTP, for what the OpenAI client will not send (bad JSON, streaming)."""
    root = server.url.removesuffix("/v1")
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(root + path, data=data, headers={"Authorization": f"Bearer {key}",
                                                                      "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_adapter_folder_loads_the_saved_adapter(trained, served):
    assert served.template == "chat"
    loaded = served.handle.get_adapter()
    assert loaded.keys() == trained[1].keys()
    assert all(torch.equal(loaded[k], trained[1][k]) for k in loaded)


def test_chat_completion_returns_text_and_usage(client):
    answer = _chat(client, max_tokens=8)
    assert answer.object == "chat.completion" and answer.model == "fedpit"
    assert answer.choices[0].message.role == "assistant"
    assert isinstance(answer.choices[0].message.content, str) and answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_tokens_is_respected(client):
    answer = _chat(client, max_tokens=3)
    assert 0 < answer.usage.completion_tokens <= 3
    assert answer.choices[0].finish_reason == "length"


def test_greedy_is_deterministic_and_seeded_sampling_repeats(client):
    assert _chat(client, max_tokens=8).choices[0].message.content == \
        _chat(client, max_tokens=8, temperature=0).choices[0].message.content
    sampled = [_chat(client, max_tokens=8, temperature=1.0, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_stop_string_cuts_the_answer(client):
    text = _chat(client, max_tokens=12).choices[0].message.content
    stop = text[len(text) // 2:][:2]
    cut = _chat(client, max_tokens=12, stop=[stop]).choices[0].message.content
    assert cut == text[: text.find(stop)].strip()


def test_wrong_key_is_an_authentication_error(server):
    wrong = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        _chat(wrong, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["fedpit"]


def test_requests_are_counted_per_route(server, client):
    before = _http(server, "/fedpit/requests")[1]
    _chat(client, max_tokens=2)
    _chat(client, max_tokens=2)
    client.models.list()
    after = _http(server, "/fedpit/requests")[1]
    assert after == {"chat_completions": before["chat_completions"] + 2, "models": before["models"] + 1}


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/v1/chat/completions", b"{not json", 400),
    ("/v1/chat/completions", {"model": "fedpit"}, 400),
    ("/v1/chat/completions", {"messages": ASK, "stream": True}, 400),
    ("/v1/chat/completions", {"messages": ASK, "n": 2}, 400),
    ("/v1/nowhere", {"messages": ASK}, 404),
])
def test_bad_requests_get_openai_errors(server, path, body, status):
    code, payload = _http(server, path, body)
    assert code == status
    assert set(payload["error"]) == {"message", "type", "code"}


def test_unsupported_options_are_bad_requests_for_the_client(client):
    with pytest.raises(openai.BadRequestError, match="n>1"):
        _chat(client, n=2)


def test_each_request_logs_one_line_without_the_key(client, caplog):
    with caplog.at_level(logging.INFO, logger="fedpit.serving"):
        client.models.list()
    lines = [r.getMessage() for r in caplog.records if r.name == "fedpit.serving"]
    assert len(lines) == 1 and "GET /v1/models" in lines[0] and " 200 " in lines[0]
    assert KEY not in caplog.text


def test_health_needs_no_key(server):
    assert _http(server, "/health", key="") == (200, {"status": "ok"})


def test_run_directory_serves_its_adapter_in_its_template(trained):
    model = load_served_model(trained[0])
    assert model.template == "alpaca"  # the config default: runs train in Alpaca
    prompt = model.render(ASK)
    assert "### Instruction:\nAnswer briefly.\n\nWhat causes anaemia?\n\n### Response:\n" in prompt
    assert all(torch.equal(model.handle.get_adapter()[k], v) for k, v in trained[1].items())
    assert isinstance(model.complete(ASK, max_tokens=4).text, str)


def test_a_folder_that_is_neither_is_a_user_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FedpitError, match="neither a run directory"):
        load_served_model(tmp_path)


def test_a_pickled_adapter_is_refused(tmp_path, trained):
    (tmp_path / "adapter_config.json").write_text((trained[0] / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FedpitError, match="pickle"):
        load_served_model(tmp_path)


def test_serve_forever_prints_the_url_and_stops_on_sigterm(trained):
    code = ("import sys; from fedpit.serving import load_served_model, serve_forever; "
            "serve_forever(load_served_model(sys.argv[1], dtype='fp32'), port=0)")
    process = subprocess.Popen([sys.executable, "-c", code, str(trained[0] / "adapter")], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+/v1", process.stdout.readline()).group(0)
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as answer:
            assert json.loads(answer.read()) == {"status": "ok"}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_leaving_running_closes_kept_alive_connections_and_ends_every_thread(served):
    """A client that keeps its connection open must not keep a handler thread (and the model) alive
    past the block: such a thread could free the model while the interpreter exits, which aborts."""
    server = make_server(served)
    context = server.running()
    context.__enter__()
    connection = http.client.HTTPConnection(*server.server_address, timeout=10)
    stopper = threading.Thread(target=context.__exit__, args=(None, None, None))
    try:
        connection.request("GET", "/health")
        assert json.loads(connection.getresponse().read()) == {"status": "ok"}  # the connection stays open
        stopper.start()
        stopper.join(timeout=20)
        assert not stopper.is_alive(), "leaving the block waited for the client to hang up"
        assert not any(t.is_alive() for t in server._handlers)
        with pytest.raises((http.client.HTTPException, ConnectionError)):  # the server closed its end
            connection.request("GET", "/health")
            connection.getresponse()
    finally:
        connection.close()  # on a failure too: the handler's read ends, and with it the server's threads
        if stopper.is_alive():
            stopper.join(timeout=20)
