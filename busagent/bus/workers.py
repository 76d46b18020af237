"""A bounded worker pool whose results come back to the reactor thread.

Workers never touch proton objects: they append finished work to a queue and
wake the reactor through proton's EventInjector, at most once per batch.
"""
from __future__ import annotations

import collections
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from proton.reactor import ApplicationEvent, EventInjector


class ReactorWorkers:
    """Run callables on threads; deliver their results to ``on_results`` on the reactor."""

    def __init__(self, size: int, event_name: str = "work_done") -> None:
        self._pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="libvirt-call")
        self.injector = EventInjector()
        self._event_name = event_name
        self._done: collections.deque[tuple[Any, Any]] = collections.deque()
        self._pending_wakeup = False
        self._lock = threading.Lock()
        self.in_flight = 0

    def submit(self, fn: Callable[[Any], Any], item: Any) -> None:
        """Run ``fn(item)`` on a worker (call from the reactor thread)."""
        self.in_flight += 1
        self._pool.submit(self._run, fn, item)

    def _run(self, fn: Callable[[Any], Any], item: Any) -> None:
        try:
            out = fn(item)
        except BaseException as exc:  # the reactor decides what an unexpected failure means
            out = exc
        self._done.append((item, out))
        with self._lock:
            if self._pending_wakeup:
                return
            self._pending_wakeup = True
        self.injector.trigger(ApplicationEvent(self._event_name))

    def drain(self) -> list[tuple[Any, Any]]:
        """Take every finished (item, result) pair (call from the reactor thread)."""
        with self._lock:
            self._pending_wakeup = False
        out = []
        while self._done:
            out.append(self._done.popleft())
        self.in_flight -= len(out)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.injector.close()
