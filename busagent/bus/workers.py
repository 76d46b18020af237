"""A bounded pool of worker threads whose results come back to the reactor thread.

Workers never touch proton objects: they append finished work to a queue and
wake the reactor (``wake(callback)``, e.g. ``Engine.call_soon_threadsafe``) at
most once per batch.
"""
from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


def _many(*_: Any) -> None:
    """Marker: the item is (fn, [items]) to run one after another."""


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    try:
        return fn(item)
    except BaseException as exc:  # the reactor decides what an unexpected failure means
        return exc


class ReactorWorkers:
    """Run ``fn(item)`` on threads; ``on_results([(item, result), ...])`` runs on the reactor."""

    def __init__(self, size: int, wake: Callable[[Callable[[], None]], None],
                 on_results: Callable[[list[tuple[Any, Any]]], None]) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done: collections.deque[tuple[Any, Any]] = collections.deque()
        self._wake, self._on_results = wake, on_results
        self._pending_wakeup = False
        self._lock = threading.Lock()
        self.in_flight = 0
        self._threads = [threading.Thread(target=self._loop, name=f"libvirt-call-{i}", daemon=True)
                         for i in range(size)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[Any], Any], item: Any) -> None:
        """Queue ``fn(item)`` (reactor thread)."""
        self.in_flight += 1
        self._queue.put((fn, item))

    def submit_many(self, fn: Callable[[Any], Any], items: list[Any]) -> None:
        """Queue ``fn(item)`` for each item, run in order by one worker (reactor thread)."""
        self.in_flight += len(items)
        self._queue.put((_many, (fn, items)) if len(items) > 1 else (fn, items[0]))

    def _loop(self) -> None:
        while True:
            work = self._queue.get()
            if work is _STOP:
                return
            fn, item = work
            if fn is _many:
                inner, items = item
                for one in items:
                    self._done.append((one, _call(inner, one)))
            else:
                self._done.append((item, _call(fn, item)))
            with self._lock:
                if self._pending_wakeup:
                    continue
                self._pending_wakeup = True
            self._wake(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            self._pending_wakeup = False
        done, out = self._done, []
        while done:
            out.append(done.popleft())
        self.in_flight -= len(out)
        if out:
            self._on_results(out)

    def close(self, timeout: float = 5.0) -> None:
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join(timeout)
