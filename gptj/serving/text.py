"""Text out of tokens: incremental detokenization with stop strings, and the chat template."""

from __future__ import annotations

from collections.abc import Callable

from .errors import bad_request

INCOMPLETE = "\ufffd"  # what a byte-level decoder shows for a character cut in the middle


class TextStream:
    """A request's tokens as text deltas that concatenate to its final text.

    The final text ends before the first stop string. While tokens still come, the last
    len(longest stop) - 1 characters and any half-decoded character are held back, so a delta
    never holds text that a later stop string or byte would take back.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode, self.stops = decode, [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0

    def _stop_cut(self, text: str) -> int:
        found = [text.find(s) for s in self.stops if s in text]
        return min(found) if found else len(text)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        safe = min(len(text) - self.hold, self._stop_cut(text))
        while safe > self.sent and text[safe - 1] == INCOMPLETE:
            safe -= 1
        if safe <= self.sent:
            return ""
        delta = text[self.sent:safe]
        self.sent = safe
        return delta

    def finish(self) -> str:
        """The rest of the text, cut before the first stop string."""
        text = self.decode(self.tokens)
        text = text[: self._stop_cut(text)]
        delta = text[self.sent:]
        self.sent = len(text)
        return delta


ROLE_ALIASES = {"developer": "system"}


def message_text(content, index: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"messages[{index}].content: only text parts are supported", "messages")
        texts.append(part["text"])
    return "".join(texts)


def render_chat(messages, template) -> str:
    """The prompt for `messages` under a ChatTemplate (gptj.execution.inference.config)."""
    if not messages:
        raise bad_request("messages must hold at least one message", "messages")
    parts = []
    for i, message in enumerate(messages):
        role = ROLE_ALIASES.get(message.role, message.role)
        pattern = getattr(template, role, None) if role in ("system", "user", "assistant") else None
        if pattern is None:
            raise bad_request(f"messages[{i}].role {message.role!r} is not one of system, user, assistant",
                              "messages")
        parts.append(pattern.replace("{content}", message_text(message.content, i)))
    return "".join(parts) + template.generation_prompt
