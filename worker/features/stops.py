"""Stop strings: the stage that owns the matchers of admitted jobs, by key.

Rule: the executor only reports the tokens of a job with stop strings as it makes them; a
match here asks it to end the job (`end`, wired by the app), and when the job leaves the
executor its matcher leaves with it (`release`), and `cut` trims what was generated after
the matching token while the request travelled (`worker.model.stops` does the decoding and
the matching). A matcher that raises is its own job's failure (`stop_failed`), never the
batch's or the loop's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from schemas import ErrorCode
from worker.model.stops import StopMatcher
from worker.model.tokenizer import Tokenizer
from worker.ops import failpoints

if TYPE_CHECKING:  # the engine's record, read by attribute (no engine import at run time)
    from worker.engine.sequence import Completion


class Stops:
    def __init__(self, tokenizer: Tokenizer, end: Callable[..., None]):
        self._tokenizer = tokenizer
        # End a running job at the next step boundary (the executor's `end`: key, reason,
        # and for "error" its (code, why)).
        self._end = end
        self._matchers: dict[int, StopMatcher] = {}  # admitted jobs with stop strings, by key
        self._job_ids: dict[int, str] = {}  # their producers' ids, for job-specific failpoints

    def watch(self, key: int, job_id: str, stops: list[str]) -> None:
        """A job with stop strings is admitted."""
        self._matchers[key] = StopMatcher(self._tokenizer, stops)
        self._job_ids[key] = job_id

    def progress(self, progress: list[tuple[int, int]]) -> None:
        """Tokens of jobs with stop strings, as the executor made them: a match ends the job."""
        for key, tok in progress:
            m = self._matchers.get(key)
            if m is None or m.end is not None:
                continue
            try:
                failpoints.hit("stops.feed", jobs=lambda k=key: (self._job_ids[k],))
                found = m.feed((tok,))
            except Exception as e:  # noqa: BLE001 - a matcher that fails is its job's alone
                self.release(key)
                self._end(key, "error", (ErrorCode.STOP_FAILED.value,
                                         f"matching its stop strings failed: {e!r}"))
                continue
            if found:
                self._end(key, "stop")

    def release(self, key: int) -> StopMatcher | None:
        """The job left the executor: its matcher leaves the stage with it."""
        self._job_ids.pop(key, None)
        return self._matchers.pop(key, None)


class StopFailed(Exception):
    """A job's stop matcher raised while its Result was built."""


def cut(m: StopMatcher, c: Completion) -> str | None:
    """Feed `m` the tokens it has not seen. When a stop string ended the job, keep its tokens
    through the one that completed it and return its Result's text, what came before the
    string; else None. A matcher that raises raises StopFailed (the job's own failure)."""
    try:
        found = m.feed(c.tokens[m.fed:])
    except Exception as e:  # noqa: BLE001 - re-raised as its job's own failure
        raise StopFailed(repr(e)) from e
    if not found:
        return None
    c.tokens, c.finish_reason = c.tokens[:m.end], "stop"
    return m.text[:m.cut]
