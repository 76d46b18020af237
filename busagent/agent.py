"""Composition root: hypervisor connection, method table, RPC service, bus."""
from __future__ import annotations

import signal
import threading

import structlog

from busagent.api.dispatch import Dispatcher
from busagent.bus.addressing import profile as get_profile
from busagent.bus.server import AgentBus
from busagent.config import Settings
from busagent.rpc import RpcService
from busagent.virt.connection import HypervisorConnection, open_with_retry
from busagent.virt.eventloop import ensure_event_loop

log = structlog.get_logger("busagent.agent")


class Agent:
    """One agent: serves one hypervisor on one bus."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hypervisor = HypervisorConnection(settings.uri)
        self.host_id = ""
        self.bus: AgentBus | None = None
        self.ready = threading.Event()

    def start_services(self) -> None:
        """Open the hypervisor, build the table, listen or connect (before ``run``)."""
        ensure_event_loop()
        open_with_retry(self.hypervisor)
        self.host_id = self.settings.host_id or self.hypervisor.hostname()
        dispatcher = Dispatcher(self.hypervisor.get)
        service = RpcService(dispatcher)
        self.bus = AgentBus(self.settings, get_profile(self.settings.profile), self.host_id, service)
        self.bus.start()
        log.info("agent starting", host_id=self.host_id, uri=self.settings.uri, mode=self.settings.mode,
                 methods=dispatcher.table.coverage_line())

    def run(self) -> None:
        """Run the reactor on the calling thread until stopped."""
        if self.bus is None:
            self.start_services()
        self.ready.set()
        try:
            self.bus.run()
        finally:
            self.bus.workers.close()
            self.hypervisor.close()
            log.info("agent stopped", host_id=self.host_id)

    def stop(self) -> None:
        """Ask the reactor to stop (any thread)."""
        if self.bus is not None:
            self.bus.stop_threadsafe()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
