"""A worker's options: everything that is not an engine field, each with a default.

Rule: the nine engine fields (`worker.config`) say what the worker serves and are all
required; these say how one process behaves -- identity, timing bounds, policy knobs -- and
come from `fabric-worker run`'s flags.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Options:
    """Everything that is not an engine field: identity, timing, policy knobs with defaults."""

    worker_id: str
    grace_s: float = 30.0  # SIGTERM: how long in-flight jobs may take to finish
    fetch_batch: int = 256  # most messages one pull asks for
    solo_from_attempt: int = 3  # a job delivered this often runs alone (suspected poison)
    connect_give_up_s: float = 30.0
    burst: bool = False  # exit once the consumer has nothing pending and nothing is held
    step_timeout_s: float = 60.0  # jobs in flight and no step finished this long: a hang, fatal
    broker_give_up_s: float = 120.0  # disconnected this long: fatal (held jobs wait the ack wait)
    publish_give_up_s: float = 60.0  # a Result publish is retried this long, then the job is nak'd
    threads: int = 1  # intra-op threads the worker may use (worker.ops.cpu.cpu_budget)
    adapt_threads: bool = False  # choose 1..threads by measured speed (engine.governor)
    start_spare: float = 0.0  # CPUs of ours left idle while the model loaded (its start count)
    served: tuple[str, ...] = ()  # model names OpenAI lines may ask for (served_names)


def served_names(model: str, given: list[str] | None) -> tuple[str, ...]:
    """What an OpenAI line's `model` may say: the names given (vLLM's --served-model-name),
    else the configured model and, for a checkpoint directory, its last path part."""
    if given:
        return tuple(given)
    tail = model.rstrip("/").rsplit("/", 1)[-1]
    return tuple(dict.fromkeys((model, tail)))
