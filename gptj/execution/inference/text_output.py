"""Showing generated text: one block per prompt, the same whether streamed or printed at the end.

    --- prompt: 'The cat'
    <the continuation, cut before a stop string>
    --- (12 tokens, finish: stop)

`StreamPrinter` writes these blocks while tokens come (plug its `on_token` / `on_finish` into
TextGenerationPipeline.generate, batch size 1). It only writes text that can no longer
change, so what is shown ends up exactly as `format_result` of the finished result.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def header(prompt: str) -> str:
    return f"--- prompt: {prompt!r}\n"


def footer(num_tokens: int, finish_reason: str) -> str:
    return f"\n--- ({num_tokens} tokens, finish: {finish_reason})\n"


def format_result(result) -> str:
    """The block of one pipelines.GeneratedText."""
    return header(result.prompt) + result.text + footer(len(result.token_ids), result.finish_reason)


def settled_text(text: str, stop: list[str]) -> str:
    """The part of a growing continuation that no later token can change: everything before a
    stop string, less a tail that may be the start of one or an unfinished character."""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    if cut >= 0:
        return text[:cut]
    hold = 0
    for s in stop:
        hold = max(hold, next((k for k in range(min(len(s) - 1, len(text)), 0, -1)
                               if text.endswith(s[:k])), 0))
    return text[: len(text) - hold].rstrip("\ufffd")


class StreamPrinter:
    """Writes each prompt's block as it is generated (prompts run one at a time)."""

    def __init__(self, prompts: list[str], decode: Callable[[list[int]], str],
                 stop: list[str] | None = None, write: Callable[[str], object] | None = None):
        self.prompts, self.decode = prompts, decode
        self.stop = [s for s in (stop or []) if s]
        self._write = write or sys.stdout.write
        self.current, self.tokens, self.shown = -1, [], ""

    def _emit(self, text: str) -> None:
        self._write(text)
        if self._write is sys.stdout.write:
            sys.stdout.flush()

    def _start(self, index: int) -> None:
        if index != self.current:
            self.current, self.tokens, self.shown = index, [], ""
            self._emit(header(self.prompts[index]))

    def on_token(self, index: int, token: int) -> None:
        self._start(index)
        self.tokens.append(token)
        text = settled_text(self.decode(self.tokens), self.stop)
        if len(text) > len(self.shown) and text.startswith(self.shown):
            self._emit(text[len(self.shown):])
            self.shown = text

    def on_finish(self, index: int, result) -> None:
        """`result`: the prompt's pipelines.GeneratedText (text already cut at a stop string)."""
        self._start(index)
        rest = result.text[len(self.shown):] if result.text.startswith(self.shown) else result.text
        self._emit(rest + footer(len(result.token_ids), result.finish_reason))
        self.current = -1
