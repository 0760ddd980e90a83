"""The process heap: a bounded number of malloc arenas, trimmed now and then.

Rule: a worker's resident memory stays flat under any mix of traffic. glibc gives each
thread that allocates under contention an arena of its own (up to eight per core), and
memory freed in one arena is not reused by another: the event loop, the executor, the
grammar compiler and llguidance's mask threads each churn small objects, and the resident
set swings by tens of MiB and creeps (a 30-minute mixed soak read +7.9 % fitted growth).
Two arenas bound the spread, and `malloc_trim` hands freed pages back to the kernel every
`TRIM_EVERY_S`. Both are glibc's; elsewhere (musl, macOS) they are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

ARENAS = 2  # malloc arenas: enough that two threads rarely wait for one, few enough to reuse
TRIM_EVERY_S = 30.0  # how often the loop returns freed heap pages to the kernel
_M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


@functools.cache
def _glibc():
    """The C library, if it is glibc (it has mallopt and malloc_trim); else None."""
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


def bound_arenas(n: int = ARENAS) -> bool:
    """Cap malloc's arenas at `n`; call before threads start. True if glibc took it."""
    libc = _glibc()
    return bool(libc and libc.mallopt(_M_ARENA_MAX, n) == 1)


def trim() -> bool:
    """Return freed heap pages to the kernel (a few milliseconds); True if any were."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0) == 1)
