"""Samples a process's RSS and CPU time in a background thread, for scripts/bench/training.py's child processes."""
from __future__ import annotations

import os
import threading
import time


class Monitor:
    """Samples this process's RSS and CPU time every 50 ms, so peaks can be read for any time window."""

    def __init__(self):
        self.samples: list[tuple[float, int, float]] = []  # (unix time, rss bytes, cpu seconds)
        self.marks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * self._page
        t = os.times()
        self.samples.append((time.time(), rss, t.user + t.system))

    def _run(self):
        while not self._stop.wait(0.05):
            self._sample()

    def start(self):
        self._sample()
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()
        self._sample()

    def mark(self, name: str, t: float | None = None):
        self.marks[name] = time.time() if t is None else t

    def peak_rss(self, t0: float, t1: float) -> int:
        inside = [rss for t, rss, _ in self.samples if t0 <= t <= t1]
        return max(inside) if inside else 0

    def cpu_at(self, when: float) -> float:
        """CPU seconds used by `when`, interpolated between the two samples around it."""
        before = max((s for s in self.samples if s[0] <= when), key=lambda s: s[0], default=self.samples[0])
        after = min((s for s in self.samples if s[0] >= when), key=lambda s: s[0], default=self.samples[-1])
        if after[0] == before[0]:
            return before[2]
        return before[2] + (after[2] - before[2]) * (when - before[0]) / (after[0] - before[0])
