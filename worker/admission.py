"""Admission: a job enters the executor only if its padded tokens fit under the budget.

A job's padded tokens are its prompt plus `max_new_tokens`, rounded up to whole KV
blocks; that is exactly the KV it will reserve, so everything downstream may assume the
memory exists. Admission is FIFO and stops at the first job that does not fit (it stays
at the front, so nothing overtakes it and nothing starves). Stopping switches admission to
*holding*: nothing more enters until the in-flight tokens fall to `low_water`, and then a
whole group enters at once. That hysteresis keeps prefill batches large instead of
trickling in one job per finished job.

Pure Python on plain data; the event loop owns the only instance.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Admission:
    def __init__(self, budget_tokens: int, low_water_tokens: int):
        if not 0 <= low_water_tokens < budget_tokens:
            raise ValueError("need 0 <= low_water < budget")
        self.budget_tokens = budget_tokens
        self.low_water_tokens = low_water_tokens
        self.in_flight_tokens = 0
        self.holding = False  # True from the first job that did not fit until low water

    def fits_ever(self, tokens: int) -> bool:
        return tokens <= self.budget_tokens

    def admit(self, pending: deque[T], cost: Callable[[T], int]) -> list[T]:
        """Pop from the front of `pending` every job admitted now, in order."""
        if self.holding:
            if self.in_flight_tokens > self.low_water_tokens:
                return []
            self.holding = False
        out: list[T] = []
        while pending:
            c = cost(pending[0])
            if self.in_flight_tokens + c > self.budget_tokens:
                self.holding = True
                break
            self.in_flight_tokens += c
            out.append(pending.popleft())
        return out

    def release(self, tokens: int) -> None:
        self.in_flight_tokens -= tokens
        if self.in_flight_tokens < 0:
            raise AssertionError("released more tokens than were admitted")

    @property
    def occupancy(self) -> float:
        return self.in_flight_tokens / self.budget_tokens
