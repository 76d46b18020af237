"""Helpers to run a real agent inside a test process (real proton, real libvirt)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from proton import Endpoint

from busagent.agent import Agent
from busagent.config import Settings


class RunningAgent:
    """An agent on its own reactor thread: direct mode on a free loopback port, or broker mode.

    In broker mode, entering waits until the broker has attached the agent's request
    receiver (so its queue exists and calls sent from then on reach it), not only until
    the reactor runs.
    """

    def __init__(self, settings: Settings | None = None, attach_timeout: float = 20.0,
                 with_stats: bool = True) -> None:
        settings = settings or Settings()
        if settings.mode == "direct":
            settings = replace(settings, listen="127.0.0.1:0")
        if settings.metrics_listen == Settings.metrics_listen:  # never the real port in tests
            settings = replace(settings, metrics_listen="127.0.0.1:0")
        self.agent = Agent(settings.validate(), with_stats=with_stats)
        self.agent.start_services()
        self.attach_timeout = attach_timeout
        self.thread = threading.Thread(target=self.agent.run, name="agent-reactor", daemon=True)

    def __enter__(self) -> RunningAgent:
        self.thread.start()
        if not self.agent.ready.wait(10):
            raise RuntimeError("agent did not start")
        if self.agent.settings.mode == "broker" and not self.wait_attached(self.attach_timeout):
            self.__exit__(None, None, None)
            raise RuntimeError(f"agent's request receiver not attached at the broker within {self.attach_timeout} s "
                               f"({', '.join(_redact(u) for u in self.agent.settings.broker_urls)})")
        return self

    def wait_attached(self, timeout: float) -> bool:
        """Broker mode: wait until the broker has answered the request receiver's attach."""
        deadline = time.monotonic() + timeout
        while True:
            if self.on_reactor(lambda: _rpc_receiver_attached(self.agent.bus), timeout=2.0):
                return True
            if time.monotonic() >= deadline or not self.thread.is_alive():
                return False
            time.sleep(0.02)

    def on_reactor(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``fn`` on the agent's reactor thread and return its result (None on timeout)."""
        done, box = threading.Event(), []

        def call() -> None:
            try:
                box.append(fn())
            finally:
                done.set()

        self.agent.bus.engine.call_soon_threadsafe(call)
        done.wait(timeout)
        return box[0] if box else None

    @property
    def url(self) -> str:
        host, port = self.agent.bus.listening
        return f"amqp://{host}:{port}"

    @property
    def host_id(self) -> str:
        return self.agent.host_id

    @property
    def stats(self):
        return self.agent.bus.service.stats

    def __exit__(self, *exc: object) -> None:
        self.agent.stop()
        self.thread.join(10)


def _rpc_receiver_attached(bus: Any) -> bool:
    """Reactor thread: is the agent's request receiver attached (the broker answered, no detach)?"""
    rcv = getattr(bus, "_rpc_receiver", None)
    return (rcv is not None and rcv.state & Endpoint.LOCAL_ACTIVE and rcv.state & Endpoint.REMOTE_ACTIVE
            and rcv.remote_source.address is not None)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return url if parts.password is None else url.replace(f":{parts.password}@", ":***@", 1)
