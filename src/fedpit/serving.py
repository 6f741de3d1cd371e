"""`fedpit serve`: a tuned model behind the OpenAI chat-completions API, on loopback by default, so a
clinic can try what it trained with any OpenAI client and tests have a real server for an LLM judge.
The stdlib server keeps it dependency-free; one model is shared, so generations run one at a time."""

from __future__ import annotations

import hmac
import json
import logging
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

from safetensors.torch import load_file

from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines.generation import DecodingOptions, generate
from fedpit.errors import FedpitError, ModelError
from fedpit.model import ADAPTER_NAME, ModelHandle, load_model
from fedpit.prompts import make_format
from fedpit.runs import RunDir
from fedpit.types import AdapterState

log = logging.getLogger(__name__)
PEFT_PREFIX = "base_model.model."
MAX_BODY_BYTES = 8 << 20
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An answer in OpenAI's error shape; by default a client mistake (400)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.code = status, code

    def payload(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": str(self), "type": kind, "code": self.code}}


class Completion(NamedTuple):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class ServedModel:
    """A loaded model with its adapter in the slot. `template` is how chat messages become a prompt:
    "chat" (the tokenizer's template) or "alpaca" (what Alpaca-trained runs answer best in)."""

    handle: ModelHandle
    template: str = "chat"
    max_tokens_limit: int = 1024
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def render(self, messages: list[dict[str, str]]) -> str:
        if self.template == "chat":
            return self.handle.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ApiError("the alpaca template needs a message with role 'user'")
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        return make_format("alpaca", self.handle.tokenizer).render(f"{system}\n\n{users[-1]}" if system else users[-1])

    def complete(self, messages: list[dict[str, str]], max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop: tuple[str, ...] = (), seed: int | None = None) -> Completion:
        """Token counts are of the prompt and of the returned text re-tokenised (the engine returns text),
        so "length" means the answer filled `max_tokens`."""
        max_tokens = max(1, min(max_tokens, self.max_tokens_limit))
        prompt = self.render(messages)
        if self.template == "alpaca":
            stop = stop + make_format("alpaca", self.handle.tokenizer).stop_strings
        context = getattr(self.handle.model.config, "max_position_embeddings", 2048)
        options = DecodingOptions(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                                  top_p=top_p, stop_strings=stop, max_prompt_tokens=max(16, context - max_tokens))
        with self._lock:  # generate mutates the tokenizer's padding settings and the model's LoRA layers
            text = generate(self.handle, [prompt], options, batch_size=1, seed=seed)[0]
            prompt_tokens = min(len(self.handle.tokenizer(prompt)["input_ids"]), options.max_prompt_tokens)
            generated = len(self.handle.tokenizer(text, add_special_tokens=False)["input_ids"])
        finish = "length" if generated >= max_tokens else "stop"
        return Completion(text, prompt_tokens, min(generated, max_tokens), finish)


def load_served_model(target: Path, base: str | None = None, dtype: str | None = None,
                      template: str | None = None) -> ServedModel:
    """`template` defaults to a run's own (a run answers best in what it was trained on), "chat" for a bare
    adapter. The adapter is read before the base model is loaded, so a bad folder fails in milliseconds."""
    target = Path(target)
    if (target / "config.toml").is_file():
        config = RunDir(target).config()
        model_config, lora_config, default_template = config.model, config.lora, config.prompt.template
        folder = target / "adapter"
    elif (target / "adapter_config.json").is_file():
        (model_config, lora_config), default_template, folder = _adapter_settings(target, base), "chat", target
    else:
        raise FedpitError(f"'{target}' is neither a run directory (config.toml) nor a PEFT adapter folder "
                          f"(adapter_config.json + adapter_model.safetensors); pass a run directory or its adapter/")
    state, template = _read_adapter(folder / "adapter_model.safetensors"), template or default_template
    if template not in ("chat", "alpaca"):
        raise FedpitError(f"unknown template {template!r}; choose 'chat' or 'alpaca'")
    model_config = replace(model_config, name=base or model_config.name, dtype=dtype or model_config.dtype)
    try:
        handle = load_model(model_config, lora_config)
    except ModelError as exc:
        raise FedpitError(f"{exc} (if the base model moved, pass it with --base)") from None
    if template == "chat" and not getattr(handle.tokenizer, "chat_template", None):
        raise FedpitError(f"the tokenizer of '{model_config.name}' has no chat template; serve with template 'alpaca'")
    try:  # set_adapter names mismatched keys; a shape mismatch fails in the copy
        handle.set_adapter(state)
    except (ValueError, RuntimeError) as exc:
        raise FedpitError(f"the adapter of '{target}' does not fit the base model ({str(exc).splitlines()[0]}); "
                          f"pass the base model it was trained on") from None
    return ServedModel(handle=handle, template=template)


def _adapter_settings(folder: Path, base: str | None) -> tuple[ModelConfig, LoraConfig]:
    """The base model and LoRA shape an adapter was saved with; plain LoRA only, as `load_model` builds."""
    try:
        peft = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FedpitError(f"cannot read {folder / 'adapter_config.json'} ({exc}); re-save the adapter") from None
    targets, extras = peft.get("target_modules"), ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern")
    plain = peft.get("peft_type") == "LORA" and isinstance(targets, list) and {"r", "lora_alpha"} <= peft.keys()
    if not plain or any(peft.get(k) for k in extras):
        raise FedpitError(f"adapter '{folder}' is not a plain LoRA on a list of target_modules (no DoRA, rsLoRA or "
                          f"per-layer patterns), as fedpit trains; serve a fedpit run's adapter")
    name = base or peft.get("base_model_name_or_path") or "smollm2-135m-instruct"
    lora = LoraConfig(rank=int(peft["r"]), alpha=int(peft["lora_alpha"]), dropout=0.0, target_modules=sorted(targets))
    return ModelConfig(name=name, dtype="auto"), lora


def _read_adapter(file: Path) -> AdapterState:
    """PEFT drops the adapter name (".default.") when saving; the slot's keys also carry none, so the
    keys match once both have PEFT's "base_model.model." prefix. Safetensors only: never unpickle."""
    if not file.is_file():
        raise FedpitError(f"'{file}' is missing: a run writes it when it completes (`fedpit run --resume` finishes "
                          f"one), and fedpit reads no pickled adapter_model.bin (save with safe_serialization=True)")
    state = {key.replace(f".{ADAPTER_NAME}.", "."): tensor for key, tensor in load_file(str(file)).items()}
    return {key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key: tensor for key, tensor in state.items()}


class FedpitServer(ThreadingHTTPServer):
    """Counts requests per route so a test can check what a client (e.g. an LLM judge) sent, and
    knows its open connections so `running` can end every thread it started."""

    daemon_threads = True  # Ctrl-C on `fedpit serve` does not wait for a client's idle keep-alive connection

    def __init__(self, address: tuple[str, int], handler: type, model: ServedModel, api_key: str | None,
                 model_name: str) -> None:
        super().__init__(address, handler)
        self.model, self.api_key, self.model_name, self.started = model, api_key, model_name, int(time.time())
        self._counts, self._lock = Counter({"chat_completions": 0, "models": 0}), threading.Lock()
        self._open: set[socket.socket] = set()  # connections whose handler thread still reads them
        self._handlers: list[threading.Thread] = []

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address), daemon=True)
        with self._lock:
            self._open.add(request)
            self._handlers = [t for t in self._handlers if t.is_alive()] + [thread]
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.discard(request)
        super().shutdown_request(request)

    @contextmanager
    def running(self) -> Iterator[FedpitServer]:
        """Serves from background threads until the block ends, then stops accepting, closes the
        connections clients keep alive, and waits for every thread it started (a generation under
        way finishes first). Why wait: a thread that outlived the block could become the last
        holder of the model and free its tensors itself, possibly while the interpreter exits,
        which aborts the process."""
        acceptor = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        acceptor.start()
        try:
            yield self
        finally:
            self.shutdown()
            acceptor.join()
            with self._lock:
                still_open, handlers = list(self._open), list(self._handlers)
            for connection in still_open:
                try:
                    connection.shutdown(socket.SHUT_RDWR)  # the handler's idle keep-alive read returns at once
                except OSError:
                    pass  # the client closed it meanwhile
            for thread in handlers:
                thread.join()
            self.server_close()

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}/v1"

    def count(self, route: str) -> None:
        with self._lock:
            self._counts[route] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: OpenAI clients reuse connections
    server: FedpitServer

    def _answer(self) -> None:
        route = self._post if self.command == "POST" else self._get
        try:
            status, payload = 200, route(self.path.split("?", 1)[0].rstrip("/"))
        except ApiError as exc:
            status, payload = exc.status, exc.payload()
        except Exception:  # a bug answers 500 and keeps the server up
            log.exception("%s %s failed", self.command, self.path)
            status, payload = 500, ApiError("the server failed; see its log", 500, "server_error").payload()
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer  # http.server's names for the handlers

    def _get(self, path: str) -> dict[str, Any]:
        if path == "/health":
            return {"status": "ok"}
        if path == "/fedpit/requests":
            return self.server.counts()
        if path != "/v1/models":
            raise ApiError(f"no route {path}", 404, "not_found")
        self._admit("models")
        return {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                            "created": self.server.started, "owned_by": "fedpit"}]}

    def _post(self, path: str) -> dict[str, Any]:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # an unread body would be taken for the next request
            raise ApiError(f"send a JSON body with a Content-Length of at most {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(int(length))  # before any answer, so a 401 or 404 leaves the connection reusable
        if path != "/v1/chat/completions":
            raise ApiError(f"no route {path}", 404, "not_found")
        self._admit("chat_completions")
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(f"the body is not valid JSON ({exc})") from None
        done = self.server.model.complete(**_parse_chat(body))
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.server.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                             "finish_reason": done.finish_reason}],
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                          "total_tokens": done.prompt_tokens + done.completion_tokens}}

    def _admit(self, route: str) -> None:
        """Count the request (whatever its outcome: a test counts what a client sent), then check the key."""
        self.server.count(route)
        key = self.server.api_key
        if key and not hmac.compare_digest(self.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()):
            raise ApiError("missing or wrong API key in 'Authorization: Bearer <key>'", 401, "invalid_api_key")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        """Request line and status only: headers (the API key) never reach the log."""
        log.info("%s %s", self.address_string(), format % args)


