"""Helpers to run a real agent inside a test process (real proton, real libvirt)."""
from __future__ import annotations

import threading
from dataclasses import replace

from busagent.agent import Agent
from busagent.config import Settings


class RunningAgent:
    """An agent on its own reactor thread, listening on a free loopback port."""

    def __init__(self, settings: Settings | None = None) -> None:
        settings = settings or Settings()
        if settings.mode == "direct":
            settings = replace(settings, listen="127.0.0.1:0")
        self.agent = Agent(settings.validate())
        self.agent.start_services()
        self.thread = threading.Thread(target=self.agent.run, name="agent-reactor", daemon=True)

    def __enter__(self) -> RunningAgent:
        self.thread.start()
        if not self.agent.ready.wait(10):
            raise RuntimeError("agent did not start")
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
