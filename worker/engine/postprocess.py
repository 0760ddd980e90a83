"""What a step's sampled tokens do to their sequences: appended, checked, finished.

The scheduler's second half (`worker.engine.scheduler.Scheduler` is a `Postprocess`): the
first decides what a step runs, this takes what it returned. Each row's token is appended
to its sequence; a grammar, logprobs, a watched stream or stop ids are served per token;
a full block of the sequence's tokens gets its content key (the next turn of a
conversation finds this one's reply); a sequence that hit an end token or its length, or
one of whose own parts failed, is finished and its blocks released.

Rows of the persistent batch (`worker.engine.batch`) that need none of the per-token
services take the array path: their tokens appended in one loop, the finish checks made
on the batch's arrays, the batch's mirror of each sequence updated in place; only rows
that finish, fill a block or need the host per token are touched one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from worker.engine.blocks import block_hashes
from worker.engine.sequence import Completion, Sequence
from worker.model.grammar import MAX_WHY, mask_allows
from worker.ops import failpoints

if TYPE_CHECKING:
    from worker.engine.batch import DecodeBatch
    from worker.engine.blocks import BlockPool
    from worker.engine.scheduler import StepPlan

FEW_ROWS = 4  # postprocess takes up to this many decode rows one by one


class Postprocess:
    """The scheduler's state this half reads and writes (set by `Scheduler.__init__`)."""

    batch: DecodeBatch | None
    pool: BlockPool
    block_size: int
    overlap: bool
    eos_ids: frozenset[int]
    running: list[Sequence]
    live: dict[int, Sequence]
    progress: list[tuple[int, int]]
    _running_rows: np.ndarray | None

    def _decode_rows(self, plan: StepPlan) -> np.ndarray:
        """The plan's decode rows in the batch (a plan made outside `schedule`, as the
        kernel ceiling's, names only sequences)."""
        if plan.decode_rows is None:
            plan.decode_rows = self.batch.rows_of(plan.decode)
        return plan.decode_rows

    def postprocess(self, plan: StepPlan, tokens: list[int], now: float,
                    logprobs: np.ndarray | None = None) -> list[Completion]:
        """Append each row's sampled token; retire finished sequences. tokens (and the rows
        of `logprobs`, when the step computed them) follow plan.rows."""
        if self.batch is not None:
            return self._postprocess_batched(plan, tokens, now, logprobs)
        done: list[Completion] = []
        still: list[Sequence] = []
        for i, (seq, tok) in enumerate(zip(plan.rows, tokens, strict=True)):
            reason = self._append(seq, tok, len(seq.req.prompt) - seq.start, now,
                                  None if logprobs is None else logprobs[i])
            if reason is None:
                still.append(seq)
            else:
                done.append(self._finish(seq, reason, now))
        self.running = still
        return done

    def _append(self, seq: Sequence, tok: int, prompt_rows: int, now: float,
                lp: np.ndarray | None = None) -> str | None:
        """Record a sampled token and the rows it cost; the finish reason, if it is the last.

        `prompt_rows`: the rows its prefill occupied (the prompt, or more when padded).
        `lp`: the token's logprob row (chosen, top ids, top logprobs; n as wide as the
        step's widest request), when the step computed them."""
        prefilled = not seq.generated
        seq.computed_tokens += (prompt_rows if prefilled else 0) + 1
        if prefilled:
            seq.first_token_at = now
        req = seq.req
        if seq.failed is None and req.grammar is not None:
            seq.failed = _advance_grammar(seq, tok)
        if seq.failed is not None:
            # One of its own parts failed (before this row was sampled, or on its token):
            # the job ends here, without the token, and alone.
            return "error"
        seq.generated.append(tok)
        if req.logprobs and lp is not None:
            seq.failed = _logprob_row(seq, lp)
        if req.watch:
            self.progress.append((req.key, tok))
        if self.pool.caching:
            self._key_full_blocks(seq)
        if seq.failed is not None:
            return "error"
        if req.grammar is not None and req.grammar.is_stopped():
            return "stop"  # the value is complete (or the grammar took its end token)
        if tok in req.stop_ids or (tok in self.eos_ids and not req.ignore_eos):
            return "stop"
        return "length" if len(seq.generated) >= req.max_new_tokens else None

    def _postprocess_batched(self, plan: StepPlan, tokens: list[int], now: float,
                             logprobs: np.ndarray | None) -> list[Completion]:
        """`postprocess` over the persistent batch: the prompts' first tokens and the rows
        that need the host per token (`DecodeBatch.slow`) one by one; for the rest, their
        tokens appended and the finish checks made on the batch's arrays."""
        b, overlap = self.batch, self.overlap
        done: list[Completion] = []

        def one(i: int, seq: Sequence, prompt_rows: int) -> None:
            if overlap:
                if seq.retired:
                    return
            reason = self._append(seq, tokens[i], prompt_rows, now,
                                  None if logprobs is None else logprobs[i])
            if reason is not None:
                seq.retired = overlap
                done.append(self._finish(seq, reason, now))
            elif seq.row >= 0:
                b.sync(seq)
            else:
                b.join(seq)  # running from its first token on

        n_pre = len(tokens) - len(plan.decode)
        for i, seq in enumerate(s for lane in plan.prefill for s in lane):
            seq.pending -= overlap
            one(i, seq, len(seq.req.prompt) - seq.start)
        seqs = plan.decode
        if len(seqs) <= FEW_ROWS:  # the per-row path costs less than the array operations
            for i, seq in enumerate(seqs):
                seq.pending -= overlap
                one(n_pre + i, seq, 0)
        else:
            self._decode_batched(plan, tokens[n_pre:], now, done, one, n_pre)
        if overlap:
            if done:
                self.running = [s for s in self.running if not s.retired]
                self._running_rows = None
        else:
            if plan.prefill or done:
                self.running = [s for s in plan.rows if s.row >= 0]
                self._running_rows = None
            else:  # the same sequences, in the order the runner grouped them
                self.running, self._running_rows = plan.decode, plan.decode_rows
        b.settle()
        return done

    def _decode_batched(self, plan: StepPlan, toks: list[int], now: float,
                        done: list[Completion], one: Callable[[int, Sequence, int], None],
                        n_pre: int) -> None:
        """The decode rows' tokens: appended, and the finish checks made, on the batch's
        arrays; rows that need the host per token go to `one`."""
        b, overlap, seqs = self.batch, self.overlap, plan.decode
        rows = self._decode_rows(plan)
        if overlap:
            for s in seqs:
                s.pending -= 1
            b.pend[rows] -= 1
            b.nctx[rows] -= 1
            live = ~np.fromiter((s.retired for s in seqs), np.bool_, len(seqs))
        else:
            live = np.ones(len(seqs), dtype=np.bool_)
        slow = b.slow[rows]
        fast = np.flatnonzero(live & ~slow)
        if len(fast) == len(seqs):
            for s, t in zip(seqs, toks):
                s.generated.append(t)
        else:
            for i in fast.tolist():
                seqs[i].generated.append(toks[i])
        fr, ft = rows[fast], np.asarray(toks, dtype=np.int64)[fast]
        b.ngen[fr] += 1
        b.nctx[fr] += 1
        b.rows_run[fr] += 1  # its computed tokens, settled when it leaves
        b.last[fr] = ft
        if self.pool.caching:  # a block just filled: its content key
            for i in fast[(b.plen[fr] + b.ngen[fr] - 1) % self.block_size == 0].tolist():
                self._key_full_blocks(seqs[i])
        stop = b.eos_ends[fr] & (ft[:, None] == b.eos[None, :]).any(axis=1)
        ended = stop | (b.ngen[fr] >= b.max_new[fr])
        for i, st in zip(fast[ended].tolist(), stop[ended].tolist()):
            seqs[i].retired = overlap
            done.append(self._finish(seqs[i], "stop" if st else "length", now))
        for i in np.flatnonzero(live & slow).tolist():
            one(n_pre + i, seqs[i], 0)

    def _key_full_blocks(self, seq: Sequence) -> None:
        """Give content keys to the blocks whose every position's KV is written: all the
        sequence's tokens but the newest (its KV is written when it is fed back)."""
        bs = self.block_size
        full = min((seq.num_tokens - 1) // bs, len(seq.blocks))
        start = len(seq.keys)
        if full <= start:
            return
        # Only the new blocks' tokens: the whole history, joined and converted each time a
        # block fills, cost more than the hash (tens of microseconds at a few hundred).
        prompt, lo, hi = seq.req.prompt, start * bs, full * bs
        n = len(prompt)
        tokens = (prompt[lo:hi] if hi <= n
                  else prompt[lo:] + seq.generated[max(0, lo - n):hi - n])
        for j, key in enumerate(block_hashes(tokens, bs, seq.keys[-1] if seq.keys else b""),
                                start=start):
            seq.keys.append(key)
            self.pool.register(seq.blocks, j, key)

    def _finish(self, seq: Sequence, reason: str, now: float) -> Completion:
        if seq.row >= 0:
            self.batch.leave(seq)
        self.pool.release(seq.req.key)
        del self.live[seq.req.key]
        return Completion(key=seq.req.key, tokens=seq.generated, finish_reason=reason,
                          computed_tokens=seq.computed_tokens,
                          first_token_at=seq.first_token_at or now, cached_tokens=seq.start,
                          logprobs=_rows(seq.logprobs, seq.req.logprobs),
                          error=seq.failed if reason == "error" else None)


def _advance_grammar(seq: Sequence, tok: int) -> tuple[str, str] | None:
    """Feed a sampled token to the job's grammar; (code, why) if that fails.

    Two checks, so a failure says whose it is: the token against the mask its row was
    sampled under (outside it: the engine's row bookkeeping is wrong, never the job's
    fault), then the matcher itself (it rejects a token its own mask allowed only if the
    parser stopped on its limits). Either way the job ends alone with `grammar_failed`."""
    g = seq.req.grammar
    if seq.mask is not None and not mask_allows(seq.mask, tok):
        return ("grammar_failed", f"token {tok} was sampled outside its grammar's mask "
                                  f"(an engine fault: please report it)")
    try:
        failpoints.hit("grammar.advance", jobs=lambda: (seq.req.job_id,))
        if g.consume_token(tok):
            return None
    except RuntimeError as e:  # llguidance refusing this matcher (or the failpoint): its own
        return ("grammar_failed", f"its grammar failed on token {tok}: {e!r}"[:MAX_WHY])
    return ("grammar_failed", f"its grammar rejected token {tok}: {g.get_error()[:MAX_WHY]}")


def _logprob_row(seq: Sequence, lp: np.ndarray) -> tuple[str, str] | None:
    """Keep the token's logprob row (chosen, top ids, top logprobs; `lp` as wide as the
    step's widest request); (code, why) if the row cannot be read."""
    n, width = seq.req.logprobs, (len(lp) - 1) // 2
    row = np.concatenate((lp[:1 + n], lp[1 + width:1 + width + n]))
    if n > width or not np.isfinite(row).all():
        # NaN logits (a broken checkpoint, an overflow) would make a Result the wire
        # refuses; the job says so instead.
        return ("logprobs_failed", f"its logprobs are not finite or not all there (asked "
                                   f"{n}, the step computed {width}): {row.tolist()[:5]}")
    seq.logprobs.append(row)
    return None


def _rows(rows: list[np.ndarray], n: int) -> np.ndarray | None:
    """A Completion's logprob rows: None when the job did not ask; [0, 1 + 2n] when it ended
    before its first token (cancelled while it waited)."""
    if not n:
        return None
    return np.stack(rows) if rows else np.zeros((0, 1 + 2 * n), dtype=np.float32)
