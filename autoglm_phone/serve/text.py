"""Generated tokens to text deltas: incremental detokenising, stop strings, the reasoning split.

:class:`TextStream` is fed one token at a time and returns what may be shown so far, split into
reasoning and answer (:func:`~autoglm_phone.data.instructions.split_reasoning`). It holds back
what could still change: a byte-level token that ends inside a UTF-8 character, a tail that may
be the start of a stop string, a tail that may be the start of ``</think>``. So the streamed
deltas always add up to the non-streamed answer.
"""

from __future__ import annotations

from typing import Any

from autoglm_phone.data.instructions import split_reasoning


class TextStream:
    """One request's output text as tokens arrive."""

    def __init__(self, tokenizer: Any, stop: list[str] | None = None, thinking: bool = False):
        self.tokenizer, self.thinking = tokenizer, thinking
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.reasoning, self.content = "", ""  # sent so far
        self.stopped = False  # a stop string was found: generation should end

    def push(self, token_id: int) -> tuple[str, str]:
        """Add a token; the new ``(reasoning, content)`` text that can be sent now."""
        self.ids.append(token_id)
        return self._update(final=False)

    def finish(self) -> tuple[str, str]:
        """Everything still held back, at the end of generation."""
        return self._update(final=True)

    def _update(self, final: bool) -> tuple[str, str]:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, final, self.stopped = text[:cut], True, True
        elif not final:
            if text.endswith("\ufffd"):  # a character split across tokens
                return "", ""
            text = text[: len(text) - self.hold]
        reasoning, content = split_reasoning(text, self.thinking, final)
        delta = reasoning[len(self.reasoning) :], content[len(self.content) :]
        self.reasoning, self.content = reasoning, content
        return delta
