"""Wires statistics into a running agent: the sampler, its batches on the bus, ``/metrics``.

``attach_stats(agent)`` is called once the agent's services are up (``Agent.start_services``);
the handle it returns is stopped on shutdown.
"""
from __future__ import annotations

from typing import Any

import structlog

from busagent.bus.topics import stats_name
from busagent.metrics import MetricsServer, StatsCollector, make_registry
from busagent.sampler import HypervisorUnavailable, Sample, Sampler, batches, stats_flags

log = structlog.get_logger("busagent.stats")


class StatsHandle:
    """What ``attach_stats`` started: ``sampler``, ``collector``, ``server`` (None when disabled)."""

    def __init__(self, sampler: Sampler, collector: StatsCollector, server: MetricsServer | None) -> None:
        self.sampler = sampler
        self.collector = collector
        self.server = server

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is served on (the bound one when configured with port 0)."""
        return self.server.port if self.server is not None else None

    def stop(self) -> None:
        self.sampler.stop()
        if self.server is not None:
            self.server.stop()
            self.server = None


def attach_stats(agent: Any, start: bool = True, **sampler_options: Any) -> StatsHandle:
    """Start the sampler (publishing through ``agent.bus``) and the metrics endpoint for ``agent``."""
    settings, hypervisor, bus = agent.settings, agent.hypervisor, agent.bus
    namespace, host = settings.namespace, agent.host_id

    def connection() -> Any:
        if not hypervisor.alive:  # the supervisor is reconnecting: do not reopen from here
            raise HypervisorUnavailable(f"no live connection to {settings.uri}")
        return hypervisor.get()

    def publish(sample: Sample) -> None:
        if bus is not None:
            for kind, doc in batches(sample, host):
                bus.publish_threadsafe(stats_name(namespace, host, kind), f"stats.{kind}", doc)
        if server is not None:  # render /metrics now, on the sampler's thread: scrapes only copy bytes
            collector.sample_text()

    server = None
    sampler_options.setdefault("stats", stats_flags(settings.stats_groups))
    sampler = Sampler(connection, settings.sample_interval, on_sample=publish, **sampler_options)
    collector = StatsCollector(
        sampler=sampler, rpc_stats=bus.service.stats if bus is not None else None,
        published=bus.published if bus is not None else None,
        bus_connected=(lambda: _bus_connected(bus)) if bus is not None else None,
        hypervisor_connected=lambda: hypervisor.alive)
    if settings.metrics_listen:
        server = MetricsServer(settings.metrics_listen, make_registry(collector), extra=collector.sample_text)
        log.info("metrics endpoint", address=f"http://{server.host}:{server.port}/metrics")
    if start:
        sampler.start()
    return StatsHandle(sampler, collector, server)


def _bus_connected(bus: Any) -> bool:
    if bus.settings.mode == "broker":
        return bus.broker_ready.is_set()
    return bus.listening is not None
