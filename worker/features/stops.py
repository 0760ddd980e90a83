"""Stop strings: the stage that owns the matchers of admitted jobs, by key.

Rule: the executor only reports the tokens of a job with stop strings as it makes them; a
match here asks it to end the job (`end`, wired by the app), and when the job leaves the
executor its matcher leaves with it, cutting what was generated after the matching token
while the request travelled (`worker.model.stops` does the decoding and the matching).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from worker.model.stops import StopMatcher
from worker.model.tokenizer import Tokenizer

if TYPE_CHECKING:  # the engine's record, read by attribute (no engine import at run time)
    from worker.engine.sequence import Completion


class Stops:
    def __init__(self, tokenizer: Tokenizer, end: Callable[[int, str], None]):
        self._tokenizer = tokenizer
        self._end = end  # end a running job at the next step boundary (the executor)
        self._matchers: dict[int, StopMatcher] = {}  # admitted jobs with stop strings, by key

    def watch(self, key: int, stops: list[str]) -> None:
        """A job with stop strings is admitted."""
        self._matchers[key] = StopMatcher(self._tokenizer, stops)

    def progress(self, progress: list[tuple[int, int]]) -> None:
        """Tokens of jobs with stop strings, as the executor made them: a match ends the job."""
        for key, tok in progress:
            m = self._matchers.get(key)
            if m is not None and m.end is None and m.feed((tok,)):
                self._end(key, "stop")

    def finish(self, comps: list[Completion]) -> dict[int, str]:
        """These jobs left the executor, and their matchers with them. A generation a stop
        string ended keeps its tokens through the one that completed it; its Result's text
        is what came before the string: those texts, by key."""
        texts: dict[int, str] = {}
        for c in comps:
            m = self._matchers.pop(c.key, None)
            if (m is not None and c.embedding is None and c.finish_reason != "cancelled"
                    and m.feed(c.tokens[m.fed:])):
                c.tokens, c.finish_reason = c.tokens[:m.end], "stop"
                texts[c.key] = m.text[:m.cut]
        return texts
