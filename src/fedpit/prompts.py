"""Instruction templates: how an (instruction, input) becomes the text a model continues.

The paper uses the Alpaca template; `chat` uses the tokenizer's own chat template, which suits
instruction-tuned bases such as SmolLM2-Instruct. Both render demonstrations for in-context
learning, and both name the markers that must never appear inside a generated sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fedpit.types import Example

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


class PromptFormat(Protocol):
    markers: tuple[str, ...]
    """Template markers: a sample that contains one would corrupt later prompts."""
    stop_strings: tuple[str, ...]
    """Where a response ends if the model keeps writing the next turn."""

    def render(self, instruction: str, input: str = "") -> str: ...

    def render_with_demos(self, demos: list[Example], instruction: str, input: str = "") -> str: ...


@dataclass(frozen=True)
class AlpacaFormat:
    markers: tuple[str, ...] = ("### Instruction:", "### Input:", "### Response:")
    stop_strings: tuple[str, ...] = ("### Instruction:", "### Input:", "### Response:", "\n\n\n")

    def render(self, instruction: str, input: str = "") -> str:
        if input:
            return f"{ALPACA_HEADER_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        return f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"

    def render_with_demos(self, demos: list[Example], instruction: str, input: str = "") -> str:
        shots = "".join(f"{self.render(d.instruction, d.input)}{d.output}\n\n" for d in demos)
        return shots + self.render(instruction, input)


@dataclass(frozen=True)
class ChatFormat:
    tokenizer: object
    markers: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    stop_strings: tuple[str, ...] = ("<|im_end|>", "<|im_start|>")

    @staticmethod
    def _user(instruction: str, input: str) -> dict[str, str]:
        return {"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction}

    def render(self, instruction: str, input: str = "") -> str:
        return self.render_with_demos([], instruction, input)

    def render_with_demos(self, demos: list[Example], instruction: str, input: str = "") -> str:
        messages = []
        for demo in demos:
            messages += [self._user(demo.instruction, demo.input), {"role": "assistant", "content": demo.output}]
        messages.append(self._user(instruction, input))
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def make_format(template: str, tokenizer: object) -> PromptFormat:
    if template == "alpaca":
        return AlpacaFormat()
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            from fedpit.errors import ConfigError

            raise ConfigError("prompt.template='chat' but the model's tokenizer has no chat template; use 'alpaca'")
        special = tuple(t for t in getattr(tokenizer, "all_special_tokens", []) if t)
        return ChatFormat(tokenizer=tokenizer, markers=special or ChatFormat.markers)
    raise ValueError(f"unknown template {template!r}")
