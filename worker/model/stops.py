"""Stop strings: generation ends when the decoded text contains one.

The executor never decodes text: it reports the tokens of jobs with stop strings as they
come, and this matcher, on the event loop, decodes them incrementally and finds a stop
string even when it spans tokens. A match asks the executor to end the job; whatever it
generated after the matching token (it ran on while the request travelled) is cut here,
so the Result is the same whenever the request lands: its `text` ends before the stop
string, its `tokens` with the token that completed it.

Incremental decoding: the text a token adds is the decode of a short window of recent
tokens with the token minus the decode without it (so a tokenizer's context-dependent
spacing comes out right), held back while it ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

from collections.abc import Iterable

from worker.model.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"


class StopMatcher:
    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self._longest = max(map(len, stops))
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (what is held back excluded)
        self._prefix = 0  # window start: tokens before it are settled text
        self._read = 0  # tokens whose text is in self.text
        self.end: int | None = None  # tokens to keep: through the one that completed a match
        self.cut: int | None = None  # the Result's text length: up to the match

    @property
    def fed(self) -> int:
        return len(self.tokens)

    def feed(self, tokens: Iterable[int]) -> bool:
        """Take the job's next tokens; True once a stop string has been found."""
        for tok in tokens:
            if self.end is not None:
                return True
            self.tokens.append(tok)
            before = len(self.text)
            self._decode_new()
            if len(self.text) > before:
                self._search(before)
        return self.end is not None

    def _decode_new(self) -> None:
        dec = self.tokenizer.decode
        settled = dec(self.tokens[self._prefix:self._read])
        window = dec(self.tokens[self._prefix:])
        if len(window) > len(settled) and not window.endswith(_INCOMPLETE):
            self.text += window[len(settled):]
            self._prefix, self._read = self._read, len(self.tokens)

    def _search(self, before: int) -> None:
        start = max(0, before - self._longest + 1)  # a match may begin in earlier text
        found = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if found:
            self.cut = min(found)
            self.end = len(self.tokens)
