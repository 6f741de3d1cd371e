"""Pairwise LLM judge over any OpenAI-compatible endpoint: the FedPIT paper's utility protocol.

The paper (after AlpaCare) shows a judge model two answers to one instruction and asks which is
better, in both orders, because LLM judges favour a position; Win / Tie / Lose is read from the
two replies together and the reported figure is Win+Tie. Here a candidate answer is judged
against the set's reference answer, or head to head against another model's answer.

Every request is cached by (judge model, template, prompt) in an append-only file that is fsynced
per reply, so a rerun or a resumed comparison sends no request twice and a crash loses no
verdict. A reply that names no verdict is kept and counted as `invalid`, never a crash. Backends
are registered by name (`JUDGES`); "openai" uses the `openai` client, which speaks to OpenAI,
vLLM, llama.cpp's server, Ollama and `fedpit serve`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedpit.config import JudgeConfig
from fedpit.errors import FedpitError
from fedpit.registry import Registry

VERDICTS = ("win", "tie", "lose", "invalid")
CHOICE = re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.IGNORECASE)
BARE_CHOICE = re.compile(r"^\W*(A|B|C|tie)\W*$", re.IGNORECASE)

PAIRWISE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the medical instruction displayed below. Choose the assistant whose response follows the instruction "
    "and answers it better: consider helpfulness, relevance, accuracy, depth and clinical safety. Do not let "
    "the order in which the responses are presented, their length or the assistants' names influence you. "
    "Explain briefly, then output your final verdict strictly in this format: \"[[A]]\" if assistant A is "
    "better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie."
)
PAIRWISE_USER = (
    "[Instruction]\n{instruction}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's "
    "Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
TEMPLATES = {"pairwise": (PAIRWISE_SYSTEM, PAIRWISE_USER)}


class JudgeBackend(Protocol):
    """Sends one chat request and returns the reply's text."""

    model: str

    def preflight(self) -> None: ...

    def ask(self, messages: list[dict[str, str]]) -> str: ...


JUDGES: Registry[Callable[[JudgeConfig], JudgeBackend]] = Registry("judge backend")


@JUDGES.register("openai")
class OpenAIJudge:
    """The `openai` client; its own retries (exponential backoff on connection errors, 429 and 5xx)
    are the retry policy, `max_retries` times per request."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.model = config.model
        self.client = None  # made by preflight(): a fully cached rerun needs neither the key nor the server

    def preflight(self) -> None:
        """Check the key's variable, then list the endpoint's models, before any verdict is asked for: an
        unreachable endpoint, a refused key or a model the endpoint does not serve is one clear error,
        with nothing spent."""
        import openai

        config = self.config
        if config.api_key_env and not os.environ.get(config.api_key_env):
            raise FedpitError(f"the judge's key is read from the environment variable {config.api_key_env} "
                              f"(eval.judge.api_key_env), which is not set; export it, or set "
                              f"eval.judge.api_key_env='' for an endpoint that needs no key")
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        self.client = openai.OpenAI(base_url=config.endpoint, api_key=key or "no-key", timeout=config.timeout,
                                    max_retries=config.max_retries)
        try:
            served = [m.id for m in self.client.with_options(max_retries=0).models.list()]
        except openai.AuthenticationError:
            raise FedpitError(f"the judge endpoint {config.endpoint} refused the key in {config.api_key_env}; "
                              f"check the key (eval.judge.api_key_env names the variable)") from None
        except openai.NotFoundError:
            return  # the server has no model listing: nothing more to check before the first request
        except openai.APIConnectionError as exc:
            raise FedpitError(f"cannot reach the judge endpoint {config.endpoint} ({exc.__cause__ or exc}); "
                              f"check eval.judge.endpoint (an OpenAI-compatible base URL such as "
                              f"http://127.0.0.1:8000/v1) and that the server is running") from None
        except openai.APIStatusError as exc:
            raise FedpitError(f"the judge endpoint {config.endpoint} answered {exc.status_code} to a model "
                              f"listing; check eval.judge.endpoint") from None
        if served and self.model not in served:
            raise FedpitError(f"the judge endpoint serves {', '.join(served[:8])}, not '{self.model}'; set "
                              f"eval.judge.model to one of them")

    def ask(self, messages: list[dict[str, str]]) -> str:
        reply = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0.0,
                                                    max_tokens=self.config.max_tokens)
        return reply.choices[0].message.content or ""


def template_texts(name: str) -> tuple[str, str]:
    """A built-in template, or a file holding the system text, a line '---', and the user text with
    {instruction}, {answer_a} and {answer_b}."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    path = Path(name).expanduser()
    if not path.is_file():
        raise FedpitError(f"eval.judge.template '{name}' is neither a built-in template ({', '.join(TEMPLATES)}) "
                          f"nor a file")
    system, sep, user = path.read_text(encoding="utf-8").partition("\n---\n")
    if not sep or not all(f"{{{k}}}" in user for k in ("instruction", "answer_a", "answer_b")):
        raise FedpitError(f"judge template {path} must be the system text, a line '---', then the user text with "
                          f"{{instruction}}, {{answer_a}} and {{answer_b}}")
    return system.strip(), user.strip()


