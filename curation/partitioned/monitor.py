"""What a task reports about itself: peak resident memory while it ran, and the node it ran on.

The scale benchmark's claim (memory per task bounded by configuration, not by N) is read from
these figures, so they are sampled inside the task: Ray reuses worker processes, which makes a
process-lifetime maximum (``ru_maxrss``) meaningless for a single task.
"""

from __future__ import annotations

import os
import socket
import threading

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # noqa: BLE001 - reporting only
        pass
    return f"local:{socket.gethostname()}"


class TaskMonitor:
    """Samples RSS every ``interval`` seconds on a daemon thread between start() and stop()."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start_rss = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "TaskMonitor":
        self.start_rss = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return {"peak_rss_mb": round(self.peak / 2**20, 1), "start_rss_mb": round(self.start_rss / 2**20, 1), "node": node_id(), "pid": os.getpid()}
