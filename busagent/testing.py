"""Helpers to run a real agent inside a test process (real proton, real libvirt)."""
from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

from proton import Endpoint

from busagent.agent import Agent
from busagent.config import Settings


class RunningAgent:
    """An agent on its own reactor thread: direct mode on a free loopback port, or broker mode.

    In broker mode, entering waits until the broker has attached the agent's request
    receiver (so its queue exists and calls sent from then on reach it), not only until
    the reactor runs.
    """

    def __init__(self, settings: Settings | None = None, attach_timeout: float = 20.0) -> None:
        settings = settings or Settings()
        if settings.mode == "direct":
            settings = replace(settings, listen="127.0.0.1:0")
        self.agent = Agent(settings.validate())
        self.agent.start_services()
        self.attach_timeout = attach_timeout
        self.attached = threading.Event()
        if settings.mode == "broker":  # scheduled before the reactor runs: no cross-thread use
            self.agent.container.schedule(0, _AttachWatch(self.agent, self.attached))
        else:
            self.attached.set()
        self.thread = threading.Thread(target=self.agent.run, name="agent-reactor", daemon=True)

    def __enter__(self) -> RunningAgent:
        self.thread.start()
        if not self.agent.ready.wait(10):
            raise RuntimeError("agent did not start")
        if not self.attached.wait(self.attach_timeout):
            self.__exit__(None, None, None)
            raise RuntimeError(f"agent's request receiver not attached at the broker within {self.attach_timeout} s "
                               f"({', '.join(self.agent.settings.broker_urls)})")
        return self

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


class _AttachWatch:
    """Reactor-thread poll: is the agent's request receiver attached at the broker?"""

    def __init__(self, agent: Agent, attached: threading.Event, period: float = 0.02) -> None:
        self.agent, self.attached, self.period = agent, attached, period
        self.deadline = time.monotonic() + 120  # stop polling some time, whatever happens

    def on_timer_task(self, event: Any) -> None:
        bus = self.agent.bus
        conn = bus._broker_conn  # noqa: SLF001 - test helper of the same package
        if conn is not None and conn.state & Endpoint.REMOTE_ACTIVE:
            link = conn.link_head(Endpoint.LOCAL_ACTIVE | Endpoint.REMOTE_ACTIVE)
            while link is not None:
                if link.is_receiver and link.source.address == bus.rpc_address and link.remote_source.address:
                    self.attached.set()
                    return
                link = link.next(Endpoint.LOCAL_ACTIVE | Endpoint.REMOTE_ACTIVE)
        if time.monotonic() < self.deadline:
            self.agent.container.schedule(self.period, self)
