"""Peak resident memory of a piece of work on CPU, shared by the benchmarks (sampled, since Linux keeps no
per-interval peak)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

Result = TypeVar("Result")


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_above_start(work: Callable[[], Result], interval_s: float = 0.002) -> tuple[Result, int]:
    """``work()``'s result and the peak resident set size while it ran, above the size when it started (bytes).

    Memory the allocator kept from earlier work is reused without growing the RSS, so measure each method in a
    fresh process, or first, when the figures must not depend on order.
    """
    start, peak, done = current_rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], current_rss())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0], current_rss()) - start
