"""Token ids -> text that is safe to show as it is generated."""

from __future__ import annotations

from lmforge.tokenizer import Tokenizer


class TextStream:
    """Token ids -> text deltas that are safe to show: no half UTF-8 characters, no partial stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0  # decode from `prefix` so merged spaces come out right
        self.text = ""  # decoded so far
        self.shown = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        if self.read < len(self.ids) and not self.stopped:
            before = self.tokenizer.decode(self.ids[self.prefix : self.read])
            self.text += self.tokenizer.decode(self.ids[self.prefix :])[len(before) :]
            self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self.text.find(s, max(0, self.shown - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:  # hold back a tail that could still grow into a stop string
            hold = max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - hold
        delta, self.shown = self.text[self.shown : end], max(self.shown, end)
        return delta
