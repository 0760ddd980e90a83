"""Response formats: the stage where a job's schema compiles, off the loop, outside admission.

Rule: a job with a `response_format` goes on to admission only with its grammar compiled. A
format in the cache is taken at once; any other compiles on a thread of its own (one at a
time, never on the loop or the executor) while the job waits here, holding no budget. A
format that does not compile in `COMPILE_TIMEOUT_S` is the producer's error (`bad_schema`).
A job that waited here may have been cancelled meanwhile: the cancel stage screens it again
(`screen`) before it goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from worker.broker.validate import Ticket
from worker.model.grammar import COMPILE_TIMEOUT_S, GrammarError, Grammars
from worker.ops.stats import WorkerStats


class Formats:
    def __init__(self, grammars: Grammars | None, stats: WorkerStats,
                 then: Callable[[Ticket], None], refuse: Callable[[Ticket, str], None],
                 screen: Callable[[Ticket, str], bool]):
        # None on an embedding worker: it refuses such jobs by task at the edge.
        self.grammars = grammars
        self._stats = stats
        self._then = then  # the job's grammar is ready: on to admission
        self._refuse = refuse  # answer the job `bad_schema`, with why
        self._screen = screen  # True: the job was cancelled meanwhile (and is answered)
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._compiling: set[asyncio.Task] = set()

    def prepare(self, t: Ticket) -> None:
        fmt = t.job.response_format
        if fmt is not None and t.grammar is None:
            t.grammar = self.grammars.cached(fmt.as_dict())
            if t.grammar is None:  # compiled off the loop; it waits outside admission
                task = asyncio.create_task(self._compile_then(t))
                self._compiling.add(task)
                task.add_done_callback(self._compiling.discard)
                return
        self._then(t)

    async def _compile_then(self, t: Ticket) -> None:
        fmt = t.job.response_format.as_dict()
        try:
            t.grammar = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(self._compiler, self.grammars.compile,
                                                           fmt),
                COMPILE_TIMEOUT_S)
        except (GrammarError, asyncio.TimeoutError) as e:
            why = str(e) if isinstance(e, GrammarError) else (
                f"the schema did not compile within {COMPILE_TIMEOUT_S:g} s")
            self._refuse(t, why)
            return
        finally:
            self._stats.grammar_compiles = self.grammars.compiles
            self._stats.grammar_compile_s = self.grammars.compile_s
        if not self._screen(t, "cancelled while its schema compiled"):
            self._then(t)
