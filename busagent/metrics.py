"""Prometheus exposition: metric families built afresh at every scrape from the latest Sample.

A scrape never calls libvirt: it reads the sampler's latest immutable ``Sample`` and the
agent's counters, nothing else. Names and labels follow the community libvirt exporters
(kumina/libvirt_exporter and its forks such as Tinkoff/libvirt-exporter, and
inovex/prometheus-libvirt-exporter) where they have one; the mapping from
``virConnectGetAllDomainStats`` keys to metrics is one table (``DOMAIN_STATS`` for whole
keys, ``DOMAIN_GROUPS`` for the ``<group>.<n>.<suffix>`` arrays).
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString


@dataclass(frozen=True)
class Unit:
    """A conversion to the base unit Prometheus wants: ``value * mul / div``."""

    mul: float = 1.0
    div: float = 1.0

    def __call__(self, value: float) -> float:
        if self.mul != 1.0:
            value *= self.mul
        return value / self.div if self.div != 1.0 else value


AS_IS = Unit()
NS = Unit(div=1e9)  # nanoseconds -> seconds (a division: exact for whole seconds)
KIB = Unit(mul=1024.0)  # KiB -> bytes
MHZ = Unit(mul=1e6)  # MHz -> Hz


@dataclass(frozen=True)
class Stat:
    """One libvirt statistic -> one metric. Counters are the names ending in ``_total``."""

    key: str  # a whole key ('cpu.time'), or the suffix inside a group ('rd.bytes' of 'block.<n>.rd.bytes')
    name: str
    help: str
    unit: Unit = AS_IS

    @property
    def counter(self) -> bool:
        return self.name.endswith("_total")


@dataclass(frozen=True)
class Group:
    """An array of ``<prefix>.<n>.<suffix>`` statistics: one label tells its elements apart."""

    prefix: str  # 'block'
    label: str  # 'target_device'
    label_key: str | None  # suffix whose value is the label ('name'), or None: the index itself
    stats: tuple[Stat, ...]


_STATES = ("0: no state, 1: running, 2: blocked on resource, 3: paused by user, 4: being shut down, "
           "5: shut off, 6: crashed, 7: suspended by guest power management")

DOMAIN_STATS: tuple[Stat, ...] = (
    Stat("state.state", "libvirt_domain_info_vstate", f"Virtual domain state. {_STATES}."),
    Stat("state.reason", "libvirt_domain_info_vstate_reason",
         "Why the domain entered its state (the virDomain*Reason value of that state)."),
    Stat("cpu.time", "libvirt_domain_info_cpu_time_seconds_total", "Amount of CPU time used by the domain, in seconds.",
         NS),
    Stat("cpu.user", "libvirt_domain_info_cpu_user_seconds_total", "User CPU time used by the domain, in seconds.", NS),
    Stat("cpu.system", "libvirt_domain_info_cpu_system_seconds_total",
         "System CPU time used by the domain, in seconds.", NS),
    Stat("balloon.maximum", "libvirt_domain_info_maximum_memory_bytes",
         "Maximum allowed memory of the domain, in bytes.", KIB),
    Stat("balloon.current", "libvirt_domain_info_memory_usage_bytes", "Memory usage of the domain, in bytes.", KIB),
    Stat("vcpu.current", "libvirt_domain_info_virtual_cpus", "Number of virtual CPUs for the domain."),
    Stat("vcpu.current", "libvirt_domain_vcpu_current", "Number of current online vCPUs."),
    Stat("vcpu.maximum", "libvirt_domain_vcpu_maximum", "Number of maximum online vCPUs."),
    Stat("balloon.current", "libvirt_domain_memory_stats_actual_balloon_bytes", "Current balloon value, in bytes.",
         KIB),
    Stat("balloon.swap_in", "libvirt_domain_memory_stats_swap_in_bytes",
         "Data read from swap space by the guest, in bytes.", KIB),
    Stat("balloon.swap_out", "libvirt_domain_memory_stats_swap_out_bytes",
         "Memory written out to swap space by the guest, in bytes.", KIB),
    Stat("balloon.major_fault", "libvirt_domain_memory_stats_major_fault_total",
         "Page faults in the guest that needed disk IO."),
    Stat("balloon.minor_fault", "libvirt_domain_memory_stats_minor_fault_total",
         "Page faults in the guest that needed no disk IO."),
    Stat("balloon.unused", "libvirt_domain_memory_stats_unused_bytes",
         "Memory left completely unused by the guest, in bytes.", KIB),
    Stat("balloon.available", "libvirt_domain_memory_stats_available_bytes",
         "Usable memory as seen by the guest, in bytes.", KIB),
    Stat("balloon.usable", "libvirt_domain_memory_stats_usable_bytes",
         "Memory the balloon can reclaim without the host swapping, in bytes.", KIB),
    Stat("balloon.rss", "libvirt_domain_memory_stats_rss_bytes",
         "Resident set size of the process running the domain, in bytes.", KIB),
    Stat("balloon.disk_caches", "libvirt_domain_memory_stats_disk_cache_bytes",
         "Guest memory reclaimable without additional IO (disk caches), in bytes.", KIB),
    Stat("balloon.last-update", "libvirt_domain_memory_stats_last_update_timestamp_seconds",
         "When the guest last updated its memory statistics (Unix time)."),
    Stat("balloon.hugetlb_pgalloc", "libvirt_domain_memory_stats_hugetlb_pgalloc_total",
         "Successful huge page allocations inside the guest."),
    Stat("balloon.hugetlb_pgfail", "libvirt_domain_memory_stats_hugetlb_pgfail_total",
         "Failed huge page allocations inside the guest."),
)

DOMAIN_GROUPS: tuple[Group, ...] = (
    Group("block", "target_device", "name", (
        Stat("rd.bytes", "libvirt_domain_block_stats_read_bytes_total",
             "Number of bytes read from a block device, in bytes."),
        Stat("rd.reqs", "libvirt_domain_block_stats_read_requests_total",
             "Number of read requests from a block device."),
        Stat("rd.times", "libvirt_domain_block_stats_read_time_seconds_total",
             "Total time spent on reads from a block device, in seconds.", NS),
        Stat("wr.bytes", "libvirt_domain_block_stats_write_bytes_total",
             "Number of bytes written to a block device, in bytes."),
        Stat("wr.reqs", "libvirt_domain_block_stats_write_requests_total",
             "Number of write requests to a block device."),
        Stat("wr.times", "libvirt_domain_block_stats_write_time_seconds_total",
             "Total time spent on writes to a block device, in seconds.", NS),
        Stat("fl.reqs", "libvirt_domain_block_stats_flush_requests_total", "Total flush requests from a block device."),
        Stat("fl.times", "libvirt_domain_block_stats_flush_time_seconds_total",
             "Total time spent on cache flushing to a block device, in seconds.", NS),
        Stat("errors", "libvirt_domain_block_stats_errors_total", "Block device errors (Xen's oo_req)."),
        Stat("allocation", "libvirt_domain_block_stats_allocation",
             "Offset of the highest written sector on a block device, in bytes."),
        Stat("capacity", "libvirt_domain_block_stats_capacity_bytes",
             "Logical size of the block device backing image, in bytes."),
        Stat("physical", "libvirt_domain_block_stats_physicalsize_bytes",
             "Physical size of the container of the backing image, in bytes."),
        Stat("threshold", "libvirt_domain_block_stats_threshold_bytes",
             "Write threshold that triggers a block-threshold event, in bytes."),
    )),
    Group("net", "target_device", "name", (
        Stat("rx.bytes", "libvirt_domain_interface_stats_receive_bytes_total",
             "Number of bytes received on a network interface, in bytes."),
        Stat("rx.pkts", "libvirt_domain_interface_stats_receive_packets_total",
             "Number of packets received on a network interface."),
        Stat("rx.errs", "libvirt_domain_interface_stats_receive_errors_total",
             "Number of packet receive errors on a network interface."),
        Stat("rx.drop", "libvirt_domain_interface_stats_receive_drops_total",
             "Number of packet receive drops on a network interface."),
        Stat("tx.bytes", "libvirt_domain_interface_stats_transmit_bytes_total",
             "Number of bytes transmitted on a network interface, in bytes."),
        Stat("tx.pkts", "libvirt_domain_interface_stats_transmit_packets_total",
             "Number of packets transmitted on a network interface."),
        Stat("tx.errs", "libvirt_domain_interface_stats_transmit_errors_total",
             "Number of packet transmit errors on a network interface."),
        Stat("tx.drop", "libvirt_domain_interface_stats_transmit_drops_total",
             "Number of packet transmit drops on a network interface."),
    )),
    Group("vcpu", "vcpu", None, (
        Stat("state", "libvirt_domain_vcpu_state",
             "State of the vCPU (virVcpuState: 0 offline, 1 running, 2 blocked)."),
        Stat("time", "libvirt_domain_vcpu_time_seconds_total", "Time spent by the virtual CPU, in seconds.", NS),
        Stat("wait", "libvirt_domain_vcpu_wait_seconds_total",
             "Time the vCPU wanted to run while the host scheduler ran something else, in seconds.", NS),
        Stat("delay", "libvirt_domain_vcpu_delay_seconds_total",
             "Time the vCPU thread waited in the host run queue (the guest's steal time), in seconds.", NS),
        Stat("halted", "libvirt_domain_vcpu_halted", "Whether the vCPU is halted (1) or not (0)."),
    )),
)

NODE_INFO: tuple[Stat, ...] = (  # keys of Sample.node (from virNodeGetInfo)
    Stat("cpus", "libvirt_node_info_cpus", "Number of active host CPUs."),
    Stat("memory_bytes", "libvirt_node_info_memory_bytes", "Host memory, in bytes."),
    Stat("mhz", "libvirt_node_info_cpu_frequency_hertz", "Expected host CPU frequency, in hertz.", MHZ),
    Stat("numa_nodes", "libvirt_node_info_numa_nodes", "Number of host NUMA cells."),
    Stat("sockets", "libvirt_node_info_cpu_sockets", "Number of CPU sockets per NUMA cell."),
    Stat("cores", "libvirt_node_info_cpu_cores", "Number of cores per socket."),
    Stat("threads", "libvirt_node_info_cpu_threads", "Number of threads per core."),
)
NODE_CPU = Stat("cpu", "libvirt_node_cpu_seconds_total", "Host CPU time by mode (virNodeGetCPUStats), in seconds.", NS)
NODE_MEMORY = Stat("memory", "libvirt_node_memory_stats_bytes",
                   "Host memory by kind (virNodeGetMemoryStats: total, free, buffers, cached), in bytes.", KIB)

POOL_STATS: tuple[Stat, ...] = (  # keys of each Sample.pools entry (from virStoragePoolGetInfo)
    Stat("state", "libvirt_storage_pool_state",
         "State of the storage pool (0 inactive, 1 building, 2 running, 3 degraded, 4 inaccessible)."),
    Stat("capacity", "libvirt_storage_pool_capacity_bytes", "Size of the storage pool in logical bytes."),
    Stat("allocation", "libvirt_storage_pool_allocation_bytes", "Current allocation bytes of the storage pool."),
    Stat("available", "libvirt_storage_pool_available_bytes", "Remaining free space of the storage pool in bytes."),
)

DOMAIN_LABELS = ("domain", "uuid")
_WHOLE: dict[str, list[Stat]] = collections.defaultdict(list)
for _s in DOMAIN_STATS:
    _WHOLE[_s.key].append(_s)
_GROUPS: dict[str, tuple[Group, dict[str, Stat]]] = {g.prefix: (g, {s.key: s for s in g.stats}) for g in DOMAIN_GROUPS}


class _Families:
    """Metric families by name, created on first use; repeated label sets keep their first value.

    ``scope`` labels (the monitor's ``host``) go first on every series added while they are set.
    """

    def __init__(self) -> None:
        self.by_name: dict[str, tuple[Metric, set[tuple[str, ...]]]] = {}
        self.scope_labels: tuple[str, ...] = ()
        self.scope_values: tuple[str, ...] = ()

    def scope(self, labels: tuple[str, ...] = (), values: tuple[str, ...] = ()) -> None:
        """Prefix every series added from now on with these labels (``scope(("host",), ("node1",))``)."""
        self.scope_labels, self.scope_values = tuple(labels), tuple(values)

    def add(self, name: str, help_text: str, labels: Iterable[str], values: tuple[str, ...], value: float,
            counter: bool | None = None) -> None:
        if self.scope_labels:
            labels, values = (*self.scope_labels, *labels), (*self.scope_values, *values)
        entry = self.by_name.get(name)
        if entry is None:
            is_counter = name.endswith("_total") if counter is None else counter
            cls = CounterMetricFamily if is_counter else GaugeMetricFamily
            entry = self.by_name[name] = (cls(name, help_text, labels=list(labels)), set())
        family, seen = entry
        if values in seen:
            return  # a duplicate series would make the exposition invalid
        seen.add(values)
        family.add_metric(list(values), value)

    def stat(self, stat: Stat, labels: Iterable[str], values: tuple[str, ...], raw: Any) -> None:
        value = _number(raw)
        if value is not None:
            self.add(stat.name, stat.help, labels, values, stat.unit(value))

    def families(self) -> list[Metric]:
        return [family for family, _ in self.by_name.values()]


Families = _Families  # public name for other exporters built on the same table (busagent.monitor)


def _number(raw: Any) -> float | None:
    if isinstance(raw, bool):
        return 1.0 if raw else 0.0
    if isinstance(raw, (int, float)):
        return float(raw)
    return None  # names, paths: labels, not values


_SHUTOFF = 5  # VIR_DOMAIN_SHUTOFF


def add_domain(out: _Families, name: str, uuid: str, stats: Mapping[str, Any]) -> None:
    """Every metric one domain's ``getAllDomainStats`` dictionary maps to."""
    base = (name, uuid)
    # libvirt 9.0's QEMU driver reports a shut-off domain's cpu.* from libvirtd's own process
    # (recorded in tests/fixtures/real-domstats-qemu.json): a stopped domain uses no CPU.
    shut_off = stats.get("state.state") == _SHUTOFF
    for key, raw in stats.items():
        if shut_off and key.startswith("cpu."):
            continue
        whole = _WHOLE.get(key)
        if whole is not None:
            for stat in whole:
                out.stat(stat, DOMAIN_LABELS, base, raw)
            continue
        prefix, _, rest = key.partition(".")
        index, _, suffix = rest.partition(".")
        grouped = _GROUPS.get(prefix)
        if grouped is None or not index.isdigit():
            continue
        group, by_suffix = grouped
        stat = by_suffix.get(suffix)
        if stat is None:
            continue
        label = index if group.label_key is None else stats.get(f"{prefix}.{index}.{group.label_key}")
        if label is None:
            continue
        out.stat(stat, (*DOMAIN_LABELS, group.label), (*base, str(label)), raw)
    available, usable = _number(stats.get("balloon.available")), _number(stats.get("balloon.usable"))
    if available and usable is not None:  # as the community exporters derive it
        out.add("libvirt_domain_memory_stats_used_percent", "The amount of memory in percent, that used by domain.",
                DOMAIN_LABELS, base, (available - usable) / available * 100.0)


def up_family(sample: Any, up: bool = True) -> Metric:
    fam = GaugeMetricFamily("libvirt_up", "Whether scraping libvirt's metrics was successful.")
    fam.add_metric([], 1.0 if up and sample is not None and sample.ok else 0.0)
    return fam


def add_stats(out: _Families, domains: Iterable[tuple[str, str, Mapping[str, Any]]] | None,
              node: Mapping[str, Any], pools: Iterable[Mapping[str, Any]],
              networks: Iterable[Mapping[str, Any]]) -> None:
    """The ``libvirt_*`` series (all but ``libvirt_up``) of one host's statistics, in any shape:
    ``domains`` as (name, uuid, getAllDomainStats dict) or None (not known: no ``libvirt_domains``),
    ``node``/``pools``/``networks`` as in a Sample."""
    if domains is not None:
        domains = list(domains)
        out.add("libvirt_domains", "Number of domains.", (), (), float(len(domains)))
        for name, uuid, stats in domains:
            add_domain(out, name, uuid, stats)
    for stat in NODE_INFO:
        if stat.key in node:
            out.stat(stat, (), (), node[stat.key])
    for mode, raw in (node.get("cpu") or {}).items():
        out.stat(NODE_CPU, ("mode",), (str(mode),), raw)
    for kind, raw in (node.get("memory") or {}).items():
        out.stat(NODE_MEMORY, ("kind",), (str(kind),), raw)
    for pool in pools:
        for stat in POOL_STATS:
            out.stat(stat, ("storage_pool", "uuid"), (pool["name"], pool["uuid"]), pool.get(stat.key))
    for net in networks:
        out.add("libvirt_network_active", "Whether the virtual network is active (1) or not (0).", ("network", "uuid"),
                (net["name"], net["uuid"]), 1.0 if net.get("active") else 0.0)


def sample_families(sample: Any) -> list[Metric]:
    """The ``libvirt_*`` families one Sample maps to (all but ``libvirt_up``)."""
    out = _Families()
    add_stats(out, ((d.name, d.uuid, d.stats) for d in sample.domains), sample.node, sample.pools, sample.networks)
    return out.families()


def add_stats_messages(out: _Families, messages: Mapping[str, Mapping[str, Any]]) -> None:
    """The same series from one host's statistics messages (``busagent.sampler.batches``), by kind:
    ``{"domain": {..., "domains": [every chunk's]}, "node": {...}, "storage_pool": {...}, "network": {...}}``.
    A kind without a message yet adds nothing of its own."""
    domain = messages.get("domain")
    add_stats(out, None if domain is None else
              ((d["name"], d["uuid"], d.get("stats") or {}) for d in domain.get("domains", ())),
              (messages.get("node") or {}).get("node") or {}, (messages.get("storage_pool") or {}).get("pools") or (),
              (messages.get("network") or {}).get("networks") or ())


def libvirt_families(sample: Any, up: bool = True) -> list[Metric]:
    """The ``libvirt_*`` families of one Sample (None: only ``libvirt_up``)."""
    return [up_family(sample, up), *(sample_families(sample) if sample is not None else ())]


# -- the agent's own metrics ---------------------------------------------------------------
def _copy(counter: Mapping[Any, Any], lock: threading.Lock | None = None) -> dict[Any, Any]:
    """A consistent copy of a dict another thread updates (under its lock when it has one)."""
    if lock is not None:
        with lock:
            return dict(counter)
    for _ in range(5):
        try:
            return dict(counter)
        except RuntimeError:  # changed size during the copy: try again
            continue
    return {}


_FOLDED_OUTCOMES = {"unknown_method", "bad_request"}  # a client chose the method name: do not make it a label


def _method_label(method: str, outcome: str) -> str:
    return "(unknown)" if outcome in _FOLDED_OUTCOMES else method


def agent_families(rpc_stats: Any = None, published: Mapping[str, int] | None = None, sampler: Any = None,
                   bus_connected: bool | None = None, hypervisor_connected: bool | None = None,
                   now: float | None = None) -> list[Metric]:
    out = _Families()
    now = time.time() if now is None else now
    if rpc_stats is not None:
        lock = getattr(rpc_stats, "lock", None)
        calls = collections.Counter()
        for (method, outcome), n in _copy(rpc_stats.calls, lock).items():
            calls[(_method_label(method, outcome), outcome)] += n
        fam = CounterMetricFamily("busagent_requests_total", "Method calls served, by method and outcome.",
                                  labels=["method", "outcome"])
        for (method, outcome), n in sorted(calls.items()):
            fam.add_metric([method, outcome], n)
        out.by_name[fam.name] = (fam, set())
        fam = CounterMetricFamily("busagent_rejected_total", "Requests rejected before a method ran, by reason.",
                                  labels=["reason"])
        for reason, n in sorted(_copy(rpc_stats.rejected, lock).items()):
            fam.add_metric([reason], n)
        out.by_name[fam.name] = (fam, set())
        latency = getattr(rpc_stats, "latency", None)
        buckets = getattr(rpc_stats, "latency_buckets", None)
        if latency is not None and buckets is not None:
            hist = HistogramMetricFamily("busagent_request_duration_seconds",
                                         "Time to serve a method call (decode, libvirt, encode), in seconds.",
                                         labels=["method"])
            if lock is not None:
                with lock:
                    snapshot = {m: list(h) for m, h in latency.items()}
            else:
                snapshot = {m: list(h) for m, h in _copy(latency).items()}
            for method, counts in sorted(snapshot.items()):
                cumulative, points = 0, []
                for le, n in zip((*buckets, float("inf")), counts[:-1], strict=True):
                    cumulative += n
                    points.append(("+Inf" if le == float("inf") else repr(float(le)), cumulative))
                hist.add_metric([method], points, counts[-1])
            out.by_name[hist.name] = (hist, set())
    if published is not None:
        snapshot = _copy(published)
        fam = CounterMetricFamily("busagent_events_published_total",
                                  "Messages published (events, objects, statistics, presence), by kind.",
                                  labels=["kind"])
        for kind, n in sorted(snapshot.items()):
            if kind != "dropped":
                fam.add_metric([str(kind)], n)
        out.by_name[fam.name] = (fam, set())
        out.add("busagent_events_dropped_total", "Messages not sent to a stalled subscriber.", (), (),
                float(snapshot.get("dropped", 0)))
    if bus_connected is not None:
        out.add("busagent_bus_connected", "Whether the agent is on the bus (listening, or connected to its broker).",
                (), (), 1.0 if bus_connected else 0.0)
    if hypervisor_connected is not None:
        out.add("busagent_hypervisor_connected", "Whether the agent's libvirt connection is alive.", (), (),
                1.0 if hypervisor_connected else 0.0)
    if sampler is not None:
        _sampler_families(out, sampler, now)
    return out.families()


def _sampler_families(out: _Families, sampler: Any, now: float) -> None:
    c = sampler.counters
    out.add("busagent_samples_total", "Statistics samples taken.", (), (), float(c.ticks))
    out.add("busagent_sample_missed_ticks_total", "Sampler ticks skipped because a sample overran its period.",
            (), (), float(c.missed_ticks))
    out.add("busagent_sample_fallbacks_total", "Samples that read domain statistics domain by domain.", (), (),
            float(c.fallbacks))
    out.add("busagent_sample_interval_seconds", "The sampler's period, in seconds.", (), (), float(sampler.interval))
    for section, n in sorted(_copy(c.failures).items()):
        out.add("busagent_sample_failures_total", "Sampling failures, by section.", ("section",), (section,), float(n))
    for section, n in sorted(_copy(c.timeouts).items()):
        out.add("busagent_sample_timeouts_total", "libvirt calls that missed their deadline, by section.",
                ("section",), (section,), float(n))
    nowait = sampler.nowait
    if nowait is not None:
        out.add("busagent_sample_nowait",
                "Whether bulk domain statistics use VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT.", (), (),
                1.0 if nowait else 0.0)
    sample = sampler.latest
    if sample is None:
        return
    out.add("busagent_sample_duration_seconds", "How long the latest sample took, in seconds.", (), (),
            float(sample.duration))
    out.add("busagent_sample_age_seconds", "Seconds since the latest sample was taken.", (), (),
            max(0.0, now - sample.timestamp))
    out.add("busagent_sample_timestamp_seconds", "When the latest sample was taken (Unix time).", (), (),
            float(sample.timestamp))
    out.add("busagent_sample_stale_domains", "Domains whose statistics in the latest sample are left from before.",
            (), (), float(len(sample.stale)))
    for dom in sample.domains:
        if dom.uuid in sample.stale:
            out.add("busagent_sample_stale_domain_age_seconds",
                    "How old a stale domain's statistics were when the latest sample was taken, in seconds.",
                    DOMAIN_LABELS, (dom.name, dom.uuid), sample.age_of(dom))


class StatsCollector:
    """A prometheus_client collector over the sampler and the agent's counters (never libvirt)."""

    def __init__(self, sampler: Any = None, rpc_stats: Any = None, published: Mapping[str, int] | None = None,
                 bus_connected: Callable[[], bool] | None = None,
                 hypervisor_connected: Callable[[], bool] | None = None) -> None:
        self.sampler = sampler
        self.rpc_stats = rpc_stats
        self.published = published
        self.bus_connected = bus_connected
        self.hypervisor_connected = hypervisor_connected
        self.scrapes = 0
        self.sample_text = SampleText(sampler)  # the sample's families, rendered once per sample

    def describe(self) -> list[Metric]:
        return []  # families vary with the domains: nothing to declare up front

    def collect(self) -> Iterable[Metric]:
        self.scrapes += 1
        hv = self.hypervisor_connected() if self.hypervisor_connected is not None else None
        bus = self.bus_connected() if self.bus_connected is not None else None
        sample = self.sampler.latest if self.sampler is not None else None
        yield up_family(sample, up=hv is not False)
        yield from agent_families(self.rpc_stats, self.published, self.sampler, bus, hv)


class _OneShot:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_families(families: Iterable[Metric]) -> bytes:
    """The text exposition of counter and gauge families, as ``generate_latest`` writes it.

    About five times faster than prometheus_client's general writer, which matters at
    hundreds of thousands of series (5,000 guests); tests check the output is identical.
    """
    out: list[str] = []
    append = out.append
    for metric in families:
        name, mtype = metric.name, metric.type
        if mtype == "counter":
            name += "_total"
        elif mtype not in ("gauge",):
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_OneShot([metric]))
            append(generate_latest(registry).decode())
            continue
        doc = metric.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        append(f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n")
        for sample in metric.samples:
            labels = sample.labels
            if labels:
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
                append(f"{sample.name}{{{text}}} {floatToGoString(sample.value)}\n")
            else:
                append(f"{sample.name} {floatToGoString(sample.value)}\n")
    return "".join(out).encode()


class SampleText:
    """The exposition text of one sample's families, rendered once per sample.

    A Sample never changes, so its (large) part of ``/metrics`` is formatted once and
    served as bytes to every scrape until the next sample replaces it; only the agent's
    own small, live families are formatted per scrape.
    """

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self._lock = threading.Lock()
        self._key: Any = None
        self._text = b""
        self.renders = 0

    def families(self) -> list[Metric]:
        sample = self.sampler.latest if self.sampler is not None else None
        return sample_families(sample) if sample is not None else []

    def __call__(self) -> bytes:
        sample = self.sampler.latest if self.sampler is not None else None
        if sample is None:
            return b""
        with self._lock:
            if sample is not self._key:
                self._text, self._key = render_families(sample_families(sample)), sample
                self.renders += 1
            return self._text


def make_registry(collector: StatsCollector, process: bool = True) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) with the collector."""
    from prometheus_client.gc_collector import GCCollector
    from prometheus_client.platform_collector import PlatformCollector
    from prometheus_client.process_collector import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


class MetricsServer:
    """``/metrics`` over HTTP on a daemon thread; ``port`` is the bound port (useful with port 0).

    The body is the registry's live families followed by ``extra()`` (pre-rendered text)."""

    def __init__(self, listen: str, registry: CollectorRegistry, extra: Callable[[], bytes] | None = None) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = generate_latest(registry) + (extra() if extra is not None else b"")
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                server.scrapes += 1

            def log_message(self, *_args: Any) -> None:  # scrapes are not worth a log line each
                pass

        self.scrapes = 0
        self.httpd = ThreadingHTTPServer((host, int(port)), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)
        self.thread.start()
        self.host = host
        self.port = self.httpd.server_port

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