def parse_choice(reply: str) -> str:
    """'A', 'B', 'C' (tie) or 'invalid': the last [[X]] of the reply, or a reply that is only the letter."""
    found = CHOICE.findall(reply)
    if found:
        letter = found[-1].upper()
    else:
        bare = BARE_CHOICE.match(reply.strip())
        if not bare:
            return "invalid"
        letter = bare.group(1).upper()
    return "C" if letter == "TIE" else letter


def combine(candidate_first: str, candidate_second: str) -> str:
    """The candidate's verdict from both orders: win or lose only when both orders agree; a tie or a
    disagreement (position bias) is a tie; an invalid reply in either order makes the pair invalid."""
    if "invalid" in (candidate_first, candidate_second):
        return "invalid"
    first = {"A": "win", "B": "lose", "C": "tie"}[candidate_first]
    second = {"A": "lose", "B": "win", "C": "tie"}[candidate_second]
    return first if first == second else "tie"


@dataclass(frozen=True)
class Pair:
    """One comparison: the candidate's answer and the other (a reference, or another model's)."""

    id: str
    instruction: str
    candidate: str
    other: str


@dataclass
class Judgement:
    id: str
    verdict: str
    orders: list[dict[str, str]] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        return {"id": self.id, "verdict": self.verdict, "orders": self.orders}


class VerdictCache:
    """Replies by sha256(judge model, template, messages), one JSON line each, fsynced as they arrive."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.replies: dict[str, str] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash mid-append
                self.replies[entry["key"]] = entry["reply"]

    @staticmethod
    def key(model: str, template: tuple[str, str], messages: list[dict[str, str]]) -> str:
        text = json.dumps({"model": model, "template": template, "messages": messages}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def add(self, key: str, model: str, reply: str) -> None:
        self.replies[key] = reply
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "model": model, "reply": reply}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


@dataclass
class JudgeRun:
    judgements: list[Judgement]
    requests: int
    failures: list[str]

    def counts(self) -> dict[str, int]:
        found = Counter(j.verdict for j in self.judgements)
        return {v: found.get(v, 0) for v in VERDICTS}


def judge_pairs(backend: JudgeBackend, template: tuple[str, str], pairs: list[Pair], cache: VerdictCache,
                max_concurrency: int = 4, on_progress: Callable[[int, int], None] | None = None) -> JudgeRun:
    """Both orders of every pair, from the cache where it has them, else from the backend, at most
    `max_concurrency` requests at a time. A request that still fails after the client's retries is
    listed in `failures` and its pair left out, so a rerun asks only for what is missing."""
    system, user = template

    def messages(first: str, second: str, instruction: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": system},
                {"role": "user", "content": user.format(instruction=instruction, answer_a=first, answer_b=second)}]

    wanted = {}
    for pair in pairs:
        for order, (a, b) in (("candidate-first", (pair.candidate, pair.other)),
                              ("candidate-second", (pair.other, pair.candidate))):
            request = messages(a, b, pair.instruction)
            wanted[(pair.id, order)] = (VerdictCache.key(backend.model, template, request), request)
    missing = {k: v for k, v in wanted.items() if v[0] not in cache.replies}
    failures: list[str] = []
    if missing:
        backend.preflight()
    done = 0

    def ask(item):
        key, request = item
        try:
            return key, backend.ask(request), None
        except Exception as exc:  # the client already retried; keep the rest of the comparison going
            return key, None, f"{type(exc).__name__}: {str(exc)[:200]}"

    with ThreadPoolExecutor(max_workers=max(1, max_concurrency)) as pool:
        for key, reply, error in pool.map(ask, list(missing.values())):
            done += 1
            if error is None:
                cache.add(key, backend.model, reply)
            else:
                failures.append(error)
            if on_progress:
                on_progress(done, len(missing))
    judgements = []
    for pair in pairs:
        orders = []
        for order in ("candidate-first", "candidate-second"):
            reply = cache.replies.get(wanted[(pair.id, order)][0])
            if reply is None:
                break
            orders.append({"order": order, "choice": parse_choice(reply), "reply": reply})
        if len(orders) == 2:
            judgements.append(Judgement(pair.id, combine(orders[0]["choice"], orders[1]["choice"]), orders))
    return JudgeRun(judgements=judgements, requests=len(missing) - len(failures), failures=failures)


def win_tie(counts: dict[str, int]) -> float:
    """The paper's figure: share of valid verdicts that are a win or a tie."""
    valid = counts["win"] + counts["tie"] + counts["lose"]
    return (counts["win"] + counts["tie"]) / valid if valid else float("nan")


def build_backend(config: JudgeConfig, backend: str = "openai") -> JudgeBackend:
    if not config.endpoint:
        raise FedpitError("no judge configured: set eval.judge.endpoint (an OpenAI-compatible base URL) and "
                          "eval.judge.model, e.g. --set eval.judge.endpoint='http://127.0.0.1:8000/v1'")
    return JUDGES.get(backend)(config)
