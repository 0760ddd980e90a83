"""Structured logs: JSON lines on stderr by default, human-readable on a terminal.

Every line about a job carries `job` (its id) and `attempt` (the delivery count), passed
explicitly at the call: a job crosses the event loop, the executor thread and callbacks,
where a context variable bound at fetch time would not follow it
(tests/unit/test_metrics.py fails on a job line without both). Secrets never reach a log
line: the config is logged through `cfg_summary`, which redacts URL credentials. At
shutdown the worker writes one `worker_summary` line (WorkerStats.summary plus the exit
reason and code) that operators and tests read instead of counting lines.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = (structlog.dev.ConsoleRenderer() if fmt == "console"
                else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
