"""Composition root: hypervisor connection, method table, RPC service, bus."""
from __future__ import annotations

import gc
import signal
import threading
from typing import Any

import libvirt
import structlog

from busagent.api.dispatch import Dispatcher
from busagent.authz import Policy
from busagent.bus.addressing import profile as get_profile
from busagent.bus.envelope import Limits
from busagent.bus.server import AgentBus
from busagent.bus.topics import event_name
from busagent.config import Settings
from busagent.events import EventRegistrar, EventSpec
from busagent.jobs import JobWatcher
from busagent.objects import ObjectCatalog, ObjectPublisher
from busagent.rpc import RpcService
from busagent.stats_wiring import attach_stats
from busagent.virt.connection import HypervisorConnection, open_with_retry
from busagent.virt.eventloop import ensure_event_loop

log = structlog.get_logger("busagent.agent")


class Agent:
    """One agent: serves one hypervisor on one bus."""

    def __init__(self, settings: Settings, with_stats: bool = True) -> None:
        self.settings = settings
        self.with_stats = with_stats
        self.stats = None
        self.hypervisor = HypervisorConnection(settings.uri)
        # [security] configured: authorize every call; else everyone may call everything
        self.policy = Policy.from_config(settings.security) if settings.security else Policy.open()
        # read-only roles' calls go through a read-only connection, so libvirt refuses writes too
        self.readonly_hypervisor = (HypervisorConnection(settings.uri, readonly=True)
                                    if self.policy.needs_readonly else None)
        self.host_id = ""
        self.bus: AgentBus | None = None
        self.ready = threading.Event()

    def start_services(self) -> None:
        """Open the hypervisor, build the table, listen or connect (before ``run``)."""
        ensure_event_loop()
        open_with_retry(self.hypervisor)
        self.host_id = self.settings.host_id or self.hypervisor.hostname()
        dispatcher = Dispatcher(self.hypervisor.get)
        readonly_dispatcher = self._open_readonly(dispatcher)
        service = RpcService(dispatcher, jobs=JobWatcher(self.hypervisor.get, self.publish_event,
                                                                 self.settings.job_interval),
                             policy=self.policy, readonly_dispatcher=readonly_dispatcher,
                             limits=Limits(self.settings.max_json_depth, self.settings.max_arg_bytes))
        log.info("authorization", uri=self.settings.uri, **self.policy.describe())
        self.bus = AgentBus(self.settings, get_profile(self.settings.profile), self.host_id, service)
        self.bus.start()
        self._start_objects(dispatcher)
        if self.with_stats:
            self.stats = attach_stats(self)
        self.events = EventRegistrar(self._on_event)
        self.events.register(self.hypervisor.get())
        self.hypervisor.on_open.append(self._hypervisor_opened)
        self.hypervisor.on_lost.append(self._hypervisor_lost)
        self.hypervisor.start_supervisor()
        self.bus.start_presence(self.settings.presence_interval, {
            "uri": self.settings.uri, "rpc": self.bus.rpc_target, "started": self.bus.stamper.started})
        # Start-up objects (the method table, schemas, libvirt-python's module) live as long as the
        # process: keep them out of the cyclic collector's full passes, which otherwise add
        # 20-30 ms to sampler ticks at 5,000 domains.
        gc.freeze()
        log.info("agent starting", host_id=self.host_id, uri=self.settings.uri, mode=self.settings.mode,
                 methods=dispatcher.table.coverage_line())

    def _open_readonly(self, dispatcher: Dispatcher) -> Dispatcher | None:
        """The read-only connection and its dispatcher, when a role needs them; opened now (a failure
        is logged and the connection opened again at the next read-only call), then supervised."""
        ro = self.readonly_hypervisor
        if ro is None:
            return None
        try:
            ro.open()
        except libvirt.libvirtError as exc:
            log.warning("read-only hypervisor connection not open yet", uri=ro.uri, error=str(exc))
        ro.start_supervisor()
        return Dispatcher(ro.get, table=dispatcher.table)

    def _start_objects(self, dispatcher: Dispatcher) -> None:
        """Object snapshots: on change (events), periodically, after a reconnect; serves busagentResync."""
        self.objects = ObjectPublisher(ObjectCatalog(self.hypervisor.get), self.bus, self.settings.snapshot_interval)
        dispatcher.resync = self.objects.resync
        self.objects.start()

    def _on_event(self, spec: EventSpec, obj: dict[str, Any], data: dict[str, Any]) -> None:
        """A libvirt callback (libvirt's event-loop thread): hand it to the bus."""
        self.publish_event(spec.kind, {"object": obj, "data": data})
        self.objects.on_event(spec.family, obj[spec.family], spec.kind)

    def publish_event(self, kind: str, fields: dict[str, Any]) -> None:
        name = event_name(self.settings.namespace, self.host_id, kind)
        self.bus.publish_threadsafe(name, kind, {"kind": kind, "host": self.host_id, **fields})

    def _hypervisor_lost(self, why: str) -> None:
        # the generation lost: the next agent.hypervisor_connected carries a higher one
        self.publish_event("agent.hypervisor_lost", {"data": {
            "uri": self.settings.uri, "why": why, "generation": self.hypervisor.generation}})

    def _hypervisor_opened(self, conn: Any, generation: int) -> None:
        self.events.register(conn)
        self.publish_event("agent.hypervisor_connected", {"data": {
            "uri": self.settings.uri, "generation": generation, "events": len(self.events.registered)}})
        self.objects.request_snapshot("reconnect")

    def run(self) -> None:
        """Run the reactor on the calling thread until stopped."""
        if self.bus is None:
            self.start_services()
        self.ready.set()
        try:
            self.bus.run()
        finally:
            if self.stats is not None:
                self.stats.stop()
            self.events.deregister()
            self.objects.close()
            self.bus.workers.close()
            self.hypervisor.close()
            if self.readonly_hypervisor is not None:
                self.readonly_hypervisor.close()
            log.info("agent stopped", host_id=self.host_id)

    def stop(self) -> None:
        """Ask the reactor to stop (any thread)."""
        if self.bus is not None:
            self.bus.stop_threadsafe()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
