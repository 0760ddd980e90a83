"""Which subject a producer publishes a job to: the broker sees subjects, not payloads.

- A job with a `session`: `fabric.session.<priority>.<token>`. The jobs stream maps it to
  one of its session partitions by a hash of the token, so every turn of a session lands
  in the same partition, and the partition's owner (the worker that holds the session's
  KV) serves it; the priority picks the partition's queue of that priority's class
  (urgent 0-4, default 5, bulk 6-9: `worker.broker.topology`).
- Otherwise a job whose `priority` is not the default: `fabric.prio.<priority>.<name>`,
  that priority's queue.
- Otherwise `fabric.jobs.<name>`, as before priorities existed (priority 5).

A session's token is the session itself when it is a valid subject token of letters,
digits, `-` and `_`; anything else is hashed (BLAKE2b, 16 bytes, hex), so two producers in
any language that follow this rule send one session's turns to one partition.
"""

from __future__ import annotations

import hashlib
import re

from schemas.models import DEFAULT_PRIORITY, Job

JOBS_PREFIX = "fabric.jobs."
PRIO_PREFIX = "fabric.prio."
SESSION_PREFIX = "fabric.session."
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")


def session_token(session: str) -> str:
    if _TOKEN.fullmatch(session):
        return session
    return hashlib.blake2b(session.encode(), digest_size=16).hexdigest()


def job_subject(job: Job, name: str = "default") -> str:
    """The subject `job` should be published to (`name`: the last token of a non-session
    subject, free for the producer's own routing or accounting)."""
    if job.session is not None:
        return f"{SESSION_PREFIX}{job.priority}.{session_token(job.session)}"
    if job.priority != DEFAULT_PRIORITY:
        return f"{PRIO_PREFIX}{job.priority}.{name}"
    return JOBS_PREFIX + name
