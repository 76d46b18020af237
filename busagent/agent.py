"""Composition root: hypervisor connection, method table, RPC service, bus handler."""
from __future__ import annotations

import signal
import threading
from typing import Any

import structlog
from proton.reactor import ApplicationEvent, Container, EventInjector

from busagent.api.dispatch import Dispatcher
from busagent.bus.addressing import profile as get_profile
from busagent.bus.server import AgentBus
from busagent.config import Settings
from busagent.rpc import RpcService
from busagent.virt.connection import HypervisorConnection, open_with_retry

log = structlog.get_logger("busagent.agent")


class _Control(EventInjector):
    """Cross-thread control of the reactor (stop)."""


class Agent:
    """One agent: serves one hypervisor on one bus."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hypervisor = HypervisorConnection(settings.uri)
        self.host_id = ""
        self.bus: AgentBus | None = None
        self.container: Container | None = None
        self._control = _Control()
        self.ready = threading.Event()

    def start_services(self) -> None:
        open_with_retry(self.hypervisor)
        self.host_id = self.settings.host_id or self.hypervisor.hostname()
        dispatcher = Dispatcher(self.hypervisor.get)
        service = RpcService(dispatcher)
        self.bus = AgentBus(self.settings, get_profile(self.settings.profile), self.host_id, service)
        self.container = Container(self.bus)
        self.container.selectable(self._control)
        log.info("agent starting", host_id=self.host_id, uri=self.settings.uri, mode=self.settings.mode,
                 methods=dispatcher.table.coverage_line())

    def run(self) -> None:
        """Run the reactor on the calling thread until stopped."""
        if self.container is None:
            self.start_services()
        _Ready(self).attach(self.container)
        self.container.run()
        self.bus.workers.close()
        self.hypervisor.close()
        log.info("agent stopped", host_id=self.host_id)

    def stop(self) -> None:
        """Ask the reactor to stop (any thread)."""
        self._control.trigger(ApplicationEvent("agent_stop"))

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())


class _Ready:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def attach(self, container: Container) -> None:
        container.schedule(0, self)

    def on_timer_task(self, event: Any) -> None:
        self.agent.ready.set()