def _parse_chat(body: Any) -> dict[str, Any]:
    """OpenAI's request fields, checked so a client mistake is a 400 that says what to change."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise ApiError("the body must be a JSON object with a non-empty 'messages' list")
    if body.get("stream") or body.get("n") not in (None, 1):
        raise ApiError("stream=true and n>1 are unsupported; send stream=false and n=1")
    get = {k: v for k, v in body.items() if v is not None}.get  # JSON null counts as unset, zero does not
    stop = [get("stop")] if isinstance(get("stop"), str) else get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError("'stop' must be a string or a list of strings")
    max_tokens = get("max_completion_tokens", get("max_tokens", 256))
    temperature, top_p, seed = get("temperature", 0.0), get("top_p", 1.0), get("seed")
    if not _is(int, max_tokens) or max_tokens < 1 or not _is(float, temperature) or not 0 <= temperature <= 2 \
            or not _is(float, top_p) or not 0 < top_p <= 1 or not (seed is None or _is(int, seed)):
        raise ApiError("need max_tokens >= 1, 0 <= temperature <= 2, 0 < top_p <= 1 and an integer seed")
    return {"messages": [_message(m) for m in body["messages"]], "max_tokens": max_tokens,
            "temperature": float(temperature), "top_p": float(top_p), "stop": tuple(stop), "seed": seed}


def _message(message: Any) -> dict[str, str]:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ApiError(f"each message needs a role among {sorted(ROLES)}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is understood
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str):
        raise ApiError("each message needs a string 'content' (or a list of text parts)")
    return {"role": ROLES[message["role"]], "content": content}


def _is(kind: type, value: Any) -> bool:  # as JSON means it: a bool is no number, an integer is a float
    return not isinstance(value, bool) and isinstance(value, int if kind is int else int | float)


def make_server(model: ServedModel, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                model_name: str = "fedpit") -> FedpitServer:
    """Bound but not serving yet; port 0 picks a free port (see `server.url`)."""
    if host not in ("127.0.0.1", "localhost") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can query the model", host)
    return FedpitServer((host, port), _Handler, model, api_key, model_name)


def serve_forever(model: ServedModel, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                  model_name: str = "fedpit") -> None:
    """Blocks until Ctrl-C or SIGTERM, then closes the socket so the port is free at once."""
    server = make_server(model, host, port, api_key, model_name)
    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None  # SIGTERM acts as Ctrl-C
    print(f"serving '{model_name}' at {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping the server")
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
